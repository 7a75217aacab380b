"""The fast training path: --gpu-aug against torchvision's own parameter sampling and pixel
functions, in-memory decoding, mixed precision steps, the sync-free loop, and main.py with
--gpu-aug --amp fp16 --compile killed and resumed through its real command line."""
import json
import functools
import math
import os
import signal
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torch import nn
from torchvision import transforms as T
from torchvision.transforms import functional as TF

import utils.engine as engine
import utils.precision as precision_module
from conftest import FAST_PRETRAIN, assert_one_line_error, run_in_process, run_script
from main import decode_for_device, get_args_parser
from utils.errors import UserError
from simclr import SimCLRTask, forward_backward, transfer_views
from utils.checkpoint import RunPaths
from utils.engine import LoopSettings, RunSetup, Trainer, check_compile_backend
from utils.optim import build_optimizer
from utils.precision import FLOAT32, MixedPrecision
from test_end_to_end import start_main, wait_for_main_step
from utils.data import ImageList, decode_images
from utils.gpu_augment import BatchSimCLRAugmentation
from utils.model import build_model
from utils.ntxent import NTXentLoss
from utils.transforms import AUGMENTATION_PRESETS, AugmentationSettings

N_VIEWS = 4000  # parameter draws per distribution test
P_MIN = 0.01


def inner(t):
    """The transform a RandomApply wraps, else the transform itself."""
    return t.transforms[0] if type(t).__name__ == "RandomApply" else t


def reference_steps(aug):
    """{step name: torchvision object} of the per-image pipeline a batched one reproduces."""
    return {type(inner(t)).__name__: t for t in aug.reference.transform.transforms}


def draw_cpu_parameters(aug, hw, n, seed=0):
    """n draws of every step's parameters with torchvision's get_params (the per-image
    pipeline's own sampling), as arrays: crop area fraction/aspect/centre, jitter factors and
    position of brightness in the order, blur sigma, rotation angle, erased area fraction."""
    steps = reference_steps(aug)
    crop, jitter = steps["RandomResizedCrop"], inner(steps["ColorJitter"])
    blur, rotation = inner(steps["GaussianBlur"]), steps["RandomRotation"]
    erasing = steps["RandomErasing"]
    torch.manual_seed(seed)
    image = torch.zeros(1, *hw)
    view = torch.zeros(1, aug.image_size, aug.image_size)
    out = {k: [] for k in ("area", "aspect", "centre", "brightness", "contrast", "saturation",
                           "hue", "brightness_position", "sigma", "angle", "erased_area")}
    for _ in range(n):
        i, _, h, w = T.RandomResizedCrop.get_params(image, crop.scale, crop.ratio)
        out["area"].append(h * w / (hw[0] * hw[1]))
        out["aspect"].append(w / h)
        out["centre"].append((i + h / 2) / hw[0])
        order, *factors = T.ColorJitter.get_params(jitter.brightness, jitter.contrast,
                                                   jitter.saturation, jitter.hue)
        for name, f in zip(("brightness", "contrast", "saturation", "hue"), factors):
            out[name].append(f)
        out["brightness_position"].append(order.tolist().index(0))
        out["sigma"].append(T.GaussianBlur.get_params(*blur.sigma))
        out["angle"].append(T.RandomRotation.get_params(rotation.degrees))
        _, _, h, w, _ = T.RandomErasing.get_params(view, erasing.scale, erasing.ratio, [0])
        if h < aug.image_size:  # torchvision's "no box found" returns the whole image
            out["erased_area"].append(h * w / aug.image_size ** 2)
    return {k: np.asarray(v) for k, v in out.items()}


def batched_parameters(aug, hw, n, seed=0):
    """The same figures from BatchSimCLRAugmentation.sample_parameters, plus the coin flips."""
    p = aug.sample_parameters(n, torch.Generator().manual_seed(seed), hw)
    crop, jitter, erase = p["RandomResizedCrop"], p["ColorJitter"], p["RandomErasing"]
    area = crop["height"] * crop["width"] / (hw[0] * hw[1])
    out = {"area": area, "aspect": crop["width"] / crop["height"],
           "centre": (crop["top"] + crop["height"] / 2) / hw[0],
           "brightness_position": (jitter["order"] == 0).float().argmax(1),
           "sigma": p["GaussianBlur"]["sigma"], "angle": p["RandomRotation"]["angle"],
           "erased_area": (erase["height"] * erase["width"] / aug.image_size ** 2)[
               erase["applied"]]}
    for name in ("brightness", "contrast", "saturation", "hue"):
        out[name] = jitter[name]
    rates = {"flip": (p["RandomHorizontalFlip"]["applied"], 0.5),
             "jitter applied": (jitter["applied"], 0.8),
             "grayscale": (p["RandomGrayscale"]["applied"], 0.2),
             "blur applied": (p["GaussianBlur"]["applied"], 0.5)}
    return {k: v.numpy() for k, v in out.items()}, {k: (v.numpy(), q) for k, (v, q) in
                                                     rates.items()}


