"""The CUDA paths, run where a GPU is visible (bash scripts/test.sh on a GPU machine) and
skipped with their reason on CPU machines such as CI's: the headline commands with -c, bf16
autocast dtypes, fp16 with GradScaler resuming, --gpu-aug determinism on the device, and the
training device's RNG state in the checkpoint."""
import json
import os

import pytest
import torch

from conftest import FAST_PRETRAIN, requires_cuda, run_script
from utils.gpu_augment import BatchSimCLRAugmentation, DeviceTwoViews
from utils.model import build_model
from utils.ntxent import NTXentLoss
from utils.precision import MixedPrecision, resolve_amp
from utils.transforms import AugmentationSettings

pytestmark = requires_cuda


def test_headline_commands_on_cuda(tiny_folder, tmp_path):
    """main.py -c (bf16 by default where the GPU has it), then linear_evaluation.py -c on the
    result; the checkpoint holds the training GPU's RNG state (one ByteTensor), plain keys."""
    respath = tmp_path / "run"
    result = run_script("main.py", tiny_folder, respath, "--epochs", "1", *FAST_PRETRAIN, "-c")
    assert result.returncode == 0, result.stderr
    run = json.load(open(respath / "run.json"))
    assert run["speed"]["amp"] == resolve_amp("auto", torch.device("cuda"), False)
    ckpt = torch.load(respath / "checkpoint.pth", weights_only=True)
    assert isinstance(ckpt["rng"]["cuda"], torch.Tensor)
    assert not any(k.startswith("module.") for k in ckpt["model"])
    evaluation = run_script("linear_evaluation.py", tiny_folder, respath / "model" / "model.pth",
                            tmp_path / "le", "-bs", "12", "-nw", "0", "-c")
    assert evaluation.returncode == 0, evaluation.stderr
    assert json.load(open(tmp_path / "le" / "report.json"))["accuracy"] > 0


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_dtypes_on_cuda(amp):
    """Under autocast the convolutions run in the low precision, z and the loss in float32;
    fp16 comes with a GradScaler, bf16 without."""
    if amp == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bf16")
    device = torch.device("cuda")
    precision = MixedPrecision(amp, device)
    assert (precision.scaler is not None) == (amp == "fp16")
    model = build_model("resnet18", 3, "cifar", [32, 16]).to(device)
    seen = []
    model.encoder.conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randn(8, 3, 16, 16, device=device)
    with precision.autocast():
        _, z = model(x)
    loss = NTXentLoss(0.2)(z.float()[:4], z.float()[4:])
    low = torch.bfloat16 if amp == "bf16" else torch.float16
    assert seen == [low] and loss.dtype == torch.float32


def test_gpu_aug_is_a_pure_function_of_seed_and_step_on_the_device():
    aug = BatchSimCLRAugmentation(AugmentationSettings(
        16, 3, [0.5] * 3, [0.25] * 3, jitter_strength=0.5, blur=True, min_scale=0.08,
        preset="simclr", noise=0.05, rotate=10.0, cutout=0.5))
    views = DeviceTwoViews(aug, seed=3, global_batch_size=8)
    images = torch.randint(0, 256, (8, 3, 20, 20), dtype=torch.uint8, device="cuda")
    first, again, other = views(images, 5), views(images, 5), views(images, 6)
    assert first.device.type == "cuda" and torch.equal(first, again)
    assert not torch.equal(first, other)


def test_fp16_run_resumes_with_its_loss_scale(tiny_folder, tmp_path):
    respath = tmp_path / "fp16"
    for epochs in ("1", "2"):
        result = run_script("main.py", tiny_folder, respath, "--epochs", epochs, *FAST_PRETRAIN,
                            "-c", "--amp", "fp16")
        assert result.returncode == 0, result.stderr
    ckpt = torch.load(respath / "checkpoint.pth", weights_only=True)
    assert ckpt["scaler"] is not None and ckpt["step"] == 6
    assert "resuming" in result.stdout and os.path.exists(respath / "model" / "model.pth")
