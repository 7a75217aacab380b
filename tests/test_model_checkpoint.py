"""SimCLR model shapes and stems against plain torchvision ResNets, projection-head truncation
against a hand-written forward pass, and checkpoint I/O (atomic writes, RNG state, pretrained
loading with DataParallel prefixes and sibling metadata)."""
import os
import random

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from utils.checkpoint import (load_checkpoint, load_pretrained, rng_state, save_checkpoint,
                              set_rng_state, strip_prefixes, training_device_cuda_state,
                              unwrap_model)
from utils.errors import UserError
from utils.fileio import atomic_torch_save
from utils.model import build_model, build_projection_head, load_state_strict, truncate_head

FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


# --- model ----------------------------------------------------------------------------------

@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("stem,side", [("cifar", 32), ("imagenet", 64)])
@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_build_model_shapes_and_stem(arch, stem, side, in_channels):
    """h has the ResNet feature width, z has proj_dims[-1]; the encoder is torchvision's
    ResNet with the same parameter shapes except conv1, whose input channels follow
    in_channels and which is 3x3 stride 1 with an Identity max-pool for the cifar stem, and
    7x7 stride 2 with the usual max-pool for the imagenet stem.
    resnet18 runs a real forward pass; resnet34/50 run it on the meta device (shapes only),
    which keeps the test fast on a small CPU."""
    torch.manual_seed(0)
    device = "cpu" if arch == "resnet18" else "meta"
    with torch.device(device):
        model = build_model(arch, in_channels, stem, [32, 16]).eval()
        with torch.no_grad():
            h, z = model(torch.randn(2, in_channels, side, side))
    with torch.device("meta"):  # the reference is only inspected, never run
        plain = getattr(torchvision.models, arch)(weights=None)
    assert h.shape == (2, FEATURES[arch]) and z.shape == (2, 16)
    if device == "cpu":
        assert torch.isfinite(h).all() and torch.isfinite(z).all()

    ours = dict(model.encoder.named_parameters())
    theirs = {k: v for k, v in plain.named_parameters() if not k.startswith("fc.")}
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        if key != "conv1.weight":
            assert ours[key].shape == value.shape, key
    assert ({type(m) for m in model.encoder.modules()} - {type(m) for m in plain.modules()}
            == {nn.Identity})  # only Identity (fc, and maxpool for cifar) is new
    conv1 = model.encoder.conv1
    assert conv1.in_channels == in_channels and conv1.out_channels == 64
    assert ours["conv1.weight"].shape[0] == 64 and ours["conv1.weight"].shape[1] == in_channels
    if stem == "cifar":
        assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)
        assert isinstance(model.encoder.maxpool, nn.Identity)
    else:
        assert conv1.kernel_size == plain.conv1.kernel_size == (7, 7)
        assert conv1.stride == plain.conv1.stride == (2, 2)
        assert isinstance(model.encoder.maxpool, nn.MaxPool2d)
        assert model.encoder.maxpool.kernel_size == plain.maxpool.kernel_size
        assert model.encoder.maxpool.stride == plain.maxpool.stride
    assert isinstance(model.encoder.fc, nn.Identity)


@pytest.mark.parametrize("stem", ["cifar", "half", "imagenet"])
def test_encoder_equals_modified_torchvision_resnet(stem):
    """The encoder computes exactly what a torchvision resnet18 computes after swapping in the
    same first conv (and, for cifar and half, removing the max-pool) and dropping fc."""
    torch.manual_seed(1)
    model = build_model("resnet18", 1, stem, [32, 16]).eval()
    plain = torchvision.models.resnet18(weights=None)
    if stem in ("cifar", "half"):
        plain.conv1 = nn.Conv2d(1, 64, 3, 1 if stem == "cifar" else 2, 1, bias=False)
        plain.maxpool = nn.Identity()
    else:
        plain.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    plain.fc = nn.Identity()
    plain.load_state_dict(model.encoder.state_dict(), strict=True)
    plain.eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], plain(x))
    layer1 = model.encoder.maxpool(model.encoder.relu(model.encoder.bn1(model.encoder.conv1(x))))
    assert layer1.shape[-1] == {"cifar": 16, "half": 8, "imagenet": 4}[stem]


@pytest.fixture
def head():
    """Projection head 512 -> 512 -> 128 with non-trivial BatchNorm statistics, eval mode."""
    torch.manual_seed(2)
    head = build_projection_head(512, [512, 128])
    bn = head[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(512))
        bn.running_var.copy_(torch.rand(512) + 0.5)
        bn.weight.copy_(torch.randn(512))
        bn.bias.copy_(torch.randn(512))
    return head.eval()