@pytest.fixture(scope="module")
def simclr_rgb():
    """The simclr preset on 3 channels at 16 px with blur, rotation and cutout."""
    return BatchSimCLRAugmentation(AugmentationSettings(
        16, 3, [0.4, 0.5, 0.3], [0.2, 0.25, 0.3], jitter_strength=0.5, blur=True, min_scale=0.08,
        preset="simclr", noise=0.0, rotate=20.0, cutout=0.5))


def test_gpu_aug_parameters_follow_the_cpu_distributions(simclr_rgb):
    """4000 draws of every random parameter against 4000 of torchvision's get_params: KS tests
    for crop area fraction, aspect ratio and centre, the four jitter factors, blur sigma,
    rotation angle and erased area, and a chi-square test for brightness's place in the random
    order, all p > 0.01 after Bonferroni correction for the 11 tests (one at 1 % each fails by
    chance one time in ten); flip, jitter, grayscale and blur rates within 4 binomial standard
    deviations of p; the erased share within 4 standard deviations of the CPU pipeline's
    (p x chance a box fits)."""
    hw = (32, 32)  # input larger than the 16 px output: crops from a 32 px image
    cpu = draw_cpu_parameters(simclr_rgb, hw, N_VIEWS)
    gpu, rates = batched_parameters(simclr_rgb, hw, N_VIEWS)
    names = ("area", "aspect", "centre", "brightness", "contrast", "saturation", "hue", "sigma",
             "angle", "erased_area")
    p_values = {name: stats.ks_2samp(cpu[name], gpu[name]).pvalue for name in names}
    counts = [np.bincount(x.astype(int), minlength=4) for x in
              (cpu["brightness_position"], gpu["brightness_position"])]
    p_values["order"] = stats.chi2_contingency(np.stack(counts)).pvalue
    failures = [f"{name}: p = {p:.2g}" for name, p in p_values.items()
                if p * len(p_values) <= P_MIN]
    for name, (flags, q) in rates.items():
        if abs(flags.sum() - N_VIEWS * q) > 4 * math.sqrt(N_VIEWS * q * (1 - q)):
            failures.append(f"{name}: {flags.mean():.3f} against p = {q}")
    cpu_erased = 0.5 * len(cpu["erased_area"]) / N_VIEWS  # RandomErasing: p * P(box found)
    sd = math.sqrt(N_VIEWS * cpu_erased * (1 - cpu_erased))
    if abs(len(gpu["erased_area"]) - N_VIEWS * cpu_erased) > 4 * sd:
        failures.append(f"erased share {len(gpu['erased_area']) / N_VIEWS:.3f} against "
                        f"{cpu_erased:.3f}")
    assert not failures, failures


def reference_view(image, p, b, aug):
    """View b of `image` (C, S, S) float through torchvision's per-image tensor functions, with
    the parameters of row b."""
    size, steps = aug.image_size, reference_steps(aug)
    crop = p["RandomResizedCrop"]
    x = TF.resized_crop(image, *(int(crop[k][b]) for k in ("top", "left", "height", "width")),
                        [size, size], antialias=True)
    if p["RandomHorizontalFlip"]["applied"][b]:
        x = TF.hflip(x)
    x = TF.rotate(x, float(p["RandomRotation"]["angle"][b]), T.InterpolationMode.BILINEAR,
                  fill=0)
    jitter = p["ColorJitter"]
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    if jitter["applied"][b]:
        for op in jitter["order"][b].tolist():
            name = ("brightness", "contrast", "saturation", "hue")[op]
            x = adjust[op](x, float(jitter[name][b]))
    if p["RandomGrayscale"]["applied"][b]:
        x = TF.rgb_to_grayscale(x, 3)
    if p["GaussianBlur"]["applied"][b]:
        k = inner(steps["GaussianBlur"]).kernel_size
        x = TF.gaussian_blur(x, list(k), [float(p["GaussianBlur"]["sigma"][b])])
    normalize = steps["Normalize"]
    x = TF.normalize(x, normalize.mean, normalize.std)
    erase = p["RandomErasing"]
    if erase["applied"][b]:
        x = TF.erase(x, *(int(erase[k][b]) for k in ("top", "left", "height", "width")),
                     torch.tensor(0.0))
    return x


