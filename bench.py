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
import os
import sys
import tempfile
import time
import types

import torch

from utils.cli import ensure_writable_dir, environment_info, non_negative_int, run_main
from utils.data import dataset_statistics
from utils.errors import UserError
from utils.file_index import find_split
from utils.fileio import json_dump
from utils.model import FEATURE_DIMS
from utils.precision import resolve_amp
from utils.sources import load_split, select_subset
from utils.speed import (MATMUL_DTYPES, MeasuredImages, Timing, compute_row, device_input,
                         end2end_row, images_per_s_at_matmul_rate, is_jpeg_data, loader_row,
                         matmul_row, select_bench_device, write_synthetic_images)

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
    images = images.with_intensity_range(stats["intensity_range"])  # as main.py scales them
    args.image_size = args.image_size or stats["native_size"]
    subset = select_subset(images, min(len(images), 8 * args.batch_size))
    return subset, stats, f"{source}, {stats['channels']} channel(s)", len(images)


def measure(args, device, images, stats, n_total):
    """{section: rows} of matmul, compute, loader and end2end; all but matmul's rows carry
    of_compute and of_matmul (img/s over that of the step at the matmul rate)."""
    size, bs, timing = args.image_size, args.batch_size, Timing(args.warmup, args.steps, device)
    config = {"arch": args.arch, "image_size": size, "amp": args.amp, "channels_last": True,
              "compile": args.compile}
    dtypes = list(dict.fromkeys([MATMUL_DTYPES[args.amp], "bfloat16"]))
    dtypes += ["tf32"] if device.type == "cuda" and args.amp == "off" else []
    matmul = [matmul_row(d, args.matmul_size, timing) for d in dtypes]
    compute = compute_row(config, bs, stats["channels"], timing, matmul)
    path, workers = device_input(n_total, stats["channels"], size), max(args.workers)
    path = path if path == "gpu-aug" or is_jpeg_data(images) else None
    data = MeasuredImages(images, stats)
    loader = [loader_row("workers", w, data, size, bs, timing) for w in args.workers]
    loader += [loader_row(path, workers, data, size, bs, timing)] if path else []
    end2end = [end2end_row(config, mode, workers, data, bs, timing)
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
