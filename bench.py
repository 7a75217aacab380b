"""How fast SimCLR pretraining runs here, on your data and this device: each part of what
main.py runs, held against the device's own dense matmul rate.

    python bench.py                                     # synthetic RGB JPEGs of 32 px
    python bench.py DATAPATH --image-size 224 -bs 256   # your images (any DATAPATH of main.py)
    python bench.py --device cuda --arch resnet50 --compile --json bench.json
    python bench.py --quick                             # seconds, meaningless figures (tests)

matmul, the device's dense rate; compute, main.py's step on a batch already on the device;
loader, main.py's input alone (workers, and the device path it takes on CUDA); end2end, the
engine's loop fed by each input. "Of matmul" is img/s over that of the same step run at the
matmul rate. docs/performance.md explains each figure; tools/bench_grid.py builds on these.
"""
import argparse
import functools
import gc
import itertools
import os
import sys
import tempfile
import time
import types

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from simclr import SimCLRTask, transfer_views
from utils.cli import ensure_writable_dir, environment_info, non_negative_int, run_main
from utils.data import (EpochBatchSampler, InMemoryBatches, TwoViewDataset, dataset_statistics,
                        decode_images, decoded_size_bytes, make_loader)
from utils.engine import LoopSettings, Run, RunFiles, Trainer
from utils.errors import UserError
from utils.file_index import find_split
from utils.fileio import json_dump
from utils.gpu_augment import BatchSimCLRAugmentation, DeviceTwoViews
from utils.gpu_decode import BatchDecoder, DecodedTwoViews, EncodedImageDataset, collate_encoded
from utils.model import FEATURE_DIMS, build_model, default_proj_dims, resolve_stem
from utils.ntxent import NTXentLoss
from utils.optim import build_optimizer, scaled_learning_rate
from utils.precision import MixedPrecision, resolve_amp
from utils.sources import load_split, select_subset
from utils.transforms import SimCLRAugmentation, TwoViews

MATMUL_DTYPES = {"off": "float32", "bf16": "bfloat16", "fp16": "float16"}  # per --amp
# main.py's defaults: temperature, SGD learning rate per 256 images and weight decay, logging
TEMPERATURE, LR_PER_256, WEIGHT_DECAY, LOG_EVERY = 0.2, 0.5, 5e-4, 10
MAX_MEMORY_GB = 4.0  # main.py's --max-memory-gb default (its CUDA default takes --gpu-aug below)
DEFAULTS = {  # per device, and --quick; a flag given on the command line wins
    "cpu": dict(batch_size=128, steps=4, warmup=1, workers=[0, 1, 2], matmul_size=2048),
    "cuda": dict(batch_size=256, steps=30, warmup=5, workers=[2, 4, 8, 16], matmul_size=8192),
    "quick": dict(batch_size=8, steps=1, warmup=0, workers=[0, 1], matmul_size=256),
}


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="How fast SimCLR pretraining runs here: matmul rate, compute, loader and end "
                    "to end on your data (or synthetic images) and device.")
    parser.add_argument("datapath", metavar="DATAPATH", nargs="?", default=None,
                        help="training images, as main.py takes them; default synthetic JPEGs")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = cuda when available, else cpu")
    parser.add_argument("--arch", choices=tuple(FEATURE_DIMS), default="resnet18",
                        help="encoder, as main.py --arch")
    parser.add_argument("--image-size", type=int, default=None,
                        help="training resolution in px (default: DATAPATH's native size, as "
                             "main.py; 32 for synthetic images)")
    parser.add_argument("-bs", "--batch-size", dest="batch_size", type=int, default=None,
                        help="images per step (two views each); default 128 on CPU, 256 on CUDA")
    parser.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
                        help="precision of the forward pass, as main.py --amp (auto: bf16 on "
                             "GPUs with native bf16, else off)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (inductor), as main.py --compile")
    parser.add_argument("--workers", nargs="+", type=non_negative_int, default=None,
                        help="DataLoader worker counts of the loader (end to end takes the "
                             "largest); default 0 1 2 on CPU, 2 4 8 16 (at most the CPUs) on CUDA")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per measurement; default 4 on CPU, 30 on CUDA")
    parser.add_argument("--warmup", type=non_negative_int, default=None,
                        help="untimed steps before each; default 1 on CPU, 5 on CUDA")
    parser.add_argument("--quick", action="store_true",
                        help="batch 8, 1 step, no warm-up: seconds, for the tests; the "
                             "figures mean nothing")
    parser.add_argument("--json", metavar="OUT", default=None,
                        help="also write every figure, the device, versions and flags to OUT")
    return parser


