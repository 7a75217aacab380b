"""SimCLR pretraining.

    python main.py DATAPATH RESPATH -bs 250 -nw 2 -c --multiple_gpus
    python main.py DATAPATH RESPATH -bs 512 -c --gpu-aug --compile       # fast path (bf16 auto)
    python main.py DATAPATH RESPATH -bs 250 --multiple_gpus --nproc 2     # 2 CPU processes
    torchrun --nproc_per_node=K main.py DATAPATH RESPATH -bs 1024 -c --optimizer lars
    torchrun --nnodes=M --node_rank=i --nproc_per_node=K --rdzv_backend=c10d \
             --rdzv_endpoint=HOST:29500 main.py DATAPATH RESPATH -bs 4096 -c --optimizer lars

DATAPATH holds ImageFolder `train/` (class subfolders; SimCLR does not use the labels) or is a
plain folder of images. RESPATH receives model/model.pth, model/optimizer.pth,
model/lossesfile.npz, plots/training_losses.png, checkpoint.pth and run.json. With
labelled images an online linear probe on the detached h (utils/online_probe.py) reports the
validation accuracy of h after every epoch without changing the encoder (--no-online-probe:
off). Running the same command again resumes (--epochs is the total); --fresh starts over.
-bs is always the global batch: with W processes (--multiple_gpus or torchrun) each loads B/W
images of every batch, and the run's result does not depend on W (see utils/distributed.py).
The loop is utils/engine.py's; the SimCLR step is simclr.py's.
"""
import argparse
import functools
import json
import os
import pickle

import numpy as np
import torch

from simclr import PretrainingOutputs, PretrainingTensorBoard, SimCLRTask, transfer_views
from utils.checkpoint import (AUG_PRESETS_VERSION, RunPaths, load_pretrained, model_metadata,
                              read_losses_file, strip_prefixes)
from utils.cli import (add_augmentation_args, add_data_loading_args, add_data_source_args,
                       add_intensity_range_arg, add_training_args, add_unreadable_arg,
                       check_augmentation_args, check_intensity_range, check_training_args,
                       ensure_writable_dir, environment_info, print_args, run_main)
from utils.data import (EpochBatchSampler, ImageDataset, InMemoryBatches, TwoViewDataset,
                        UnreadableFiles,
                        dataset_statistics, decode_images, decoded_size_bytes, fits_in_memory,
                        make_loader)
from utils.distributed import (check_same_on_all_ranks, decide_on_main,
                               gather_with_grad, get_rank, get_world_size, is_main_process,
                               print0, run_in_process_group)
from utils.engine import (LoopSettings, RunSetup, Trainer, launcher_name, load_resumable,
                          report_outcome)
from utils.errors import UserError
from utils.gpu_augment import BatchSimCLRAugmentation, DeviceTwoViews
from utils.gpu_decode import BatchDecoder, DecodedTwoViews, EncodedImageDataset, collate_encoded
from utils.knn import knn_accuracy
from utils.linear_probe import extract_features
from utils.foreign_weights import WeightSettings, is_torchvision_resnet
from utils.model import (adapt_input_channels, build_model_from_meta, default_proj_dims,
                         load_state_strict, resolve_stem, FEATURE_DIMS, STEM_CHOICES,
                         STEM_HELP)
from utils.ntxent import NTXentLoss
from utils.online_probe import OnlineProbe, probe_labels
from utils.optim import (WarmupCosine, add_optimisation_args, build_optimizer,
                         fill_optimisation_defaults, scaled_learning_rate)
from utils.precision import MixedPrecision, resolve_amp
from utils.sources import has_split, load_split, select_subset, validation_indices
from utils.tensorboard import tensorboard_dir
from utils.transforms import AugmentationSettings, EvalTransform, SimCLRAugmentation, TwoViews

# Settings that define the run: resuming with a different value is an error, not a silent mix.
RUN_DEFINING_ARGS = ("arch", "stem", "proj_dims", "image_size", "batch_size", "optimizer", "lr",
                     "lr_scaling", "weight_decay", "temperature", "warmup_epochs",
                     "jitter_strength", "blur", "min_scale", "aug", "noise", "rotate", "cutout",
                     "seed", "fin", "intensity_range")
# What a checkpoint written before a flag existed meant by it (so older runs still resume).
LEGACY_VALUES = {"lr_scaling": "none", "aug": "simclr", "noise": 0.0, "rotate": 0.0,
                 "cutout": 0.0, "fin": None, "intensity_range": None}