def test_head_structure(head):
    """The head is Linear, BatchNorm1d, ReLU, Linear with widths 512 -> 512 -> 128."""
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head[0].in_features == 512 and head[0].out_features == 512
    assert head[3].out_features == 128


def test_truncate_head(head):
    """0 layers removed gives the head's output z, 2 gives the input h unchanged, 1 gives
    relu(bn(W1 h)) computed by hand from the head's parameters and running statistics."""
    h = torch.randn(6, 512)
    with torch.no_grad():
        expected_z = head(h.clone())
        assert torch.equal(truncate_head(head, 0)(h.clone()), expected_z)
        assert torch.equal(truncate_head(head, 2)(h.clone()), h)
        linear, bn = head[0], head[1]
        pre = h @ linear.weight.T
        normed = (pre - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
        expected = torch.clamp(normed * bn.weight + bn.bias, min=0)
        got = truncate_head(head, 1).eval()(h.clone())
    assert got.shape == (6, 512)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got == 0).any() and (got > 0).any()


@pytest.mark.parametrize("bad", [-1, 3, 10])
def test_truncate_head_out_of_range(head, bad):
    """Removing a negative number of layers or more than the head has raises UserError."""
    with pytest.raises(UserError):
        truncate_head(head, bad)


def test_load_state_strict_mismatch():
    """A resnet34 state dict loaded into a resnet18 model raises UserError naming the source."""
    small = build_model("resnet18", 1, "cifar", [16, 8])
    other = build_model("resnet34", 1, "cifar", [16, 8])
    with pytest.raises(UserError, match="my_weights.pth"):
        load_state_strict(small, other.state_dict(), "my_weights.pth")


# --- checkpoint I/O -------------------------------------------------------------------------

def test_atomic_torch_save_no_temp_files(tmp_path):
    """atomic_torch_save leaves only the target file and it loads with weights_only=True."""
    obj = {"w": torch.arange(6.0).reshape(2, 3), "n": 3, "s": "x", "l": [1, 2.5]}
    path = tmp_path / "out.pth"
    atomic_torch_save(obj, str(path))
    atomic_torch_save(obj, str(path))  # overwrite too
    assert os.listdir(tmp_path) == ["out.pth"]
    loaded = torch.load(str(path), weights_only=True)
    assert torch.equal(loaded["w"], obj["w"])
    assert loaded["n"] == 3 and loaded["s"] == "x" and loaded["l"] == [1, 2.5]


def test_half_written_file_from_a_killed_save_is_consumed(tmp_path):
    """A temporary file left by a process killed mid-write does not hide the previous file and
    is replaced by the next save, so kills do not pile up garbage."""
    path = tmp_path / "model.pth"
    atomic_torch_save({"v": torch.ones(2)}, str(path))
    (tmp_path / ".model.pth.tmp").write_bytes(b"half a zip file")  # what a SIGKILL leaves
    assert torch.equal(torch.load(str(path), weights_only=True)["v"], torch.ones(2))
    atomic_torch_save({"v": torch.zeros(2)}, str(path))
    assert os.listdir(tmp_path) == ["model.pth"]
    assert torch.equal(torch.load(str(path), weights_only=True)["v"], torch.zeros(2))


def _draws():
    """A few draws from the python, numpy and torch global generators (gaussians included,
    which have cached second values)."""
    return ([random.random(), random.gauss(0, 1), random.gauss(0, 1)],
            np.random.standard_normal(3).tolist() + np.random.rand(2).tolist(),
            torch.rand(4).tolist() + torch.randn(3).tolist())


def test_set_rng_state_restores_sequences():
    """set_rng_state(rng_state()) replays python random, numpy and torch sequences exactly,
    including cached gaussians in the middle of a pair."""
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leave a cached gaussian
    np.random.standard_normal()  # numpy caches the second gaussian too
    state = rng_state()
    first = _draws()
    _draws()
    set_rng_state(state)
    assert _draws() == first


def test_checkpoint_roundtrip_with_rng_state(tmp_path):
    """save_checkpoint/load_checkpoint keep tensors, numbers and the RNG state (weights_only
    loading); restoring the loaded RNG state replays the same random sequences."""
    random.seed(4)
    np.random.seed(5)
    torch.manual_seed(6)
    random.gauss(0, 1)
    model = nn.Linear(3, 2)
    state = {"epoch": 7, "model": model.state_dict(), "rng": rng_state(), "losses": [0.5, 0.25]}
    first = _draws()
    path = str(tmp_path / "checkpoint.pth")
    save_checkpoint(state, path)
    torch.load(path, weights_only=True)  # plain weights_only load works
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 7 and ckpt["losses"] == [0.5, 0.25]
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt["model"][key], value)
    _draws()
    set_rng_state(ckpt["rng"])
    assert _draws() == first


