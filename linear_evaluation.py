"""Linear evaluation of a SimCLR model: a logistic-regression probe on frozen features.

    python linear_evaluation.py DATAPATH MODELPATH RESPATH -bs 125 -c --multiple_gpus \
        --remove_top_layers N

DATAPATH holds ImageFolder train/ and test/ with the same class folders, or is a MedMNIST
.npz file or name, or a path list with --test-list (see utils/sources.py). MODELPATH is the
model.pth or checkpoint.pth main.py wrote. --remove_top_layers N removes the top N Linear layers
of the projection head (each with its BatchNorm/ReLU): N = head depth (the default) evaluates the
encoder output h, as the SimCLR paper does; N = 0 evaluates the projection z. With --snapshots,
MODELPATH is RESPATH/model of a main.py --save-every run and every snapshot is evaluated.
"""
import argparse
import os
import re

import torch

from utils.cli import (add_data_loading_args, add_data_source_args,
                       add_labelled_data_and_model_args, add_weight_description_args,
                       ensure_writable_dir, note_one_device, print_args, run_main, select_device,
                       ONE_DEVICE_HELP)
from utils.data import ImageDataset, make_loader, warn_if_colour_dropped
from utils.errors import UserError
from utils.fileio import atomic_torch_save, atomic_write_bytes
from utils.foreign_weights import WeightSettings
from utils.knn import knn_accuracy
from utils.linear_probe import describe_weight_decay, extract_features, fit_probe
from utils.metrics import write_classification_report
from utils.model import head_depth, load_trained_model, truncate_head
from utils.plotfuncs import plot_accuracy_vs_epoch, plot_accuracy_vs_layer
from utils.sources import labelled_train_test
from utils.transforms import EvalTransform


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Linear evaluation: logistic regression on frozen SimCLR features.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_labelled_data_and_model_args(parser, "respath", "folder for the report and figures")
    add_data_loading_args(parser, batch_size=125,
                          multiple_gpus_help=ONE_DEVICE_HELP)
    add_data_source_args(parser)
    parser.add_argument("--remove_top_layers", "--remove-top-layers", dest="remove_top_layers",
                        type=int, default=None,
                        help="projection-head Linear layers to remove (each with its activation); "
                             "default: all of them, i.e. the encoder output h; 0 gives z")
    parser.add_argument("--epochs", type=int, default=500,
                        help="full-batch L-BFGS iterations of the probe over the cached features")
    parser.add_argument("--weight-decay", "--wd", dest="weight_decay", type=probe_weight_decay,
                        default="auto",
                        help="L2 penalty of the probe on standardised features; auto = chosen "
                             "per feature set from 1e-5 to 1 on held-out training images (5 "
                             "folds up to 2,000 images, else a fifth of each class), never on "
                             "the test split")
    parser.add_argument("--knn-k", type=int, default=20,
                        help="also report the kNN accuracy (cosine similarity, majority vote of "
                             "the K nearest training images) of the same features; 0 = off")
    parser.add_argument("--sweep", action="store_true",
                        help="evaluate every cut point of the head; writes acc_vs_layer.png/.csv")
    parser.add_argument("--reference", choices=("random", "pixels"), default=None,
                        help="evaluate a reference instead of the trained weights: 'random' = "
                             "the same architecture randomly initialised (--seed), 'pixels' = "
                             "the normalised pixels themselves")
    parser.add_argument("--snapshots", action="store_true",
                        help="MODELPATH is a folder of main.py --save-every snapshots "
                             "(RESPATH/model): probe h and z of each; writes acc_vs_epoch.csv/.png")
    add_weight_description_args(parser)
    return parser


class Flatten(torch.nn.Module):
    """(B, C, H, W) -> (B, C*H*W): the 'pixels' reference encoder."""

    def forward(self, x):
        return x.flatten(1)


def probe_weight_decay(text):
    """--weight-decay: 'auto' -> None (chosen by fit_probe), else a float >= 0."""
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'auto' nor a number >= 0")
    return value


