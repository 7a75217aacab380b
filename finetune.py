"""Fine-tune a pretrained SimCLR encoder with a classifier head, or train the supervised baseline.

    python finetune.py DATAPATH MODELPATH RESPATH -bs 64 -c            # LP-FT: probe, then all
    python finetune.py DATAPATH MODELPATH RESPATH --freeze             # frozen encoder, head only
    python finetune.py DATAPATH MODELPATH RESPATH --baseline           # same network, from scratch
    python finetune.py DATAPATH RESPATH --baseline --arch resnet18     # baseline without a model
    python finetune.py DATAPATH MODELPATH RESPATH --label-fraction 0.1 # 10 % of each class's labels

Fine-tuning a pretrained encoder follows LP-FT (Kumar et al. 2022) by default: the linear head
starts from linear_evaluation.py's probe fitted on the frozen features of the labelled images
(--head-init), the encoder trains at --encoder-lr-ratio times the head's learning rate, and its
BatchNorm layers keep the statistics of pretraining (--encoder-bn); the probe itself is
validated as epoch 0, so the kept model is never worse on the validation split than the probe.
--from-head-layer K fine-tunes from inside the projection head (SimCLRv2).

DATAPATH is any labelled source of utils/sources.py (ImageFolder train/ [val/] test/, a MedMNIST
file or name, path lists). The validation split is DATAPATH's own (val/, the MedMNIST val
arrays, --val-list) or, when there is none, --val-fraction of every class carved out of the
training images by --seed: out of those outside the label budget when --label-fraction /
--samples-per-class is given (so the labelled images are exactly those linear_evaluation.py
uses for the same seed), else out of all of them. The model of the epoch with the best
validation accuracy is kept (RESPATH/best.pth) and evaluated on the test split: accuracy,
balanced accuracy, macro-F1, one-vs-rest AUROC, the per-class report and the confusion matrix
(report.json/.csv, predictions.csv, confusion_matrix.csv/.png). RESPATH/checkpoint.pth holds the run: running the
same command again resumes it, exactly, also mid-epoch (Ctrl-C saves first), --fresh starts over.
Training runs on the engine (utils/engine.py), like pretraining: --multiple_gpus (or torchrun)
trains on every GPU with -bs the global batch, --amp, --compile, --tensorboard.
"""
import argparse
import os

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from utils.checkpoint import RunPaths, load_best, load_pretrained, unwrap_model
from utils.cli import (add_data_loading_args, add_data_source_args, add_intensity_range_arg,
                       add_training_args, add_unreadable_arg, add_weight_description_args,
                       check_intensity_range, check_training_args, ensure_writable_dir,
                       environment_info, print_args, run_main)
from utils.data import (EpochBatchSampler, ImageDataset, LabelledViewDataset, UnreadableFiles,
                        dataset_statistics, make_loader, warn_if_colour_dropped)
from utils.distributed import (barrier, decide_on_main, get_rank, get_world_size,
                               is_main_process, print0, run_in_process_group)
from utils.engine import (LoopSettings, RunSetup, Task, Trainer, launcher_name,
                          load_resumable, report_outcome)
from utils.errors import UserError
from utils.fileio import json_dump
from utils.foreign_weights import WeightSettings
from utils.metrics import write_classification_report
from utils.model import FEATURE_DIMS, STEM_CHOICES, STEM_HELP, resolve_stem
from utils.optim import (PartRate, WarmupCosine, add_optimisation_args, build_optimizer,
                         fill_optimisation_defaults, scaled_learning_rate)
from utils.plotfuncs import plot_finetune_curves
from utils.precision import MixedPrecision, resolve_amp
from utils.sources import (has_split, load_split, select_subset, split_off_validation,
                           train_and_test)
from utils.tensorboard import tensorboard_dir
from utils.transfer import (ProbeHead, add_transfer_args, batchnorm_mode,
                            encoder_with_head_layers, fit_probe_head, freeze_batchnorm_statistics,
                            resolve_encoder_lr_ratio)
