"""Semantic segmentation with a pretrained SimCLR encoder, fine-tuned or frozen, or the same
network trained from scratch as the reference.

    python segment.py TRAIN_LIST MODELPATH RESPATH --val-list VAL_LIST --test-list TEST_LIST \
        [--classes classes.txt] [--num-classes K] [--freeze] [--decoder fcn|unet] \
        [--epochs 10] [-bs 32] [-c]
    python segment.py TRAIN_LIST MODELPATH RESPATH --baseline ...   # MODELPATH's network, random
    python segment.py TRAIN_LIST RESPATH --baseline [--arch resnet18] [--stem auto] ...

Each list line is `image_path,labelmap_path` (relative to the list's folder or absolute); a
labelmap is a single-channel PNG of the image's size whose pixels are class indices 0..K-1 or
the ignore value (--ignore-index, 255). Every image and labelmap is read once before training
and a bad one stops the run with one line naming it. MODELPATH is the model.pth or
checkpoint.pth of main.py: its encoder stages (any arch and stem), channel count, mean/std and
image size are used. With --baseline the weights are random: MODELPATH then only gives the
architecture and normalisation, or without MODELPATH --arch/--stem do, with channels, mean/std
and image size from the training images. RESPATH receives checkpoint.pth (the same command
resumes; --fresh starts over), best.pth (the weights of the epoch with the best validation
mIoU), metrics.json, metrics.csv and predictions.png. Training runs on the engine
(utils/engine.py): --multiple_gpus or torchrun train on every GPU with -bs the global batch,
and --amp, --compile, --tensorboard and exact mid-epoch resume work as in pretraining.
"""
import argparse
import csv
import io
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.checkpoint import RunPaths, load_best, load_pretrained, unwrap_model
from utils.cli import (add_data_loading_args, add_intensity_range_arg, add_training_args,
                       add_weight_description_args, check_intensity_range, check_training_args,
                       ensure_writable_dir, print_args, run_main)
from utils.data import (EpochBatchSampler, ImageList, dataset_statistics, make_loader,
                        warn_if_colour_dropped)
from utils.distributed import (all_reduce_sum, barrier, decide_on_main, get_rank,
                               get_world_size, is_main_process, run_in_process_group)
from utils.engine import (LoopSettings, RunSetup, Task, Trainer, launcher_name,
                          load_resumable, report_outcome)
from utils.errors import UserError
from utils.fileio import atomic_write_bytes, json_dump
from utils.foreign_weights import WeightSettings
from utils.model import (FEATURE_DIMS, SMALL_IMAGE_MAX, STEM_CHOICES, STEM_HELP, encoder_state,
                         load_state_strict, resolve_stem)
from utils.optim import (PartRate, WarmupCosine, add_optimisation_args, build_optimizer,
                         fill_optimisation_defaults)
from utils.precision import MixedPrecision, resolve_amp
from utils.segmentation import (DECODERS, IGNORE_INDEX, JointTransform, SegmentationDataset,
                                build_segmentation_net, check_class_indices, confusion_matrix,
                                plot_segmentation_grid, read_pair_list,
                                scan_pairs, segmentation_scores, stage_strides)
from utils.sources import read_list_lines
from utils.tensorboard import tensorboard_dir
from utils.transfer import (add_transfer_args, batchnorm_mode, freeze_batchnorm_statistics,
                            resolve_encoder_lr_ratio)
from utils.transforms import denormalize

# Settings that define the run: resuming with a different value is an error, not a silent mix
# (positionals in upper case, as the usage line names them).
RUN_DEFINING_ARGS = ("TRAIN_LIST", "MODELPATH", "baseline", "arch", "stem", "decoder", "freeze",
                     "num_classes", "classes", "ignore_index", "image_size", "min_scale",
                     "batch_size", "optimizer", "lr", "weight_decay", "warmup_epochs", "seed",
                     "decoder_epochs", "encoder_lr_ratio", "encoder_bn", "intensity_range",
                     "output_stride")
# What a run written before a flag existed did (so it still resumes).
LEGACY_VALUES = {"decoder_epochs": 0, "encoder_lr_ratio": 1.0, "encoder_bn": "train",
                 "intensity_range": None, "output_stride": "native"}
