"""The online linear probe of main.py (utils/online_probe.py): it never changes the SimCLR
gradients, it is printed, recorded and plotted every epoch on labelled data, it is off (one
line) on unlabelled data and with --no-online-probe, and the validation images carved out of
train never train it (ignore index), with the CPU workers, --gpu-aug and --gpu-decode.
Exact resume of the probe: tests/test_end_to_end.py (the kill-and-resume runs)."""
import copy
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import FAST_PRETRAIN, run_in_process, run_script
from simclr import SimCLRTask
from utils.model import build_model
from utils.ntxent import NTXentLoss
from utils.online_probe import IGNORE_INDEX, OnlineProbe, probe_labels
from utils.precision import FLOAT32


def simclr_step(model, x, y=None, chunk_size=None):
    """One SimCLRTask step (forward and backward, no optimizer) on a copy of `model`, with the
    online probe when labels `y` are given: (the copy, the task)."""
    model = copy.deepcopy(model)
    probe = None if y is None else OnlineProbe(512, 3, torch.device("cpu"), seed=0)
    task = SimCLRTask(NTXentLoss(0.2), lambda batch, step: batch, chunk_size, probe=probe)
    trainer = SimpleNamespace(model=model, precision=FLOAT32,
                              settings=SimpleNamespace(channels_last=False))
    task.step(trainer, x if y is None else (x, y), 0)
    return model, task


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_probe_leaves_the_simclr_gradients_unchanged(chunk_size):
    """From the same state and views, the encoder's and head's gradients (and BatchNorm
    statistics) are bitwise those of the step without the probe; the probe itself learned."""
    torch.manual_seed(0)
    model = build_model("resnet18", 1, "cifar", [32, 16]).train()
    x = torch.randn(2 * 6, 1, 16, 16)
    y = torch.tensor([0, 1, 2, 0, IGNORE_INDEX, 1])
    plain, _ = simclr_step(model, x, chunk_size=chunk_size)
    probed, task = simclr_step(model, x, y, chunk_size)
    for (name, p), (_, q) in zip(plain.named_parameters(), probed.named_parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, a), (_, b) in zip(plain.named_buffers(), probed.named_buffers()):
        assert torch.equal(a, b), name
    fresh = OnlineProbe(512, 3, torch.device("cpu"), seed=0)
    assert not torch.equal(task.probe.linear.weight, fresh.linear.weight)
    assert task.probe.optimizer.state[task.probe.linear.weight]["step"] == 1