def test_gpu_aug_pixels_equal_torchvision_functions(simclr_rgb, rgb_image):
    """For drawn parameters, every view of a batch equals torchvision's per-image tensor
    functions (resized_crop, hflip, rotate, adjust_* in the drawn order, rgb_to_grayscale,
    gaussian_blur, normalize, erase) applied with the same parameters, to 1e-4."""
    image = torch.from_numpy(np.array(rgb_image.resize((16, 16)))).permute(2, 0, 1)
    images = image.expand(64, -1, -1, -1).contiguous()
    p = simclr_rgb.sample_parameters(64, torch.Generator().manual_seed(3), (16, 16))
    views = simclr_rgb.apply(images, p, None)
    assert views.shape == (64, 3, 16, 16) and views.dtype == torch.float32
    for b in range(64):
        expected = reference_view(image.float() / 255, p, b, simclr_rgb)
        torch.testing.assert_close(views[b], expected, atol=1e-4, rtol=0, msg=f"view {b}")


def test_gpu_aug_views_look_like_cpu_views(gray_image):
    """1000 views of one real image by the per-image PIL pipeline and by the batched one:
    the distributions of a view's mean and standard deviation agree (KS p > 0.01)."""
    image = gray_image.resize((16, 16))
    batched = BatchSimCLRAugmentation(AugmentationSettings(
        16, 1, [0.3], [0.3], jitter_strength=0.5, blur=True, min_scale=0.08, preset="simclr"))
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker: PIL-sized blurs, no thread handoffs
    try:
        cpu = torch.stack([batched.reference(image) for _ in range(1000)])
    finally:
        torch.set_num_threads(threads)
    pixels = torch.from_numpy(np.array(image)).view(1, 1, 16, 16).expand(1000, -1, -1, -1)
    gpu = batched(pixels, torch.Generator().manual_seed(0))
    for name, statistic in (("mean", lambda v: v.mean((1, 2, 3))),
                            ("std", lambda v: v.std((1, 2, 3)))):
        p = stats.ks_2samp(statistic(cpu).numpy(), statistic(gpu).numpy()).pvalue
        assert p > P_MIN, f"view {name}: KS p = {p:.2g}"


@pytest.mark.parametrize("preset", AUGMENTATION_PRESETS)
def test_gpu_aug_has_the_steps_of_the_simclr_preset_and_refuses_the_others(preset, tiny_folder,
                                                                            tmp_path):
    """simclr, for 1 and 3 channels, with and without the extras: the batched steps are those
    of the per-image pipeline (same names, same order; ToTensor is the uint8 conversion) and a
    batch of uint8 (B, C, 20, 20) gives finite float32 (B, C, 16, 16). The published presets,
    whose luma equalisation and random sharpness have no batched version, are refused in one
    line by main.py before anything runs."""
    if preset != "simclr":
        with pytest.raises(UserError, match="--aug simclr only"):
            BatchSimCLRAugmentation(AugmentationSettings(
                16, 1, [0.5], [0.25], jitter_strength=0.5, blur=True, preset=preset))
        if preset == "novel":
            result = run_in_process("main.py", tiny_folder, tmp_path / "r", "--gpu-aug", "--aug",
                                    preset, *FAST_PRETRAIN)
            assert_one_line_error(result, "--gpu-aug", "--aug novel", "drop --gpu-aug")
        return
    for channels in (1, 3):
        for extras in ({}, {"noise": 0.05, "rotate": 10.0, "cutout": 0.5}):
            aug = BatchSimCLRAugmentation(AugmentationSettings(
                16, channels, [0.5] * channels, [0.25] * channels, jitter_strength=0.5,
                blur=True, preset=preset, **extras))
            names = [type(inner(t)).__name__ for t in aug.reference.transform.transforms]
            assert [s.name for s in aug.steps] == [n for n in names if n != "ToTensor"]
            images = torch.randint(0, 256, (6, channels, 20, 20), dtype=torch.uint8)
            views = aug(images, torch.Generator().manual_seed(0))
            assert views.shape == (6, channels, 16, 16) and views.dtype == torch.float32
            assert torch.isfinite(views).all()


