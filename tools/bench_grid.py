"""The maintainers' benchmark grids, built on bench.py's measurements: every part of the
pretraining path over architectures, image sizes, precisions, memory formats, torch.compile and
input pipelines, next to the device's matmul rate and a straightforward reference loop, with the
performance targets; and the start-up and augmentation studies. The tables of
docs/performance.md are generated from the --json files it writes (tools/results_tables.py).

    python tools/bench_grid.py                                # this machine's default grid
    python tools/bench_grid.py --device cpu --json results/bench_cpu.json
    python tools/bench_grid.py --device cuda --archs resnet18 --sizes 32 --compile off on \
                    --sections compute end2end --json results/bench_cuda_compile.json
    python tools/bench_grid.py --device cuda --gpu-targets --json results/bench_cuda_targets.json
    python tools/bench_grid.py --quick --json /tmp/grid.json  # seconds: what the tests run

Sections (--sections; each prints a table, and every row goes to the JSON file):
    matmul    square matmul in each --amp dtype: the measured dense rate of the device
    compute   forward + backward + optimizer step on a batch already on the device, for every
              arch x size x amp x channels-last x compile: img/s, TFLOP/s (FlopCounterMode count
              of the step) and their fraction of the matmul rate, peak memory
    loader    main.py's input pipeline alone: DataLoader workers (decode + two augmented views
              per image) per worker count, with --gpu-aug on the decoded uint8 batches
              augmented on the device, with --gpu-decode on (JPEG data) workers reading bytes
              and the device decoding and augmenting; its ratio to what the trainer consumes
              (the fastest compute img/s of that size)
    end2end   the engine's loop (Trainer.train_one_epoch) fed by that pipeline, as main.py runs
              it, in the fastest compute configuration of each arch and size
    baseline  the reference: a plain Dataset with per-image PIL transforms, two forward passes
              (one per view), fp32, a broadcast cosine-similarity NT-Xent and loss.item() per step
    ntxent    NTXentLoss forward + backward against the bare matmul + cross_entropy lower bound
              and the broadcast version, for N in --ntxent-n
    startup   (only when named) main.py's start-up on path lists of --startup-sizes entries,
              the first scan of a folder of that many files, and the memory of DataLoader
              workers holding that many entries (tools/startup_bench.py)
    augment   (only when named) ways of producing the views: the batched ops of --gpu-aug,
              torchvision.transforms.v2 per view, the per-image PIL pipeline and kornia where
              installed, ms per batch of views (tools/augment_bench.py)
Images per second count images (two views each), as main.py's img/s does. The targets are
printed as "target ...: measured X (met|not met)" lines and stored under "targets"; the
end-to-end target also gives its ceiling: the speed-up over the baseline of a step that ran all
its FLOPs at the measured matmul rate (no loop doing the same work can exceed it). MFU is a
step's TFLOP/s over the device's measured bf16 matmul rate. On CUDA the targets judge the
fastest input pipeline of each arch and size, and main.py's default one (--gpu-aug where the
decoded images fit --max-memory-gb, else --gpu-decode) where that is slower: >= 90 % of
compute-only, >= 3x the baseline and, on an H100/H200, >= 15,000 img/s (ResNet-18, 32 px,
batch 512, 3-channel images) and >= 2,500 img/s (ResNet-50, 224 px, batch 256, JPEG files);
--gpu-targets runs just those configurations.
Image sizes above --jpeg-above (CUDA: 64) read synthetic RGB JPEGs of 8/7 x the size unless
--data; with --gpu-targets the smaller sizes read RGB JPEGs of their own size (32 px).
A results file keeps the runs of one command; one first written by `python bench.py ARGS`
(where these grids were before) takes the runs of `python tools/bench_grid.py ARGS`.
"""
import argparse
import ctypes
import gc
import math
import os
import platform
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from utils.cli import ensure_writable_dir, environment_info, run_main  # noqa: E402
from utils.data import dataset_statistics  # noqa: E402
from utils.errors import UserError, warn  # noqa: E402
from utils.file_index import find_split  # noqa: E402
from utils.fileio import json_dump, open_runs  # noqa: E402
from utils.model import FEATURE_DIMS, build_model, default_proj_dims, resolve_stem  # noqa: E402
from utils.ntxent import NTXentLoss  # noqa: E402
from utils.optim import scaled_learning_rate  # noqa: E402
from utils.precision import resolve_amp  # noqa: E402
from utils.sources import select_subset  # noqa: E402
from utils.speed import (LR_PER_256, MATMUL_DTYPES, TEMPERATURE, WEIGHT_DECAY,  # noqa: E402
                         MeasuredImages, Timing, compute_row, device_input, end2end_row,
                         endless_batches, images_per_s_at_matmul_rate, is_jpeg_data, loader_row,
                         main_augmentation_settings, matmul_row, release_memory, seconds_per_call,
                         select_bench_device, write_synthetic_images)
from utils.transforms import SimCLRAugmentation  # noqa: E402

SECTIONS = ("matmul", "compute", "loader", "ntxent", "end2end", "baseline")
# The broadcast NT-Xent peaked at 6.2x one (2N, 2N, D) float32 tensor (CPU, N = 256 and 512).
BROADCAST_PEAK_TENSORS = 6.2
# Performance targets (CPU: end to end over the baseline, loader over the trainer; CUDA: end to
# end over compute-only and over the baseline; any device: NT-Xent over its bound).
E2E_OVER_BASELINE, LOADER_OVER_TRAINER, NTXENT_OVER_BOUND, E2E_OVER_COMPUTE = 1.3, 3.0, 1.5, 0.90
CUDA_E2E_OVER_BASELINE = 3.0
NTXENT_TARGET_N = 1024
# img/s of the GPU targets on an H100/H200-class GPU, per (arch, image size, batch): the
# published references are about 4,200 img/s (ResNet-18, CIFAR-10, fp32, A100) and 2,500-3,000
# per view (ResNet-50, 224 px, DALI + AMP, A100).
GPU_CLASS_TARGETS = {("resnet18", 32, 512): 15_000, ("resnet50", 224, 256): 2_500}
TARGET_GPU_NAMES = ("H100", "H200")

