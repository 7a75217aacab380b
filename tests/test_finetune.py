"""finetune.py through its real command line on the tiny folder and the 2-epoch model: a frozen
encoder stays bit-identical to the checkpoint (moco's sanity check), full fine-tuning changes it,
the supervised baseline runs without a model, every reported metric equals scikit-learn's on the
saved predictions, the label budget gives the exact number of images, and runs resume."""
import csv
import json
import os
import signal

import numpy as np
import pytest
import torch
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             roc_auc_score)

from conftest import (assert_one_line_error, copy_of_killed_run, run_in_process, run_script,
                      start_script, step_losses, wait_for_step)

QUICK = ["--epochs", "1", "-bs", "8", "-nw", "0"]


def model_path(pretrained):
    return os.path.join(pretrained[0], "model", "model.pth")


@pytest.fixture(scope="module")
def runs(tiny_folder, pretrained, tmp_path_factory):
    """Four runs: frozen encoder, full fine-tuning (half of each class's labels, MLP head),
    LP-FT (the defaults, half of the images validate), and the baseline without MODELPATH.
    {name: (RESPATH, CompletedProcess)}."""
    out, model = {}, model_path(pretrained)
    for name, models, flags in (
            ("frozen", [model], ["--freeze"]),
            ("lpft", [model], ["--val-fraction", "0.5"]),
            ("full", [model], ["--label-fraction", "0.5", "--head", "mlp"]),
            ("baseline", [], ["--baseline", "--arch", "resnet18", "--image-size", "16"])):
        respath = str(tmp_path_factory.mktemp(name))
        result = run_script("finetune.py", tiny_folder, *models, respath, *QUICK, *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        out[name] = (respath, result)
    return out


def encoder_tensors(state, prefix="encoder."):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def test_frozen_encoder_is_bit_identical_and_full_finetuning_changes_it(runs, pretrained):
    pretrained_encoder = encoder_tensors(torch.load(model_path(pretrained), weights_only=True))
    for name, should_change in (("frozen", False), ("full", True)):
        ckpt = torch.load(os.path.join(runs[name][0], "checkpoint.pth"), weights_only=True)
        tuned = encoder_tensors(ckpt["model"])
        assert tuned.keys() == pretrained_encoder.keys()
        changed = [k for k in tuned if not torch.equal(tuned[k], pretrained_encoder[k])]
        if should_change:  # every weight and, since the 2-epoch model's BatchNorm statistics
            # have had only a few updates (--encoder-bn auto: train), every statistic moves
            report = json.load(open(os.path.join(runs[name][0], "report.json")))
            assert report["encoder_bn"] == "train" and "updated them only" in runs[name][1].stdout
            assert sorted(changed) == sorted(tuned)
        else:  # every weight and every BatchNorm buffer
            assert changed == []
        assert ckpt["script"] == "finetune" and ckpt["step"] > 0


@pytest.mark.parametrize("name", ["frozen", "full", "baseline"])
def test_every_metric_equals_scikit_learn_on_saved_predictions(runs, name):
    respath = runs[name][0]
    report = json.load(open(os.path.join(respath, "report.json")))
    with open(os.path.join(respath, "predictions.csv")) as f:
        rows = list(csv.DictReader(f))
    classes = [key[2:] for key in rows[0] if key.startswith("p_")]
    y = np.array([int(r["label"]) for r in rows])
    pred = np.array([int(r["prediction"]) for r in rows])
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    assert len(rows) == 18 and len(classes) == 3
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs.argmax(1) == pred).all()
    assert report["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert report["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert report["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro",
                                                        zero_division=0))
    assert report["auroc_ovr"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"),
                                                abs=1e-5)
    with open(os.path.join(respath, "confusion_matrix.csv")) as f:
        matrix = [[int(v) for v in row[1:]] for row in list(csv.reader(f))[1:]]
    assert (np.array(matrix) == confusion_matrix(y, pred)).all()
    for output in ("report.csv", "confusion_matrix.png", "training_curves.png", "best.pth"):
        assert os.path.getsize(os.path.join(respath, output)) > 0
    assert report["method"] == {"frozen": "frozen", "full": "finetune",
                                "baseline": "baseline"}[name]


def test_validation_and_label_budget_sizes_are_exact(runs):
    # --label-fraction 0.5 of 12 per class keeps round(6) = 6 (as linear evaluation does);
    # validation: round(0.1 * 6) = 1 of each class's 6 other images
    full = json.load(open(os.path.join(runs["full"][0], "report.json")))
    assert (full["n_train"], full["n_val"], full["n_test"]) == (18, 3, 18)
    assert full["train_per_class"] == [6, 6, 6]
    # no budget: round(0.1 * 12) = 1 per class moves to validation, 11 stay
    frozen = json.load(open(os.path.join(runs["frozen"][0], "report.json")))
    assert (frozen["n_train"], frozen["train_per_class"]) == (33, [11, 11, 11])