def test_load_checkpoint_random_bytes(tmp_path):
    """A file of random bytes is reported as UserError, not a pickle/zip traceback."""
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(UserError):
        load_checkpoint(str(path))


def test_load_checkpoint_foreign_dict(tmp_path):
    """A valid torch file that is not a toolkit checkpoint is a UserError too."""
    path = str(tmp_path / "other.pth")
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(UserError):
        load_checkpoint(path)


def test_strip_prefixes():
    """'module.' and '_orig_mod.' prefixes (also stacked) are removed, other keys untouched."""
    t = torch.zeros(1)
    out = strip_prefixes({"module.encoder.conv1.weight": t, "_orig_mod.module.head.0.bias": t,
                          "head.3.weight": t, "encoder.module_x.w": t})
    assert set(out) == {"encoder.conv1.weight", "head.0.bias", "head.3.weight",
                        "encoder.module_x.w"}


META = {"arch": "resnet18", "stem": "cifar", "proj_dims": [32, 16], "in_channels": 1,
        "image_size": 28, "mean": [0.28], "std": [0.35]}


def test_load_pretrained_dataparallel_with_sibling_checkpoint(tmp_path):
    """A model.pth with 'module.' keys (nn.DataParallel) beside a checkpoint.pth holding the
    model metadata loads: the returned state dict loads strictly into a model rebuilt from
    the returned metadata and reproduces the original model's outputs."""
    torch.manual_seed(7)
    model = build_model(META["arch"], META["in_channels"], META["stem"], META["proj_dims"])
    model.eval()
    wrapped = nn.DataParallel(model)
    dp_state = wrapped.state_dict()
    assert all(k.startswith("module.") for k in dp_state)
    folder = tmp_path / "run" / "model"
    folder.mkdir(parents=True)
    torch.save(dp_state, str(folder / "model.pth"))
    save_checkpoint({"model": model.state_dict(), "model_meta": dict(META), "epoch": 1},
                    str(folder / "checkpoint.pth"))
    state_dict, meta = load_pretrained(str(folder / "model.pth"))
    assert meta == META
    rebuilt = build_model(meta["arch"], meta["in_channels"], meta["stem"], meta["proj_dims"])
    rebuilt.load_state_dict(state_dict, strict=True)
    rebuilt.eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        for a, b in zip(model(x), rebuilt(x)):
            assert torch.equal(a, b)


def test_load_pretrained_bare_model_without_metadata(tmp_path):
    """A bare model.pth with no sibling checkpoint.pth and no run.json is a UserError."""
    folder = tmp_path / "lonely" / "model"
    folder.mkdir(parents=True)
    torch.save(nn.Linear(2, 2).state_dict(), str(folder / "model.pth"))
    with pytest.raises(UserError):
        load_pretrained(str(folder / "model.pth"))


def test_unwrap_model():
    """unwrap_model returns the module inside (possibly nested) DataParallel, and a plain
    module itself."""
    inner = nn.Linear(2, 2)
    assert unwrap_model(nn.DataParallel(inner)) is inner
    assert unwrap_model(nn.DataParallel(nn.DataParallel(inner))) is inner
    assert unwrap_model(inner) is inner


def test_rng_state_of_eight_gpus_restores_on_fewer(monkeypatch):
    """A format-1 checkpoint's "cuda" entry holds get_rng_state_all() of its writer, here 8 GPUs.
    Restoring on a machine with fewer (CPU here; one GPU emulated by recording
    torch.cuda.set_rng_state) sets the CPU streams and gives the training device the writer's
    training device (GPU 0) state, once; a format-2 entry (one state) is used as it is."""
    random.seed(7)
    np.random.seed(8)
    torch.manual_seed(9)
    gpu_states = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    state = {**rng_state(), "cuda": gpu_states}
    first = _draws()
    assert training_device_cuda_state(gpu_states) is gpu_states[0]
    assert training_device_cuda_state(gpu_states[3]) is gpu_states[3]
    assert training_device_cuda_state(None) is None and training_device_cuda_state([]) is None

    set_rng_state(state, torch.device("cpu"))  # no CUDA here: the CUDA entry is left alone
    assert _draws() == first
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: calls.append((s, d)))
    set_rng_state(state, torch.device("cuda", 0))
    assert _draws() == first
    assert len(calls) == 1 and torch.equal(calls[0][0], gpu_states[0])
    assert calls[0][1] == torch.device("cuda", 0)
    set_rng_state({**state, "cuda": gpu_states[5]}, torch.device("cuda", 0))
    assert torch.equal(calls[1][0], gpu_states[5])
