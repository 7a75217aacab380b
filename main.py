"""SimCLR pretraining.

    python main.py DATAPATH RESPATH -bs 250 -nw 2 -c --multiple_gpus
    python main.py DATAPATH RESPATH -bs 512 -c --gpu-aug --compile       # fast path (bf16 auto)
    torchrun --nproc_per_node=K main.py DATAPATH RESPATH -bs 1024 -c --optimizer lars
    torchrun --nnodes=M --node_rank=i --nproc_per_node=K --rdzv_backend=c10d \
             --rdzv_endpoint=HOST:29500 main.py DATAPATH RESPATH -bs 4096 -c --optimizer lars

DATAPATH holds ImageFolder `train/` (class subfolders; labels are not used here) or is a plain
folder of images. RESPATH receives model/model.pth, model/optimizer.pth, model/lossesfile.npz,
model/checkpoint.pth, plots/training_losses.png and run.json. Running the same command again
resumes (--epochs is the total); --fresh starts over. -bs is always the global batch: under
torchrun each of the W processes loads B/W images of every batch, and the run's result does not
depend on W (see utils/distributed.py).
"""
import argparse
import functools
import os
import resource
import shutil
import sys
import time

import numpy as np
import torch

from simclr import (History, MixedPrecision, build_optimizer, checkpoint_state, resolve_amp,
                    scaled_learning_rate, train)
from utils.checkpoint import (RunPaths, atomic_savez, atomic_torch_save, load_checkpoint,
                              load_pretrained, save_checkpoint, set_rng_state, unwrap_model)
from utils.cli import (UserError, add_augmentation_args, add_data_loading_args,
                       add_data_source_args, check_augmentation_args, ensure_writable_dir,
                       environment_info, json_dump, print_args, run_main, select_device)
from utils.distributed import (barrier, check_same_on_all_ranks, cleanup, decide_on_main,
                               gather_with_grad, get_rank, get_world_size, is_main_process,
                               launched_by_torchrun, print0, setup, wrap_model)
from utils.data import (EpochBatchSampler, ImageDataset, InMemoryBatches, TwoViewDataset,
                        dataset_statistics, decode_images, decoded_size_bytes, make_loader)
from utils.gpu_augment import BatchSimCLRAugmentation, DeviceTwoViews
from utils.model import (FEATURE_DIMS, adapt_input_channels, build_model, default_proj_dims,
                         load_state_strict, resolve_stem)
from utils.ntxent import NTXentLoss
from utils.knn import knn_accuracy
from utils.linear_probe import extract_features
from utils.plotfuncs import plot_training_losses
from utils.sources import has_split, load_split, select_subset
from utils.training import check_resume_compatible, learning_rate_at
from utils.transforms import EvalTransform, SimCLRAugmentation, TwoViews

# Settings that define the run: resuming with a different value is an error, not a silent mix.
RUN_DEFINING_ARGS = ("arch", "stem", "proj_dims", "image_size", "batch_size", "optimizer", "lr",
                     "lr_scaling", "weight_decay", "temperature", "warmup_epochs",
                     "jitter_strength", "blur", "min_scale", "aug", "noise", "rotate", "cutout",
                     "seed", "fin")
# What a checkpoint written before a flag existed meant by it (so older runs still resume).
LEGACY_VALUES = {"lr_scaling": "none", "aug": "natural", "noise": 0.0, "rotate": 0.0,
                 "cutout": 0.0, "fin": None}