# Measured on the demo data (docs/defaults.md): a decoder-first epoch, a 0.1 encoder rate and
# the statistics of pretraining lost val mIoU with FCN and were level with U-Net, so by default
# everything trains together; the flags keep the LP-FT schedule at hand.
DEFAULT_DECODER_EPOCHS, DEFAULT_ENCODER_LR_RATIO, DEFAULT_ENCODER_BN = 0, 1.0, "train"
# --output-stride auto (measured on the demo data, docs/evaluation.md): FCN's single map at
# stride 4 for small images (7x7 at 28 px; 2x2 undilated with the half stem) beat stride 8 and
# the native strides on val mIoU; above SMALL_IMAGE_MAX px stride 8, torchvision's FCN and
# DeepLab's (stride 4 there would cost many times layer4's compute). U-Net reads every stage
# anyway: its own strides (stride 4 lost val mIoU).
OUTPUT_STRIDES = ("auto", "native", "2", "4", "8", "16", "32")
OUTPUTS = ("metrics.json", "metrics.csv", "predictions.png")  # beside RunPaths' files


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Semantic segmentation on a pretrained SimCLR encoder (resumes "
                    "automatically).",
        usage="%(prog)s TRAIN_LIST MODELPATH RESPATH [options]\n"
              "       %(prog)s TRAIN_LIST RESPATH --baseline [--arch A] [--stem S] [options]",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("train_list", metavar="TRAIN_LIST",
                        help="text file of 'image_path,labelmap_path' lines (relative to its "
                             "folder or absolute)")
    parser.add_argument("modelpath", metavar="MODELPATH",
                        help="model.pth or checkpoint.pth written by main.py (left out with "
                             "--baseline: then the second path is RESPATH)")
    parser.add_argument("respath", metavar="RESPATH", nargs="?", default=None,
                        help="output folder of this run")
    add_data_loading_args(parser, batch_size=32)

    data = parser.add_argument_group("data")
    for split in ("val", "test"):
        data.add_argument(f"--{split}-list", metavar="FILE", default=None,
                          help=f"{split} pairs, same format as TRAIN_LIST" +
                               ("; picks best.pth by mIoU (without it best.pth is the last "
                                "epoch)" if split == "val" else ""))
    data.add_argument("--num-classes", type=int, default=None,
                      help="number of classes K (default: from --classes, else the largest "
                           "index in the training labelmaps + 1)")
    data.add_argument("--classes", metavar="FILE", default=None,
                      help="text file of class names, line i naming class i (default: 0, 1, ...)")
    data.add_argument("--ignore-index", type=int, default=IGNORE_INDEX,
                      help="labelmap value that is neither trained on nor scored")
    data.add_argument("--image-size", type=int, default=None,
                      help="training and evaluation resolution S in px (default: MODELPATH's "
                           "image size; with --baseline alone the images' median shorter side)")
    data.add_argument("--min-scale", type=float, default=0.5,
                      help="smallest RandomResizedCrop area fraction of the training crops")
    add_intensity_range_arg(data)

    mod = parser.add_argument_group("model")
    mod.add_argument("--decoder", choices=DECODERS, default="fcn",
                     help="fcn: 1x1 convolution on the last stage, upsampled bilinearly; unet: a "
                          "light decoder over all four stages")
    mod.add_argument("--output-stride", choices=OUTPUT_STRIDES, default="auto",
                     help="dilate the encoder's last stages instead of striding until layer4's "
                          "stride is at most this (DeepLab's output stride; the weights are "
                          "unchanged; a finer map for the decoder at more compute); native: "
                          f"the encoder's own strides; auto: fcn 4 for images up to "
                          f"{SMALL_IMAGE_MAX} px, else 8; unet native")
    mod.add_argument("--freeze", action="store_true",
                     help="train the decoder only: the encoder's weights and BatchNorm "
                          "statistics stay as pretrained")
    mod.add_argument("--baseline", action="store_true",
                     help="the same network with random weights (the from-scratch reference)")
    mod.add_argument("--arch", choices=tuple(FEATURE_DIMS), default=None,
                     help="--baseline without MODELPATH: the ResNet (default resnet18)")
    mod.add_argument("--stem", choices=STEM_CHOICES, default=None,
                     help="--baseline without MODELPATH (default auto): " + STEM_HELP)

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=10, help="total epochs of the run")
    add_optimisation_args(opt, "segment")
    opt.add_argument("--decoder-epochs", type=int, default=None,
                     help="epochs the decoder trains alone on the fixed pretrained encoder "
                          "before the encoder joins at --encoder-lr-ratio (the LP-FT idea: "
                          "a random decoder's first gradients would distort the features; "
                          f"default {DEFAULT_DECODER_EPOCHS})")
    add_transfer_args(opt, "decoder", DEFAULT_ENCODER_LR_RATIO, DEFAULT_ENCODER_BN)

    out = parser.add_argument_group("output")
    out.add_argument("--grid-rows", type=int, default=6,
                     help="images in predictions.png (evenly spread over the test split, else "
                          "val, else train)")
    out.add_argument("--fresh", action="store_true",
                     help="start over even if RESPATH holds a run (its files are replaced)")
    add_training_args(parser)
    add_weight_description_args(parser, image_size=False)
    return parser