def test_budget_picks_the_images_linear_evaluation_uses(tiny_folder, pretrained, tmp_path):
    import finetune
    import linear_evaluation
    from utils.sources import labelled_train_test
    for seed in (0, 3):
        argv = [tiny_folder, model_path(pretrained), str(tmp_path / "out"),
                "--samples-per-class", "4", "--seed", str(seed)]
        train, val, _ = finetune.finetune_splits(finetune.get_args_parser().parse_args(argv))
        probe_train, _ = labelled_train_test(
            linear_evaluation.get_args_parser().parse_args(argv))
        assert train.paths == probe_train.paths and len(train) == 12
        assert not set(val.paths) & set(train.paths) and len(val) == 3


def test_resume_continues_to_more_epochs(runs, tiny_folder):
    respath, first = runs["baseline"]
    result = run_script("finetune.py", tiny_folder, respath, "--baseline", "--arch", "resnet18",
                        "--image-size", "16", "--epochs", "2", "-bs", "8", "-nw", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout and "epoch 2/2" in result.stdout
    assert "epoch 1/2" not in result.stdout
    ckpt = torch.load(os.path.join(respath, "checkpoint.pth"), weights_only=True)
    assert ckpt["epoch"] == 2 and [e["epoch"] for e in ckpt["history"]["evaluations"]] == [1, 2]
    assert ckpt["best"]["epoch"] in (1, 2) and "val_accuracy" in ckpt["best"]
    changed = run_in_process("finetune.py", tiny_folder, respath, "--baseline", "--arch",
                             "resnet18", "--image-size", "16", "--epochs", "2", "-bs", "4",
                             "-nw", "0")
    assert_one_line_error(changed, "--batch-size 8", "--fresh")


def test_missing_model_is_one_line_error(tiny_folder, tmp_path):
    assert_one_line_error(run_script("finetune.py", tiny_folder, str(tmp_path / "out")),
                          "MODELPATH", "--baseline")


# Full fine-tuning with augmentation in 2 worker processes; a decision (and so a mid-epoch
# checkpoint) at every step: 4 steps per epoch, 8 in all.
KILLED_RUN = ["--epochs", "2", "-bs", "8", "-nw", "2", "--log-every", "1",
              "--checkpoint-minutes", "0.0001"]


@pytest.fixture(scope="module")
def uninterrupted_and_killed(tiny_folder, pretrained, tmp_path_factory):
    """The per-step losses of an uninterrupted run, and the RESPATH of the same run SIGKILLed
    inside epoch 2 (its checkpoint holds at least 5 steps)."""
    model = model_path(pretrained)
    full = str(tmp_path_factory.mktemp("full"))
    result = run_script("finetune.py", tiny_folder, model, full, *KILLED_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    killed = str(tmp_path_factory.mktemp("killed"))
    proc = start_script("finetune.py", tiny_folder, model, killed, *KILLED_RUN)
    wait_for_step(os.path.join(killed, "checkpoint.pth"), 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return step_losses(os.path.join(full, "checkpoint.pth")), killed


@pytest.mark.parametrize("layout", ["current", "before the engine"])
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(uninterrupted_and_killed, layout,
                                                            tiny_folder, pretrained, tmp_path):
    """The killed run resumed with the same command gives the uninterrupted per-step losses;
    so does its checkpoint rewritten in the layout finetune.py wrote before the engine."""
    reference, killed = uninterrupted_and_killed
    respath, checkpoint = copy_of_killed_run(killed, tmp_path, layout, range(5, 8))
    result = run_script("finetune.py", tiny_folder, model_path(pretrained), respath, *KILLED_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout
    np.testing.assert_allclose(step_losses(checkpoint), reference, rtol=0, atol=1e-5)
    ckpt = torch.load(checkpoint, weights_only=True)
    # epoch 0: the probe head before fine-tuning (LP-FT), validated once, not again on resume;
    # the old layout had no place for it
    validated = [0, 1, 2] if layout == "current" else [1, 2]
    assert ckpt["format_version"] == 2 and [e["epoch"] for e in ckpt["history"]["evaluations"]] \
        == validated


def test_batchnorm_mode_keeps_only_converged_statistics():
    from utils.transfer import MIN_STATISTICS_UPDATES, batchnorm_mode
    state = {"encoder.bn1.num_batches_tracked": torch.tensor(MIN_STATISTICS_UPDATES - 1),
             "encoder.layer1.0.bn1.num_batches_tracked": torch.tensor(500)}
    assert batchnorm_mode("auto", state)[0] == "train"  # the least-updated layer decides
    state["encoder.bn1.num_batches_tracked"] = torch.tensor(MIN_STATISTICS_UPDATES)
    assert batchnorm_mode("auto", state)[0] == "frozen"
    assert batchnorm_mode("auto", {"bn1.num_batches_tracked": torch.tensor(0)})[0] == "frozen"
    assert batchnorm_mode("auto", None)[0] == "train"  # --baseline
    assert batchnorm_mode("train", state)[0] == "train"


def test_frozen_statistics_train_the_weights_and_keep_the_running_averages():
    """--encoder-bn frozen: a training step moves the encoder's weights and BatchNorm affine
    parameters; its running mean, variance and count stay those of pretraining, and its
    forward pass in training mode equals the eval-mode one (the statistics normalise)."""
    import argparse

    from finetune import Classifier, FinetuneTask
    from utils.model import build_encoder
    torch.manual_seed(0)
    encoder, dim = build_encoder("resnet18", 1, "cifar")
    for layer in encoder.modules():  # statistics as pretraining would leave them
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.1, 0.1)
            layer.running_var.uniform_(0.5, 2.0)
    model = Classifier(encoder, torch.nn.Linear(dim, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = FinetuneTask(argparse.Namespace(freeze=False), "frozen", None, torch.device("cpu"))
    task.train_mode(model)
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 0])
    train_logits = model(x)
    torch.nn.functional.cross_entropy(train_logits, y).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    after = model.state_dict()
    statistics = [k for k in after if k.endswith(("running_mean", "running_var",
                                                  "num_batches_tracked"))]
    assert statistics and all(torch.equal(after[k], before[k]) for k in statistics)
    moved = [k for k in after if k not in statistics and not torch.equal(after[k], before[k])]
    assert sorted(moved) == sorted(set(after) - set(statistics))
    model.load_state_dict(before)
    model.eval()
    torch.testing.assert_close(train_logits.detach(), model(x), rtol=0, atol=1e-5)


def test_lpft_starts_at_the_probes_validation_accuracy(runs, tiny_folder, pretrained):
    """Epoch 0 of LP-FT (validated before any step) scores what the probe fitted independently
    on the frozen features of the same labelled images (its penalty chosen on them, as
    linear_evaluation.py does) scores on the same validation images."""
    import finetune
    from utils.data import ImageDataset, make_loader
    from utils.linear_probe import extract_features, fit_probe
    from utils.model import load_trained_model
    from utils.transforms import EvalTransform
    respath, result = runs["lpft"]
    args = finetune.get_args_parser().parse_args(
        [tiny_folder, model_path(pretrained), respath, "--val-fraction", "0.5"])
    train, val, _ = finetune.finetune_splits(args)
    model, meta = load_trained_model(model_path(pretrained))
    transform = EvalTransform(meta["image_size"], meta["mean"], meta["std"])
    (train_x, train_y), (val_x, val_y) = [
        extract_features(model.encoder, make_loader(ImageDataset(images, 1, transform),
                                                    batch_size=8), torch.device("cpu"))
        for images in (train, val)]
    probe = fit_probe(train_x, train_y, 3, seed=0)
    expected = (probe.predict(val_x) == val_y).double().mean().item()
    ckpt = torch.load(os.path.join(respath, "checkpoint.pth"), weights_only=True)
    first = ckpt["history"]["evaluations"][0]
    assert len(val) == 18 and first["epoch"] == 0
    assert first["val_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert "head: the linear probe on the frozen features of the 18 labelled" in result.stdout
    report = json.load(open(os.path.join(respath, "report.json")))
    assert report["head_init"] == "probe" and report["start_val_accuracy"] == first["val_accuracy"]
    assert report["val_accuracy"] >= first["val_accuracy"]  # epoch 0 can be the one kept


def test_encoder_learning_rate_ratio_reaches_the_optimizer(runs, pretrained):
    """The optimizer's groups hold every encoder parameter at 0.1 times the head's rate (the
    default --encoder-lr-ratio), the head's at the schedule's own rate."""
    respath, _ = runs["lpft"]
    ckpt = torch.load(os.path.join(respath, "checkpoint.pth"), weights_only=True)
    groups = ckpt["optimizer"]["param_groups"]
    encoder = [g for g in groups if g.get("lr_scale") == 0.1]
    rest = [g for g in groups if "lr_scale" not in g]
    n_encoder = sum(1 for k in ckpt["model"] if k.startswith("encoder.") and
                    not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert sum(len(g["params"]) for g in encoder) == n_encoder
    assert sum(len(g["params"]) for g in rest) == 2  # the head's weight and bias
    head_lr = {g["lr"] for g in rest if g["params"]}
    assert len(head_lr) == 1 and head_lr.pop() > 0
    for group in encoder:
        assert group["lr"] == pytest.approx(0.1 * rest[0]["lr"], rel=1e-12)


def test_from_head_layer_keeps_the_first_layers_of_the_projection_head(pretrained):
    """--from-head-layer 1 (SimCLRv2): the fine-tuned encoder computes what the pretrained
    model's head computes after its first Linear-BN-ReLU (linear_evaluation.py
    --remove_top_layers 1, computed another way), and a head without that many layers is a
    one-line error naming the flag."""
    from utils.errors import UserError
    from utils.model import load_trained_model, truncate_head
    from utils.transfer import encoder_with_head_layers
    model, meta = load_trained_model(model_path(pretrained))
    state = torch.load(model_path(pretrained), weights_only=True)
    encoder, dim = encoder_with_head_layers(meta, state, 1)
    assert dim == meta["proj_dims"][0]
    x = torch.randn(3, meta["in_channels"], meta["image_size"], meta["image_size"])
    with torch.no_grad():
        expected = truncate_head(model.head, 1)(model.encoder(x))
        torch.testing.assert_close(encoder.eval()(x), expected, rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="--from-head-layer 2"):
        encoder_with_head_layers(meta, state, 2)