def resolve_settings(args):
    """Fill the flags left at None with the defaults of the device (or --quick), check them,
    resolve --amp as main.py does; returns the torch.device."""
    device = select_bench_device(args.device)
    defaults = dict(DEFAULTS["quick" if args.quick else device.type])
    if device.type == "cuda" and not args.quick:
        defaults["workers"] = sorted({min(w, os.cpu_count() or 1) for w in defaults["workers"]})
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    for bad, message in [(args.batch_size < 2, "-bs: SimCLR needs 2 images or more, e.g. 128"),
                         (args.steps < 1, f"--steps {args.steps} must be at least 1"),
                         ((args.image_size or 8) < 8, "--image-size: 8 px or more, e.g. 32")]:
        if bad:
            raise UserError(message)
    args.amp = resolve_amp(args.amp, device)
    return device


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
    trainer = Trainer(Run(
        task=SimCLRTask(NTXentLoss(TEMPERATURE), make_views), model=model,
        optimizer=build_optimizer(model, "sgd", lr, WEIGHT_DECAY), schedule=lambda step: lr,
        sampler=sampler, loader=loader, precision=MixedPrecision(config["amp"], device),
        settings=settings, files=RunFiles(os.devnull), device=device))
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


def main_augmentation_args(image_size, stats):
    """main.py's default augmentation (simclr preset, jitter 0.5, blur above 32 px, crops down
    to 8 %) at `image_size`, for SimCLRAugmentation or BatchSimCLRAugmentation."""
    return (image_size, stats["channels"], stats["mean"], stats["std"], 0.5, image_size > 32,
            0.08, "simclr", 0.0, 0.0, 0.0)