from utils.transforms import EvalTransform, SupervisedAugmentation

# Settings that define the run: resuming with another value is an error, not a silent mix
# (positionals in upper case, as the usage line names them).
RUN_DEFINING_ARGS = ("MODELPATH", "baseline", "freeze", "head", "arch", "stem", "image_size",
                     "batch_size", "optimizer", "lr", "weight_decay", "warmup_epochs",
                     "min_scale", "val_fraction", "test_fraction", "samples",
                     "samples_per_class", "label_fraction", "seed", "head_init",
                     "encoder_lr_ratio", "encoder_bn", "from_head_layer", "intensity_range")
# What a run written before a flag existed did (so it still resumes).
LEGACY_VALUES = {"head_init": "random", "encoder_lr_ratio": 1.0, "encoder_bn": "train",
                 "from_head_layer": 0, "intensity_range": None}


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Fine-tune a SimCLR encoder with a classifier head (or train the supervised "
                    "baseline) and report test metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("datapath", metavar="DATAPATH",
                        help="labelled data: folder with train/ [val/] test/ class folders, a "
                             "MedMNIST .npz file or name, or a path list (with --test-list)")
    parser.add_argument("modelpath", metavar="MODELPATH", nargs="?", default=None,
                        help="model.pth or checkpoint.pth of main.py; may be left out with "
                             "--baseline (then --arch and --stem define the network)")
    parser.add_argument("respath", metavar="RESPATH", help="folder for the run and its report")
    add_data_loading_args(parser, batch_size=64)
    add_intensity_range_arg(add_data_source_args(parser))
    model = parser.add_argument_group("model")
    model.add_argument("--baseline", action="store_true",
                       help="supervised baseline: the same network randomly initialised "
                            "(architecture from MODELPATH when given, else --arch/--stem)")
    model.add_argument("--freeze", action="store_true",
                       help="keep the encoder frozen (weights and BatchNorm statistics); "
                            "train the head only")
    model.add_argument("--head", choices=("linear", "mlp"), default="linear",
                       help="classifier on h: one Linear layer, or Linear-BN-ReLU-Linear")
    model.add_argument("--head-init", choices=("auto", "probe", "random"), default="auto",
                       help="probe = the linear head starts from linear_evaluation.py's probe "
                            "fitted on the frozen features of the labelled training images "
                            "(LP-FT), validated as epoch 0; random = a fresh head; auto = probe "
                            "for a pretrained encoder with the linear head, else random")
    model.add_argument("--from-head-layer", type=int, default=0, metavar="K",
                       help="keep the first K Linear layers of the projection head (with their "
                            "BatchNorm and ReLU) as part of the encoder, SimCLRv2's fine-tuning "
                            "from the middle of the head; 0 = from h")
    model.add_argument("--arch", choices=tuple(FEATURE_DIMS), default="resnet18",
                       help="--baseline without MODELPATH: the ResNet to train")
    model.add_argument("--stem", choices=STEM_CHOICES, default="auto",
                       help="--baseline without MODELPATH: " + STEM_HELP)
    model.add_argument("--image-size", type=int, default=None,
                       help="--baseline without MODELPATH: training size (default: the data's)")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=30,
                       help="total epochs (a resumed run continues to this number)")
    add_optimisation_args(train, "finetune")
    add_transfer_args(train, "head")
    train.add_argument("--min-scale", type=float, default=0.5,
                       help="smallest crop area of the training augmentation (random resized "
                            "crop and horizontal flip); 1.0 with --no-flip = no augmentation")
    train.add_argument("--no-flip", dest="flip", action="store_false",
                       help="no horizontal flips (for images whose left and right differ)")
    train.add_argument("--val-fraction", type=float, default=0.1,
                       help="share of every class held out for validation when DATAPATH has "
                            "no validation split of its own")
    train.add_argument("--val-every", type=int, default=1,
                       help="validate every E epochs (and after the last); the best of the "
                            "validated epochs is kept")
    train.add_argument("--fresh", action="store_true",
                       help="start over, replacing the run in RESPATH")
    add_unreadable_arg(add_training_args(parser))
    add_weight_description_args(parser, image_size=False)
    return parser


