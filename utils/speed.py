"""The measurements behind bench.py (and the maintainers' grids in tools/bench_grid.py): the
device's dense matmul rate, main.py's SimCLR step on a batch already on the device, main.py's
input pipeline alone (CPU workers, --gpu-aug, --gpu-decode) and the engine's loop fed by it,
each as a row of figures (img/s, and against the matmul rate)."""
import functools
import gc
import itertools
import os
import time
import types
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from simclr import SimCLRTask, transfer_views
from utils.data import (EpochBatchSampler, InMemoryBatches, TwoViewDataset, decode_images,
                        fits_in_memory, make_loader)
from utils.checkpoint import RunPaths
from utils.engine import LoopSettings, RunSetup, Trainer
from utils.errors import UserError
from utils.gpu_augment import BatchSimCLRAugmentation, DeviceTwoViews
from utils.gpu_decode import BatchDecoder, DecodedTwoViews, EncodedImageDataset, collate_encoded
from utils.model import build_model, default_proj_dims, resolve_stem
from utils.ntxent import NTXentLoss
from utils.optim import build_optimizer, scaled_learning_rate
from utils.precision import MixedPrecision
from utils.transforms import AugmentationSettings, SimCLRAugmentation, TwoViews

MATMUL_DTYPES = {"off": "float32", "bf16": "bfloat16", "fp16": "float16"}  # per --amp
# main.py's defaults: temperature, SGD learning rate per 256 images and weight decay, logging
TEMPERATURE, LR_PER_256, WEIGHT_DECAY, LOG_EVERY = 0.2, 0.5, 5e-4, 10
MAX_MEMORY_GB = 4.0  # main.py's --max-memory-gb default (its CUDA default takes --gpu-aug below)


@dataclass(frozen=True)
class Timing:
    """How a figure is timed: `warmup` untimed calls (or steps), then the mean over `steps`
    timed ones, on `device` (synchronised before each clock reading)."""
    warmup: int
    steps: int
    device: torch.device


@dataclass(frozen=True)
class MeasuredImages:
    """The training images an input or end-to-end figure is measured on: `images` (an
    ImageList, as utils.sources.load_split gives it) and `stats`, their
    utils.data.dataset_statistics (channels, mean, std: main.py's augmentation of them)."""
    images: Any
    stats: dict


def select_bench_device(name):
    """torch.device for --device: 'auto' is cuda when available; UserError for cuda without."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available; use --device cpu")
    return torch.device(name)


def synchronize(device):
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, warmup, steps, device):
    """Mean wall time of fn() over `steps` calls after `warmup` untimed ones (device synced)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    tic = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - tic) / steps


def count_flops(fn):
    """FLOPs of one call of fn() as FlopCounterMode counts them (matmuls, convolutions)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def release_memory(device):
    """Free what the last measurement left: garbage, and on CUDA the allocator's cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_trainer(arch, channels, image_size, config, pipeline, device, steps=1):
    """The engine's Trainer for main.py's SimCLR task with its defaults (SGD, NT-Xent, constant
    learning rate here, no checkpoints), channels-last and compiled as `config` says, for
    epochs of `steps` batches of pipeline = (loader, sampler, make_views)."""
    loader, sampler, make_views = pipeline
    if config["compile"]:
        torch._dynamo.reset()  # else each configuration adds graphs, up to the recompile limit
    torch.manual_seed(0)
    model = build_model(arch, channels, resolve_stem("auto", image_size),
                        default_proj_dims(arch)).to(device)
    lr = scaled_learning_rate(LR_PER_256, sampler.global_batch_size, "linear")
    settings = LoopSettings(epochs=1, steps_per_epoch=steps, log_every=LOG_EVERY,
                            checkpoint_minutes=0, channels_last=config["channels_last"],
                            compile="inductor" if config["compile"] else None)
    trainer = Trainer(RunSetup(
        task=SimCLRTask(NTXentLoss(TEMPERATURE), make_views), model=model,
        optimizer=build_optimizer(model, "sgd", lr, WEIGHT_DECAY), schedule=lambda step: lr,
        sampler=sampler, loader=loader, precision=MixedPrecision(config["amp"], device),
        settings=settings, paths=RunPaths(os.devnull), device=device))
    trainer.stop = types.SimpleNamespace(requested=False)
    return trainer