KNN_MEMORY = 10_000  # training images kept as the kNN memory of --knn-every
DEFAULT_LR = {"sgd": 0.5, "lars": 0.3, "adamw": 1e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "lars": 1e-6, "adamw": 1e-2}


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
    add_data_source_args(parser)

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=100, help="total epochs of the run")
    opt.add_argument("--optimizer", choices=("sgd", "adamw", "lars"), default="sgd",
                     help="SGD with momentum 0.9, AdamW, or LARS (the SimCLR paper's, for "
                          "global batches of about 1024 and more)")
    opt.add_argument("--lr", type=float, default=None,
                     help="peak learning rate per 256 images, scaled by --lr-scaling to the "
                          "global batch (default 0.5 for sgd, 0.3 for lars, 1e-3 for adamw)")
    opt.add_argument("--lr-scaling", choices=("linear", "sqrt", "none"), default="linear",
                     help="peak lr = lr * B/256 (linear), lr * sqrt(B/256) (sqrt; the paper's "
                          "advice for small batches and long runs, e.g. lars --lr 1.2), or lr "
                          "as given (none), B being the global batch size")
    opt.add_argument("--weight-decay", "--wd", dest="weight_decay", type=float, default=None,
                     help="weight decay, not applied to BatchNorm and biases "
                          "(default 5e-4 for sgd, 1e-6 for lars, 1e-2 for adamw)")
    opt.add_argument("--warmup-epochs", type=float, default=1.0,
                     help="epochs of linear learning-rate warm-up before the cosine decay")
    opt.add_argument("--temperature", type=float, default=0.2, help="NT-Xent temperature tau")
    opt.add_argument("--chunk-size", type=int, default=None,
                     help="images per forward pass within a batch: the loss and gradient of the "
                          "whole batch are computed chunk by chunk (gradient caching), for "
                          "batches larger than memory; BatchNorm then uses per-chunk statistics")
    opt.add_argument("--knn-every", type=int, default=0, metavar="E",
                     help="every E epochs (and after the last) print and record the kNN "
                          "accuracy (cosine, --knn-k) of h on the labelled test split, with up "
                          "to 10,000 training images as memory; 0 = off")
    opt.add_argument("--knn-k", type=int, default=20, help="neighbours of the --knn-every vote")
    opt.add_argument("--tensorboard", action="store_true",
                     help="log to RESPATH/tensorboard: loss, lr, positive-pair top-1 per step, "
                          "the spread of the normalised z (collapse check), augmented view "
                          "pairs, the --knn-every accuracy and, at the end, the embedding "
                          "projector of h (optional dependency: pip install tensorboard)")
    opt.add_argument("--checkpoint-minutes", type=float, default=10.0,
                     help="also checkpoint mid-epoch every this many minutes (0: epoch ends only)")

    mod = parser.add_argument_group("model")
    mod.add_argument("--arch", choices=tuple(FEATURE_DIMS), default="resnet18",
                     help="ResNet encoder (torchvision, random initialisation)")
    mod.add_argument("--stem", choices=("auto", "cifar", "imagenet"), default="auto",
                     help="first layers: cifar = 3x3 conv stride 1, no max-pool; imagenet = 7x7 "
                          "stride 2 + max-pool; auto = cifar for images <= 64 px")
    mod.add_argument("--proj-dims", "--proj_dims", dest="proj_dims", type=int, nargs="+",
                     default=None, help="projection head widths after h, the last is z's size "
                                        "(default: feature size then 128, e.g. 512 128)")
    mod.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                     help="under torchrun, BatchNorm statistics over the global batch of all "
                          "processes (SyncBatchNorm); --no-sync-bn keeps them per process")

    speed = parser.add_argument_group("speed")
    speed.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
                       help="mixed precision of the forward pass (the loss stays float32): auto "
                            "= bf16 on GPUs that support it, off on the CPU (no fast bf16 "
                            "here); fp16 adds loss scaling (GradScaler)")
    speed.add_argument("--compile", metavar="BACKEND", nargs="?", const="inductor",
                       default=None,
                       help="torch.compile the model (backend inductor unless named; the first "
                            "steps then take longer; checkpoints keep plain keys)")
    speed.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                       help="channels-last memory format (about 1.4x faster on CPU here)")
    speed.add_argument("--gpu-aug", action="store_true",
                       help="decode the training images once into a uint8 tensor on the device "
                            "and augment whole batches there (utils/gpu_augment.py; same "
                            "augmentation distributions), instead of per image in -nw workers")
    speed.add_argument("--max-memory-gb", type=float, default=4.0,
                       help="largest decoded data set --gpu-aug holds (N x C x S x S bytes)")
    speed.add_argument("--log-every", type=int, default=10, metavar="N",
                       help="bring the losses to the host (and decide on stopping and "
                            "checkpoints) every N steps and at epoch ends; the steps in between "
                            "run without waiting for the device")

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
    """Resolve the defaults that depend on other flags."""
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    if args.weight_decay is None:
        args.weight_decay = DEFAULT_WEIGHT_DECAY[args.optimizer]
    if args.chunk_size is not None and args.chunk_size < 1:
        raise UserError("--chunk-size must be at least 1 image")
    if args.proj_dims is None:
        args.proj_dims = default_proj_dims(args.arch)
    if args.epochs < 1:
        raise UserError("--epochs must be at least 1")
    check_augmentation_args(args)
    if args.temperature <= 0:
        raise UserError("--temperature must be positive, e.g. 0.2")
    if args.log_every < 1:
        raise UserError(f"--log-every {args.log_every} must be at least 1 step, e.g. 10")
    if args.max_memory_gb <= 0:
        raise UserError(f"--max-memory-gb {args.max_memory_gb} must be positive, e.g. 4")