class Classifier(nn.Module):
    """Encoder f and classifier head: forward(x (B, C, S, S)) -> logits (B, K)."""

    def __init__(self, encoder, head):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x):
        return self.head(self.encoder(x))


def build_head(kind, feat_dim, n_classes):
    """'linear': Linear(F, K); 'mlp': Linear(F, F) -> BatchNorm1d -> ReLU -> Linear(F, K)."""
    if kind == "linear":
        return nn.Linear(feat_dim, n_classes)
    return nn.Sequential(nn.Linear(feat_dim, feat_dim, bias=False), nn.BatchNorm1d(feat_dim),
                         nn.ReLU(inplace=True), nn.Linear(feat_dim, n_classes))


def check_args(args):
    """Resolve the defaults that depend on other flags and reject inconsistent ones."""
    if args.modelpath is None and not args.baseline:
        raise UserError("give MODELPATH (the model.pth of main.py) to fine-tune, or --baseline "
                        "to train the same network from scratch")
    if args.baseline and args.freeze:
        raise UserError("--freeze with --baseline would train a head on a random encoder; that "
                        "is linear_evaluation.py --reference random")
    if args.head_init == "probe" and args.head != "linear":
        raise UserError("--head-init probe starts the linear head from the probe; with --head "
                        "mlp use --head-init random (or auto)")
    if args.from_head_layer < 0:
        raise UserError(f"--from-head-layer {args.from_head_layer} must be >= 0 (0 = from h)")
    check_intensity_range(args, model_given=args.modelpath is not None)
    resolve_encoder_lr_ratio(args)
    if args.head_init == "auto":
        args.head_init = "probe" if not args.baseline and args.head == "linear" else "random"
    check_training_args(args)
    if args.val_every < 1:
        raise UserError(f"--val-every {args.val_every} must be at least 1")
    if args.batch_size < 2:
        raise UserError("-bs must be at least 2 (BatchNorm needs two images)")
    if not 0 < args.min_scale <= 1:
        raise UserError(f"--min-scale {args.min_scale} must be in (0, 1]")
    fill_optimisation_defaults(args, "finetune")
    for name in ("modelpath", "datapath"):
        value = getattr(args, name)
        if value is not None and os.path.exists(value):
            setattr(args, name, os.path.abspath(value))


def finetune_splits(args):
    """(train, val, test) ImageLists with the same classes. The training images of a label
    budget are those linear_evaluation.py picks for the same seed; without a validation split
    in DATAPATH, validation images are carved from the training images outside the budget
    (from all of them when there is no budget)."""
    everything, test = train_and_test(args)
    train = select_subset(everything, args.samples, args.samples_per_class, args.seed,
                          args.label_fraction)
    if has_split(args.datapath, "val", args):
        val = load_split(args.datapath, "val", True, args)
    elif train is everything:
        train, val = split_off_validation(everything, args.val_fraction, args.seed)
    else:
        chosen = set(train.paths)
        rest = everything.subset([i for i, p in enumerate(everything.paths) if p not in chosen])
        val = split_off_validation(rest, args.val_fraction, args.seed)[1]
    if not has_split(args.datapath, "val", args):
        print0(f"validation: {len(val)} training images outside the label budget "
              f"(--val-fraction {args.val_fraction}, seed {args.seed})", flush=True)
    if not len(val):
        raise UserError(f"no images are left for validation in {args.datapath}; give a "
                        f"validation split (DATAPATH/val/ or --val-list) or a smaller budget")
    for name, split in (("val", val), ("test", test)):
        if split.classes != train.classes:
            raise UserError(f"the train and {name} splits of {args.datapath} have different "
                            f"classes ({len(train.classes)} vs {len(split.classes)}); they must "
                            f"match")
    return train, val, test