KNN_MEMORY = 10_000  # training images kept as the kNN memory of --knn-every
PROBE_QUERIES = 10_000  # validation images the online probe is evaluated on, at most


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="SimCLR pretraining on your own images (resumes automatically).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("datapath", metavar="DATAPATH",
                        help="folder with train/ (ImageFolder or plain images), a plain folder "
                             "of images, a MedMNIST .npz file or name (pathmnist, ...), or a "
                             "path list (see README 'Data sources')")
    parser.add_argument("respath", metavar="RESPATH", help="output folder of this run")
    add_data_loading_args(parser, batch_size=250)
    add_intensity_range_arg(add_data_source_args(parser))

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=100, help="total epochs of the run")
    add_optimisation_args(opt, "main")
    opt.add_argument("--lr-scaling", choices=("linear", "sqrt", "none"), default="linear",
                     help="peak lr = lr * B/256 (linear), lr * sqrt(B/256) (sqrt; the paper's "
                          "advice for small batches and long runs, e.g. lars --lr 1.2), or lr "
                          "as given (none), B being the global batch size")
    opt.add_argument("--temperature", type=float, default=0.2, help="NT-Xent temperature tau")
    opt.add_argument("--chunk-size", type=int, default=None,
                     help="images per forward pass within a batch: the loss and gradient of the "
                          "whole batch are computed chunk by chunk (gradient caching), for "
                          "batches larger than memory; BatchNorm then uses per-chunk statistics")
    opt.add_argument("--knn-every", type=int, default=0, metavar="E",
                     help="every E epochs (and after the last) print and record the kNN "
                          "accuracy (cosine, --knn-k) of h on the validation split (val/, "
                          "MedMNIST val, --val-list, else --val-fraction of train), with up to "
                          "10,000 training images as memory; 0 = off")
    opt.add_argument("--knn-on-test", action="store_true",
                     help="--knn-every on the test split instead (only when you mean to)")
    opt.add_argument("--val-fraction", type=float, default=0.1,
                     help="--knn-every without a validation split: this share of each class "
                          "of train, chosen by --seed, is held out as the kNN queries")
    opt.add_argument("--knn-k", type=int, default=20, help="neighbours of the --knn-every vote")
    opt.add_argument("--online-probe", action=argparse.BooleanOptionalAction, default=True,
                     help="with labelled training images, train a linear classifier on the "
                          "detached h of view 1 alongside SimCLR (own AdamW, no gradient into "
                          "the encoder; the validation images of --knn-every never train it) "
                          "and print its accuracy on those images (at most 10,000) after every "
                          "epoch; off by itself for unlabelled data")
    opt.add_argument("--save-every", type=int, default=0, metavar="E",
                     help="keep a snapshot every E epochs, RESPATH/model/epoch_NNNN.pth (weights "
                          "and metadata, loadable by every script; linear_evaluation.py "
                          "--snapshots evaluates them all); 0 = off")

    mod = parser.add_argument_group("model")
    mod.add_argument("--arch", choices=tuple(FEATURE_DIMS), default="resnet18",
                     help="ResNet encoder (torchvision, random initialisation)")
    mod.add_argument("--stem", choices=STEM_CHOICES, default="auto", help=STEM_HELP)
    mod.add_argument("--proj-dims", "--proj_dims", dest="proj_dims", type=int, nargs="+",
                     default=None, help="projection head widths after h, the last is z's size "
                                        "(default: feature size then 128, e.g. 512 128)")
    speed = add_training_args(parser)
    add_unreadable_arg(speed)
    speed.add_argument("--gpu-aug", action="store_true",
                       help="decode the training images once into a uint8 tensor on the device "
                            "and augment whole batches there (utils/gpu_augment.py; same "
                            "augmentation distributions), instead of per image in -nw workers "
                            "(the default on CUDA when they fit --max-memory-gb)")
    speed.add_argument("--cpu-aug", action="store_true",
                       help="make the views per image in the -nw CPU workers even on CUDA "
                            "(the default on the CPU); without it a CUDA run with --aug simclr "
                            "uses --gpu-aug, or --gpu-decode when the data do not fit")
    speed.add_argument("--max-memory-gb", type=float, default=4.0,
                       help="largest decoded data set --gpu-aug holds (N x C x S x S bytes)")
    speed.add_argument("--gpu-decode", action="store_true",
                       help="for JPEG data too large for --gpu-aug: -nw workers read the files' "
                            "bytes, the device decodes each batch (torchvision decode_jpeg, "
                            "nvJPEG on CUDA) and augments it as --gpu-aug does "
                            "(utils/gpu_decode.py); other formats are decoded by the workers")
    add_augmentation_args(parser)

    parser.add_argument("--fin", metavar="MODEL", default=None,
                        help="start from this model.pth/checkpoint.pth of main.py (further "
                             "pretraining, e.g. on another data set): its architecture and "
                             "weights, a fresh optimizer and schedule, this data's statistics; a "
                             "different channel count is adapted in the first convolution")
    parser.add_argument("--fout", metavar="NAME", default=None,
                        help="write this run to RESPATH/NAME instead of RESPATH")
    parser.add_argument("--fresh", action="store_true",
                        help="start over even if RESPATH holds a run (its files are replaced)")
    return parser