# Defaults that depend on the device (and on --quick); a flag given on the command line wins.
DEFAULTS = {
    "cpu": dict(archs=["resnet18"], sizes=[32], amp=["off"], channels_last=["on", "off"],
                compile=["off", "on"], gpu_aug=["off"], gpu_decode=["off"], batch_size=128,
                batch_by_size={}, jpeg_above=None, steps=4, warmup=1,
                workers=[0, 1, 2], ntxent_n=[256, 1024, 4096], matmul_size=2048,
                broadcast_limit_gb=4.0),
    "cuda": dict(archs=["resnet18", "resnet50"], sizes=[32, 224], amp=["off", "bf16", "fp16"],
                 channels_last=["on", "off"], compile=["off"], gpu_aug=["off", "on"],
                 gpu_decode=["off", "on"], batch_size=None, batch_by_size={32: 512, 224: 256},
                 jpeg_above=64, steps=30, warmup=5, workers=[2, 4, 8, 16],
                 ntxent_n=[256, 1024, 4096], matmul_size=8192, broadcast_limit_gb=None),
    "quick": dict(archs=["resnet18"], sizes=[8], amp=["off"], channels_last=["on", "off"],
                  compile=["off"], gpu_aug=["off"], gpu_decode=["off"], batch_size=8,
                  batch_by_size={}, jpeg_above=None, steps=1, warmup=0,
                  workers=[0, 1], ntxent_n=[64, 1024], matmul_size=256,
                  broadcast_limit_gb=1.0),
}
QUICK_MAX_IMAGES = 128


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="The maintainers' benchmark grids (bench.py's measurements over archs, "
                    "sizes, precisions, inputs), a reference loop, NT-Xent and the targets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (8 px, batch 8, 1 step without warm-up, 128 images): "
                             "runs in seconds, for the test suite; the figures mean nothing")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = cuda when available, else cpu")
    parser.add_argument("--gpu-targets", action="store_true",
                        help="only the configurations of the GPU targets, side by side: "
                             "ResNet-18 at 32 px (batch 512, RGB JPEGs of 32 px) and ResNet-50 "
                             "at 224 px (batch 256, from JPEG files), bf16, channels-last, every "
                             "input pipeline and the baseline (flags given on the command line "
                             "still win)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS + ("startup", "augment"),
                        default=list(SECTIONS),
                        help="what to measure (see the module docstring)")
    parser.add_argument("--json", metavar="OUT", default=os.path.join("results", "bench.json"),
                        help="the results file: every row, the settings and the device, kept "
                             "as one more run of this command (the tables give the range over "
                             "the runs)")
    parser.add_argument("--replace", action="store_true",
                        help="drop the runs of another command recorded in the --json file")
    grid = parser.add_argument_group(
        "grid (defaults per device: CPU resnet18, 32 px, amp off, gpu-aug off; CUDA resnet18 and "
        "resnet50, 32 and 224 px, amp off bf16 fp16, gpu-aug off on; both channels-last on off, "
        "compile off)")
    grid.add_argument("--archs", nargs="+", choices=tuple(FEATURE_DIMS), default=None,
                      help="encoders of the compute, end-to-end and baseline sections")
    grid.add_argument("--sizes", nargs="+", type=int, default=None,
                      help="training resolutions in px (the augmentation's --image-size)")
    grid.add_argument("--amp", nargs="+", choices=tuple(MATMUL_DTYPES), default=None,
                      help="precisions: off = fp32, bf16 / fp16 = autocast of the forward pass "
                           "(fp16 with a GradScaler); CPU bf16 is slow without native support")
    grid.add_argument("--channels-last", nargs="+", choices=("on", "off"), default=None,
                      help="memory formats to measure (main.py's default is on)")
    grid.add_argument("--compile", nargs="+", choices=("off", "on"), default=None,
                      help="torch.compile of the model (inductor); every configuration compiles "
                           "anew in its warm-up, which can take minutes, so measure it on a "
                           "narrowed grid")
    grid.add_argument("--gpu-aug", nargs="+", choices=("off", "on"), default=None,
                      help="input pipelines of the loader and end-to-end sections: off = "
                           "DataLoader workers, on = main.py --gpu-aug (decoded uint8 images, "
                           "augmentation on the device, utils/gpu_augment.py)")
    grid.add_argument("--gpu-decode", nargs="+", choices=("off", "on"), default=None,
                      help="also time main.py --gpu-decode (workers read JPEG bytes, the device "
                           "decodes and augments) on JPEG data (default on CUDA: off on)")
    grid.add_argument("-bs", "--batch-size", dest="batch_size", type=int, default=None,
                      help="images per step (two views each); default 128 (8 with --quick)")
    grid.add_argument("--steps", type=int, default=None,
                      help="timed steps (batches, matmuls, loss evaluations) per measurement; "
                           "default 4 on CPU, 30 on CUDA")
    grid.add_argument("--warmup", type=int, default=None,
                      help="untimed steps before each measurement; default 1 on CPU, 5 on CUDA")
    grid.add_argument("--workers", nargs="+", type=int, default=None,
                      help="DataLoader worker counts of the loader section; default 0 1 2 on "
                           "CPU, 2 4 8 16 (at most the CPU count) on CUDA")
    grid.add_argument("--e2e-workers", type=int, default=None,
                      help="workers of the end-to-end and baseline loops (default: the largest "
                           "of --workers)")
    data = parser.add_argument_group("data and sizes")
    data.add_argument("--data", metavar="FOLDER", default=None,
                      help="image folder (with train/ or plain images) of the loader, end-to-end "
                           "and baseline sections; default demo_data when present, else "
                           "synthetic images written to a temporary folder")
    data.add_argument("--jpeg-above", metavar="PX", type=int, default=None,
                      help="image sizes above PX read RGB JPEGs of 8/7 x the size (synthetic, "
                           "as ImageNet's 256 px files for 224 px crops) unless --data is given "
                           "(default on CUDA: 64; elsewhere none); with --gpu-targets the sizes "
                           "at or below PX read RGB JPEGs of their own size")
    data.add_argument("--ntxent-n", nargs="+", type=int, default=None,
                      help="batch sizes N of the NT-Xent section (2N embeddings)")
    data.add_argument("--startup-sizes", nargs="+", type=int, default=None,
                      help="--sections startup: numbers of entries (default 10^4 10^5 10^6; "
                           "quick: 200 1000)")
    data.add_argument("--startup-repo", metavar="DIR", default=None,
                      help="--sections startup: time this checkout's main.py (e.g. a worktree of "
                           "an older commit, for a before/after table); default this one")
    data.add_argument("--ntxent-dim", type=int, default=128, help="embedding size D of NT-Xent")
    data.add_argument("--matmul-size", type=int, default=None,
                      help="side of the square matmul; default 2048 on CPU, 8192 on CUDA")
    data.add_argument("--broadcast-limit-gb", type=float, default=None,
                      help="skip the broadcast NT-Xent where its estimated peak memory "
                           "(6.2 x (2N)^2 x D x 4 bytes) exceeds this; default 4 on CPU, half "
                           "the GPU memory on CUDA")
    return parser