def resolve_args(args):
    """Positionals (TRAIN_LIST RESPATH with --baseline alone), defaults that depend on other
    flags, absolute paths (so a resumed run is recognised from any folder), flag checks."""
    if args.respath is None:
        if not args.baseline:
            raise UserError("RESPATH is missing: give TRAIN_LIST MODELPATH RESPATH, or "
                            "TRAIN_LIST RESPATH --baseline to train from scratch")
        args.modelpath, args.respath = None, args.modelpath
    if args.modelpath is not None and (args.arch or args.stem):
        raise UserError("--arch and --stem choose the network of --baseline without MODELPATH; "
                        "with MODELPATH the network is MODELPATH's, so drop them")
    if args.modelpath is None:
        args.arch, args.stem = args.arch or "resnet18", args.stem or "auto"
    check_intensity_range(args, model_given=args.modelpath is not None)
    for name in ("train_list", "val_list", "test_list", "modelpath", "classes"):
        if getattr(args, name) is not None:
            setattr(args, name, os.path.abspath(getattr(args, name)))
    fill_optimisation_defaults(args, "segment")
    resolve_encoder_lr_ratio(args, DEFAULT_ENCODER_LR_RATIO)
    if args.decoder_epochs is None:
        args.decoder_epochs = 0 if args.baseline else DEFAULT_DECODER_EPOCHS
    check_training_args(args)
    checks = [(args.batch_size >= 2,
               f"-bs {args.batch_size} must be at least 2 (BatchNorm needs two images)"),
              (args.num_classes is None or args.num_classes >= 2,
               f"--num-classes {args.num_classes} must be at least 2"),
              (0 <= args.ignore_index <= 65535,
               f"--ignore-index {args.ignore_index} must be a labelmap value, 0 to 65535"),
              (args.image_size is None or args.image_size >= 8,
               f"--image-size {args.image_size} must be at least 8 px"),
              (0 < args.min_scale <= 1, f"--min-scale {args.min_scale} must be in (0, 1]"),
              (args.lr > 0, f"--lr {args.lr} must be positive"),
              (args.warmup_epochs >= 0, f"--warmup-epochs {args.warmup_epochs} must be >= 0"),
              (args.grid_rows >= 1, f"--grid-rows {args.grid_rows} must be at least 1"),
              (args.decoder_epochs >= 0,
               f"--decoder-epochs {args.decoder_epochs} must be >= 0 (0: all train together)")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def output_stride(choice, decoder, image_size):
    """--output-stride CHOICE as dilate_encoder's bound, or None (the encoder's own strides):
    auto -> 4 for fcn on images up to SMALL_IMAGE_MAX px, 8 above, None for unet."""
    if choice == "auto":
        return None if decoder == "unet" else 4 if image_size <= SMALL_IMAGE_MAX else 8
    return None if choice == "native" else int(choice)


def read_splits(args):
    """{'train': PairList, 'val': PairList or None, 'test': PairList or None}."""
    lists = {"train": args.train_list, "val": args.val_list, "test": args.test_list}
    return {split: read_pair_list(path) if path else None for split, path in lists.items()}


def decide_classes(args, splits):
    """(class names, pixel counts per class of each split): every labelmap read and checked
    (size, channels, indices < K or the ignore value) before anything is trained."""
    names = None
    if args.classes:
        names = [line for _, line in read_list_lines(args.classes, "class name",
                                                     "give a text file of class names")]
    scans = {split: scan_pairs(pairs, args.ignore_index)
             for split, pairs in splits.items() if pairs is not None}
    if args.num_classes is not None:
        k, source = args.num_classes, f"--num-classes {args.num_classes}"
    elif names is not None:
        k, source = len(names), f"{len(names)} names in --classes {args.classes}"
    else:
        k = max(scans["train"][0]) + 1
        source = "the largest index in the training labelmaps + 1"
    if names is not None and len(names) != k:
        raise UserError(f"--classes {args.classes} names {len(names)} classes but --num-classes "
                        f"is {k}; make them agree")
    if k < 2:
        raise UserError(f"the training labelmaps hold only class 0 (and the ignore value "
                        f"{args.ignore_index}); segmentation needs at least 2 classes")
    for split, (maxima, _) in scans.items():
        check_class_indices(splits[split], maxima, k, args.ignore_index, source)
    counts = {split: np.pad(c, (0, k - len(c))) for split, (_, c) in scans.items()}
    return names or [str(c) for c in range(k)], counts


def model_setup(args, train_pairs):
    """(model_meta, encoder weights or None): arch, stem, in_channels, mean, std and the
    resolution S, from MODELPATH or (--baseline alone) from the training images."""
    if args.modelpath is not None:
        state, meta = load_pretrained(args.modelpath, WeightSettings.from_args(args))
        meta = {k: meta[k] for k in ("arch", "stem", "in_channels", "mean", "std")} | {
            "image_size": args.image_size or meta["image_size"],
            "intensity_range": meta.get("intensity_range")}
        warn_if_colour_dropped(ImageList(train_pairs.images), meta["in_channels"],
                               f"TRAIN_LIST {args.train_list}")
        return meta, None if args.baseline else encoder_state(state)
    stats = dataset_statistics(ImageList(train_pairs.images),
                               RunPaths(args.respath).data_stats, args.seed,
                               args.intensity_range)
    size = args.image_size or stats["native_size"]
    return {"arch": args.arch, "stem": resolve_stem(args.stem, size),
            "in_channels": stats["channels"], "mean": stats["mean"], "std": stats["std"],
            "image_size": size, "intensity_range": stats["intensity_range"]}, None


def loaders(args, splits, meta, device):
    """(train sampler, train loader, {split: eval loader}) with the joint transforms."""
    size, mean, std = meta["image_size"], meta["mean"], meta["std"]
    scaling = meta.get("intensity_range")
    train_set = SegmentationDataset(splits["train"], meta["in_channels"],
                                    JointTransform(size, mean, std, True, args.min_scale),
                                    args.seed, scaling)
    sampler = EpochBatchSampler(len(train_set), args.batch_size, args.seed, get_rank(),
                                get_world_size())
    pin = device.type == "cuda"
    train_loader = make_loader(train_set, batch_sampler=sampler, num_workers=args.num_workers,
                               pin_memory=pin)
    evaluation = JointTransform(size, mean, std, False)
    eval_loaders = {split: make_loader(SegmentationDataset(pairs, meta["in_channels"], evaluation,
                                                           intensity_range=scaling),
                                       batch_size=args.batch_size,
                                       num_workers=args.num_workers, pin_memory=pin)
                    for split, pairs in splits.items() if pairs is not None}
    return sampler, train_loader, eval_loaders


@torch.no_grad()
def predict(net, loader, device, num_classes, ignore_index, channels_last, keep=()):
    """Run `net` (eval mode) over `loader`: (confusion matrix (K, K), kept), `kept` holding
    (images, masks, predictions) of the dataset indices in `keep`, on the CPU."""
    net.eval()
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    kept, offset = ([], [], []), 0
    for x, y in tqdm(loader, desc="evaluating", leave=False, disable=None):
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        pred = net(x).argmax(1).cpu()
        matrix += confusion_matrix(pred, y, num_classes, ignore_index)
        rows = [i - offset for i in keep if offset <= i < offset + len(y)]
        for store, values in zip(kept, (x.cpu(), y, pred)):
            store.extend(values[rows])
        offset += len(y)
    return matrix, tuple(torch.stack(s) if s else None for s in kept)


def majority_reference(matrix, majority):
    """Scores of predicting class `majority` everywhere, from a split's confusion matrix."""
    constant = torch.zeros_like(matrix)
    constant[:, majority] = matrix.sum(1)
    return segmentation_scores(constant)


class SegmentationTask(Task):
    """The segmentation step for the engine: cross-entropy over the non-ignored pixels of the
    global batch, and the val split's mIoU as the evaluation (best.pth keeps its best epoch;
    without a val split every epoch is the best known). With `freeze` the encoder stays in eval
    mode (its BatchNorm statistics are part of what is frozen); with --encoder-bn frozen only
    its BatchNorm layers do."""
    script = "segment"
    series = {"loss": "loss"}
    best_metric = "miou"

    def __init__(self, args, bn_mode, num_classes, val_loader, device):
        self.ignore_index, self.freeze, self.k = args.ignore_index, args.freeze, num_classes
        self.val_loader, self.device, self.channels_last = val_loader, device, args.channels_last
        self.frozen_statistics = bn_mode == "frozen"

    def train_mode(self, model):
        model.train()
        if self.freeze:
            unwrap_model(model).encoder.eval()
        elif self.frozen_statistics:
            freeze_batchnorm_statistics(unwrap_model(model).encoder)

    def step(self, trainer, batch, step):
        """loss = sum of the pixel cross-entropies of this process * W / V, V the non-ignored
        pixels of the global batch over W processes: DDP's mean over processes is then the
        mean over every valid pixel of the global batch (0, not NaN, when there is none)."""
        x, y = trainer.images_and_targets(batch)
        with trainer.precision.autocast():
            logits = trainer.model(x)
        valid = all_reduce_sum((y != self.ignore_index).sum().to(torch.float32))
        loss = (F.cross_entropy(logits.float(), y, ignore_index=self.ignore_index,
                                reduction="sum") * get_world_size() / valid.clamp_min(1))
        trainer.precision.backward(loss)
        return loss.detach(), ()

    def evaluate(self, model, epoch):
        if self.val_loader is None:
            return None
        scores = segmentation_scores(predict(model, self.val_loader, self.device, self.k,
                                             self.ignore_index, self.channels_last)[0])
        print(f"epoch {epoch}: val mIoU {100 * scores['miou']:.2f} %  pixel accuracy "
              f"{100 * scores['pixel_accuracy']:.2f} %", flush=True)
        return {"miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"]}