def write_synthetic_images(folder, n, size, seed=0, rgb_jpeg=True):
    """Write `n` RGB JPEGs (or gray PNGs) of random blobs of `size` px into folder/train/."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "train"), exist_ok=True)
    for i in range(n):
        coarse = rng.integers(0, 256, (8, 8, 3) if rgb_jpeg else (7, 7), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BICUBIC).save(os.path.join(
            folder, "train", f"{i:05d}.{'jpg' if rgb_jpeg else 'png'}"), quality=90)
    return folder


def main_augmentation_settings(image_size, stats):
    """main.py's default augmentation (simclr preset, jitter 0.5, blur above 32 px, crops down
    to 8 %) at `image_size`, for data of `stats` (channels, mean, std): the AugmentationSettings
    of SimCLRAugmentation and BatchSimCLRAugmentation."""
    return AugmentationSettings(image_size=image_size, channels=stats["channels"],
                                mean=stats["mean"], std=stats["std"], jitter_strength=0.5,
                                blur=image_size > 32, min_scale=0.08, preset="simclr")


def pipeline_for(mode, workers, data, size, batch_size, device):
    """(loader, sampler, make_views) of main.py's input `mode` over `data` (MeasuredImages) at
    `size` px: 'workers' (views made per image in `workers` workers), 'gpu-aug' or 'gpu-decode'
    (views made on the device; see main.py -h)."""
    images, stats = data.images, data.stats
    sampler = EpochBatchSampler(len(images), batch_size, seed=0)
    channels, pin = stats["channels"], device.type == "cuda"
    if mode == "workers":
        dataset = TwoViewDataset(images, channels, TwoViews(SimCLRAugmentation(
            main_augmentation_settings(size, stats))), seed=0)
        loader = make_loader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin)
        return loader, sampler, functools.partial(transfer_views, device=device)
    views = DeviceTwoViews(BatchSimCLRAugmentation(main_augmentation_settings(size, stats)), 0,
                           batch_size)
    if mode == "gpu-aug":
        pixels = decode_images(images, channels, size).to(device)
        return InMemoryBatches(pixels, sampler), sampler, views
    loader = make_loader(EncodedImageDataset(images, channels, size), batch_sampler=sampler,
                         num_workers=workers, pin_memory=pin, collate_fn=collate_encoded)
    return loader, sampler, DecodedTwoViews(BatchDecoder(images, channels, size, device), views)


def device_input(n_images, channels, size):
    """The input main.py takes on CUDA by default: 'gpu-aug' where the decoded images fit its
    --max-memory-gb, else 'gpu-decode' (which decodes JPEG files on the device)."""
    return "gpu-aug" if fits_in_memory(n_images, channels, size, MAX_MEMORY_GB) else "gpu-decode"


def is_jpeg_data(images):
    """Whether every file of `images` is named as a JPEG (what --gpu-decode is for)."""
    return images.pixels is None and all(p.lower().endswith((".jpg", ".jpeg"))
                                         for p in images.paths)


def endless_batches(loader, sampler=None):
    """The batches of `loader`, epoch after epoch (sampler.set_epoch when given)."""
    for epoch in itertools.count():
        if sampler is not None:
            sampler.set_epoch(epoch)
        yield from loader


def timed_batches(batches, timing, started):
    """timing.warmup + timing.steps batches of `batches`; `started` gets the time of the first
    timed one."""
    for k in range(timing.warmup + timing.steps):
        if k == timing.warmup:
            synchronize(timing.device)
            started.append(time.perf_counter())
        yield next(batches)


def matmul_row(dtype_name, n, timing):
    """{dtype, size, ms, tflops} of an (n x n) @ (n x n) matmul, 2 n^3 FLOPs, timed as `timing`
    (Timing) says; 'tf32' is float32 with TF32 allowed (what cuDNN uses for fp32 convolutions
    by default), 'float32' without."""
    dtype = torch.float32 if dtype_name == "tf32" else getattr(torch, dtype_name)
    a, b = (torch.randn(n, n, device=timing.device).to(dtype) for _ in range(2))
    previous = torch.backends.cuda.matmul.allow_tf32
    if dtype_name in ("float32", "tf32"):
        torch.backends.cuda.matmul.allow_tf32 = dtype_name == "tf32"
    try:
        seconds = seconds_per_call(lambda: a @ b, timing.warmup, timing.steps, timing.device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return {"dtype": dtype_name, "size": n, "ms": 1e3 * seconds,
            "tflops": 2 * n ** 3 / seconds / 1e12}


def matmul_reference(matmul_rows, amp):
    """The matmul rate (TFLOP/s) a step of precision `amp` is held against: its dtype's, for
    fp32 on CUDA TF32's when cuDNN may use TF32 (its default)."""
    by_dtype = {row["dtype"]: row["tflops"] for row in matmul_rows}
    tf32 = amp == "off" and "tf32" in by_dtype and torch.backends.cudnn.allow_tf32
    return by_dtype.get("tf32" if tf32 else MATMUL_DTYPES[amp])


def images_per_s_at_matmul_rate(compute):
    """B x rate / FLOP per step: the img/s of compute row `compute`'s step at the measured matmul
    rate of its precision, which no loop doing that work exceeds (None without them)."""
    if not compute or not compute.get("matmul_tflops") or not compute.get("gflop_per_step"):
        return None
    return compute["batch_size"] * compute["matmul_tflops"] * 1e3 / compute["gflop_per_step"]