def probe_accuracy(train_x, train_y, test_x, test_y, n_classes, args):
    """(probe, test predictions (M,), test accuracy) of the probe fitted on the train features
    with --weight-decay (auto: chosen on held-out train features)."""
    probe = fit_probe(train_x, train_y, n_classes, args.weight_decay, args.epochs, args.seed)
    pred = probe.predict(test_x)
    return probe, pred, (pred == test_y).double().mean().item()


def split_features(encoder, meta, images_pair, args, device, channels_last=True):
    """((train features (N, F), labels (N,)), (test ...)) of `encoder` on the two image lists,
    without augmentation (resize, centre crop, the model's intensity range and normalisation)."""
    transform = EvalTransform(meta["image_size"], meta["mean"], meta["std"])
    scaling = meta.get("intensity_range")
    loaders = [make_loader(ImageDataset(images.with_intensity_range(scaling), meta["in_channels"],
                                        transform),
                           batch_size=args.batch_size, num_workers=args.num_workers,
                           pin_memory=device.type == "cuda")
               for images in images_pair]
    if channels_last:
        encoder = encoder.to(device, memory_format=torch.channels_last)
    return [extract_features(encoder, loader, device, channels_last, desc=f"{split} features")
            for loader, split in zip(loaders, ("train", "test"))]