def test_decode_images_resizes_to_the_training_size(tmp_path, rgb_image):
    """Files of other sizes are resized as a whole (PIL bilinear) to S x S, files of size S are
    kept as they are, array rows are copied; uint8 (N, C, S, S)."""
    wide = rgb_image.resize((20, 12))
    square = rgb_image.resize((16, 16))
    paths = []
    for name, img in (("wide.png", wide), ("square.png", square)):
        img.save(tmp_path / name)
        paths.append(str(tmp_path / name))
    decoded = decode_images(ImageList(paths), 3, 16)
    assert decoded.shape == (2, 3, 16, 16) and decoded.dtype == torch.uint8
    expected = np.stack([np.asarray(wide.resize((16, 16), Image.BILINEAR)), np.asarray(square)])
    np.testing.assert_array_equal(decoded.permute(0, 2, 3, 1).numpy(), expected)
    rows = np.random.default_rng(0).integers(0, 256, (3, 16, 16), dtype=np.uint8)
    from_array = decode_images(ImageList(["a", "b", "c"], pixels=rows), 1, 16)
    np.testing.assert_array_equal(from_array[:, 0].numpy(), rows)


def test_gpu_aug_memory_limit_and_compile_backend_are_user_errors():
    """More decoded data than --max-memory-gb, and an unknown --compile backend, are one-line
    UserErrors naming the flags."""
    args = get_args_parser().parse_args(["data", "out", "--gpu-aug", "--max-memory-gb", "1e-6"])
    images = ImageList([f"{i}.png" for i in range(100)])
    meta = {"in_channels": 3, "image_size": 32}
    with pytest.raises(UserError, match="--max-memory-gb.*drop --gpu-aug"):
        decode_for_device(args, images, meta, torch.device("cpu"))
    with pytest.raises(UserError, match="--compile nosuchbackend"):
        check_compile_backend("nosuchbackend", torch.device("cpu"))