def check_compile_backend(backend, device):
    """UserError for a --compile backend torch does not know, or inductor on the CPU without
    the C++ compiler it generates code for."""
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise UserError(f"--compile {backend}: torch.compile has no such backend; use inductor "
                        f"(the default) or one of {', '.join(sorted(known))}", all_ranks=True)
    compiler = os.environ.get("CXX", "g++")
    if backend == "inductor" and device.type == "cpu" and not (
            shutil.which(compiler) or shutil.which("clang++")):
        raise UserError(f"--compile on the CPU needs a C++ compiler ({compiler} or clang++, "
                        f"e.g. apt-get install g++); install one, or drop --compile",
                        all_ranks=True)


def decode_for_device(args, images, meta, device):
    """The training images as uint8 (N, C, S, S) on `device` for --gpu-aug; UserError if they
    would take more than --max-memory-gb."""
    channels, size = meta["in_channels"], meta["image_size"]
    size_mb = decoded_size_bytes(len(images), channels, size) / 2 ** 20
    if size_mb > args.max_memory_gb * 1024:
        raise UserError(f"--gpu-aug: the {len(images)} decoded images ({channels} x {size} x "
                        f"{size}) would take {size_mb:.0f} MB, more than --max-memory-gb "
                        f"{args.max_memory_gb:g}; drop --gpu-aug (workers decode on the fly) or "
                        f"raise --max-memory-gb", all_ranks=True)
    pixels = decode_images(images, channels, size).to(device)
    print0(f"--gpu-aug: {len(images)} images decoded once, uint8 {tuple(pixels.shape)}, "
           f"{size_mb:.1f} MB on {device}", flush=True)
    return pixels


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def select_training_device(args):
    """The device of this process: one GPU per process under torchrun, else select_device."""
    if launched_by_torchrun():
        if args.multiple_gpus:
            raise UserError("--multiple_gpus (DataParallel) does not combine with torchrun, "
                            "which already runs one process per GPU; drop --multiple_gpus",
                            all_ranks=True)
        return setup(args.cuda), 1
    return select_device(args.cuda, args.multiple_gpus)


def prepare_run(args, images, paths):
    """(checkpoint or None, model_meta, initial weights or None) on rank 0: resume checks, or
    data statistics for a new run (computed once and cached in RESPATH), and with --fin the
    weights to start from (architecture from that model)."""
    ensure_writable_dir(args.respath)
    ckpt = None
    if os.path.exists(paths.checkpoint) and not args.fresh:
        ckpt = load_checkpoint(paths.checkpoint)
        check_resume_compatible(ckpt, args, paths.checkpoint, RUN_DEFINING_ARGS, LEGACY_VALUES)
    if ckpt is not None and ckpt["data"]["n_images"] != len(images):
        raise UserError(f"{args.datapath} now has {len(images)} training images, the run in "
                        f"{args.respath} was started with {ckpt['data']['n_images']}; use --fresh "
                        f"to start over or another RESPATH")
    if ckpt is not None:
        return ckpt, ckpt["model_meta"], None
    stats = dataset_statistics(images, paths.data_stats, args.seed)
    image_size = args.image_size or stats["native_size"]
    meta = {"arch": args.arch, "stem": resolve_stem(args.stem, image_size),
            "proj_dims": list(args.proj_dims), "in_channels": stats["channels"],
            "image_size": image_size, "mean": stats["mean"], "std": stats["std"]}
    if args.fin is None:
        return None, meta, None
    if not os.path.isfile(args.fin):
        raise UserError(f"--fin {args.fin} does not exist; give the model.pth or "
                        f"checkpoint.pth of an earlier main.py run")
    state, fin_meta = load_pretrained(args.fin)
    meta.update(arch=fin_meta["arch"], stem=fin_meta["stem"], proj_dims=fin_meta["proj_dims"])
    if fin_meta["in_channels"] != meta["in_channels"]:
        print(f"--fin: {args.fin} takes {fin_meta['in_channels']} channel(s), this data has "
              f"{meta['in_channels']}: the first convolution is adapted (filters "
              f"{'summed over RGB' if meta['in_channels'] == 1 else 'repeated / 3'})",
              flush=True)
        state = adapt_input_channels(state, meta["in_channels"])
    return None, meta, state


