"""Constants of the per-step path are made on the device, not copied from the host every step
(on CUDA a host-to-device copy of a small tensor is a transfer in the stream, and one from
pageable memory synchronises it): the NT-Xent targets (utils.ntxent, made by arange on the
device) and the constant tensors of the batched augmentation (utils.gpu_augment, made once). A CPU run cannot see a synchronisation, so
these tests check what it can: results bitwise equal to a reference computed another way, the
cached objects being reused, and no tensor being made from Python data or moved with .to() on
the second call."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.transforms.v2 import functional as v2F

from utils import gpu_augment
from utils.gpu_augment import BatchSimCLRAugmentation, DeviceTwoViews
from utils.ntxent import NTXentLoss, ntxent_logits
from utils.transforms import AugmentationSettings

TAU = 0.3


class RecordOps(TorchDispatchMode):
    """Records the aten operations run inside it (name, output dtypes)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.ops.append((str(func), [o.dtype for o in outs if isinstance(o, torch.Tensor)]))
        return out

    def names(self):
        return [name for name, _ in self.ops]


def fake_gather(before, after):
    """A `gather` for ntxent_logits: u (2N, D) -> (cat(before rows, u, after rows), offset
    = len(before)), as utils.distributed.gather_with_grad returns the views of all ranks."""
    def gather(u):
        return torch.cat([before.to(u.dtype), u, after.to(u.dtype)]), before.shape[0]
    return gather


def reference_loss(z1, z2, before=None, after=None):
    """Cross-entropy over logits built explicitly: normalised views, candidates = (before, u,
    after), the 1/tau-scaled anchors against them, self-similarities masked with -inf by
    masked_fill, targets written out by hand as a Python list."""
    n = z1.shape[0]
    u = F.normalize(torch.cat([z1, z2]).to(torch.promote_types(z1.dtype, torch.float32)), dim=1)
    offset = 0 if before is None else before.shape[0]
    parts = [u] if before is None else [before.to(u.dtype), u, after.to(u.dtype)]
    candidates = torch.cat(parts)
    logits = (u * (1.0 / TAU)) @ candidates.T
    self_mask = torch.zeros(logits.shape, dtype=torch.bool)
    for k in range(2 * n):
        self_mask[k, k + offset] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    targets = torch.tensor([(k + n) % (2 * n) + offset for k in range(2 * n)])
    return F.cross_entropy(logits, targets)


def loss_and_grads(fn, z1, z2):
    a = z1.detach().clone().requires_grad_(True)
    b = z2.detach().clone().requires_grad_(True)
    loss = fn(a, b)
    loss.backward()
    return loss.detach(), a.grad, b.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gathered", [False, True])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_ntxent_bitwise_equals_explicit_cross_entropy(n, gathered, dtype):
    """NTXentLoss (twice: targets made, then reused) gives bitwise the loss and gradients of
    F.cross_entropy on explicitly built logits with hand-written targets, alone and with a
    gather that puts this process's 2N rows at offset 2 (N=1), 6 (N=3) or 16 (N=8)."""
    g = torch.Generator().manual_seed(10 * n + gathered)
    z1 = torch.randn(n, 5, generator=g, dtype=dtype)
    z2 = z1 + 0.5 * torch.randn(n, 5, generator=g, dtype=dtype)
    before = after = gather = None
    if gathered:
        before = F.normalize(torch.randn(2 * n, 5, generator=g, dtype=torch.float64), dim=1)
        after = F.normalize(torch.randn(2 * n + 1, 5, generator=g, dtype=torch.float64), dim=1)
        gather = fake_gather(before, after)
    expected = loss_and_grads(lambda a, b: reference_loss(a, b, before, after), z1, z2)
    criterion = NTXentLoss(TAU, gather)
    for _ in range(2):
        got = loss_and_grads(criterion, z1, z2)
        for x, y in zip(got, expected):
            assert x.dtype == y.dtype and torch.equal(x, y)