def main(args):
    resolve_args(args)
    return run_in_process_group(segment, args)


def segment(args, device):
    """Train on this process's `device` (one of `get_world_size()`), then report on rank 0."""
    precision = MixedPrecision(resolve_amp(args.amp, device, is_main_process()), device)
    run_paths = RunPaths(args.respath)
    paths = {name: os.path.join(args.respath, name) for name in OUTPUTS}

    def prepare():
        ensure_writable_dir(args.respath)
        print_args(args)
        return load_resumable(run_paths.checkpoint, "segment", args, RUN_DEFINING_ARGS,
                              LEGACY_VALUES)
    ckpt = decide_on_main(prepare)
    splits = read_splits(args)
    meta, weights = decide_on_main(lambda: model_setup(args, splits["train"]))
    classes, counts = decide_on_main(lambda: decide_classes(args, splits))
    k, n_train = len(classes), len(splits["train"])
    started_with = ckpt and (ckpt["extra"]["num_classes"], ckpt["extra"]["n_train"])
    if ckpt is not None and started_with != (k, n_train):
        raise UserError(f"{run_paths.checkpoint} was started with {ckpt['extra']['n_train']} "
                        f"training pairs and {ckpt['extra']['num_classes']} classes, the lists "
                        f"now give {n_train} and {k}; use --fresh or another RESPATH")
    stride = output_stride(args.output_stride, args.decoder, meta["image_size"])
    if is_main_process():
        describe_run(args, splits, classes, counts, meta, weights, stride)

    torch.manual_seed(args.seed)
    net = build_segmentation_net(meta["arch"], meta["in_channels"], meta["stem"], k,
                                 args.decoder, args.freeze, stride)
    if weights is not None:
        load_state_strict(net.encoder, weights, args.modelpath)
    net = net.to(device)
    sampler, train_loader, eval_loaders = loaders(args, splits, meta, device)
    steps_per_epoch = n_train // args.batch_size
    schedule = WarmupCosine(args.lr, round(args.warmup_epochs * steps_per_epoch),
                            args.epochs * steps_per_epoch)
    bn_mode, why = batchnorm_mode(args.encoder_bn, weights)
    schedule_parts = not args.freeze and (args.encoder_lr_ratio, args.decoder_epochs) != (1, 0)
    parts = [PartRate(net.encoder, args.encoder_lr_ratio,
                      args.decoder_epochs * steps_per_epoch)] if schedule_parts else []
    if is_main_process() and not args.freeze:
        alone = (f" from epoch {args.decoder_epochs + 1} (the decoder trains alone before)"
                 if args.decoder_epochs else "")
        print(f"encoder: lr x{args.encoder_lr_ratio:g}{alone}, BatchNorm statistics {bn_mode} "
              f"({why})", flush=True)
    trainer = Trainer(RunSetup(
        task=SegmentationTask(args, bn_mode, k, eval_loaders.get("val"), device), model=net,
        optimizer=build_optimizer(net, args.optimizer, args.lr, args.weight_decay, parts),
        schedule=schedule, sampler=sampler, loader=train_loader, precision=precision,
        settings=LoopSettings.from_args(args, steps_per_epoch, eval_every=1,
                                        tensorboard_dir=tensorboard_dir(args.respath)),
        paths=run_paths, device=device, resume=ckpt,
        record={"args": vars(args), "model_meta": meta,
                "extra": {"classes": classes, "num_classes": k, "n_train": n_train,
                          "decoder": args.decoder}}))
    del ckpt
    first_step = trainer.history.step
    status = report_outcome(trainer.fit(), trainer)
    if status == 0 and is_main_process():
        if trainer.history.step == first_step:
            print(f"{args.respath} already holds a finished run of {args.epochs} epochs (pass a "
                  f"larger --epochs to continue it, --fresh to start over); evaluating best.pth",
                  flush=True)
        net.load_state_dict(load_best(run_paths.best, "segment")["model"])
        data = SegmentationData(splits, classes, counts, meta, eval_loaders)
        report = evaluate_and_write(net, data, args, device, paths, trainer.history)
        report.update(train_seconds=round(time.perf_counter() - trainer.started, 1),
                      train_images_per_s=trainer.images_per_second(),
                      processes=get_world_size(), launcher=launcher_name())
        json_dump(report, paths["metrics.json"])
        print(f"done: metrics in {paths['metrics.json']} and metrics.csv, figure "
              f"{paths['predictions.png']}, best weights {run_paths.best} "
              f"(epoch {trainer.history.best['epoch']})")
    barrier()
    return status


