"""main.py and linear_evaluation.py through their real command lines on small real images:
every output present and loadable, resume, kill-and-resume equal to an uninterrupted run (also
from a checkpoint of the layout before the engine), Ctrl-C leaves a resumable run, and so does
a SIGKILL while a checkpoint is being written in the background."""
import json
import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST_PRETRAIN, run_script, start_script, wait_for_step
from old_layouts import to_format_1
from utils.model import build_model


def epoch_losses(respath):
    with np.load(os.path.join(respath, "model", "lossesfile.npz")) as f:
        return f["epoch_losses"], f["step_losses"]


def online_probe(respath):
    """(probe weights and optimizer state from checkpoint.pth, its (epoch, accuracy) rows)."""
    ckpt = torch.load(os.path.join(respath, "checkpoint.pth"), weights_only=True)
    with np.load(os.path.join(respath, "model", "lossesfile.npz")) as f:
        return ckpt["extra"]["online_probe"], f["online_probe"]


def assert_same_probe(respath, reference):
    """The online probe of `respath` equals `reference` (online_probe()): weights,
    standardisation statistics, AdamW moments and step count, and the accuracy rows."""
    (state, rows), (expected, expected_rows) = online_probe(respath), reference
    for part in ("linear", "norm"):
        for name, value in expected[part].items():
            torch.testing.assert_close(state[part][name], value, rtol=0, atol=1e-6)
    for key, moments in expected["optimizer"]["state"].items():
        for name, value in moments.items():
            torch.testing.assert_close(state["optimizer"]["state"][key][name], value, rtol=0,
                                       atol=1e-6)
    np.testing.assert_allclose(rows, expected_rows, rtol=0, atol=1e-9)