def build_knn_monitor(args, meta, images, encoder, device):
    """A function returning the kNN accuracy (cosine, args.knn_k) of the encoder's h on the
    labelled test split, with the training images (at most KNN_MEMORY, chosen by seed) as the
    memory. Features are computed in batches, one pass per call; the images are not augmented."""
    if images.labels is None:
        raise UserError("--knn-every needs labelled training images (class folders, MedMNIST "
                        "or a path list with labels); drop --knn-every for unlabeled data",
                        all_ranks=True)
    test = load_split(args.datapath, "test", True, args)
    if test.classes != images.classes:
        raise UserError(f"--knn-every: the train and test splits of {args.datapath} have "
                        f"different classes", all_ranks=True)
    if args.knn_k < 1:
        raise UserError("--knn-k must be at least 1", all_ranks=True)
    memory = select_subset(images, min(len(images), KNN_MEMORY), None, args.seed)
    transform = EvalTransform(meta["image_size"], meta["mean"], meta["std"])
    loaders = [make_loader(ImageDataset(split, meta["in_channels"], transform),
                           batch_size=args.batch_size, num_workers=args.num_workers,
                           pin_memory=device.type == "cuda") for split in (memory, test)]

    def knn_monitor():
        (train_h, train_y), (test_h, test_y) = [
            extract_features(encoder, loader, device, args.channels_last, desc="kNN features")
            for loader in loaders]
        return knn_accuracy(train_h, train_y, test_h, test_y, len(images.classes), args.knn_k)
    return knn_monitor


def log_knn_to(logger, knn_monitor, history):
    """knn_monitor that also writes its accuracy to TensorBoard at the current step."""
    def monitor():
        accuracy = knn_monitor()
        logger.log_knn(len(history.step_losses), accuracy)
        return accuracy
    return monitor