def describe_run(args, splits, classes, counts, meta, weights, stride):
    """Print the data (pairs per split, class shares of the training pixels) and the model
    (`stride`: layer4's bound of --output-stride, None when undilated)."""
    share = counts["train"] / max(1, counts["train"].sum())
    print(f"data: {', '.join(f'{len(p)} {s}' for s, p in splits.items() if p)} pairs; "
          f"{len(classes)} classes, training pixels " +
          ", ".join(f"{n} {100 * f:.1f} %" for n, f in zip(classes, share)), flush=True)
    source = "random weights (--baseline)" if weights is None else f"encoder of {args.modelpath}"
    strides = "" if stride is None else f", layer4 stride at most {stride}: dilated"
    print(f"model: {meta['arch']} ({meta['stem']} stem{strides}, {meta['in_channels']} "
          f"channel(s)), {args.decoder} decoder, {source}"
          f"{', encoder frozen' if args.freeze else ''}; "
          f"{meta['image_size']} px", flush=True)


@dataclass
class SegmentationData:
    """What a segmentation run evaluates on: the pair lists per split, the class names, the
    training pixels per class (`counts["train"]`, (K,)), the model description (mean/std) and
    the evaluation loaders per split."""
    splits: dict
    classes: list
    counts: dict
    meta: dict
    eval_loaders: dict

    def shown_split(self):
        """The split whose predictions the figure shows: test, else val, else train."""
        return next(s for s in ("test", "val", "train") if s in self.eval_loaders or s == "train")