def resolve_settings(args):
    """Fill the flags left at None with the defaults of the device (or of --quick), check the
    values; returns the torch.device."""
    device = select_bench_device(args.device)
    defaults = dict(DEFAULTS["quick" if args.quick else device.type])
    args.pairs = None
    if args.gpu_targets:
        args.pairs = sorted({(arch, size) for arch, size, _ in GPU_CLASS_TARGETS})
        defaults.update(archs=sorted({a for a, _ in args.pairs}),
                        sizes=sorted({s for _, s in args.pairs}), amp=["bf16"],
                        channels_last=["on"], compile=["off"], gpu_aug=["off", "on"],
                        gpu_decode=["off", "on"], batch_size=None,
                        batch_by_size={size: b for _, size, b in GPU_CLASS_TARGETS},
                        jpeg_above=64)
    if device.type == "cuda" and not args.quick:
        defaults["workers"] = sorted({min(w, os.cpu_count() or 1) for w in defaults["workers"]})
        defaults["broadcast_limit_gb"] = torch.cuda.get_device_properties(
            device).total_memory / 2 ** 31
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.e2e_workers is None:
        args.e2e_workers = max(args.workers)
    checks = [(min(batch_for(args, size) for size in args.sizes) >= 2,
               f"-bs {args.batch_size}: SimCLR needs at least 2 images per batch, e.g. -bs 128"),
              (args.steps >= 1, f"--steps {args.steps} must be at least 1"),
              (args.warmup >= 0, f"--warmup {args.warmup} must be 0 or more"),
              (min(args.workers + [args.e2e_workers]) >= 0, "worker counts must be 0 or more"),
              (min(args.sizes) >= 8, f"--sizes {args.sizes}: images of at least 8 px, e.g. 32"),
              (min(args.ntxent_n) >= 2, f"--ntxent-n {args.ntxent_n}: at least 2 images"),
              (args.ntxent_dim >= 1, f"--ntxent-dim {args.ntxent_dim} must be at least 1"),
              (args.matmul_size >= 16, f"--matmul-size {args.matmul_size}: at least 16")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    for amp in args.amp:
        resolve_amp(amp, device)  # UserError for bf16 on a GPU without it
    return device


def batch_for(args, size):
    """The batch size at image size `size`: -bs when given, else the device's default for that
    size (CUDA: 512 at 32 px, 256 at 224 px, the sizes of the GPU targets), else 128."""
    if args.batch_size is not None:
        return args.batch_size
    return (getattr(args, "batch_by_size", None) or {}).get(size, 128)


def sized_args(args, size):
    """A copy of `args` for the sections at one image size: sizes [size], its batch size."""
    archs = [a for a in args.archs if args.pairs is None or (a, size) in args.pairs]
    return argparse.Namespace(**{**vars(args), "sizes": [size], "archs": archs,
                                 "batch_size": batch_for(args, size)})


# ---------------------------------------------------------------------------------------------
# Peak memory, and the reference implementations


def _proc_status_mb(field):
    """A memory figure of this process from /proc/self/status (e.g. VmRSS) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise OSError(f"no {field} in /proc/self/status")


class PeakMemory:
    """Peak memory of a `with` block above what was in use at its start, in MB (`.mb`).

    CUDA: torch.cuda.max_memory_allocated minus memory_allocated at the start (tensor bytes).
    CPU: the peak resident set size (Linux VmHWM, reset to the current size at the start by
    writing 5 to /proc/self/clear_refs) minus the resident size at the start, after returning
    the allocator's free memory to the system (glibc malloc_trim), so that memory reused from
    earlier measurements counts again. Small figures (below a page or two of allocator slack)
    can still read 0; DataLoader worker processes are not included. `.mb` is None where
    /proc/self/clear_refs is not available (not Linux).
    """

    METHOD = {"cuda": "torch.cuda.max_memory_allocated above the start",
              "cpu": "peak resident set size above the start (Linux VmHWM after a reset "
                     "through /proc/self/clear_refs, free heap returned by malloc_trim first)"}

    def __init__(self, device):
        self.device, self.mb, self.start = device, None, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            gc.collect()
            release_free_heap()
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.start = _proc_status_mb("VmRSS")
            except OSError:
                self.start = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.start) / 2 ** 20
        elif self.start is not None:
            self.mb = max(0.0, _proc_status_mb("VmHWM") - self.start)
        return False


def release_free_heap():
    """Give the C heap's free pages back to the system (glibc malloc_trim(0)); a no-op where
    the C library has no malloc_trim."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def partner_targets(n, device):
    """Index of each of the 2N views' partner: i <-> i + N."""
    return torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(device)


def matmul_cross_entropy(z1, z2):
    """The lower bound of any NT-Xent: logits = z z^T (2N, 2N) for z = cat(z1, z2), then
    cross_entropy against the partners; no normalisation, no temperature, no mask."""
    z = torch.cat([z1, z2])
    return F.cross_entropy(z @ z.T, partner_targets(z1.shape[0], z.device))


def broadcast_ntxent(z1, z2, temperature):
    """NT-Xent as common SimCLR repositories write it (the reference): the cosine similarity of
    every pair by broadcasting (2N, 1, D) against (1, 2N, D), which materialises (2N, 2N, D)
    tensors, the diagonal masked, cross_entropy against the partners. The same loss value as
    utils.ntxent.NTXentLoss, at far more time and memory."""
    z = torch.cat([z1, z2])
    sim = F.cosine_similarity(z.unsqueeze(1), z.unsqueeze(0), dim=2) / temperature
    self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    return F.cross_entropy(sim.masked_fill(self_mask, float("-inf")),
                           partner_targets(z1.shape[0], z.device))


class PlainTwoViewDataset(torch.utils.data.Dataset):
    """The reference's dataset: open file `index` with PIL, convert it to `mode`, apply the
    per-image `transform` twice; no seeding, no substitute for unreadable files."""

    def __init__(self, paths, mode, transform):
        self.paths, self.mode, self.transform = paths, mode, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        img = Image.open(self.paths[index]).convert(self.mode)
        return self.transform(img), self.transform(img)


def baseline_step(model, optimizer, view1, view2):
    """The reference step: one forward pass per view (so each view has its own BatchNorm
    statistics), the broadcast NT-Xent in fp32, backward, step, and loss.item() (a host sync
    every step)."""
    _, z1 = model(view1)
    _, z2 = model(view2)
    loss = broadcast_ntxent(z1, z2, TEMPERATURE)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


# ---------------------------------------------------------------------------------------------
# Data


class BenchData:
    """The images of the data sections per image size, loaded once per kind: --data, else
    synthetic RGB JPEGs where jpeg_side() gives them a side, else demo_data/ when present, else
    synthetic gray PNGs. `for_size(args, size)` -> (ImageList, statistics, description)."""

    def __init__(self, workdir):
        self.workdir, self.loaded = workdir, {}

    def for_size(self, args, size):
        side = jpeg_side(args, size)
        key = ("jpeg", size) if side else "default"
        if key not in self.loaded:
            self.loaded[key] = (load_jpeg_images(args, self.workdir, size, side) if side
                                else load_bench_images(args, self.workdir))
        images = self.loaded[key][0]
        if len(images) < args.batch_size:
            raise UserError(f"{self.loaded[key][2]}: fewer than one batch of {args.batch_size}; "
                            f"use -bs {len(images)} or less")
        return self.loaded[key]


def jpeg_side(args, size):
    """The side in px of the synthetic RGB JPEGs that the rows at `size` read, or None where
    they read --data or demo_data: 8/7 x the size above --jpeg-above (as ImageNet's 256 px
    files for 224 px crops); with --gpu-targets the size itself at or below it (3-channel
    images as CIFAR's for the 32 px target: RGB augmentation costs about twice gray's)."""
    if args.data is not None:
        return None
    if args.jpeg_above is not None and size > args.jpeg_above:
        return round(size * 8 / 7)
    return size if getattr(args, "gpu_targets", False) else None


def load_jpeg_images(args, workdir, size, side):
    """(ImageList, statistics, description) of synthetic RGB JPEGs of `side` px for the rows
    at `size`."""
    n = max(8 * batch_for(args, size), 256)
    folder = write_synthetic_images(os.path.join(workdir, f"jpeg{size}"), n, side)
    images = find_split(folder, "train", require_labels=False)
    stats = dataset_statistics(images, os.path.join(folder, "data_stats.json"), seed=0)
    return images.with_intensity_range(stats["intensity_range"]), stats, f"synthetic: {n} RGB JPEGs of {side} px"


def load_bench_images(args, workdir):
    """(ImageList, statistics dict, description) of the images the data sections read:
    --data, else demo_data/ when present, else synthetic images written under `workdir`."""
    demo = os.path.join(REPO, "demo_data")
    if args.data is not None:
        if not os.path.isdir(args.data):
            raise UserError(f"--data {args.data} is not a folder; give a folder of images (or "
                            f"one with train/), or leave --data out to use demo_data")
        folder, source = args.data, args.data
    elif os.path.isdir(os.path.join(demo, "train")):
        folder, source = demo, "demo_data (Fashion-MNIST, 28 px gray)"
    else:
        n = max(8 * max(batch_for(args, size) for size in args.sizes or [0]), 256)
        folder = write_synthetic_images(os.path.join(workdir, "synthetic"), n, 28,
                                        rgb_jpeg=False)
        source = f"synthetic: {n} random 28 px gray PNGs (no demo_data)"
    images = find_split(folder, "train", require_labels=False)
    if args.quick:
        images = select_subset(images, min(len(images), QUICK_MAX_IMAGES))
    stats = dataset_statistics(images, os.path.join(workdir, "data_stats.json"), seed=0)
    return images.with_intensity_range(stats["intensity_range"]), stats, f"{source}, {len(images)} images"


def input_modes(args, images):
    """The input pipelines to time on `images`: workers, then gpu-aug and gpu-decode (JPEG
    data only) when asked for."""
    modes = ["workers"] + (["gpu-aug"] if "on" in args.gpu_aug else [])
    return modes + (["gpu-decode"] if "on" in args.gpu_decode and is_jpeg_data(images) else [])


# ---------------------------------------------------------------------------------------------
# Sections


def bench_matmul(args, device):
    """Rows {dtype, size, ms, tflops} of utils.speed.matmul_row in each --amp dtype, and always bf16
    (the rate MFU is held against); on CUDA also fp32 with TF32 allowed ('tf32', what cuDNN
    uses for fp32 convolutions by default)."""
    dtypes = list(dict.fromkeys([MATMUL_DTYPES[a] for a in args.amp] + ["bfloat16"]))
    dtypes += ["tf32"] if device.type == "cuda" and "off" in args.amp else []
    return [matmul_row(name, args.matmul_size, Timing(args.warmup, args.steps, device))
            for name in dtypes]


def compute_configs(args):
    """Every arch x size x compile x amp x channels-last combination, as dicts."""
    return [{"arch": arch, "image_size": size, "amp": amp, "channels_last": cl == "on",
             "compile": comp == "on"}
            for arch in args.archs for size in args.sizes for comp in args.compile
            for amp in args.amp for cl in args.channels_last]


def bench_compute(args, device, channels, matmul_rows):
    """Rows of utils.speed.compute_row, one per compute_configs entry, the step's FLOPs counted once
    per arch and size, with the peak memory; a configuration that fails to compile is a row
    with its error."""
    rows, flops, timing = [], {}, Timing(args.warmup, args.steps, device)
    for config in compute_configs(args):
        key = (config["arch"], config["image_size"])
        with PeakMemory(device) as memory:
            try:
                row = compute_row(config, args.batch_size, channels, timing, matmul_rows,
                                  flops.get(key))
            except Exception as err:  # a backend that cannot compile: report it and go on
                if not config["compile"]:
                    raise
                error = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
                warn(f"torch.compile failed for {config_label(config)}: {error}")
                rows.append({**config, "batch_size": args.batch_size, "error": error})
                continue
            finally:
                release_memory(device)
        flops.setdefault(key, row["gflop_per_step"] * 1e9)
        rows.append({**row, "peak_memory_mb": memory.mb})
    return rows


def fastest_compute(compute_rows, arch, size):
    """The compute row of `arch` at `size` with the most img/s, or None."""
    rows = [r for r in compute_rows if r["arch"] == arch and r["image_size"] == size
            and "images_per_s" in r]
    return max(rows, key=lambda r: r["images_per_s"], default=None)


def bench_loader(args, device, images, stats, compute_rows):
    """Rows of utils.speed.loader_row per input mode (input_modes): the DataLoader and --gpu-decode
    for each --workers count, --gpu-aug once; each with its ratio to the fastest compute-only
    img/s of every arch at that size (what the trainer consumes)."""
    rows, data = [], MeasuredImages(images, stats)
    timing = Timing(args.warmup, args.steps, device)
    for size in args.sizes:
        for mode in input_modes(args, images):
            for workers in ([0] if mode == "gpu-aug" else args.workers):
                rows.append(loader_row(mode, workers, data, size, args.batch_size, timing))
    for row in rows:
        for arch in args.archs:
            consumer = fastest_compute(compute_rows, arch, row["image_size"])
            if consumer is not None:
                row[f"over_{arch}_compute"] = row["images_per_s"] / consumer["images_per_s"]
    return rows


def bench_ntxent(args, device):
    """Rows {n, dim, method, ms, peak_memory_mb, over_bound} of forward + backward of
    utils.ntxent.NTXentLoss ('ntxent'), the bare matmul + cross_entropy ('bound') and the
    broadcast reference ('broadcast', skipped above --broadcast-limit-gb)."""
    criterion = NTXentLoss(TEMPERATURE)
    methods = {"bound": matmul_cross_entropy, "ntxent": criterion,
               "broadcast": lambda z1, z2: broadcast_ntxent(z1, z2, TEMPERATURE)}
    rows = []
    for n in args.ntxent_n:
        generator = torch.Generator().manual_seed(n)
        z1, z2 = (torch.randn(n, args.ntxent_dim, generator=generator).to(device)
                  .requires_grad_() for _ in range(2))
        bound_ms = None
        for method, loss_fn in methods.items():
            row = {"n": n, "dim": args.ntxent_dim, "method": method}
            estimate_gb = BROADCAST_PEAK_TENSORS * (2 * n) ** 2 * args.ntxent_dim * 4 / 2 ** 30
            if method == "broadcast" and estimate_gb > args.broadcast_limit_gb:
                row["skipped"] = (f"estimated {estimate_gb:.1f} GB > --broadcast-limit-gb "
                                  f"{args.broadcast_limit_gb:g}")
                rows.append(row)
                continue

            def forward_backward_once():
                loss_fn(z1, z2).backward()
                z1.grad = z2.grad = None

            with PeakMemory(device) as memory:
                seconds = seconds_per_call(forward_backward_once, args.warmup, args.steps, device)
            bound_ms = 1e3 * seconds if method == "bound" else bound_ms
            rows.append({**row, "ms": 1e3 * seconds, "peak_memory_mb": memory.mb,
                         "over_bound": 1e3 * seconds / bound_ms})
        release_memory(device)
    return rows


def e2e_config(args, compute_rows, arch, size):
    """(config, its compute-only row or None) of the end-to-end run of `arch` at `size`: amp,
    channels-last and compile of the fastest compute-only row (the trainer to feed), else the
    first --amp with channels-last on if listed and no compile."""
    best = fastest_compute(compute_rows, arch, size)
    if best is not None:
        return {k: best[k] for k in ("amp", "channels_last", "compile")}, best
    return {"amp": args.amp[0], "channels_last": "on" in args.channels_last,
            "compile": args.compile == ["on"]}, None


def bench_end2end(args, device, images, stats, compute_rows, baseline_rows):
    """Rows of utils.speed.end2end_row, main.py's loop fed as main.py feeds it, per input mode
    (input_modes: DataLoader workers, --gpu-aug, --gpu-decode), with its fraction of the
    compute-only img/s of the same configuration and its ratio to the baseline loop of the
    same arch and size."""
    rows, data = [], MeasuredImages(images, stats)
    timing = Timing(args.warmup, args.steps, device)
    for arch in args.archs:
        for size in args.sizes:
            config, compute = e2e_config(args, compute_rows, arch, size)
            baseline = next((r for r in baseline_rows
                             if (r["arch"], r["image_size"]) == (arch, size)), None)
            for mode in input_modes(args, images):
                row = end2end_row({"arch": arch, "image_size": size, **config}, mode,
                                  args.e2e_workers, data, args.batch_size, timing)
                default = device_input(len(images), stats["channels"], size)
                row.update(main_default=mode == default, gpu_aug=mode == "gpu-aug")
                if compute is not None:
                    row["compute_images_per_s"] = compute["images_per_s"]
                    row["fraction_of_compute"] = row["images_per_s"] / compute["images_per_s"]
                    if compute.get("mfu"):
                        row["mfu"] = compute["mfu"] * row["fraction_of_compute"]
                if baseline is not None:
                    row["over_baseline"] = row["images_per_s"] / baseline["images_per_s"]
                    ceiling = images_per_s_at_matmul_rate(compute)
                    if ceiling:
                        row["ceiling_over_baseline"] = ceiling / baseline["images_per_s"]
                rows.append(row)
    return rows


def bench_baseline(args, device, images, stats):
    """Rows of the reference loop (see baseline_step) over a plain Dataset of the same images
    with the same per-image augmentation, shuffled by a plain DataLoader, per arch and size."""
    rows = []
    for arch in args.archs:
        for size in args.sizes:
            seconds = time_baseline_step(arch, size, args, device, images, stats)
            release_memory(device)
            rows.append({"arch": arch, "image_size": size, "workers": args.e2e_workers,
                         "batch_size": args.batch_size, "step_ms": 1e3 * seconds,
                         "images_per_s": args.batch_size / seconds})
    return rows


def time_baseline_step(arch, size, args, device, images, stats):
    """Seconds per step of the reference loop, loading included: the model main.py would build
    (contiguous memory format), plain SGD over all parameters, a shuffling DataLoader."""
    torch.manual_seed(0)
    model = build_model(arch, stats["channels"], resolve_stem("auto", size),
                        default_proj_dims(arch)).to(device)
    lr = scaled_learning_rate(LR_PER_256, args.batch_size, "linear")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9,
                                weight_decay=WEIGHT_DECAY)
    mode = "L" if stats["channels"] == 1 else "RGB"
    augmentation = SimCLRAugmentation(main_augmentation_settings(size, stats))
    loader = torch.utils.data.DataLoader(
        PlainTwoViewDataset(images.paths, mode, augmentation),
        batch_size=args.batch_size, shuffle=True, drop_last=True,
        num_workers=args.e2e_workers, pin_memory=device.type == "cuda")
    batches = endless_batches(loader)

    def step():
        view1, view2 = next(batches)
        baseline_step(model, optimizer, view1.to(device), view2.to(device))

    try:
        return seconds_per_call(step, args.warmup, args.steps, device)
    finally:
        batches.close()