def start_tensorboard(args, paths, model, history, images, meta, augmentation):
    """The TensorBoard logger of rank 0 (imported only with --tensorboard): it watches the
    spread of z and shows the view pairs of the current epoch."""
    from utils.tensorboard import TensorBoardLogger, tensorboard_dir
    step = len(history.step_losses)
    logger = TensorBoardLogger(tensorboard_dir(paths.root), first_step=step)
    logger.watch_collapse(unwrap_model(model).head)
    logger.log_augmented_pairs(images, meta["in_channels"], augmentation, meta["mean"],
                               meta["std"], args.seed, step // history.steps_per_epoch, step)
    return logger


def projector_images(args, images):
    """Images for TensorBoard's projector: the test split when DATAPATH has one, else the
    training images."""
    if has_split(args.datapath, "test", args):
        return load_split(args.datapath, "test", False, args)
    return images


def main(args):
    fill_defaults(args)
    if args.fout:
        args.respath = os.path.join(args.respath, args.fout)
    device, n_gpus = select_training_device(args)
    try:
        return pretrain(args, device, n_gpus)
    finally:
        cleanup()


def pretrain(args, device, n_gpus):
    """The run on this process's `device` (one of `get_world_size()` under torchrun)."""
    rank, world_size = get_rank(), get_world_size()
    if is_main_process():
        print_args(args)
    precision = MixedPrecision(resolve_amp(args.amp, device), device)
    if args.compile:
        check_compile_backend(args.compile, device)
    images = select_subset(load_split(args.datapath, "train", False, args), args.samples,
                           args.samples_per_class, args.seed, args.label_fraction)
    check_same_on_all_ranks(len(images), "the number of training images")
    paths = RunPaths(args.respath)
    ckpt, meta, initial_state = decide_on_main(lambda: prepare_run(args, images, paths))
    blur = args.blur if args.blur is not None else meta["image_size"] > 32
    print0(f"data: {len(images)} training images, {meta['in_channels']} channel(s), "
           f"{meta['image_size']} px, mean {np.round(meta['mean'], 4).tolist()}, "
           f"std {np.round(meta['std'], 4).tolist()}; model {meta['arch']} ({meta['stem']} stem)",
           flush=True)

    augmentation_args = (meta["image_size"], meta["in_channels"], meta["mean"], meta["std"],
                         args.jitter_strength, blur, args.min_scale, args.aug, args.noise,
                         args.rotate, args.cutout)
    sampler = EpochBatchSampler(len(images), args.batch_size, args.seed, rank, world_size)
    if args.gpu_aug:
        augmentation = BatchSimCLRAugmentation(*augmentation_args)
        loader = InMemoryBatches(decode_for_device(args, images, meta, device), sampler)
        make_views = DeviceTwoViews(augmentation, args.seed, args.batch_size, rank)
    else:
        augmentation = SimCLRAugmentation(*augmentation_args)
        dataset = TwoViewDataset(images, meta["in_channels"], TwoViews(augmentation), args.seed)
        loader = make_loader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                             pin_memory=device.type == "cuda")
        make_views = None
    steps_per_epoch = len(images) // args.batch_size
    peak_lr = scaled_learning_rate(args.lr, args.batch_size, args.lr_scaling)
    scaling = {"global_batch_size": args.batch_size, "processes": world_size,
               "batch_per_process": sampler.batch_size, "lr_per_256": args.lr,
               "lr_scaling": args.lr_scaling, "peak_lr": peak_lr,
               "sync_bn": bool(args.sync_bn and world_size > 1), "chunk_size": args.chunk_size}
    print0(f"global batch {args.batch_size} = {world_size} process(es) x {sampler.batch_size}"
           f"{f' (chunks of {args.chunk_size})' if args.chunk_size else ''}; peak lr "
           f"{peak_lr:.4g} ({args.lr_scaling} scaling of {args.lr:g} per 256 images), "
           f"{args.optimizer}, {args.warmup_epochs:g} warm-up epoch(s)", flush=True)
    print0(f"speed: amp {precision.mode}{' (GradScaler)' if precision.scaler else ''}, "
           f"compile {args.compile or 'off'}, channels-last {'on' if args.channels_last else 'off'}"
           f", augmentation {f'on {device}' if args.gpu_aug else 'in CPU workers'}, log every "
           f"{args.log_every} steps", flush=True)

    torch.manual_seed(args.seed)
    model = build_model(meta["arch"], meta["in_channels"], meta["stem"], meta["proj_dims"])
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if initial_state is not None:
        load_state_strict(model, initial_state, args.fin)
        print0(f"starting from {args.fin} ({meta['arch']}, {meta['stem']} stem)", flush=True)
    optimizer = build_optimizer(model, args.optimizer, peak_lr, args.weight_decay)
    history = History(steps_per_epoch)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        history = History(steps_per_epoch, ckpt["losses"]["step_losses"].tolist(),
                          ckpt["losses"]["step_top1"].tolist(),
                          ckpt["losses"].get("knn", torch.zeros(0, 2)).tolist())
        set_rng_state(ckpt["rng"])
        precision.load_state_dict(ckpt.get("scaler"))
        print0(f"resuming {paths.checkpoint}: epoch {ckpt['epoch']}, step {ckpt['step']} of "
               f"{args.epochs * steps_per_epoch}", flush=True)
        if ckpt["args"]["epochs"] != args.epochs:
            print0(f"note: --epochs changed from {ckpt['args']['epochs']} to {args.epochs}; "
                   f"the cosine schedule is recomputed for the new total", flush=True)
    del ckpt
    model = wrap_model(model, device, args.sync_bn)  # DDP under torchrun
    if n_gpus > 1:
        model = torch.nn.DataParallel(model)  # z of every GPU is gathered: all are negatives
    if args.compile:
        model = torch.compile(model, backend=args.compile)  # unwrap_model gives the plain one

    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(round(args.warmup_epochs * steps_per_epoch))
    schedule = functools.partial(learning_rate_at, base_lr=peak_lr, warmup_steps=warmup_steps,
                                 total_steps=total_steps)
    schedule_info = {"name": "linear_warmup_cosine", "base_lr": peak_lr,
                     "warmup_steps": warmup_steps, "total_steps": total_steps}
    source = os.path.abspath(args.datapath) if os.path.exists(args.datapath) else args.datapath
    data_info = {"datapath": source, "n_images": len(images),
                 "classes": images.classes, "blur": blur}
    run_info = {"args": vars(args), "model_meta": meta, "environment": environment_info(device),
                "steps_per_epoch": steps_per_epoch,
                "augmentation": {"preset": args.aug, "steps": augmentation.describe(),
                                 "on": "device" if args.gpu_aug else "cpu"},
                "speed": {"amp": precision.mode, "compile": args.compile,
                          "channels_last": args.channels_last, "gpu_aug": args.gpu_aug,
                          "log_every": args.log_every},
                **scaling}
    started = time.perf_counter()
    first_step = len(history.step_losses)

    def save(draw_plot):
        """Rank 0 writes (every rank holds the same state); the others wait for it."""
        if is_main_process():
            write_outputs(draw_plot)
        barrier()

    def write_outputs(draw_plot):
        plain = unwrap_model(model)
        state = checkpoint_state(plain, optimizer, history, schedule_info, vars(args), meta,
                                 data_info, precision.state_dict())
        save_checkpoint(state, paths.checkpoint)  # the file resume reads comes first
        atomic_torch_save(state["model"], paths.model)
        atomic_torch_save(state["optimizer"], paths.optimizer)
        atomic_savez(paths.losses, step_losses=np.asarray(history.step_losses),
                     epoch_losses=history.epoch_losses,
                     step_top1=np.asarray(history.step_top1), epoch_top1=history.epoch_top1,
                     knn=np.asarray(history.knn, dtype=float).reshape(-1, 2),
                     steps_per_epoch=steps_per_epoch)
        if draw_plot and history.step_losses:
            plot_training_losses(history.step_losses, steps_per_epoch, paths.loss_plot,
                                 knn=history.knn)
        seconds = time.perf_counter() - started
        steps = len(history.step_losses) - first_step
        json_dump({**run_info, "epochs_done": len(history.epoch_losses),
                   "steps_done": len(history.step_losses),
                   "epoch_losses": history.epoch_losses.tolist(),
                   "epoch_positive_pair_top1": history.epoch_top1.tolist(),
                   "knn_accuracy": [list(row) for row in history.knn],
                   "wall_time_s": round(seconds, 1),
                   "images_per_s": round(steps * args.batch_size / seconds, 1) if steps else None,
                   "peak_memory_mb": round(peak_memory_mb(device), 1)}, paths.run_json)

    if len(history.step_losses) >= total_steps:
        print0(f"{args.respath} already holds a finished run of {args.epochs} epochs; pass a "
               f"larger --epochs to continue it or --fresh to start over")
        return 0
    criterion = NTXentLoss(args.temperature, gather=gather_with_grad if world_size > 1 else None)
    knn_monitor = (build_knn_monitor(args, meta, images, unwrap_model(model).encoder, device)
                   if args.knn_every else None)
    logger = None
    if args.tensorboard and is_main_process():
        logger = start_tensorboard(args, paths, model, history, images, meta,
                                   SimCLRAugmentation(*augmentation_args))
        if knn_monitor is not None:
            knn_monitor = log_knn_to(logger, knn_monitor, history)
    outcome = train(model, criterion, optimizer, sampler, loader, device, history, args.epochs,
                    schedule, args.channels_last, args.chunk_size, save, args.checkpoint_minutes,
                    args.knn_every, knn_monitor, precision, args.log_every,
                    on_log=logger.log_steps if logger else None, make_views=make_views)
    if logger is not None:
        if outcome == "finished":
            logger.log_projector(unwrap_model(model).encoder, projector_images(args, images),
                                 meta, device, args.batch_size, len(history.step_losses))
        logger.close()
    if outcome == "stopped":
        if is_main_process():
            print(f"interrupted at step {len(history.step_losses)}: checkpoint saved in "
                  f"{paths.checkpoint}; run the same command to resume", file=sys.stderr)
        return 130
    print0(f"done: {args.epochs} epochs; model in {paths.model}, loss plot in {paths.loss_plot}")
    return 0


if __name__ == "__main__":
    run_main(main, get_args_parser())