def evaluate_and_write(model, data, args, device, paths, history):
    """Scores of the loaded weights on val and test (also printed), metrics.csv and the
    prediction grid; returns the metrics.json dict."""
    shown = data.shown_split()
    n_shown = len(data.splits[shown])
    keep = sorted(set(np.linspace(0, n_shown - 1, min(args.grid_rows, n_shown)).round()
                      .astype(int).tolist()))
    results = {}
    for split in [s for s in ("val", "test") if s in data.eval_loaders] + (
            ["train"] if shown == "train" else []):
        matrix, kept = predict(model, data.eval_loaders[split], device, len(data.classes),
                               args.ignore_index, args.channels_last,
                               keep if split == shown else ())
        results[split] = split_scores(matrix, data, split)
        if split == shown:
            write_prediction_grid(kept, data, args.ignore_index, paths["predictions.png"])
    write_metrics_csv(results, data.classes, paths["metrics.csv"])
    return {"classes": data.classes, "num_classes": len(data.classes),
            "ignore_index": args.ignore_index, "resolution": data.meta["image_size"],
            "decoder": args.decoder, "freeze": args.freeze, "baseline": args.baseline,
            "output_stride": args.output_stride, "stage_strides": stage_strides(model.encoder),
            "decoder_epochs": args.decoder_epochs, "encoder_lr_ratio": args.encoder_lr_ratio,
            "encoder_bn": args.encoder_bn,
            "modelpath": args.modelpath, "model_meta": data.meta,
            "n_pairs": {s: len(p) for s, p in data.splits.items() if p is not None},
            "epochs": args.epochs, "best_epoch": history.best["epoch"],
            "epoch_losses": history.epoch_means().tolist(),
            "val_per_epoch": [dict(e) for e in history.evaluations], **results}