def pipeline_for(mode, images, stats, size, batch_size, workers, device):
    """(loader, sampler, make_views) of main.py's input `mode`: 'workers' (views made per image
    in workers), 'gpu-aug' or 'gpu-decode' (views made on the device; see main.py -h)."""
    sampler = EpochBatchSampler(len(images), batch_size, seed=0)
    channels, pin = stats["channels"], device.type == "cuda"
    if mode == "workers":
        dataset = TwoViewDataset(images, channels, TwoViews(SimCLRAugmentation(
            *main_augmentation_args(size, stats))), seed=0)
        loader = make_loader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin)
        return loader, sampler, functools.partial(transfer_views, device=device)
    views = DeviceTwoViews(BatchSimCLRAugmentation(*main_augmentation_args(size, stats)), 0,
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
    fits = decoded_size_bytes(n_images, channels, size) <= MAX_MEMORY_GB * 2 ** 30
    return "gpu-aug" if fits else "gpu-decode"


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


def timed_batches(batches, warmup, steps, device, started):
    """warmup + steps batches of `batches`; `started` gets the time of the first timed one."""
    for k in range(warmup + steps):
        if k == warmup:
            synchronize(device)
            started.append(time.perf_counter())
        yield next(batches)


def matmul_row(dtype_name, n, warmup, steps, device):
    """{dtype, size, ms, tflops} of an (n x n) @ (n x n) matmul, 2 n^3 FLOPs; 'tf32' is float32
    with TF32 allowed (what cuDNN uses for fp32 convolutions by default), 'float32' without."""
    dtype = torch.float32 if dtype_name == "tf32" else getattr(torch, dtype_name)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    previous = torch.backends.cuda.matmul.allow_tf32
    if dtype_name in ("float32", "tf32"):
        torch.backends.cuda.matmul.allow_tf32 = dtype_name == "tf32"
    try:
        seconds = seconds_per_call(lambda: a @ b, warmup, steps, device)
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


def compute_row(config, batch_size, channels, warmup, steps, device, matmul_rows, flops=None):
    """Trainer.train_step on random 2B views on the device, `config` {arch, image_size, amp,
    channels_last, compile}: ms/step, img/s, first step s, FLOP per step (counted unless given),
    TFLOP/s, its fraction of the matmul rate of its precision, and MFU (of the bf16 rate)."""
    size = config["image_size"]
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


def loader_row(mode, workers, images, stats, size, batch_size, warmup, steps, device):
    """{image_size, pipeline, workers, batch_size, images_per_s} of main.py's input `mode`
    alone, views made; for gpu-aug also decode_s, the seconds of its one-time decoding."""
    tic = time.perf_counter()
    loader, sampler, make_views = pipeline_for(mode, images, stats, size, batch_size, workers,
                                               device)
    setup_s = time.perf_counter() - tic
    batches, step = endless_batches(loader, sampler), itertools.count()
    fetch = ((lambda: next(batches)) if mode == "workers" else
             (lambda: make_views(next(batches), next(step))))
    seconds = seconds_per_call(fetch, warmup, steps, device)
    batches.close()
    del loader, make_views, batches  # decoded images, worker processes
    release_memory(device)
    row = {"image_size": size, "pipeline": mode, "workers": workers, "batch_size": batch_size,
           "images_per_s": batch_size / seconds}
    return {**row, "workers": 0, "decode_s": setup_s} if mode == "gpu-aug" else row


def end2end_row(config, mode, workers, images, stats, batch_size, warmup, steps, device):
    """{**config, pipeline, workers, batch_size, step_ms, images_per_s} of the engine's loop
    (Trainer.train_one_epoch, main.py's settings) fed by input `mode`, loading included."""
    size = config["image_size"]
    loader, sampler, make_views = pipeline_for(mode, images, stats, size, batch_size, workers,
                                               device)
    batches, started = endless_batches(loader, sampler), []
    trainer = build_trainer(config["arch"], stats["channels"], size, config, (timed_batches(
        batches, warmup, steps, device, started), sampler, make_views), device, warmup + steps)
    try:
        trainer.train_one_epoch(0)
        synchronize(device)
        seconds = time.perf_counter() - started[0]
    finally:
        batches.close()
    del trainer, loader, make_views
    release_memory(device)
    return {**config, "pipeline": mode, "workers": 0 if mode == "gpu-aug" else workers,
            "batch_size": batch_size, "step_ms": 1e3 * seconds / steps,
            "images_per_s": steps * batch_size / seconds}


def load_images(args, workdir):
    """(8 batches of images, statistics, description, how many main.py would hold): DATAPATH as
    main.py reads it, else RGB JPEGs under `workdir` (8/7 x the size above 64 px, as ImageNet's)."""
    if args.datapath is None:
        args.image_size = args.image_size or 32
        side = round(args.image_size * 8 / 7) if args.image_size > 64 else args.image_size
        n = max(8 * args.batch_size, 256)
        images = find_split(write_synthetic_images(os.path.join(workdir, "synthetic"), n, side),
                            "train", False)
        source = f"synthetic: {n} RGB JPEGs of {side} px"
    else:
        options = types.SimpleNamespace(data_root=os.path.expanduser("~/.medmnist"), size=28)
        images, source = load_split(args.datapath, "train", False, options), args.datapath
    if len(images) < args.batch_size:
        raise UserError(f"{source}: {len(images)} images, fewer than one batch; use "
                        f"-bs {len(images)} or less")
    stats = dataset_statistics(images, os.path.join(workdir, "data_stats.json"), seed=0)
    args.image_size = args.image_size or stats["native_size"]
    subset = select_subset(images, min(len(images), 8 * args.batch_size))
    return subset, stats, f"{source}, {stats['channels']} channel(s)", len(images)


def measure(args, device, images, stats, n_total):
    """{section: rows} of matmul, compute, loader and end2end; all but matmul's rows carry
    of_compute and of_matmul (img/s over that of the step at the matmul rate)."""
    size, bs, timing = args.image_size, args.batch_size, (args.warmup, args.steps, device)
    config = {"arch": args.arch, "image_size": size, "amp": args.amp, "channels_last": True,
              "compile": args.compile}
    dtypes = list(dict.fromkeys([MATMUL_DTYPES[args.amp], "bfloat16"]))
    dtypes += ["tf32"] if device.type == "cuda" and args.amp == "off" else []
    matmul = [matmul_row(d, args.matmul_size, *timing) for d in dtypes]
    compute = compute_row(config, bs, stats["channels"], *timing, matmul)
    path, workers = device_input(n_total, stats["channels"], size), max(args.workers)
    path = path if path == "gpu-aug" or is_jpeg_data(images) else None
    loader = [loader_row("workers", w, images, stats, size, bs, *timing) for w in args.workers]
    loader += [loader_row(path, workers, images, stats, size, bs, *timing)] if path else []
    end2end = [end2end_row(config, mode, workers, images, stats, bs, *timing)
               for mode in ["workers"] + ([path] if path else [])]
    bound = images_per_s_at_matmul_rate(compute)
    for row in [compute] + loader + end2end:
        row["of_matmul"] = row["images_per_s"] / bound if bound else None
        row["of_compute"] = row["images_per_s"] / compute["images_per_s"]
    return {"matmul": matmul, "compute": [compute], "loader": loader, "end2end": end2end}


def input_name(row):
    """'2 workers', 'gpu-aug (decoded once in 0.4 s)' or 'gpu-decode, 2 workers'."""
    if row["pipeline"] == "gpu-aug":
        decode = f" (decoded once in {row['decode_s']:.1f} s)" if "decode_s" in row else ""
        return "gpu-aug" + decode
    workers = f"{row['workers']} worker{'' if row['workers'] == 1 else 's'}"
    return workers if row["pipeline"] == "workers" else f"gpu-decode, {workers}"


def report(results):
    """The figures as lines: each part's img/s and what it is held against."""
    c, pct = results["compute"][0], lambda x: "n/a" if x is None else f"{x:.0%}"
    lines = [f"matmul   {r['dtype']}, n = {r['size']}: {r['tflops']:.3g} TFLOP/s"
             for r in results["matmul"]]
    lines.append(f"compute  {c['images_per_s']:,.1f} img/s ({c['step_ms']:,.1f} ms/step, first "
                 f"step {c['first_step_s']:.1f} s), {c['gflop_per_step']:,.1f} GFLOP/step, "
                 f"{c['tflops']:.3g} TFLOP/s = {pct(c['of_matmul'])} of matmul, "
                 f"MFU {pct(c['mfu'])}")
    lines += [f"loader   {r['images_per_s']:,.1f} img/s = {r['of_compute']:,.2f}x compute, "
              f"{r['of_matmul'] or 0:,.2f}x the step at the matmul rate; {input_name(r)}"
              for r in results["loader"]]
    lines += [f"end2end  {r['images_per_s']:,.1f} img/s = {pct(r['of_compute'])} of compute, "
              f"{pct(r['of_matmul'])} of matmul; {input_name(r)}" for r in results["end2end"]]
    return lines


def main(args):
    device = resolve_settings(args)
    if args.json:
        ensure_writable_dir(os.path.dirname(os.path.abspath(args.json)), "the --json folder")
    info = environment_info(device)
    info["device_name"] = (torch.cuda.get_device_name(device) if device.type == "cuda" else
                           info["cpu_model"])
    with tempfile.TemporaryDirectory(prefix="bench_") as workdir:
        images, stats, source, n_total = load_images(args, workdir)
        print(f"{info['device_name']} ({device.type}), torch {info['torch']}, "
              f"{info['cpu_threads']} threads; {args.arch}, {args.image_size} px, batch "
              f"{args.batch_size}, amp {args.amp}{', compiled' if args.compile else ''}; "
              f"{source}; {args.warmup} warm-up + {args.steps} timed steps", flush=True)
        results = measure(args, device, images, stats, n_total)
    print("\n".join(report(results)))
    if args.json:
        json_dump({"command": " ".join(["python", *sys.argv]), "device": info, "data": source,
                   "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": vars(args),
                   "sections": results}, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    run_main(main, get_args_parser())