def snapshot_paths(folder):
    """[(epoch, path)] of the epoch_NNNN.pth files in `folder`, by epoch; UserError for none."""
    if not os.path.isdir(folder):
        raise UserError(f"--snapshots: {folder} is not a folder; give RESPATH/model of a main.py "
                        f"run made with --save-every E")
    found = sorted((int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
                   for m in [re.fullmatch(r"epoch_(\d+)\.pth", name)] if m)
    if not found:
        raise UserError(f"--snapshots: {folder} holds no epoch_NNNN.pth; pretrain with main.py "
                        f"--save-every E to keep one every E epochs")
    return found


def evaluate_snapshots(args, device):
    """--snapshots: the probe on h and on z (the whole head) of every snapshot; prints one line
    each and writes acc_vs_epoch.csv (epoch, accuracy_h, accuracy_z) and acc_vs_epoch.png."""
    snapshots = snapshot_paths(args.modelpath)
    images_pair = labelled_train_test(args)
    classes = images_pair[0].classes
    rows = []
    for epoch, path in snapshots:
        model, meta = load_trained_model(path, settings=WeightSettings.from_args(args))
        (train_h, train_y), (test_h, test_y) = split_features(model.encoder, meta, images_pair,
                                                              args, device)
        with torch.no_grad():
            head = model.head.eval()
            train_z, test_z = head(train_h), head(test_h)
        acc_h = probe_accuracy(train_h, train_y, test_h, test_y, len(classes), args)[2]
        acc_z = probe_accuracy(train_z, train_y, test_z, test_y, len(classes), args)[2]
        rows.append((epoch, acc_h, acc_z))
        print(f"epoch {epoch}: test accuracy h {100 * acc_h:.2f} %, z {100 * acc_z:.2f} % "
              f"({os.path.basename(path)})", flush=True)
    lines = ["epoch,accuracy_h,accuracy_z"] + [f"{e},{h:.4f},{z:.4f}" for e, h, z in rows]
    atomic_write_bytes(os.path.join(args.respath, "acc_vs_epoch.csv"),
                       ("\n".join(lines) + "\n").encode())
    plot_accuracy_vs_epoch(*zip(*rows), os.path.join(args.respath, "acc_vs_epoch.png"))
    print(f"{len(rows)} snapshot(s); acc_vs_epoch.csv and .png in {args.respath}")
    return 0


def main(args):
    device = select_device(args.cuda)
    note_one_device(args, "feature extraction")
    ensure_writable_dir(args.respath)
    print_args(args)
    if args.knn_k < 0:
        raise UserError(f"--knn-k {args.knn_k} must be >= 0 (0: no kNN accuracy)")
    if args.snapshots:
        return evaluate_snapshots(args, device)
    model, meta = load_trained_model(args.modelpath, args.reference is not None, args.seed,
                                     WeightSettings.from_args(args))
    train_images, test_images = labelled_train_test(args)
    warn_if_colour_dropped(train_images, meta["in_channels"], f"DATAPATH {args.datapath}")
    depth = head_depth(model.head)
    remove = depth if args.remove_top_layers is None else args.remove_top_layers
    truncate_head(model.head, remove)  # validates the value before the slow part

    channels_last = args.reference != "pixels"
    encoder = model.encoder if channels_last else Flatten()
    (train_h, train_y), (test_h, test_y) = split_features(
        encoder, meta, (train_images, test_images), args, device, channels_last)
    print(f"features: {tuple(train_h.shape)} train, {tuple(test_h.shape)} test "
          f"({'pixels' if args.reference == 'pixels' else meta['arch'] + ' h'})", flush=True)

    classes = train_images.classes
    head = model.head.eval()
    cut_points = list(range(depth, -1, -1)) if args.sweep else [remove]
    if args.reference == "pixels":
        cut_points = [depth]  # there is no head on pixels
    results, feature_dims = {}, {}
    with torch.no_grad():
        for n in cut_points:
            cut = truncate_head(head, n)
            train_x, test_x = cut(train_h), cut(test_h)
            results[n] = probe_accuracy(train_x, train_y, test_x, test_y, len(classes), args)
            feature_dims[n] = train_x.shape[1]
            print(f"remove_top_layers={n}: feature size {train_x.shape[1]}, weight decay "
                  f"{describe_weight_decay(results[n][0])}, test accuracy "
                  f"{100 * results[n][2]:.2f} %", flush=True)
    if args.sweep and len(cut_points) > 1:
        with open(os.path.join(args.respath, "acc_vs_layer.csv"), "w") as f:
            f.write("remove_top_layers,feature_dim,test_accuracy\n")
            for n in sorted(results):
                f.write(f"{n},{feature_dims[n]},{results[n][2]:.4f}\n")
        plot_accuracy_vs_layer(sorted(results), [results[n][2] for n in sorted(results)],
                               os.path.join(args.respath, "acc_vs_layer.png"))
    report_at = remove if remove in results else cut_points[0]
    probe, pred, accuracy = results[report_at]
    with torch.no_grad():
        cut = truncate_head(head, report_at)
        train_x, test_x = cut(train_h), cut(test_h)
        probs = torch.softmax(probe.decision_function(test_x), 1)
    knn = None
    if args.knn_k:
        knn = knn_accuracy(train_x, train_y, test_x, test_y, len(classes), args.knn_k)
        print(f"kNN accuracy (k {args.knn_k}, cosine, majority vote) of the same features "
              f"{100 * knn:.2f} %", flush=True)
    write_classification_report(
        test_y.numpy(), pred.numpy(), probs.numpy(), classes, args.respath,
        {"remove_top_layers": report_at, "modelpath": os.path.abspath(args.modelpath),
         "reference": args.reference, "n_train": len(train_y), "n_test": len(test_y),
         "knn_accuracy": knn, "knn_k": args.knn_k, "weight_decay": probe.weight_decay,
         "weight_decay_selection": {f"{wd:g}": acc for wd, acc in probe.selection.items()},
         "train_per_class": torch.bincount(train_y, minlength=len(classes)).tolist()},
        names=test_images.paths)
    atomic_torch_save({**probe.state_dict(), "classes": classes, "remove_top_layers": report_at},
                      os.path.join(args.respath, "linear_classifier.pth"))
    print(f"test accuracy {100 * accuracy:.2f} % (remove_top_layers={report_at}); report in "
          f"{args.respath}")
    return 0


if __name__ == "__main__":
    run_main(main, get_args_parser())