def split_scores(matrix, data, split):
    """The metrics.json entry of one split from its confusion matrix (K, K), printed too: IoU
    per class, mIoU, pixel accuracy, and the same for predicting the majority training class."""
    classes, majority = data.classes, int(np.argmax(data.counts["train"]))
    scores = segmentation_scores(matrix)
    reference = majority_reference(matrix, majority)
    print(f"{split}: mIoU {100 * scores['miou']:.2f} %, pixel accuracy "
          f"{100 * scores['pixel_accuracy']:.2f} % over {scores['pixels']} pixels of "
          f"{len(data.splits[split])} images (predicting '{classes[majority]}' everywhere: "
          f"mIoU {100 * reference['miou']:.2f} %)")
    print("  IoU " + ", ".join(f"{name} -" if math.isnan(v) else f"{name} {100 * v:.1f}"
                               for name, v in zip(classes, scores["iou"])), flush=True)
    return {"iou": dict(zip(classes, nan_to_none(scores["iou"]))), "miou": scores["miou"],
            "pixel_accuracy": scores["pixel_accuracy"], "pixels": scores["pixels"],
            "images": len(data.splits[split]), "confusion_matrix": matrix.tolist(),
            "majority_class_reference": {key: reference[key]
                                         for key in ("miou", "pixel_accuracy")}}


def write_prediction_grid(kept, data, ignore_index, path):
    """predictions.png: image, truth and prediction of the kept pairs (images (N, C, H, W)
    normalised, masks (N, H, W)), each titled with its share of valid pixels right."""
    images, truths, preds = kept
    pixels = denormalize(images.float(), data.meta["mean"], data.meta["std"]).permute(0, 2, 3, 1)
    pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    valid = truths != ignore_index
    correct = ((preds == truths) & valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)
    plot_segmentation_grid(pixels.numpy(), truths.numpy(), preds.numpy(), data.classes, path,
                           [f"{100 * c:.0f} % of pixels right" for c in correct.tolist()],
                           ignore_index)


def nan_to_none(values):
    """JSON has no NaN: NaN (a class absent from ground truth and prediction) becomes null."""
    return [None if math.isnan(v) else v for v in values]


def write_metrics_csv(results, classes, path):
    """metrics.csv: one row per metric (IoU of each class, mIoU, pixel accuracy), one column per
    evaluated split; 'nan' for a class absent from that split's truth and prediction."""
    splits = list(results)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["metric"] + splits)
    for name in classes:
        writer.writerow([f"IoU {name}"] + [fmt(results[s]["iou"][name]) for s in splits])
    writer.writerow(["mIoU"] + [fmt(results[s]["miou"]) for s in splits])
    writer.writerow(["pixel accuracy"] + [fmt(results[s]["pixel_accuracy"]) for s in splits])
    atomic_write_bytes(path, buffer.getvalue().encode())


def fmt(value):
    return "nan" if value is None or math.isnan(value) else f"{value:.4f}"


if __name__ == "__main__":
    run_main(main, get_args_parser(), launches_workers=True)