def test_probe_step_is_the_mean_over_labelled_rows_and_survives_an_empty_batch():
    """The gradient averaged by OnlineProbe.step equals that of the mean cross-entropy over
    the labelled rows of the batch standardised by BatchNorm1d without affine parameters; its
    running statistics and its evaluation-mode output are BatchNorm1d's too. A batch with no
    labelled row, or non-finite h, keeps the weights and the statistics finite."""
    g = torch.Generator().manual_seed(1)
    h = 3 + 2 * torch.randn(8, 5, generator=g)
    y = torch.tensor([0, 1, IGNORE_INDEX, 2, 2, IGNORE_INDEX, 0, 1])
    probe = OnlineProbe(5, 3, torch.device("cpu"), seed=3)
    reference, norm = copy.deepcopy(probe.linear), torch.nn.BatchNorm1d(5, affine=False)
    torch.nn.functional.cross_entropy(reference(norm(h)), y,
                                      ignore_index=IGNORE_INDEX).backward()
    probe.optimizer.step = lambda: None  # look at the gradient the step hands to AdamW
    probe.step(h, y)
    torch.testing.assert_close(probe.linear.weight.grad, reference.weight.grad, rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(probe.norm.mean, norm.running_mean)
    torch.testing.assert_close(probe.norm.var, norm.running_var)
    torch.testing.assert_close(probe.norm(h), norm.eval()(h))
    probe = OnlineProbe(5, 3, torch.device("cpu"), seed=3)
    probe.step(h, torch.full((8,), IGNORE_INDEX))
    probe.step(torch.full((8, 5), float("inf")), y)
    assert torch.isfinite(probe.linear.weight).all() and torch.isfinite(probe.linear.bias).all()
    assert torch.isfinite(probe.norm.mean).all() and torch.isfinite(probe.norm.var).all()


def test_probe_saved_before_the_standardisation_is_not_loaded(capsys):
    """A run resumed with a probe fitted on raw h (no "norm" in its state) starts a fresh
    probe, said in one line, instead of reading raw-h weights as standardised-h ones."""
    probe = OnlineProbe(5, 3, torch.device("cpu"), seed=3)
    task = SimCLRTask(NTXentLoss(0.2), None, probe=probe)
    old = probe.state_dict()
    old["linear"] = {k: v + 1 for k, v in old["linear"].items()}
    del old["norm"]
    task.load_extra_state({"online_probe": old})
    assert "fitted on raw h (before the standardisation), a fresh probe starts" in \
        capsys.readouterr().out
    fresh = OnlineProbe(5, 3, torch.device("cpu"), seed=3)
    assert torch.equal(probe.linear.weight, fresh.linear.weight)


def test_building_the_probe_leaves_the_global_random_state():
    state = torch.get_rng_state()
    OnlineProbe(512, 10, torch.device("cpu"), seed=0)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.fixture(scope="module")
def probe_run(tiny_folder, tmp_path_factory):
    """2 epochs with --knn-every 2: the probe every epoch, kNN only after epoch 2."""
    respath = tmp_path_factory.mktemp("probe")
    result = run_script("main.py", tiny_folder, respath, "--epochs", "2", *FAST_PRETRAIN,
                        "--knn-every", "2", "--knn-k", "5")
    assert result.returncode == 0, result.stderr
    return respath, result


def test_probe_accuracy_printed_recorded_and_plotted_every_epoch(probe_run):
    respath, result = probe_run
    split = "the validation images (0.1 of each class of train, seed 0)"
    for epoch in (1, 2):
        assert f"epoch {epoch}: online probe accuracy of h on {split}" in result.stdout
    assert "epoch 1: kNN" not in result.stdout and "epoch 2: kNN" in result.stdout
    assert result.stdout.count("online probe: linear on the detached, standardised h of view 1") \
        == 1
    with np.load(respath / "model" / "lossesfile.npz") as f:
        rows, knn = f["online_probe"], f["knn"]
    assert rows.shape == (2, 2) and rows[:, 0].tolist() == [1, 2] and knn[:, 0].tolist() == [2]
    assert np.all((0 <= rows[:, 1]) & (rows[:, 1] <= 1))
    np.testing.assert_allclose(json.load(open(respath / "run.json"))["online_probe_accuracy"],
                               rows)
    ckpt = torch.load(respath / "checkpoint.pth", weights_only=True)
    assert set(ckpt["extra"]) == {"data", "aug_presets", "online_probe"}  # merged, not replaced
    assert ckpt["extra"]["online_probe"]["linear"]["weight"].shape == (3, 512)
    state = torch.load(respath / "model" / "model.pth", weights_only=True)
    build_model("resnet18", 1, "cifar", [32, 16]).load_state_dict(state, strict=True)
    assert os.path.getsize(respath / "plots" / "training_losses.png") > 0
    from utils.checkpoint import read_losses_file
    assert read_losses_file(respath / "model" / "lossesfile.npz")["online_probe"] == \
        [tuple(r) for r in rows.tolist()]


def test_last_accuracy_is_the_saved_probe_on_the_saved_encoder(probe_run, tiny_folder):
    """Recomputed here: the checkpoint's probe on h of the final model.pth over the carved-out
    validation images (no augmentation)."""
    from utils.checkpoint import load_pretrained
    from utils.data import ImageDataset, make_loader
    from utils.file_index import find_split
    from utils.linear_probe import extract_features
    from utils.sources import split_off_validation
    from utils.transforms import EvalTransform
    respath, _ = probe_run
    state, meta = load_pretrained(str(respath / "model" / "model.pth"))
    model = build_model(meta["arch"], meta["in_channels"], meta["stem"], meta["proj_dims"])
    model.load_state_dict(state, strict=True)
    _, queries = split_off_validation(find_split(tiny_folder, "train", True), 0.1, 0)
    transform = EvalTransform(meta["image_size"], meta["mean"], meta["std"])
    h, y = extract_features(model.encoder, make_loader(ImageDataset(queries, 1, transform),
                                                       batch_size=12), "cpu")
    ckpt = torch.load(respath / "checkpoint.pth", weights_only=True)
    probe = OnlineProbe(512, 3, torch.device("cpu"))
    probe.load_state_dict(ckpt["extra"]["online_probe"])
    accuracy = json.load(open(respath / "run.json"))["online_probe_accuracy"][-1][1]
    assert probe.accuracy(h, y) == pytest.approx(accuracy)


def test_unlabelled_folder_says_off_once_and_trains(tiny_folder, tmp_path):
    plain = os.path.join(tiny_folder, "train", sorted(os.listdir(
        os.path.join(tiny_folder, "train")))[0])
    result = run_script("main.py", plain, tmp_path / "r", "--epochs", "1", *FAST_PRETRAIN,
                        "-bs", "6")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("online probe: off (the training images have no labels)") == 1
    assert "online probe accuracy" not in result.stdout and "epoch 1/1" in result.stdout
    with np.load(tmp_path / "r" / "model" / "lossesfile.npz") as f:
        assert f["online_probe"].shape == (0, 2)


def test_no_online_probe_turns_it_off(tiny_folder, tmp_path):
    result = run_script("main.py", tiny_folder, tmp_path / "r", "--epochs", "1",
                        *FAST_PRETRAIN, "--no-online-probe")
    assert result.returncode == 0, result.stderr
    assert "online probe" not in result.stdout
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pth", weights_only=True)
    assert "online_probe" not in ckpt["extra"] and ckpt["history"]["evaluations"] == []
    assert json.load(open(tmp_path / "r" / "run.json"))["online_probe_accuracy"] == []


@pytest.mark.parametrize("path", ["", "--gpu-aug", "--gpu-decode"])
def test_carved_out_validation_images_never_train_the_probe(tiny_folder, tmp_path,
                                                            monkeypatch, path):
    """The labels every probe step sees are exactly those of the step's images (the sampler's
    order), with IGNORE_INDEX on the --val-fraction queries carved out of train."""
    from utils.data import EpochBatchSampler
    from utils.file_index import find_split
    from utils.sources import validation_indices
    seen = []
    step = OnlineProbe.step
    monkeypatch.setattr(OnlineProbe, "step",
                        lambda self, h, y: seen.append(y.clone()) or step(self, h, y))
    result = run_in_process("main.py", tiny_folder, tmp_path / "r", "--epochs", "1",
                            *FAST_PRETRAIN, "--val-fraction", "0.25",
                            *([path] if path else []))
    assert result.returncode == 0, result.stderr
    images = find_split(tiny_folder, "train", True)
    _, held_out = validation_indices(images, 0.25, 0)
    labels = probe_labels(images, held_out)
    assert (labels == IGNORE_INDEX).sum() == len(held_out) == 9
    sampler = EpochBatchSampler(len(images), 12, 0)
    expected = [labels[[i for i, _ in keys]] for keys in sampler]
    assert len(seen) == len(expected) == 3
    for got, want in zip(seen, expected):
        assert torch.equal(got.cpu(), want)
    assert sum(int((y == IGNORE_INDEX).sum()) for y in seen) > 0


def probe_steps_on_rank(rank, world_size, port, h, y, folder):
    """mp.spawn target: 3 probe steps on this rank's rows of each global batch (gloo)."""
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        probe = OnlineProbe(5, 3, torch.device("cpu"), seed=3)
        b = h.shape[1] // world_size
        for hs, ys in zip(h, y):
            probe.step(hs[rank * b:(rank + 1) * b], ys[rank * b:(rank + 1) * b])
        torch.save({**probe.linear.state_dict(), **probe.norm.state_dict()},
                   os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_hold_the_same_probe_as_one(tmp_path):
    """2 gloo processes, each stepping on its half of every global batch (one half without a
    labelled row), end with bitwise the same probe (weights and standardisation statistics),
    equal to one process on the whole batch."""
    from test_distributed import free_port
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 8, 5, generator=g)
    y = torch.randint(0, 3, (3, 8), generator=g)
    y[1, :4] = IGNORE_INDEX  # rank 0 has no labelled row in step 2
    torch.multiprocessing.spawn(probe_steps_on_rank, args=(2, free_port(), h, y, str(tmp_path)),
                                nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    single = OnlineProbe(5, 3, torch.device("cpu"), seed=3)
    for hs, ys in zip(h, y):
        single.step(hs, ys)
    for name, value in {**single.linear.state_dict(), **single.norm.state_dict()}.items():
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], value, rtol=0, atol=1e-6)