# ---------------------------------------------------------------------------------------------
# Targets and output


def target(name, measured, threshold, config, at_most=False, ceiling=None):
    """One target row {name, measured, threshold, at_most, met, config, ceiling}: met when
    measured >= threshold (<= with at_most); `ceiling` the best value the device allows, when
    known (see bench.images_per_s_at_matmul_rate)."""
    met = measured <= threshold if at_most else measured >= threshold
    return {"name": name, "measured": measured, "threshold": threshold, "at_most": at_most,
            "met": bool(met), "config": config, "ceiling": ceiling}


def evaluate_targets(results, device, device_name=""):
    """The performance targets that the measured rows allow. CPU: end to end >= 1.3x the
    baseline loop, and the loader (best worker count) >= 3x the trainer's compute-only img/s.
    CUDA, for the fastest input pipeline of each arch and size (the one to choose) and for
    main.py's default one (bench.device_input) where that is another: end to end
    >= 90 % of the compute-only img/s of the same configuration, >= 3x the baseline loop, and
    on an H100/H200 the img/s of GPU_CLASS_TARGETS. Any device: NT-Xent forward + backward
    <= 1.5x the matmul + cross_entropy bound at N = 1024."""
    targets = []
    if device.type == "cpu":
        for row in results.get("end2end", []):
            if "over_baseline" in row:
                targets.append(target(f"end to end >= {E2E_OVER_BASELINE}x the baseline loop",
                                      row["over_baseline"], E2E_OVER_BASELINE, config_label(row),
                                      ceiling=row.get("ceiling_over_baseline")))
        targets += loader_targets(results.get("loader", []))
    else:
        targets += cuda_end2end_targets(results.get("end2end", []), device_name)
    for row in results.get("ntxent", []):
        if row["n"] == NTXENT_TARGET_N and row["method"] == "ntxent":
            targets.append(target(
                f"NT-Xent forward+backward <= {NTXENT_OVER_BOUND}x the matmul + cross_entropy "
                f"bound", row["over_bound"], NTXENT_OVER_BOUND,
                f"N = {row['n']}, D = {row['dim']}", at_most=True))
    return targets