def fill_defaults(args):
    """Resolve the defaults that depend on other flags; UserError for unusable values."""
    fill_optimisation_defaults(args, "main")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise UserError("--chunk-size must be at least 1 image")
    if args.proj_dims is None:
        args.proj_dims = default_proj_dims(args.arch)
    check_training_args(args)
    check_augmentation_args(args)
    check_intensity_range(args)
    if args.temperature <= 0:
        raise UserError("--temperature must be positive, e.g. 0.2")
    if args.max_memory_gb <= 0:
        raise UserError(f"--max-memory-gb {args.max_memory_gb} must be positive, e.g. 4")
    if args.knn_every and args.knn_k < 1:
        raise UserError("--knn-k must be at least 1")
    if args.save_every < 0:
        raise UserError(f"--save-every {args.save_every} must be >= 0 epochs (0: no snapshots)")
    if args.gpu_aug and args.gpu_decode:
        raise UserError("--gpu-aug and --gpu-decode are two ways to feed the device: --gpu-aug "
                        "decodes every image once into memory, --gpu-decode decodes each batch; "
                        "give one of them")
    if args.cpu_aug and (args.gpu_aug or args.gpu_decode):
        raise UserError(f"--cpu-aug makes the views in CPU workers, "
                        f"{'--gpu-aug' if args.gpu_aug else '--gpu-decode'} on the device: give "
                        f"one of them")
    for flag, on in (("--gpu-aug", args.gpu_aug), ("--gpu-decode", args.gpu_decode)):
        if on and args.aug != "simclr":
            raise UserError(f"{flag} has the steps of --aug simclr only; --aug {args.aug} "
                            f"(j-freddy's published sequence, with luma equalisation and random "
                            f"sharpness) runs in the CPU workers: drop {flag}")


def choose_input_path(args, n_images, meta, device):
    """Where the views are made, chosen where no flag says: sets args.gpu_aug / args.gpu_decode
    and returns the reason, for the speed line and run.json.

    CPU: per image in the -nw workers. CUDA with --aug simclr: --gpu-aug when the decoded
    images (N x C x S x S bytes) fit --max-memory-gb, else --gpu-decode (workers only read
    bytes; a 2-core host cannot augment for a GPU); the published presets run in the workers.
    """
    if args.gpu_aug or args.gpu_decode or args.cpu_aug:
        flag = "--gpu-aug" if args.gpu_aug else "--gpu-decode" if args.gpu_decode else "--cpu-aug"
        return f"{input_path_name(args, device)} ({flag})"
    if device.type != "cuda":
        return f"{input_path_name(args, device)} (a CPU run)"
    if args.aug != "simclr":
        return f"{input_path_name(args, device)} (--aug {args.aug} runs there only)"
    channels, size = meta["in_channels"], meta["image_size"]
    fits = fits_in_memory(n_images, channels, size, args.max_memory_gb)
    size_gb = decoded_size_bytes(n_images, channels, size) / 2 ** 30
    args.gpu_aug, args.gpu_decode = fits, not fits
    why = (f"{size_gb:.2g} GB decoded {'fit' if fits else 'exceed'} --max-memory-gb "
           f"{args.max_memory_gb:g}; --cpu-aug for the workers")
    return f"{input_path_name(args, device)} (the CUDA default: {why})"