def test_pretraining_writes_every_output(pretrained):
    """model.pth loads strictly into a freshly built model; optimizer, losses, checkpoint, plot
    and run.json are present and consistent."""
    respath, result = pretrained
    run = json.load(open(os.path.join(respath, "run.json")))
    meta = run["model_meta"]
    assert meta["in_channels"] == 1 and meta["image_size"] == 16 and meta["stem"] == "cifar"
    state = torch.load(os.path.join(respath, "model", "model.pth"), weights_only=True)
    assert not any(k.startswith("module.") for k in state)
    model = build_model(meta["arch"], meta["in_channels"], meta["stem"], meta["proj_dims"])
    model.load_state_dict(state, strict=True)
    opt = torch.load(os.path.join(respath, "model", "optimizer.pth"), weights_only=True)
    assert "state" in opt and "param_groups" in opt
    ckpt = torch.load(os.path.join(respath, "checkpoint.pth"), weights_only=True)
    for key in ("model", "optimizer", "epoch", "step", "history", "args",
                "model_meta", "rng", "extra"):
        assert key in ckpt
    assert ckpt["kind"] == "simclr-toolkit-checkpoint" and ckpt["format_version"] == 2
    assert ckpt["script"] == "main" and ckpt["steps_per_epoch"] == 36 // 12
    np.testing.assert_allclose(ckpt["history"]["series"]["loss"], epoch_losses(respath)[1])
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * (36 // 12)
    epochs, steps = epoch_losses(respath)
    assert epochs.shape == (2,) and steps.shape == (6,)
    np.testing.assert_allclose(epochs, steps.reshape(2, 3).mean(1))
    assert np.all(np.isfinite(steps)) and steps[0] < np.log(2 * 12 - 1) + 0.5
    with Image.open(os.path.join(respath, "plots", "training_losses.png")) as img:
        assert img.size[0] > 300
    for key in ("environment", "images_per_s", "peak_memory_mb", "wall_time_s"):
        assert run[key] is not None
    assert run["environment"]["torch"] == torch.__version__
    assert "epoch 2/2" in result.stdout


def test_linear_evaluation_reports(pretrained, tiny_folder, tmp_path):
    """linear_evaluation.py prints the per-class report and writes CSV, JSON, confusion matrix
    and, with --sweep, accuracy per cut point for every head layer."""
    respath, _ = pretrained
    out = str(tmp_path / "le")
    result = run_script("linear_evaluation.py", tiny_folder,
                        os.path.join(respath, "model", "model.pth"), out, "-bs", "7", "-nw", "0",
                        "--remove_top_layers", "1", "--sweep")
    assert result.returncode == 0, result.stderr
    assert "colour" not in result.stderr
    for name in ("T-shirt_top", "Trouser", "Pullover", "precision", "macro avg"):
        assert name in result.stdout
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["remove_top_layers"] == 1 and report["n_test"] == 18  # no test image dropped
    assert 0 <= report["accuracy"] <= 1
    csv_rows = open(os.path.join(out, "report.csv")).read().splitlines()
    # header, 3 classes, macro and weighted avg, accuracy, balanced accuracy, macro-F1, AUROC
    assert csv_rows[0].startswith("class,precision") and len(csv_rows) == 1 + 3 + 2 + 4
    assert [row.split(",")[0] for row in csv_rows[-4:]] == [
        "accuracy", "balanced_accuracy", "macro_f1", "auroc_ovr"]
    sweep = open(os.path.join(out, "acc_vs_layer.csv")).read().splitlines()
    assert sweep[1].startswith("0,16,") and sweep[3].startswith("2,512,")
    for png in ("confusion_matrix.png", "acc_vs_layer.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
    # a checkpoint.pth works as MODELPATH too, and gives the same h features and accuracy
    out2 = str(tmp_path / "le2")
    result2 = run_script("linear_evaluation.py", tiny_folder,
                         os.path.join(respath, "checkpoint.pth"), out2, "-nw", "0",
                         "--remove_top_layers", "1")
    assert result2.returncode == 0, result2.stderr
    assert json.load(open(os.path.join(out2, "report.json")))["accuracy"] == report["accuracy"]


def test_linear_evaluation_knn_equals_scikit_learn(pretrained, tiny_folder, tmp_path):
    """The kNN accuracy linear_evaluation.py reports beside the probe equals scikit-learn's
    cosine kNN on h computed independently (the model loaded, the test images transformed)."""
    import types

    from conftest import assert_knn_accuracy_matches_sklearn
    from utils.data import ImageDataset, make_loader
    from utils.linear_probe import extract_features
    from utils.model import load_trained_model
    from utils.sources import labelled_train_test
    from utils.transforms import EvalTransform
    model_file = os.path.join(pretrained[0], "model", "model.pth")
    out = tmp_path / "knn"
    result = run_script("linear_evaluation.py", tiny_folder, model_file, out, "-nw", "0",
                        "--knn-k", "5")
    assert result.returncode == 0, result.stderr
    report = json.load(open(out / "report.json"))
    assert report["knn_k"] == 5 and "kNN accuracy (k 5, cosine" in result.stdout
    model, meta = load_trained_model(model_file)
    transform = EvalTransform(meta["image_size"], meta["mean"], meta["std"])
    options = types.SimpleNamespace(datapath=tiny_folder, data_root=None, size=None,
                                    download=False, train_list=None, val_list=None,
                                    test_list=None, samples=None, samples_per_class=None,
                                    label_fraction=None, seed=0, test_fraction=None)
    (train_x, train_y), (test_x, test_y) = [
        extract_features(model.encoder, make_loader(ImageDataset(images, 1, transform),
                                                    batch_size=8), torch.device("cpu"))
        for images in labelled_train_test(options)]
    assert_knn_accuracy_matches_sklearn(report["knn_accuracy"], train_x, train_y, test_x,
                                        test_y, 5)


def test_linear_evaluation_chooses_the_penalty_on_training_images_only(pretrained, tiny_folder,
                                                                      tmp_path):
    """--weight-decay auto (the default) chooses the probe's penalty from the training features
    alone: with half the test images removed the choice and every candidate's held-out score
    are the same; --wd 1e-4 fixes it, and a penalty that is not a number is a one-line error."""
    model_file = os.path.join(pretrained[0], "model", "model.pth")
    fewer = tmp_path / "fewer_test"
    shutil.copytree(tiny_folder, fewer)
    for class_dir in sorted((fewer / "test").iterdir()):
        for image in sorted(class_dir.iterdir())[::2]:
            image.unlink()
    reports = []
    for data in (tiny_folder, fewer):
        out = tmp_path / f"le_{len(reports)}"
        result = run_script("linear_evaluation.py", data, model_file, out, "-nw", "0")
        assert result.returncode == 0, result.stderr
        reports.append(json.load(open(out / "report.json")))
        assert f"weight decay {reports[-1]['weight_decay']:.0e} (chosen:" in result.stdout
    assert reports[0]["n_test"] == 18 and reports[1]["n_test"] == 9
    assert reports[0]["weight_decay"] == reports[1]["weight_decay"]
    assert reports[0]["weight_decay_selection"] == reports[1]["weight_decay_selection"]
    assert len(reports[0]["weight_decay_selection"]) == 11
    out = tmp_path / "fixed"
    result = run_script("linear_evaluation.py", tiny_folder, model_file, out, "-nw", "0",
                        "--wd", "1e-4")
    report = json.load(open(out / "report.json"))
    assert report["weight_decay"] == 1e-4 and report["weight_decay_selection"] == {}
    bad = run_script("linear_evaluation.py", tiny_folder, model_file, tmp_path / "bad",
                     "--wd", "strong")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "error: argument --weight-decay/--wd: 'strong' is neither 'auto' nor a number" \
        in bad.stderr


def test_colour_images_for_a_grayscale_model_warn_once(pretrained, tiny_folder, tmp_path):
    """The grayscale model on a colour copy of its data (R = x, G = 255 - x, B = x / 2): one
    warning line naming the data, and the evaluation runs on the images converted to grey."""
    respath, _ = pretrained
    colour = tmp_path / "colour"
    for root, _, files in os.walk(tiny_folder):
        for name in files:
            x = np.asarray(Image.open(os.path.join(root, name)).convert("L"))
            target = colour / os.path.relpath(os.path.join(root, name), tiny_folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.stack([x, 255 - x, x // 2], axis=-1), mode="RGB").save(target)
    result = run_script("linear_evaluation.py", colour,
                        os.path.join(respath, "model", "model.pth"), tmp_path / "le", "-nw", "0")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "colour images" in line]
    assert len(warnings) == 1 and str(colour) in warnings[0] and "grayscale" in warnings[0]
    assert json.load(open(tmp_path / "le" / "report.json"))["n_test"] == 18


def test_running_again_resumes_and_extends(pretrained, tmp_path):
    """The same command on a finished run says so; a larger --epochs continues from step 6."""
    respath, _ = pretrained
    copy = str(tmp_path / "copy")
    shutil.copytree(respath, copy)
    tiny = json.load(open(os.path.join(copy, "run.json")))["args"]["datapath"]
    again = run_script("main.py", tiny, copy, "--epochs", "2", *FAST_PRETRAIN)
    assert again.returncode == 0 and "already holds a finished run" in again.stdout
    more = run_script("main.py", tiny, copy, "--epochs", "3", *FAST_PRETRAIN)
    assert more.returncode == 0, more.stderr
    assert "resuming" in more.stdout and "epoch 3/3" in more.stdout
    assert "epoch 1/3" not in more.stdout
    epochs, steps = epoch_losses(copy)
    np.testing.assert_array_equal(epochs[:2], epoch_losses(respath)[0])
    assert steps.shape == (9,)


def start_main(datapath, respath, *extra, env=None):
    return start_script("main.py", datapath, respath, *extra, env=env)


def wait_for_main_step(respath, min_steps, proc):
    wait_for_step(os.path.join(respath, "checkpoint.pth"), min_steps, proc)


# --log-every 1: decisions (and so mid-epoch checkpoints) at every step
RESUME_ARGS = ["--epochs", "3", "--checkpoint-minutes", "0.0001", "--log-every", "1",
               *FAST_PRETRAIN, "-nw", "2"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_folder, tmp_path_factory):
    respath = str(tmp_path_factory.mktemp("full"))
    result = run_script("main.py", tiny_folder, respath, *RESUME_ARGS)
    assert result.returncode == 0, result.stderr
    return (*epoch_losses(respath), online_probe(respath))


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tiny_folder, tmp_path,
                                                            uninterrupted):
    """SIGKILL twice at arbitrary moments (mid-epoch, mid-save possible); resuming gives the
    same per-step and per-epoch losses, and the same online probe (weights, optimizer state,
    accuracies), as a run that was never interrupted. A copy of the killed run whose
    checkpoint is rewritten in the layout main.py wrote before the engine (format 1: losses,
    scheduler, data; no probe) resumes to the same losses, with a fresh probe, and is then
    written in the current layout."""
    respath = str(tmp_path / "killed")
    for min_steps in (2, 5):  # steps 2 and 5 are inside epochs 1 and 2 (3 steps per epoch)
        proc = start_main(tiny_folder, respath, *RESUME_ARGS)
        wait_for_main_step(respath, min_steps, proc)
        time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    old = str(tmp_path / "old")  # as the code before the engine left it: format 1, model/
    shutil.copytree(respath, old)
    checkpoint = os.path.join(old, "model", "checkpoint.pth")
    torch.save(to_format_1(torch.load(os.path.join(old, "checkpoint.pth"), weights_only=True)),
               checkpoint)
    os.remove(os.path.join(old, "checkpoint.pth"))
    for resumed in (respath, old):
        final = run_script("main.py", tiny_folder, resumed, *RESUME_ARGS)
        assert final.returncode == 0, final.stderr
        assert "resuming" in final.stdout
        epochs, steps = epoch_losses(resumed)
        np.testing.assert_allclose(steps, uninterrupted[1], rtol=0, atol=1e-5)
        np.testing.assert_allclose(epochs, uninterrupted[0], rtol=0, atol=1e-5)
        if resumed == respath:
            assert_same_probe(resumed, uninterrupted[2])
        else:
            assert "online probe: none in the run resumed, a fresh probe starts" in final.stdout
        leftovers = [f for f in os.listdir(resumed) + os.listdir(os.path.join(resumed, "model"))
                     if ".tmp" in f]
        assert not leftovers
    assert torch.load(checkpoint, weights_only=True)["format_version"] == 2  # kept in model/
    assert not os.path.exists(os.path.join(old, "checkpoint.pth"))


def test_ctrl_c_saves_resumable_checkpoint(tiny_folder, tmp_path, uninterrupted):
    """SIGINT mid-run: exits with 130 and a one-line message, no traceback; the checkpoint it
    leaves resumes to the same losses as the uninterrupted run."""
    respath = str(tmp_path / "interrupted")
    args = [a if a != "0.0001" else "0" for a in RESUME_ARGS]  # epoch-end checkpoints only
    proc = start_main(tiny_folder, respath, *args)
    wait_for_main_step(respath, 3, proc)  # end of epoch 1 saved; now inside epoch 2
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "run the same command to resume" in stderr
    ckpt = torch.load(os.path.join(respath, "checkpoint.pth"), weights_only=True)
    assert 3 <= ckpt["step"] < 9
    final = run_script("main.py", tiny_folder, respath, *args)
    assert final.returncode == 0, final.stderr
    epochs, steps = epoch_losses(respath)
    np.testing.assert_allclose(steps, uninterrupted[1], rtol=0, atol=1e-5)
    assert_same_probe(respath, uninterrupted[2])


# A sitecustomize for one main.py run (PYTHONPATH): the HOLD_WRITE-th write of checkpoint.pth
# writes half its bytes to the temporary file, names its thread in HOLD_MARKER and hangs there.
HOLD_ONE_CHECKPOINT_WRITE = '''
import builtins, os, threading, time
_open, _writes = builtins.open, []

class _Held:
    def __init__(self, f):
        self.f = f
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()
    def write(self, data):
        self.f.write(data[:len(data) // 2])
        self.f.flush()
        with _open(os.environ["HOLD_MARKER"], "w") as marker:
            marker.write(threading.current_thread().name)
        time.sleep(600)
    def __getattr__(self, name):
        return getattr(self.f, name)

def _open_holding_one_write(file, mode="r", *args, **kwargs):
    f = _open(file, mode, *args, **kwargs)
    if isinstance(file, str) and os.path.basename(file) == ".checkpoint.pth.tmp" and "w" in mode:
        _writes.append(file)
        if len(_writes) == int(os.environ["HOLD_WRITE"]):
            return _Held(f)
    return f

builtins.open = _open_holding_one_write
'''


def read_lines_until(proc, prefix, timeout=180):
    """The stdout lines of the running `proc` up to the first that starts with `prefix`; an
    AssertionError if none comes within `timeout` seconds or the process ends first."""
    lines, found = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(prefix):
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(timeout), f"no line {prefix!r} in {timeout} s: {''.join(lines)}"
    return lines


def test_sigkill_during_a_background_write_then_resume(tiny_folder, tmp_path, uninterrupted):
    """The epoch-2 checkpoint write hangs half-written on the writer thread while training goes
    on through epoch 3 (its epoch line is printed); SIGKILL then leaves the epoch-1
    checkpoint.pth intact beside the half-written temporary file, and the same command resumes
    from it to the losses and online probe of the uninterrupted run, leaving no temporary
    file."""
    inject, respath = tmp_path / "inject", tmp_path / "killed"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(HOLD_ONE_CHECKPOINT_WRITE)
    marker = tmp_path / "held"
    args = [a if a != "0.0001" else "0" for a in RESUME_ARGS]  # epoch-end checkpoints only
    proc = start_main(tiny_folder, respath, *args,
                      env={"PYTHONPATH": str(inject), "HOLD_WRITE": "2",
                           "HOLD_MARKER": str(marker)})
    try:
        read_lines_until(proc, "epoch 3/3")
        assert marker.read_text() == "checkpoint-writer"
        assert proc.poll() is None  # the last save waits for the write in flight
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert 0 < (respath / ".checkpoint.pth.tmp").stat().st_size
    assert torch.load(respath / "checkpoint.pth", weights_only=True)["step"] == 3
    final = run_script("main.py", tiny_folder, respath, *args)
    assert final.returncode == 0, final.stderr
    assert "resuming" in final.stdout and "step 3 of 9" in final.stdout
    epochs, steps = epoch_losses(respath)
    np.testing.assert_allclose(steps, uninterrupted[1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(epochs, uninterrupted[0], rtol=0, atol=1e-5)
    assert_same_probe(respath, uninterrupted[2])
    assert not [f for f in os.listdir(respath) + os.listdir(respath / "model") if ".tmp" in f]


def test_outputs_written_in_the_background_equal_the_checkpoint(pretrained):
    """model.pth and optimizer.pth, written by the background writer after checkpoint.pth from
    the same snapshot, equal the checkpoint's model and optimizer state tensor for tensor;
    run.json's per-epoch losses are the means of the checkpoint's step losses; run.json
    records the seconds the training thread spent in its saves, per epoch."""
    respath, _ = pretrained
    folder = os.path.join(respath, "model")
    ckpt = torch.load(os.path.join(respath, "checkpoint.pth"), weights_only=True)
    for name in ("model", "optimizer"):
        saved = torch.load(os.path.join(folder, f"{name}.pth"), weights_only=True)
        flat, expected = torch.utils._pytree.tree_flatten(saved), \
            torch.utils._pytree.tree_flatten(ckpt[name])
        assert flat[1] == expected[1]  # the same structure and keys
        for value, reference in zip(flat[0], expected[0]):
            assert (torch.equal(value, reference) if torch.is_tensor(reference)
                    else value == reference)
    run = json.load(open(os.path.join(respath, "run.json")))
    steps = ckpt["history"]["series"]["loss"].numpy()
    np.testing.assert_allclose(run["epoch_losses"], steps.reshape(2, -1).mean(1), rtol=1e-12)
    waits = run["save_wait_s"]
    assert [epoch for epoch, _ in waits["per_epoch"]] == [1, 2]
    assert all(seconds > 0 for _, seconds in waits["per_epoch"])
    assert waits["total"] == pytest.approx(sum(s for _, s in waits["per_epoch"]), abs=1e-3)


def test_unlabeled_plain_folder_pretrains_rgb(tmp_path, real_images):
    """A plain folder of RGB images (no train/, no classes) pretrains with a 3-channel conv."""
    (data, _) = real_images
    folder = tmp_path / "plain"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, img in enumerate(data["train"][0][:24]):
        tint = rng.uniform(0.3, 1.0, size=3)
        rgb = (img[..., None] * tint).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"img{i:03d}.jpg")
    respath = str(tmp_path / "out")
    result = run_script("main.py", folder, respath, "--epochs", "1", *FAST_PRETRAIN)
    assert result.returncode == 0, result.stderr
    meta = json.load(open(os.path.join(respath, "run.json")))["model_meta"]
    assert meta["in_channels"] == 3 and len(meta["mean"]) == 3
    state = torch.load(os.path.join(respath, "model", "model.pth"), weights_only=True)
    assert state["encoder.conv1.weight"].shape == (64, 3, 3, 3)