def loader_targets(loader_rows):
    """CPU: the best loader row of each size >= LOADER_OVER_TRAINER x each arch's compute."""
    targets = []
    for size in sorted({r["image_size"] for r in loader_rows}):
        best = max((r for r in loader_rows if r["image_size"] == size),
                   key=lambda r: r["images_per_s"])
        for key in (k for k in best if k.startswith("over_")):
            arch = key[len("over_"):-len("_compute")]
            targets.append(target(
                f"loader >= {LOADER_OVER_TRAINER}x what the trainer consumes",
                best[key], LOADER_OVER_TRAINER,
                f"{arch}, {size} px, bs {best['batch_size']}, {best['pipeline']}, "
                f"{best['workers']} workers"))
    return targets


def cuda_end2end_targets(end2end_rows, device_name):
    """The GPU targets on the fastest end-to-end row of each (arch, size) and, when that is
    another row, on the row of the input main.py takes by default (`main_default`)."""
    targets = []
    for key in sorted({(r["arch"], r["image_size"]) for r in end2end_rows}):
        rows = [r for r in end2end_rows if (r["arch"], r["image_size"]) == key]
        best = max(rows, key=lambda r: r["images_per_s"])
        default = next((r for r in rows if r.get("main_default")), best)
        targets += row_targets(key, best, "fastest input", device_name)
        if default is not best:
            targets += row_targets(key, default, "main.py's default path", device_name)
    return targets