class TinySimCLR(nn.Module):
    """conv -> BatchNorm -> ReLU -> average pool = h (8-d); a linear layer = z: (h, z)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 8)

    def forward(self, x):
        h = self.encoder(x)
        return h, self.head(h)


def view_batches(n, scale=None):
    """n loader batches (view1, view2) of 4 images 1 x 8 x 8; batch k multiplied by scale[k]."""
    g = torch.Generator().manual_seed(0)
    batches = [tuple(torch.randn(4, 1, 8, 8, generator=g) for _ in range(2)) for _ in range(n)]
    return [(a * scale[k], b * scale[k]) if scale else (a, b) for k, (a, b) in enumerate(batches)]


class RecordingLogger:
    """Stands in for the TensorBoard logger: keeps each window the engine logs."""

    def __init__(self):
        self.windows = []

    def log_steps(self, first_step, series, lrs):
        self.windows.append((first_step, series["loss"], series["positive_pair_top1"], lrs))


def run_epoch(batches, precision=FLOAT32, log_every=10, logger=None):
    """One epoch of the engine's loop (Trainer.train_one_epoch) with the SimCLR task on
    TinySimCLR; returns (model, history)."""
    torch.manual_seed(0)
    model = TinySimCLR()
    cpu = torch.device("cpu")
    trainer = Trainer(RunSetup(
        task=SimCLRTask(NTXentLoss(0.2), functools.partial(transfer_views, device=cpu)),
        model=model, optimizer=build_optimizer(model, "sgd", 0.1, 0.0),
        schedule=lambda step: 0.1, sampler=types.SimpleNamespace(global_batch_size=4),
        loader=batches, precision=precision,
        settings=LoopSettings(epochs=1, steps_per_epoch=len(batches), log_every=log_every,
                              checkpoint_minutes=0, channels_last=False),
        paths=RunPaths(os.devnull), device=cpu))
    trainer.stop, trainer.logger = types.SimpleNamespace(requested=False), logger
    trainer.train_one_epoch(0)
    return model, trainer.history


def test_sync_free_loop_transfers_once_per_window(monkeypatch):
    """7 steps with --log-every 3: the host reads the device three times (steps 0-2, 3-5 and the
    epoch's last step 6), each with one all-reduce and one tolist, never .item(); on_log gets
    each window's per-step values; the losses equal those of --log-every 1."""
    calls = {"tolist": 0, "item": 0, "all_reduce": 0}
    real_tolist, real_item, real_reduce = torch.Tensor.tolist, torch.Tensor.item, \
        engine.all_reduce_mean

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(torch.Tensor, "tolist", counted("tolist", real_tolist))
    monkeypatch.setattr(torch.Tensor, "item", counted("item", real_item))
    monkeypatch.setattr(engine, "all_reduce_mean", counted("all_reduce", real_reduce))
    logger = RecordingLogger()
    _, history = run_epoch(view_batches(7), log_every=3, logger=logger)
    logged = logger.windows
    assert calls == {"tolist": 3, "item": 0, "all_reduce": 3}
    monkeypatch.undo()
    assert [(first, len(losses), len(top1s), lrs) for first, losses, top1s, lrs in logged] == \
        [(0, 3, 3, [0.1] * 3), (3, 3, 3, [0.1] * 3), (6, 1, 1, [0.1])]
    assert [loss for window in logged for loss in window[1]] == history.series["loss"]
    _, every_step = run_epoch(view_batches(7), log_every=1)
    assert every_step.series["loss"] == history.series["loss"]


def test_mixed_precision_steps_on_cpu():
    """A step under bf16 and fp16 autocast: the convolution runs in the low precision, the loss
    is float32 and within 0.05 of the float32 step's; fp16 backpropagates the loss times the
    GradScaler's scale (the gradients are that much larger before the step unscales them)."""
    torch.manual_seed(0)
    model = TinySimCLR()
    x = torch.randn(16, 1, 8, 8)
    seen = []
    model.encoder[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    results = {}
    for mode in ("off", "bf16", "fp16"):
        model.zero_grad()
        precision = MixedPrecision(mode, torch.device("cpu"))
        loss, _ = forward_backward(model, NTXentLoss(0.2), x, None, precision)
        results[mode] = loss, model.head.weight.grad.clone()
    assert seen == [torch.float32, torch.bfloat16, torch.float16]
    for mode in ("bf16", "fp16"):
        assert results[mode][0].dtype == torch.float32
        assert abs(results[mode][0].item() - results["off"][0].item()) < 0.05
    scale = precision.scaler.get_scale()
    torch.testing.assert_close(results["fp16"][1] / scale, results["off"][1], atol=0.02,
                               rtol=0.05)


def cpu_flags():
    """The x86 feature flags of /proc/cpuinfo (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f
                         if line.startswith("flags")), None)
    except OSError:
        return None


def test_cpu_amp_without_fast_kernels_warns_once(monkeypatch, capsys):
    """On a CPU, --amp bf16/fp16 warns (one line naming --amp off) exactly where the CPU lacks
    the instructions oneDNN's fast kernels need, read here from /proc/cpuinfo; auto is float32
    on the CPU and off never warns."""
    cpu = torch.device("cpu")
    flags = cpu_flags()
    if flags is not None and {"sse2", "avx"} & flags:  # x86 Linux: the flags decide
        fast = {"bf16": {"avx512bw", "avx512vl", "avx512dq"} <= flags,
                "fp16": bool({"avx512_fp16", "amx_fp16"} & flags)}
        for mode in ("bf16", "fp16"):
            assert precision_module.cpu_has_fast(mode) == fast[mode], mode
            assert precision_module.resolve_amp(mode, cpu) == mode
            err = capsys.readouterr().err
            assert (err == "") == fast[mode], err
            if err:
                assert err.count("\n") == 1 and f"--amp {mode}" in err and "--amp off" in err
    assert precision_module.resolve_amp("auto", cpu) == "off" and precision_module.resolve_amp("off", cpu) == "off"
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(precision_module, "cpu_has_fast", lambda mode: False)
    precision_module.resolve_amp("bf16", cpu)
    assert "no fast bfloat16 kernels" in capsys.readouterr().err
    monkeypatch.setattr(precision_module, "cpu_has_fast", lambda mode: True)
    precision_module.resolve_amp("bf16", cpu)
    assert capsys.readouterr().err == ""


def test_fp16_overflow_is_a_skipped_step_not_a_divergence():
    """fp16: a batch that overflows (x 1e6 > 65504) gives a NaN loss; GradScaler skips it, the
    weights stay as they were, the step is recorded as NaN and the epoch mean leaves it out.
    Without loss scaling a NaN loss is the one-line divergence error; 20 overflows in a row are
    an error naming --amp bf16."""
    fp16 = MixedPrecision("fp16", torch.device("cpu"))
    torch.manual_seed(0)
    before = [p.clone() for p in TinySimCLR().parameters()]
    model, history = run_epoch(view_batches(1, [1e6]), fp16)
    assert math.isnan(history.series['loss'][0])
    for old, new in zip(before, model.parameters()):
        torch.testing.assert_close(old, new, atol=0, rtol=0)
    _, history = run_epoch(view_batches(3, [1, 1e6, 1]), MixedPrecision("fp16", torch.device(
        "cpu")))
    assert [math.isnan(v) for v in history.series['loss']] == [False, True, False]
    assert history.epoch_means()[0] == pytest.approx(np.mean(history.series['loss'][::2]))
    with pytest.raises(UserError, match="the loss became nan at step 1"):
        run_epoch(view_batches(3, [1, math.nan, 1]))
    with pytest.raises(UserError, match="last 20 steps.*--amp bf16"):
        run_epoch(view_batches(20, [1e6] * 20), MixedPrecision("fp16", torch.device("cpu")))


SPEED_RUN = ["--samples", "8", "--epochs", "2", "--image-size", "8", "--proj-dims", "32", "16",
             "-bs", "4", "-nw", "0", "--lr", "1.0", "--gpu-aug", "--amp", "fp16"]


def read_run(respath):
    ckpt = torch.load(os.path.join(respath, "checkpoint.pth"), weights_only=True)
    with np.load(os.path.join(respath, "model", "lossesfile.npz")) as f:
        return ckpt, f["step_losses"], f["epoch_losses"]


def test_gpu_aug_fp16_compile_run_resumes_exactly(tiny_folder, tmp_path):
    """main.py --gpu-aug --amp fp16: a run compiled with torch.compile (backend eager: dynamo's
    tracing without inductor's minute of C++ compilation on this CPU) and logged every step
    writes plain checkpoint keys and the GradScaler state; the same run SIGKILLed mid-epoch
    and resumed with --log-every 5 gives the same per-step losses (to 1e-5) and ends with the
    same GradScaler state (restored, not restarted)."""
    full = str(tmp_path / "full")
    result = run_script("main.py", tiny_folder, full, *SPEED_RUN, "--compile", "eager",
                        "--log-every", "1")
    assert result.returncode == 0, result.stderr
    assert "--gpu-aug: 8 images decoded once, uint8 (8, 1, 8, 8)" in result.stdout
    assert "amp fp16 (GradScaler), compile eager" in result.stdout
    ckpt, steps, epochs = read_run(full)
    assert not any("_orig_mod" in k or k.startswith("module.") for k in ckpt["model"])
    build_model("resnet18", 1, "cifar", [32, 16]).load_state_dict(ckpt["model"], strict=True)
    assert ckpt["scaler"]["scale"] > 0 and steps.shape == (4,)
    with open(os.path.join(full, "run.json")) as f:
        run = json.load(f)
    assert run["speed"] == {"amp": "fp16", "compile": "eager", "channels_last": True,
                            "gpu_aug": True, "gpu_decode": False, "log_every": 1}
    killed = str(tmp_path / "killed")
    proc = start_main(tiny_folder, killed, *SPEED_RUN, "--log-every", "1",
                      "--checkpoint-minutes", "0.0001")
    wait_for_main_step(killed, 1, proc)  # step 1 of 2 in epoch 1
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_script("main.py", tiny_folder, killed, *SPEED_RUN, "--log-every", "5")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    ckpt_resumed, steps_resumed, epochs_resumed = read_run(killed)
    np.testing.assert_allclose(steps_resumed, steps, rtol=0, atol=1e-5)
    np.testing.assert_allclose(epochs_resumed, epochs, rtol=0, atol=1e-5)
    assert ckpt_resumed["scaler"] == ckpt["scaler"]