def input_path_name(args, device):
    """'in CPU workers', 'on cuda:0 (--gpu-aug)' ...: where the views are made."""
    if args.gpu_decode:
        return f"on {device}, each batch decoded there (JPEG) or by the workers"
    return f"on {device}, decoded once into memory" if args.gpu_aug else "in CPU workers"


def decode_for_device(args, images, meta, device):
    """The training images as uint8 (N, C, S, S) on `device` for --gpu-aug; UserError if they
    would take more than --max-memory-gb."""
    channels, size = meta["in_channels"], meta["image_size"]
    size_mb = decoded_size_bytes(len(images), channels, size) / 2 ** 20
    if not fits_in_memory(len(images), channels, size, args.max_memory_gb):
        raise UserError(f"--gpu-aug: the {len(images)} decoded images ({channels} x {size} x "
                        f"{size}) would take {size_mb:.0f} MB, more than --max-memory-gb "
                        f"{args.max_memory_gb:g}; drop --gpu-aug (workers decode on the fly) or "
                        f"raise --max-memory-gb", all_ranks=True)
    pixels = decode_images(images, channels, size).to(device)
    print0(f"--gpu-aug: {len(images)} images decoded once, uint8 {tuple(pixels.shape)}, "
           f"{size_mb:.1f} MB on {device}", flush=True)
    return pixels