def row_targets(key, row, which, device_name):
    """The GPU targets of one end-to-end `row` of (arch, size) `key`, labelled `which`."""
    targets = []
    label = f"{config_label(row)} ({which})"
    if "fraction_of_compute" in row:
        targets.append(target(f"end to end >= {E2E_OVER_COMPUTE:.0%} of compute-only img/s",
                              row["fraction_of_compute"], E2E_OVER_COMPUTE, label))
    if "over_baseline" in row:
        targets.append(target(f"end to end >= {CUDA_E2E_OVER_BASELINE}x the baseline loop",
                              row["over_baseline"], CUDA_E2E_OVER_BASELINE, label,
                              ceiling=row.get("ceiling_over_baseline")))
    wanted = GPU_CLASS_TARGETS.get((*key, row["batch_size"]))
    if wanted and any(name in device_name for name in TARGET_GPU_NAMES):
        targets.append(target(f"end to end >= {wanted} img/s on an H100/H200",
                              row["images_per_s"], wanted, label))
    return targets


def config_label(row):
    """'resnet18, 32 px, bs 128, amp off, channels-last, 2 workers' for a row or config."""
    parts = [row["arch"], f"{row['image_size']} px"]
    parts += [f"bs {row['batch_size']}"] if "batch_size" in row else []
    if "amp" in row:
        parts += [f"amp {row['amp']}", "channels-last" if row["channels_last"] else "contiguous"]
        parts += ["compiled"] if row["compile"] else []
        pipeline = row.get("pipeline", "gpu-aug" if row.get("gpu_aug") else "workers")
        parts += [] if pipeline == "workers" else [pipeline]
    parts += [f"{row['workers']} workers"] if "workers" in row else []
    return ", ".join(parts)