def model_description(args, train_images):
    """(model_meta, state dict of the pretrained model or None) for this run."""
    if args.modelpath is not None:
        state, meta = load_pretrained(args.modelpath, WeightSettings.from_args(args))
        return meta, None if args.baseline else state
    stats = dataset_statistics(train_images, RunPaths(args.respath).data_stats,
                               args.seed, args.intensity_range)
    image_size = args.image_size or stats["native_size"]
    return {"arch": args.arch, "stem": resolve_stem(args.stem, image_size), "proj_dims": None,
            "in_channels": stats["channels"], "image_size": image_size,
            "mean": stats["mean"], "std": stats["std"],
            "intensity_range": stats["intensity_range"]}, None


def build_classifier(meta, pretrained_state, args, n_classes):
    """The classifier (encoder, with --from-head-layer K the first K layers of the projection
    head, and args.head: a ProbeHead to be filled by the probe with --head-init probe) with the
    pretrained weights when given, else randomly initialised from args.seed."""
    torch.manual_seed(args.seed)
    encoder, feat_dim = encoder_with_head_layers(meta, pretrained_state, args.from_head_layer)
    head = (ProbeHead(feat_dim, n_classes) if args.head_init == "probe" else
            build_head(args.head, feat_dim, n_classes))
    return Classifier(encoder, head)


def start_head_from_probe(model, images, meta, args, device):
    """LP-FT's first stage: model.head := the probe fitted on the frozen features of the
    labelled `images` (on rank 0, the result given to every rank)."""
    loader = make_loader(ImageDataset(images, meta["in_channels"],
                                      EvalTransform(meta["image_size"], meta["mean"], meta["std"])),
                         batch_size=args.batch_size, num_workers=args.num_workers)

    def fit():
        head, accuracy = fit_probe_head(model.encoder, loader, device, model.head.out_features,
                                        seed=args.seed)
        return head.state_dict(), accuracy
    state, accuracy = decide_on_main(fit)
    model.head.load_state_dict(state)
    print0(f"head: the linear probe on the frozen features of the {len(images)} labelled images "
           f"(training accuracy {100 * accuracy:.2f} %); validated as epoch 0", flush=True)


class FinetuneTask(Task):
    """The classification step for the engine (cross-entropy of the logits, per-step loss and
    batch accuracy) and the validation accuracy as the evaluation, whose best epoch is kept in
    best.pth. With `freeze` the encoder stays in eval mode: its BatchNorm statistics are part
    of what is frozen (as in moco's linear evaluation); with --encoder-bn frozen only its
    BatchNorm layers are (statistics of pretraining, affine parameters trained)."""
    script = "finetune"
    series = {"loss": "loss", "accuracy": "training accuracy"}
    best_metric = "val_accuracy"

    def __init__(self, args, bn_mode, val_loader, device):
        self.freeze, self.val_loader, self.device = args.freeze, val_loader, device
        self.frozen_statistics = bn_mode == "frozen"
        self.criterion = nn.CrossEntropyLoss()

    def train_mode(self, model):
        model.train()
        if self.freeze:
            unwrap_model(model).encoder.eval()
        elif self.frozen_statistics:
            freeze_batchnorm_statistics(unwrap_model(model).encoder)

    def step(self, trainer, batch, step):
        x, y = trainer.images_and_targets(batch)
        with trainer.precision.autocast():
            logits = trainer.model(x)
        loss = self.criterion(logits.float(), y)
        trainer.precision.backward(loss)
        return loss.detach(), ((logits.detach().argmax(1) == y).float().mean(),)

    def evaluate(self, model, epoch):
        probs, labels = predict(model, self.val_loader, self.device)
        accuracy = float(np.mean(probs.argmax(1) == labels))
        print(f"epoch {epoch}: validation accuracy {100 * accuracy:.2f} %", flush=True)
        return {"val_accuracy": accuracy}