def compute_row(config, batch_size, channels, timing, matmul_rows, flops=None):
    """Trainer.train_step on random 2B views on the device, `config` {arch, image_size, amp,
    channels_last, compile}, timed as `timing` (Timing) says: ms/step, img/s, first step s, FLOP
    per step (counted unless given), TFLOP/s, its fraction of the matmul rate of its precision
    (`matmul_rows`, matmul_row's) and MFU (of the bf16 rate)."""
    size, warmup, steps, device = config["image_size"], timing.warmup, timing.steps, timing.device
    memory_format = torch.channels_last if config["channels_last"] else torch.contiguous_format
    x = torch.randn(2 * batch_size, channels, size, size, device=device).contiguous(
        memory_format=memory_format)
    pipeline = ([x], types.SimpleNamespace(global_batch_size=batch_size), lambda v, s: v)
    trainer = build_trainer(config["arch"], channels, size, config, pipeline, device)
    if flops is None:  # on the plain module: FlopCounterMode does not see into compiled code
        compiled, trainer.model, warmup = trainer.model, trainer.plain, warmup - 1
        flops, trainer.model = count_flops(lambda: trainer.train_step(x, 0)), compiled
    warmup = max(warmup, 1 if config["compile"] else 0)  # compiling is the first call's work
    first = seconds_per_call(lambda: trainer.train_step(x, 0), 0, 1, device) if warmup else None
    seconds = seconds_per_call(lambda: trainer.train_step(x, 0), max(warmup - 1, 0), steps,
                               device)
    del trainer, x
    release_memory(device)
    tflops = flops / seconds / 1e12
    rate, bf16 = (matmul_reference(matmul_rows, amp) for amp in (config["amp"], "bf16"))
    return {**config, "batch_size": batch_size, "step_ms": 1e3 * seconds,
            "first_step_s": first or seconds, "images_per_s": batch_size / seconds,
            "gflop_per_step": flops / 1e9, "tflops": tflops, "matmul_tflops": rate,
            "fraction_of_matmul": tflops / rate if rate else None,
            "mfu": tflops / bf16 if bf16 else None}


def loader_row(mode, workers, data, size, batch_size, timing):
    """{image_size, pipeline, workers, batch_size, images_per_s} of main.py's input `mode`
    (with `workers` DataLoader workers) alone, views of `data` (MeasuredImages) made at `size`
    px in batches of `batch_size`, timed as `timing` (Timing) says; for gpu-aug also decode_s,
    the seconds of its one-time decoding."""
    tic = time.perf_counter()
    loader, sampler, make_views = pipeline_for(mode, workers, data, size, batch_size,
                                               timing.device)
    setup_s = time.perf_counter() - tic
    batches, step = endless_batches(loader, sampler), itertools.count()
    fetch = ((lambda: next(batches)) if mode == "workers" else
             (lambda: make_views(next(batches), next(step))))
    seconds = seconds_per_call(fetch, timing.warmup, timing.steps, timing.device)
    batches.close()
    del loader, make_views, batches  # decoded images, worker processes
    release_memory(timing.device)
    row = {"image_size": size, "pipeline": mode, "workers": workers, "batch_size": batch_size,
           "images_per_s": batch_size / seconds}
    return {**row, "workers": 0, "decode_s": setup_s} if mode == "gpu-aug" else row


def end2end_row(config, mode, workers, data, batch_size, timing):
    """{**config, pipeline, workers, batch_size, step_ms, images_per_s} of the engine's loop
    (Trainer.train_one_epoch, main.py's settings; `config` {arch, image_size, amp, channels_last,
    compile}) fed by input `mode` (with `workers` DataLoader workers) with batches of
    `batch_size` images of `data` (MeasuredImages), loading included, timed as `timing`
    (Timing) says."""
    size, device = config["image_size"], timing.device
    loader, sampler, make_views = pipeline_for(mode, workers, data, size, batch_size, device)
    batches, started = endless_batches(loader, sampler), []
    trainer = build_trainer(config["arch"], data.stats["channels"], size, config,
                            (timed_batches(batches, timing, started), sampler, make_views), device,
                            timing.warmup + timing.steps)
    try:
        trainer.train_one_epoch(0)
        synchronize(device)
        seconds = time.perf_counter() - started[0]
    finally:
        batches.close()
    del trainer, loader, make_views
    release_memory(device)
    return {**config, "pipeline": mode, "workers": 0 if mode == "gpu-aug" else workers,
            "batch_size": batch_size, "step_ms": 1e3 * seconds / timing.steps,
            "images_per_s": timing.steps * batch_size / seconds}