def format_value(value, kind):
    """A table cell: kind int, ms, x (ratio), pct, mb, tf (3 significant digits) or str."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return {"int": "{:.0f}", "ms": "{:.2f}", "x": "{:.2f}x", "pct": "{:.1%}", "mb": "{:.0f}",
            "tf": "{:.3g}", "str": "{}"}[kind].format(value)


def print_table(title, columns, rows, key_columns=0):
    """Print `rows` (dicts) under `title` as right-aligned columns, columns = [(key, header,
    kind)]. A row with "skipped" or "error" shows its first `key_columns` cells and the reason."""
    lines = [[header for _, header, _ in columns]]
    for row in rows:
        reason = row.get("skipped") or row.get("error")
        lines.append([format_value(row.get(key), kind) for key, _, kind in
                      columns[:key_columns if reason else len(columns)]] + [reason] * bool(reason))
    widths = [max(len(line[i]) for line in lines if i < len(line) - (len(line) < len(columns)))
              for i in range(len(columns))]
    print(f"\n{title}")
    for line in lines:
        if len(line) < len(columns):  # a skipped row: the reason takes the rest of the line
            print("  " + "  ".join(c.rjust(w) for c, w in zip(line[:-1], widths)) + "  " + line[-1])
        else:
            print("  " + "  ".join(c.rjust(w) for c, w in zip(line, widths)))


def print_section(name, rows, archs):
    """The table of one section (`archs` names the loader's ratio columns)."""
    config = [("arch", "arch", "str"), ("image_size", "px", "int"), ("amp", "amp", "str"),
              ("channels_last", "ch-last", "str"), ("compile", "compile", "str")]
    tables = {
        "matmul": ("dense matmul (the device's measured rate)", [
            ("dtype", "dtype", "str"), ("size", "n", "int"), ("ms", "ms", "ms"),
            ("tflops", "TFLOP/s", "tf")], 1),
        "compute": ("compute only: forward + backward + step on a batch already on the device",
                    config + [("step_ms", "ms/step", "ms"), ("images_per_s", "img/s", "int"),
                              ("gflop_per_step", "GFLOP/step", "tf"),
                              ("tflops", "TFLOP/s", "tf"),
                              ("fraction_of_matmul", "of matmul", "pct"),
                              ("mfu", "MFU", "pct"), ("peak_memory_mb", "peak MB", "mb")], 5),
        "loader": ("loader only: main.py's input pipeline (workers: DataLoader decoding and "
                   "augmenting per image; gpu-aug: decoded uint8 batches augmented on the device; "
                   "gpu-decode: JPEG bytes decoded and augmented on the device)",
                   [("image_size", "px", "int"), ("pipeline", "input", "str"),
                    ("workers", "workers", "int"), ("images_per_s", "img/s", "int")] +
                   [(f"over_{a}_compute", f"/ {a} compute", "x") for a in archs], 3),
        "ntxent": ("NT-Xent forward + backward (bound: z @ z.T + cross_entropy)", [
            ("n", "N", "int"), ("dim", "D", "int"), ("method", "method", "str"),
            ("ms", "ms", "ms"), ("over_bound", "/ bound", "x"),
            ("peak_memory_mb", "peak MB", "mb")], 3),
        "baseline": ("baseline (reference): plain Dataset, per-image PIL transforms, two forward "
                     "passes, fp32, broadcast NT-Xent", [
                         ("arch", "arch", "str"), ("image_size", "px", "int"),
                         ("workers", "workers", "int"), ("step_ms", "ms/step", "ms"),
                         ("images_per_s", "img/s", "int")], 2),
        "end2end": ("end to end: main.py's loop (the engine's Trainer.train_one_epoch) fed by "
                    "its loader",
                    config + [("pipeline", "input", "str"), ("workers", "workers", "int"),
                              ("images_per_s", "img/s", "int"),
                              ("fraction_of_compute", "of compute", "pct"), ("mfu", "MFU", "pct"),
                              ("over_baseline", "/ baseline", "x"),
                              ("ceiling_over_baseline", "ceiling / baseline", "x")], 5),
    }
    title, columns, key_columns = tables[name]
    print_table(title, columns, rows, key_columns)


def device_description(device):
    """Device name, library versions and numeric settings, for telling runs apart."""
    info = environment_info(device)
    info.update(interop_threads=torch.get_num_interop_threads(),
                cudnn_benchmark=torch.backends.cudnn.benchmark)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, gpu_memory_gb=round(props.total_memory / 2 ** 30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    bf16_supported=torch.cuda.is_bf16_supported())
    else:
        info["device_name"] = info["cpu_model"]
    return info


def finite_or_none(value):
    """JSON has no NaN/inf: such values become None."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def run_sections(args, device, data):
    """{section: rows} for --sections, in an order where each section finds the rows it is
    held against: matmul before compute, compute before loader and end2end, baseline before
    end2end. The size-dependent sections run one image size at a time, with that size's batch
    (batch_for) and images (`data`, a BenchData). Prints each section's table as it completes."""
    results = {name: [] for name in SECTIONS if name in args.sections}
    for name in ("matmul", "ntxent"):
        if name in results:
            tic = time.perf_counter()
            section = bench_matmul if name == "matmul" else bench_ntxent
            results[name] = section(args, device)
            print_section(name, results[name], args.archs)
            print(f"  ({name}: {time.perf_counter() - tic:.0f} s)", flush=True)
    needs_data = {"loader", "end2end", "baseline"} & set(results)
    for size in args.sizes:
        at_size = sized_args(args, size)
        images = stats = None
        if needs_data:
            images, stats, source = data.for_size(at_size, size)
            print(f"\n{size} px, batch {at_size.batch_size}: {source}, {stats['channels']} "
                  f"channel(s)", flush=True)
        channels = stats["channels"] if stats else 1
        compute = []
        for name in ("compute", "loader", "baseline", "end2end"):
            if name not in results:
                continue
            tic = time.perf_counter()
            if name == "compute":
                rows = compute = bench_compute(at_size, device, channels,
                                               results.get("matmul", []))
            elif name == "loader":
                rows = bench_loader(at_size, device, images, stats, compute)
            elif name == "baseline":
                rows = bench_baseline(at_size, device, images, stats)
            else:
                rows = bench_end2end(at_size, device, images, stats, compute,
                                     results.get("baseline", []))
            results[name] += rows
            print_section(name, rows, args.archs)
            print(f"  ({name}, {size} px: {time.perf_counter() - tic:.0f} s)", flush=True)
    return results


def run_startup(args, workdir):
    """The startup, startup_scan and startup_memory tables (tools/startup_bench.py)."""
    from tools.startup_bench import bench_startup
    sizes = args.startup_sizes or ([200, 1000] if args.quick else [10 ** 4, 10 ** 5, 10 ** 6])
    repo = os.path.abspath(args.startup_repo or REPO)
    tic = time.perf_counter()
    found = bench_startup(sizes, workdir, repo)
    tables = {
        "startup": (f"start-up of main.py on a path list (seconds after the imports; checkout "
                    f"{repo})", [
                        ("entries", "entries", "int"), ("start", "start", "str"),
                        ("commit", "commit", "str"), ("import_s", "imports s", "ms"),
                        ("to_first_step_s", "to first step s", "ms"),
                        ("one_step_run_s", "one-step run s", "ms")], 2),
        "scan": ("first scan of a folder of hard links", [
            ("entries", "entries", "int"), ("method", "method", "str"),
            ("seconds", "s", "ms"), ("files_per_s", "files/s", "int")], 2),
        "memory": ("memory after one pass over every entry by 2 DataLoader workers", [
            ("entries", "entries", "int"), ("layout", "layout", "str"),
            ("index_mb", "index MB", "mb"), ("main_rss_mb", "main RSS MB", "mb"),
            ("worker_rss_mb", "worker RSS MB", "mb"), ("worker_pss_mb", "worker PSS MB", "mb"),
            ("worker_private_mb", "worker private MB", "mb")], 2)}
    for name, (title, columns, key_columns) in tables.items():
        print_table(title, columns, found[name], key_columns)
    print(f"  (startup: {time.perf_counter() - tic:.0f} s)", flush=True)
    return {"startup" if name == "startup" else f"startup_{name}": rows
            for name, rows in found.items()}


def run_augment(args):
    """The augment table (tools/augment_bench.py), on the CPU: the PIL pipeline and workers
    run there; --gpu-aug's own speed on a GPU is the loader section's."""
    from tools.augment_bench import bench_augment
    tic = time.perf_counter()
    rows = bench_augment(repeats=2 if args.quick else 8, quick=args.quick)
    print_table("views of the simclr preset (RGB), ms per batch of views: least of the timed "
                "calls, and their median", [
                    ("views", "views", "int"), ("image_size", "px", "int"),
                    ("blur", "blur", "str"), ("method", "method", "str"),
                    ("ms", "ms", "ms"), ("median_ms", "median ms", "ms")], rows, 4)
    print(f"  (augment: {time.perf_counter() - tic:.0f} s)", flush=True)
    return rows


def main(args):
    device = resolve_settings(args)
    ensure_writable_dir(os.path.dirname(os.path.abspath(args.json)), "the --json folder")
    # the command without --replace, so that the runs after a replacing one append to it
    argv = [a for a in sys.argv if a != "--replace"]
    # before measuring: a wrong file fails now; a file of these grids from before they moved
    # here (`python bench.py ARGS`) takes the run
    before = os.path.join(os.path.dirname(os.path.dirname(argv[0])), "bench.py")
    kept = open_runs(args.json, " ".join(["python", *argv]), args.replace,
                     earlier=[" ".join(["python", before, *argv[1:]])])
    info = device_description(device)
    batches = ", ".join(f"{batch_for(args, size)} at {size} px" for size in args.sizes)
    print(f"device: {info['device_name']} ({device.type}), torch {info['torch']}, "
          f"torchvision {info['torchvision']}, {info['cpu_threads']} threads; batch "
          f"{batches}, {args.warmup} warm-up + {args.steps} timed steps"
          f"{' (quick mode)' if args.quick else ''}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_") as workdir:
        data = BenchData(workdir)
        results = run_sections(args, device, data)
        source = "; ".join(description for _, _, description in data.loaded.values()) or None
        if "startup" in args.sections:
            results.update(run_startup(args, os.path.join(workdir, "startup")))
    if "augment" in args.sections:
        results["augment"] = run_augment(args)
    targets = evaluate_targets(results, device, info["device_name"])
    print()
    for t in targets:
        ceiling = ("" if t["ceiling"] is None else
                   f", {t['ceiling']:.3g} at 100 % of the measured matmul rate")
        print(f"target {t['name']} ({t['config']}): measured {t['measured']:.3g}{ceiling} "
              f"({'met' if t['met'] else 'not met'})")
    kept["runs"].append({
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": platform.node(),
        "device": info, "settings": vars(args), "data": source,
        "memory_method": PeakMemory.METHOD[device.type],
        "sections": {name: [{k: finite_or_none(v) for k, v in row.items()} for row in rows]
                     for name, rows in results.items()},
        "targets": targets})
    json_dump(kept, args.json)
    print(f"\nwrote {args.json} (run {len(kept['runs'])} of this command kept there)")
    return 0


if __name__ == "__main__":
    run_main(main, get_args_parser())