def test_ntxent_targets_are_the_partners_made_on_the_device(monkeypatch):
    """The targets hold the partners [N..2N-1, 0..N-1] + offset, int64 on z's device, made
    with torch.arange(..., device=...): no torch.tensor and no Tensor.to of an index tensor
    (a host-to-device copy, which on CUDA waits for the stream)."""
    arange, tensor, to = torch.arange, torch.tensor, torch.Tensor.to
    calls = {"arange without device": 0, "tensor": 0, "index .to": 0}

    def counting_arange(*args, **kwargs):
        calls["arange without device"] += "device" not in kwargs
        return arange(*args, **kwargs)

    def counting_tensor(*args, **kwargs):
        calls["tensor"] += 1
        return tensor(*args, **kwargs)

    def counting_to(self, *args, **kwargs):
        calls["index .to"] += not self.is_floating_point()
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch, "arange", counting_arange)
    monkeypatch.setattr(torch, "tensor", counting_tensor)
    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    z = torch.randn(8, 4)
    _, plain = ntxent_logits(z[:4], z[4:], TAU)
    _, other_n = ntxent_logits(z[:3], z[3:6], TAU)
    _, shifted = ntxent_logits(z[:4], z[4:], TAU, fake_gather(torch.randn(8, 4), torch.randn(0, 4)))
    assert calls == {"arange without device": 0, "tensor": 0, "index .to": 0}
    assert plain.tolist() == [4, 5, 6, 7, 0, 1, 2, 3] and other_n.tolist() == [3, 4, 5, 0, 1, 2]
    assert shifted.tolist() == [12, 13, 14, 15, 8, 9, 10, 11]
    assert plain.dtype == torch.int64 and plain.device == z.device


def test_ntxent_targets_first_made_under_inference_mode_still_train():
    """Targets first asked for under torch.inference_mode are normal tensors: the same N then
    trains (cross_entropy saves its targets for backward)."""
    z1, z2 = torch.randn(13, 4), torch.randn(13, 4)
    with torch.inference_mode():
        NTXentLoss(TAU)(z1, z2)
    a = z1.clone().requires_grad_(True)
    NTXentLoss(TAU)(a, z2).backward()
    assert torch.isfinite(a.grad).all()


@pytest.mark.parametrize("factor", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("channels", [1, 3])
def test_adjust_sharpness_bitwise_equals_torchvision(channels, factor):
    """gpu_augment.adjust_sharpness (cached kernel) equals torchvision.transforms.v2's
    adjust_sharpness bit for bit on (B, C, H, W) batches, and returns a 2-pixel-high image
    unchanged as it does."""
    g = torch.Generator().manual_seed(channels)
    x = torch.rand(4, channels, 9, 7, generator=g)
    for _ in range(2):  # the kernel made, then reused
        assert torch.equal(gpu_augment.adjust_sharpness(x, factor), v2F.adjust_sharpness(x, factor))
    small = x[:, :, :2]
    assert torch.equal(gpu_augment.adjust_sharpness(small, factor), small)


def test_device_constants_are_made_once_per_device_and_dtype():
    """A DeviceConstant holds torch.tensor(values)'s numbers in its shape, the same object for
    the same (device, dtype) and another one for another dtype."""
    c = gpu_augment.DeviceConstant([0.25, 0.5, 0.125], (1, -1, 1, 1))
    a = c(torch.device("cpu"), torch.float32)
    assert a is c("cpu", torch.float32) and a.shape == (1, 3, 1, 1)
    assert torch.equal(a.flatten(), torch.tensor([0.25, 0.5, 0.125]))
    b = c(torch.device("cpu"), torch.float64)
    assert b is not a and b.dtype == torch.float64


@pytest.mark.parametrize("preset", ["simclr"])  # the one preset --gpu-aug has
def test_second_batch_makes_no_tensor_from_python_data(preset, monkeypatch):
    """After a first batch, a second one (BatchSimCLRAugmentation and DeviceTwoViews, with blur,
    noise, rotation and cutout, 3 and 1 channels) calls neither torch.tensor nor
    torch.as_tensor, in gpu_augment or in the torchvision functions it uses, and runs no
    aten.lift_fresh (the op every tensor made from Python data goes through); the first batch
    does make its constants (so the counting would see them)."""
    counts = {"tensor": 0, "as_tensor": 0}
    for name in counts:
        original = getattr(torch, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(torch, name, counting)
    for channels in (3, 1):
        aug = BatchSimCLRAugmentation(AugmentationSettings(
            12, channels, [0.4] * channels, [0.3] * channels, jitter_strength=0.5, blur=True,
            min_scale=0.08, preset=preset, noise=0.05, rotate=10.0, cutout=0.5))
        two_views = DeviceTwoViews(aug, seed=1, global_batch_size=8, rank=1)
        images = torch.randint(0, 256, (4, channels, 12, 12), dtype=torch.uint8)
        aug(images, torch.Generator().manual_seed(0))
        two_views(images, 0)
        assert counts["tensor"] > 0  # this instance's mean and std at least
        counts.update(tensor=0, as_tensor=0)
        with RecordOps() as record:
            aug(images, torch.Generator().manual_seed(1))
            two_views(images, 1)
        assert counts == {"tensor": 0, "as_tensor": 0}, (preset, channels)
        assert "aten.lift_fresh.default" not in record.names(), (preset, channels)