def prepare_run(args, images, paths):
    """(checkpoint or None, model_meta, initial weights or None) on rank 0: resume checks, or
    data statistics for a new run (computed once and cached in RESPATH), and with --fin the
    weights to start from (architecture from that model)."""
    ensure_writable_dir(args.respath)
    ckpt = load_resumable(paths.checkpoint, "main", args, RUN_DEFINING_ARGS, LEGACY_VALUES)
    if ckpt is not None:
        if ckpt["extra"]["data"]["n_images"] != len(images):
            raise UserError(f"{args.datapath} now has {len(images)} training images, the run in "
                            f"{args.respath} was started with {ckpt['extra']['data']['n_images']}"
                            f"; use --fresh to start over or another RESPATH")
        if ckpt["args"]["epochs"] != args.epochs:
            print(f"note: --epochs changed from {ckpt['args']['epochs']} to {args.epochs}; "
                  f"the cosine schedule is recomputed for the new total", flush=True)
        return ckpt, ckpt["model_meta"], None
    stats = dataset_statistics(images, paths.data_stats, args.seed, args.intensity_range)
    image_size = args.image_size or stats["native_size"]
    meta = {"arch": args.arch, "stem": resolve_stem(args.stem, image_size),
            "proj_dims": list(args.proj_dims), "in_channels": stats["channels"],
            "image_size": image_size, "mean": stats["mean"], "std": stats["std"],
            "intensity_range": stats["intensity_range"]}
    if not args.fresh and os.path.exists(paths.model):
        ckpt = resume_from_outputs(args, paths, meta, len(images) // args.batch_size)
        return ckpt, ckpt["model_meta"], None
    if args.fin is None:
        return None, meta, None
    if not os.path.isfile(args.fin):
        raise UserError(f"--fin {args.fin} does not exist; give the model.pth or "
                        f"checkpoint.pth of an earlier main.py run")
    state, fin_meta = load_pretrained(args.fin, WeightSettings(meta["image_size"],
                                                               from_flags=False))
    meta.update(arch=fin_meta["arch"], stem=fin_meta["stem"], proj_dims=fin_meta["proj_dims"])
    if not fin_meta.get("head_norm", True):
        meta["head_norm"] = False
    if fin_meta["in_channels"] != meta["in_channels"]:
        print(f"--fin: {args.fin} takes {fin_meta['in_channels']} channel(s), this data has "
              f"{meta['in_channels']}: the first convolution is adapted (filters "
              f"{'summed over RGB' if meta['in_channels'] == 1 else 'repeated / 3'})",
              flush=True)
        state = adapt_input_channels(state, meta["in_channels"])
    return None, meta, state


def resume_from_outputs(args, paths, meta, steps_per_epoch):
    """A resume state from what the original project kept (model/model.pth, optimizer.pth,
    lossesfile.npz) when checkpoint.pth is gone: the weights (strict, else a UserError naming the
    file), the optimizer state where it fits these weights, the position from the step losses.
    The model description is run.json's when there is one, else this command's (`meta`)."""
    if os.path.exists(paths.run_json):
        try:
            with open(paths.run_json) as f:
                meta = model_metadata(json.load(f))
        except (OSError, ValueError, KeyError):
            pass  # not ours or damaged: this command describes the model
    state = load_model_state(paths.model, meta)
    optimizer_state, optimizer_note = fitting_optimizer_state(args, paths.optimizer, meta, state)
    series, evaluations = {"loss": np.zeros(0)}, {}
    if os.path.exists(paths.losses):
        history = read_losses_file(paths.losses)
        series = {k: v for k, v in history.items() if k not in ("knn", "online_probe")}
        for name, key in (("knn", "knn_accuracy"), ("online_probe", "online_probe_accuracy")):
            for e, a in history[name]:
                evaluations.setdefault(int(e), {"epoch": int(e)})[key] = float(a)
    step = len(series["loss"])
    print(f"resuming from {paths.model} without checkpoint.pth: weights, {optimizer_note}, "
          f"position step {step} (epoch {step // steps_per_epoch}) from "
          f"{'lossesfile.npz' if step else 'nothing (no step losses): step 0'}; the random state "
          f"restarts, so this resume is not bit-exact as one from checkpoint.pth is", flush=True)
    return {"model": state, "optimizer": optimizer_state, "scaler": None, "step": step,
            "epoch": step // steps_per_epoch, "steps_per_epoch": steps_per_epoch,
            "history": {"series": series,
                        "evaluations": [evaluations[e] for e in sorted(evaluations)]},
            "best": None, "rng": None, "model_meta": meta, "args": vars(args),
            "resumed_from": paths.model}


def load_model_state(path, meta):
    """The state dict in `path` if it loads strictly into the model `meta` describes; UserError
    naming the file and the choices otherwise."""
    model = build_model_from_meta(meta)
    try:
        state = strip_prefixes(torch.load(path, map_location="cpu", weights_only=True))
        if isinstance(state, dict) and is_torchvision_resnet(state):
            raise UserError(f"{path} is another project's model (a ResNet in torchvision's "
                            f"layout, as thunderInfy/simclr saves it), not a run to resume; to "
                            f"continue from its weights, pretrain into a new RESPATH with --fin "
                            f"{path}")
        model.load_state_dict(state, strict=True)
        return state
    except RuntimeError as err:
        lines = str(err).splitlines()
        reason = (lines[1] if len(lines) > 1 else lines[0]).strip()[:160]
    except (OSError, ValueError, AttributeError, pickle.UnpicklingError) as err:
        reason = f"unreadable ({type(err).__name__})"
    raise UserError(f"{path} cannot be resumed as a {meta['arch']} ({meta['stem']} stem, "
                    f"{meta['in_channels']} channel(s), head {meta['proj_dims']}): {reason}; "
                    f"pass the flags it was trained with, --fresh to overwrite it, or another "
                    f"RESPATH")


def fitting_optimizer_state(args, path, meta, state):
    """(optimizer.pth's state or None, a note saying which): used when it loads into this
    command's optimizer over these weights with every tensor of its parameter's shape."""
    if not os.path.exists(path):
        return None, "no optimizer.pth (a fresh optimizer)"
    model = build_model_from_meta(meta)
    model.load_state_dict(state)
    optimizer = build_optimizer(model, args.optimizer, args.lr, args.weight_decay)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if [set(g) for g in saved["param_groups"]] != [set(g) for g in
                                                       optimizer.state_dict()["param_groups"]]:
            raise ValueError("other settings")  # another optimizer's kind of parameter group
        optimizer.load_state_dict(saved)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for p in params:
            for value in optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.dim() and value.shape != p.shape:
                    raise ValueError("state shape")
    except Exception as err:  # another optimizer or model: not worth stopping for
        return None, f"not optimizer.pth ({type(err).__name__}: it belongs to another optimizer)"
    return saved, "the optimizer state of optimizer.pth"


def knn_memory_and_queries(args, images):
    """(memory, queries, description, held_out) of --knn-every and the online probe: the
    validation split when the data has one (val/, MedMNIST val, --val-list), else
    --val-fraction of each class carved out of the training images by seed (and left out of
    the memory; `held_out` their indices in `images`, else empty); the test split only with
    --knn-on-test, so choosing a model on the kNN curve never looks at the test set."""
    none = np.zeros(0, dtype=int)
    scaling = images.intensity_range  # the training images' (prepare_run)
    if args.knn_on_test:
        return (images, load_split(args.datapath, "test", True, args).with_intensity_range(
            scaling), "test split", none)
    if has_split(args.datapath, "val", args):
        return (images, load_split(args.datapath, "val", True, args).with_intensity_range(
            scaling), "validation split", none)
    kept, held_out = validation_indices(images, args.val_fraction, args.seed)
    return (images.subset(kept.tolist()), images.subset(held_out.tolist()),
            f"validation images ({args.val_fraction:g} of each class of train, seed "
            f"{args.seed})", held_out)


class KnnMonitor:
    """encoder -> the kNN accuracy (cosine, args.knn_k) of its h on the query images, with the
    memory images (at most KNN_MEMORY, chosen by seed) as neighbours. One pass over both per
    call, without augmentation; `split` says what the queries are, `due(epoch)` whether
    --knn-every asks for it after `epoch` epochs. `sets`: knn_memory_and_queries'."""

    def __init__(self, args, meta, images, device, sets):
        if images.labels is None:
            raise UserError("--knn-every needs labelled training images (class folders, "
                            "MedMNIST or a path list with labels); drop --knn-every for "
                            "unlabeled data", all_ranks=True)
        memory, queries, self.split, _ = sets
        self.every, self.epochs = args.knn_every, args.epochs
        if queries.classes != images.classes:
            raise UserError(f"--knn-every: the {self.split} of {args.datapath} has other classes "
                            f"than the training images", all_ranks=True)
        memory = select_subset(memory, min(len(memory), KNN_MEMORY), None, args.seed)
        transform = EvalTransform(meta["image_size"], meta["mean"], meta["std"])
        self.loaders = [make_loader(ImageDataset(split, meta["in_channels"], transform),
                                    batch_size=args.batch_size, num_workers=args.num_workers,
                                    pin_memory=device.type == "cuda")
                        for split in (memory, queries)]
        self.device, self.channels_last = device, args.channels_last
        self.k, self.n_classes = args.knn_k, len(images.classes)

    def due(self, epoch):
        return epoch % self.every == 0 or epoch == self.epochs

    def __call__(self, encoder):
        (memory_h, memory_y), (query_h, query_y) = [
            extract_features(encoder, loader, self.device, self.channels_last,
                             desc="kNN features") for loader in self.loaders]
        return knn_accuracy(memory_h, memory_y, query_h, query_y, self.n_classes, self.k)


class ProbeMonitor:
    """(encoder, probe) -> accuracy of the online probe (utils/online_probe.py) on the query
    images of --knn-every (`sets`, knn_memory_and_queries'; at most PROBE_QUERIES, chosen by
    seed): one no-grad pass without augmentation; `split` says what they are."""

    def __init__(self, args, meta, sets, device):
        _, queries, self.split, _ = sets
        if len(queries) > PROBE_QUERIES:
            queries = select_subset(queries, PROBE_QUERIES, None, args.seed)
        transform = EvalTransform(meta["image_size"], meta["mean"], meta["std"])
        self.loader = make_loader(ImageDataset(queries, meta["in_channels"], transform),
                                  batch_size=args.batch_size, num_workers=args.num_workers,
                                  pin_memory=device.type == "cuda")
        self.device, self.channels_last = device, args.channels_last

    def __call__(self, encoder, probe):
        h, y = extract_features(encoder, self.loader, self.device, self.channels_last,
                                desc="online probe features")
        return probe.accuracy(h, y)


def build_online_probe(args, meta, images, sets, device):
    """(OnlineProbe, ProbeMonitor, labels (N,) of the training images with IGNORE_INDEX on
    the held-out queries), or (None, None, None) with one line saying why it is off."""
    if not args.online_probe:
        return None, None, None
    if images.labels is None:
        print0("online probe: off (the training images have no labels)", flush=True)
        return None, None, None
    _, queries, split, held_out = sets
    if queries.classes != images.classes:
        print0(f"online probe: off (the {split} has other classes than the training images)",
               flush=True)
        return None, None, None
    probe = OnlineProbe(FEATURE_DIMS[meta["arch"]], len(images.classes), device, args.seed)
    monitor = ProbeMonitor(args, meta, sets, device)
    print0(f"online probe: linear on the detached, standardised h of view 1 (AdamW lr "
           f"{probe.optimizer.defaults['lr']:g}), evaluated after every epoch on "
           f"{len(monitor.loader.dataset)} image(s), the {split}", flush=True)
    return probe, monitor, probe_labels(images, held_out)


class Pipeline:
    """The input side of a run: `loader` (batches of `sampler`), `make_views` (batch, step) ->
    x (2B, C, S, S) on the device, `augmentation` (what it applies, for run.json) and the CPU
    version of it (for TensorBoard's view pairs). With `labels` (N,) (the online probe's) every
    loader batch is (batch, labels of its images (b,))."""

    def __init__(self, args, images, meta, blur, sampler, device, labels=None):
        self.unreadable = UnreadableFiles(len(images), args.max_unreadable)
        settings = AugmentationSettings(
            image_size=meta["image_size"], channels=meta["in_channels"], mean=meta["mean"],
            std=meta["std"], jitter_strength=args.jitter_strength, blur=blur,
            min_scale=args.min_scale, preset=args.aug, noise=args.noise, rotate=args.rotate,
            cutout=args.cutout)
        self.cpu_augmentation = SimCLRAugmentation(settings)
        if args.gpu_aug or args.gpu_decode:
            self.augmentation = BatchSimCLRAugmentation(settings)
            self.make_views = DeviceTwoViews(self.augmentation, args.seed, args.batch_size,
                                             sampler.rank)
        if args.gpu_aug:
            self.loader = InMemoryBatches(decode_for_device(args, images, meta, device), sampler,
                                          labels)
        elif args.gpu_decode:
            channels, size = meta["in_channels"], meta["image_size"]
            self.loader = make_loader(EncodedImageDataset(images, channels, size, args.seed,
                                                          self.unreadable),
                                      batch_sampler=sampler, num_workers=args.num_workers,
                                      pin_memory=device.type == "cuda",
                                      collate_fn=functools.partial(collate_encoded,
                                                                   labels=labels))
            self.make_views = DecodedTwoViews(
                BatchDecoder(images, channels, size, device, self.unreadable), self.make_views)
        else:
            self.augmentation = self.cpu_augmentation
            dataset = TwoViewDataset(images, meta["in_channels"], TwoViews(self.augmentation),
                                     args.seed, self.unreadable, labels)
            self.loader = make_loader(dataset, batch_sampler=sampler,
                                      num_workers=args.num_workers,
                                      pin_memory=device.type == "cuda")
            self.make_views = functools.partial(transfer_views, device=device)


def build_pretraining_model(args, meta, initial_state, device):
    """The SimCLR model of `meta` on `device`, initialised from `args.seed`, or with the --fin
    weights."""
    torch.manual_seed(args.seed)
    model = build_model_from_meta(meta)
    if initial_state is not None:
        load_state_strict(model, initial_state, args.fin)
        print0(f"starting from {args.fin} ({meta['arch']}, {meta['stem']} stem)", flush=True)
    return model.to(device)


def main(args):
    fill_defaults(args)
    if args.fout:
        args.respath = os.path.join(args.respath, args.fout)
    return run_in_process_group(pretrain, args)


def pretrain(args, device):
    """The run on this process's `device` (one of `get_world_size()` processes)."""
    if is_main_process():
        print_args(args)
    precision = MixedPrecision(resolve_amp(args.amp, device, is_main_process()), device)
    images = select_subset(load_split(args.datapath, "train", False, args), args.samples,
                           args.samples_per_class, args.seed, args.label_fraction)
    check_same_on_all_ranks(len(images), "the number of training images")
    paths = RunPaths(args.respath)
    ckpt, meta, initial_state = decide_on_main(lambda: prepare_run(args, images, paths))
    images = images.with_intensity_range(meta.get("intensity_range"))
    blur = args.blur if args.blur is not None else meta["image_size"] > 32
    scaled = (", 16-bit/float values scaled from [{:g}, {:g}]".format(*meta["intensity_range"])
              if meta.get("intensity_range") else "")
    print0(f"data: {len(images)} training images, {meta['in_channels']} channel(s), "
           f"{meta['image_size']} px{scaled}, mean {np.round(meta['mean'], 4).tolist()}, "
           f"std {np.round(meta['std'], 4).tolist()}; model {meta['arch']} ({meta['stem']} stem)",
           flush=True)

    sampler = EpochBatchSampler(len(images), args.batch_size, args.seed, get_rank(),
                                get_world_size())
    labelled = images.labels is not None and (args.knn_every or args.online_probe)
    sets = knn_memory_and_queries(args, images) if labelled else None
    probe, probe_eval, labels = build_online_probe(args, meta, images, sets, device)
    input_path = choose_input_path(args, len(images), meta, device)
    pipeline = Pipeline(args, images, meta, blur, sampler, device, labels)
    steps_per_epoch = len(images) // args.batch_size
    peak_lr = scaled_learning_rate(args.lr, args.batch_size, args.lr_scaling)
    schedule = WarmupCosine(peak_lr, int(round(args.warmup_epochs * steps_per_epoch)),
                            args.epochs * steps_per_epoch)
    scaling = {"global_batch_size": args.batch_size, "processes": get_world_size(),
               "batch_per_process": sampler.batch_size, "lr_per_256": args.lr,
               "lr_scaling": args.lr_scaling, "peak_lr": peak_lr,
               "sync_bn": bool(args.sync_bn and get_world_size() > 1),
               "chunk_size": args.chunk_size, "launcher": launcher_name()}
    print0(f"global batch {args.batch_size} = {get_world_size()} process(es) x "
           f"{sampler.batch_size}{f' (chunks of {args.chunk_size})' if args.chunk_size else ''}"
           f"; peak lr {peak_lr:.4g} ({args.lr_scaling} scaling of {args.lr:g} per 256 images),"
           f" {args.optimizer}, {args.warmup_epochs:g} warm-up epoch(s)", flush=True)
    print0(f"speed: amp {precision.mode}{' (GradScaler)' if precision.scaler else ''}, "
           f"compile {args.compile or 'off'}, channels-last {'on' if args.channels_last else 'off'}"
           f", views made {input_path}, log every "
           f"{args.log_every} steps", flush=True)

    model = build_pretraining_model(args, meta, initial_state, device)
    knn = KnnMonitor(args, meta, images, device, sets) if args.knn_every else None
    task = SimCLRTask(
        NTXentLoss(args.temperature, gather=gather_with_grad if get_world_size() > 1 else None),
        pipeline.make_views, args.chunk_size, knn,
        PretrainingTensorBoard(args, images, meta, pipeline.cpu_augmentation), probe, probe_eval)
    source = os.path.abspath(args.datapath) if os.path.exists(args.datapath) else args.datapath
    data_info = {"datapath": source, "n_images": len(images), "classes": images.classes,
                 "blur": blur}
    run_info = {"args": vars(args), "model_meta": meta, "environment": environment_info(device),
                "steps_per_epoch": steps_per_epoch,
                "augmentation": {"preset": args.aug, "steps": pipeline.augmentation.describe(),
                                 "on": "device" if args.gpu_aug or args.gpu_decode else "cpu",
                                 "decode": "device" if args.gpu_decode else "cpu",
                                 "path": input_path},
                "speed": {"amp": precision.mode, "compile": args.compile,
                          "channels_last": args.channels_last, "gpu_aug": args.gpu_aug,
                          "gpu_decode": args.gpu_decode,
                          "log_every": args.log_every}, **scaling}
    trainer = Trainer(RunSetup(
        task=task, model=model,
        optimizer=build_optimizer(model, args.optimizer, peak_lr, args.weight_decay),
        schedule=schedule, sampler=sampler, loader=pipeline.loader, precision=precision,
        settings=LoopSettings.from_args(args, steps_per_epoch,
                                        eval_every=1 if probe is not None else args.knn_every,
                                        tensorboard_dir=tensorboard_dir(paths.root)),
        paths=paths, device=device, resume=ckpt,
        unreadable=pipeline.unreadable,
        record={"args": vars(args), "model_meta": meta,
                "extra": {"data": data_info, "aug_presets": AUG_PRESETS_VERSION}},
        write_outputs=PretrainingOutputs(paths, run_info, pipeline.unreadable)))
    del ckpt
    if trainer.finished:
        print0(f"{args.respath} already holds a finished run of {args.epochs} epochs; pass a "
               f"larger --epochs to continue it or --fresh to start over")
        return 0
    status = report_outcome(trainer.fit(), trainer)
    if status == 0:
        print0(f"done: {args.epochs} epochs; model in {paths.model}, loss plot in "
               f"{paths.loss_plot}")
    return status


if __name__ == "__main__":
    run_main(main, get_args_parser(), launches_workers=True)