@torch.no_grad()
def predict(model, loader, device):
    """Class probabilities (N, K) float64 and labels (N,) of the images of `loader`."""
    model.eval()
    probs, labels = [], []
    for x, y in tqdm(loader, desc="evaluate", leave=False, disable=None):
        probs.append(torch.softmax(model(x.to(device)).double(), 1).cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def run_kind(args):
    return ("baseline (random init)" if args.baseline else "frozen encoder" if args.freeze
            else "full fine-tuning")


def main(args):
    check_args(args)
    return run_in_process_group(finetune, args)


def finetune(args, device):
    """Train on this process's `device` (one of `get_world_size()`), then report on rank 0."""
    precision = MixedPrecision(resolve_amp(args.amp, device, is_main_process()), device)
    paths = RunPaths(args.respath)

    def prepare():
        ensure_writable_dir(args.respath)
        print_args(args)
        return load_resumable(paths.checkpoint, "finetune", args, RUN_DEFINING_ARGS,
                              LEGACY_VALUES)
    ckpt = decide_on_main(prepare)
    train_images, val_images, test_images = finetune_splits(args)
    classes = train_images.classes
    counts = np.bincount(train_images.labels, minlength=len(classes))
    meta, pretrained = decide_on_main(lambda: model_description(args, train_images))
    train_images, val_images, test_images = (  # scaled as the model's statistics were
        images.with_intensity_range(meta.get("intensity_range"))
        for images in (train_images, val_images, test_images))
    if is_main_process():
        warn_if_colour_dropped(train_images, meta["in_channels"], f"DATAPATH {args.datapath}")
    model = build_classifier(meta, pretrained, args, len(classes))
    print0(f"{run_kind(args)}: {meta['arch']} ({meta['stem']} stem, {meta['in_channels']} "
           f"channel(s), {meta['image_size']} px), {args.head} head; {len(train_images)} "
           f"training images ({counts.min()}-{counts.max()} per class), {len(val_images)} "
           f"validation, {len(test_images)} test", flush=True)
    if args.freeze:
        model.encoder.requires_grad_(False)
    model = model.to(device)
    if args.head_init == "probe" and ckpt is None:
        start_head_from_probe(model, train_images, meta, args, device)

    batch_size = min(args.batch_size, len(train_images))
    if batch_size < args.batch_size:
        print0(f"note: -bs {args.batch_size} is more than the {len(train_images)} training "
               f"images; using batches of {batch_size}", flush=True)
    if batch_size < 2:
        raise UserError("fine-tuning needs at least 2 training images; raise --label-fraction "
                        "or --samples-per-class")
    sampler = EpochBatchSampler(len(train_images), batch_size, args.seed, get_rank(),
                                get_world_size())
    augmentation = SupervisedAugmentation(meta["image_size"], meta["mean"], meta["std"],
                                          args.min_scale, args.flip)
    pin = device.type == "cuda"
    unreadable = UnreadableFiles(len(train_images), args.max_unreadable)
    train_loader = make_loader(
        LabelledViewDataset(train_images, meta["in_channels"], augmentation, args.seed,
                            unreadable),
        batch_sampler=sampler, num_workers=args.num_workers, pin_memory=pin)
    evaluation = EvalTransform(meta["image_size"], meta["mean"], meta["std"])
    val_loader, test_loader = [
        make_loader(ImageDataset(images, meta["in_channels"], evaluation),
                    batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=pin)
        for images in (val_images, test_images)]

    steps_per_epoch = len(train_images) // batch_size
    peak_lr = scaled_learning_rate(args.lr, batch_size, "linear")
    schedule = WarmupCosine(peak_lr, int(round(args.warmup_epochs * steps_per_epoch)),
                            args.epochs * steps_per_epoch)
    bn_mode, why = batchnorm_mode(args.encoder_bn, pretrained)
    encoder_rate = "" if args.freeze else (
        f", encoder lr x{args.encoder_lr_ratio:g} with BatchNorm statistics {bn_mode} ({why})")
    print0(f"{steps_per_epoch} steps of {batch_size} per epoch ({get_world_size()} "
           f"process(es) x {sampler.batch_size}), {args.epochs} epochs, {args.optimizer} peak lr "
           f"{peak_lr:.4g}{encoder_rate}, amp {precision.mode}", flush=True)
    parts = [PartRate(model.encoder, args.encoder_lr_ratio)] if args.encoder_lr_ratio != 1 else []
    trainer = Trainer(RunSetup(
        task=FinetuneTask(args, bn_mode, val_loader, device), model=model,
        optimizer=build_optimizer(model, args.optimizer, peak_lr, args.weight_decay, parts),
        schedule=schedule, sampler=sampler, loader=train_loader, precision=precision,
        settings=LoopSettings.from_args(args, steps_per_epoch, eval_every=args.val_every,
                                        tensorboard_dir=tensorboard_dir(args.respath),
                                        eval_at_start=args.head_init == "probe"),
        paths=paths,
        device=device, resume=ckpt, unreadable=unreadable,
        record={"args": vars(args), "model_meta": meta, "extra": {"classes": classes}}))
    del ckpt
    status = report_outcome(trainer.fit(), trainer)
    if status == 0 and is_main_process():
        report(args, trainer, meta, (train_images, val_images, test_images), test_loader)
    barrier()
    return status


def report(args, trainer, meta, splits, test_loader):
    """Rank 0, after training: the curves, the best model's test metrics and run.json."""
    train_images, val_images, test_images = splits
    counts = np.bincount(train_images.labels, minlength=len(train_images.classes))
    history = trainer.history
    epoch_losses = history.epoch_means()
    validated = {e["epoch"]: e["val_accuracy"] for e in history.evaluations}
    val_accuracy = [validated.get(epoch, float("nan"))
                    for epoch in range(1, len(epoch_losses) + 1)]
    plot_finetune_curves(epoch_losses, val_accuracy,
                         os.path.join(args.respath, "training_curves.png"),
                         title=f"{run_kind(args)}, {len(train_images)} labelled images",
                         start_score=validated.get(0))
    best = load_best(trainer.setup.paths.best, "finetune")
    trainer.plain.load_state_dict(best["model"])
    probs, labels = predict(trainer.plain, test_loader, trainer.device)
    kept = best["best"]["epoch"]
    what = "the probe head before fine-tuning, epoch 0" if kept == 0 else f"epoch {kept}"
    print(f"test split, model of {what} (validation accuracy "
          f"{100 * best['best']['val_accuracy']:.2f} %):")
    metrics = write_classification_report(
        labels, probs.argmax(1), probs, train_images.classes, args.respath,
        {"method": "baseline" if args.baseline else "frozen" if args.freeze else "finetune",
         "modelpath": args.modelpath, "head": args.head, "head_init": args.head_init,
         "encoder_lr_ratio": args.encoder_lr_ratio,
         "encoder_bn": "frozen" if trainer.setup.task.frozen_statistics else "train",
         "from_head_layer": args.from_head_layer, "best_epoch": best["best"]["epoch"],
         "start_val_accuracy": validated.get(0),
         "val_accuracy": best["best"]["val_accuracy"], "n_train": len(train_images),
         "n_val": len(val_images), "n_test": len(test_images),
         "train_per_class": counts.tolist(), "epochs": args.epochs,
         "processes": get_world_size(), "environment": environment_info(trainer.device)},
        names=test_images.paths)
    json_dump({"args": vars(args), "model_meta": meta, "metrics": metrics,
               "val_accuracy": val_accuracy, "start_val_accuracy": validated.get(0),
               "epoch_losses": epoch_losses.tolist(),
               "launcher": launcher_name(), "processes": get_world_size(),
               "images_per_s": trainer.images_per_second(),
               "unreadable_images": trainer.setup.unreadable.summary()},
              trainer.setup.paths.run_json)
    print(f"test accuracy {100 * metrics['accuracy']:.2f} %; report in {args.respath}")


if __name__ == "__main__":
    run_main(main, get_args_parser(), launches_workers=True)
