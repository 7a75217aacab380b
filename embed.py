"""Features of your own images from a trained SimCLR model: one row per image.

    python embed.py DATAPATH MODELPATH OUT -bs 250 -nw 2 -c [--layer h|z] [--normalize] \
        [--split train|val|test|all]

DATAPATH is a plain folder of images (searched recursively), an ImageFolder class tree, a
folder with train/ (val/, test/) splits, a path list (a text file of 'path' or 'path,label'
lines) or a MedMNIST .npz file or name, read as every script reads it (utils/sources.py).
MODELPATH is the model.pth or checkpoint.pth main.py wrote. Every image goes through the
evaluation transform (converted to the model's channels, shorter side resized to the training
size, centre crop, the stored mean/std), never an augmentation, the model in eval mode. Writes

    OUT.npy  float32 (N, D): row i is h of image i (D = 512 for ResNet-18/34, 2048 for
             ResNet-50), or with --layer z the projection-head output z (D = its last width);
             with --normalize every row divided by its L2 norm, so that dot products are cosine
             similarities
    OUT.csv  one line per row of OUT.npy, in the same order: index, split (for a DATAPATH with
             splits), path, label (the class name, where the source has labels)

OUT may be given with or without .npy. The rows are streamed batch by batch into a memory-mapped
temporary file beside OUT.npy, which is renamed to OUT.npy at the end: the images never have to
fit in memory, and a run that is stopped leaves no OUT.npy (an earlier one stays as it was).
A file that is not an image at all is skipped with a warning when the images are listed, as in
every script; an image that fails to decode later (a truncated file) stops the run with an error
naming it, because a substituted row would be silently wrong.
"""
import argparse
import csv
import io
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.errors import UserError
from utils.fileio import atomic_write_bytes, fsync_folder
from utils.cli import (add_data_loading_args, add_data_source_args,
                       add_labelled_data_and_model_args, add_weight_description_args,
                       ensure_writable_dir, note_one_device, print_args, run_main, select_device,
                       ONE_DEVICE_HELP)
from utils.data import make_loader, warn_if_colour_dropped
from utils.file_index import scan_image_folder
from utils.foreign_weights import WeightSettings
from utils.model import FEATURE_DIMS, load_trained_model
from utils.sources import SPLITS, has_split, load_split, select_subset
from utils.transforms import EvalTransform


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Write the SimCLR features (h or z) of every image of DATAPATH to OUT.npy, "
                    "with OUT.csv naming the image of each row.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_labelled_data_and_model_args(
        parser, "out", "output name: writes OUT.npy and OUT.csv (a trailing .npy is dropped)",
        datapath_help="a folder of images (searched recursively), an ImageFolder class tree, a "
                      "folder with train/ val/ test/, a path list of 'path' or 'path,label' "
                      "lines, or a MedMNIST .npz file or name")
    add_data_loading_args(parser, batch_size=250,
                          multiple_gpus_help=ONE_DEVICE_HELP)
    add_data_source_args(parser)
    group = parser.add_argument_group("features")
    group.add_argument("--layer", choices=("h", "z"), default="h",
                       help="h = the encoder output (the representation to use downstream), "
                            "z = the output of the whole projection head")
    group.add_argument("--normalize", action="store_true",
                       help="divide every row by its L2 norm (dot products become cosine "
                            "similarities)")
    group.add_argument("--split", choices=SPLITS + ("all",), default="all",
                       help="for a DATAPATH with splits (train/ val/ test/ folders, MedMNIST): "
                            "embed this split only; 'all' embeds every split it has, in the "
                            "order train, val, test")
    add_weight_description_args(parser)
    return parser


def output_paths(out):
    """(OUT.npy, OUT.csv) for OUT given with or without .npy."""
    base = out.removesuffix(".npy")
    return base + ".npy", base + ".csv"


def image_sets(args):
    """The images to embed as [(split name or None, ImageList)], in output order.

    A DATAPATH with splits (train/ val/ test/ folders, a MedMNIST file or name) gives every
    split it has, or --split alone; --train-list etc. replace or add their split. Any other
    DATAPATH (a plain folder, a class tree, a path list) is one set of images without a split.
    --samples / --samples-per-class / --label-fraction keep a subset of every set.
    """
    datapath = args.datapath
    # DATAPATH's own splits, without the --{split}-list overrides
    own = [s for s in SPLITS if has_split(datapath, s, argparse.Namespace())]
    listed = [s for s in SPLITS if getattr(args, f"{s}_list")]
    if not own:
        flag = (f"--split {args.split}" if args.split != "all" else
                f"--{listed[0]}-list" if listed else None)
        if flag and os.path.exists(datapath):
            raise UserError(f"{flag}: DATAPATH {datapath} is one set of images, without "
                            f"train/ val/ test/ splits; leave out {flag}")
        if os.path.isdir(datapath):
            sets = [(None, scan_image_folder(datapath, require_labels=False))]
        else:  # a path list, or nothing: load_split reads it or says what is wrong
            sets = [(None, load_split(datapath, "train", False, args))]
    else:
        splits = [s for s in SPLITS if s in own or s in listed]
        if args.split != "all":
            if args.split not in splits:
                raise UserError(f"--split {args.split}: DATAPATH {datapath} has no "
                                f"{args.split} split (it has {', '.join(splits)}); choose one "
                                f"of those or --split all")
            splits = [args.split]
        sets = [(s, load_split(datapath, s, False, args)) for s in splits]
    return [(split, select_subset(images, args.samples, args.samples_per_class, args.seed,
                                  args.label_fraction)) for split, images in sets]


def csv_table(sets):
    """OUT.csv as bytes: a header and one line per image of `sets`, in row order.

    Columns: index, split (when the images come from splits), path, label (class name; when
    any set has labels, empty for images without one).
    """
    with_split = sets[0][0] is not None
    with_label = any(images.labels is not None for _, images in sets)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index"] + ["split"] * with_split + ["path"] + ["label"] * with_label)
    index = 0
    for split, images in sets:
        for i, path in enumerate(images.paths):
            label = "" if images.labels is None else images.classes[images.labels[i]]
            writer.writerow([index] + [split] * with_split + [path] + [label] * with_label)
            index += 1
    return buffer.getvalue().encode()


class DecodeCheckedDataset(torch.utils.data.Dataset):
    """Image i of an ImageList -> (tensor (C, S, S), problem); problem is '' when the image
    decoded, else the file's name and the reason with a zero tensor in its place.

    Unlike ImageDataset it never substitutes another image. The problem travels as data because
    an exception raised in a DataLoader worker reaches the main process as a traceback text.
    """

    def __init__(self, images, channels, image_size, transform):
        self.images, self.channels, self.transform = images, channels, transform
        self.blank = torch.zeros(channels, image_size, image_size)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        try:
            img = self.images.load(index, self.channels)
        except (OSError, ValueError) as err:  # PIL's decoding errors are OSErrors
            return self.blank, f"{self.images.paths[index]} could not be decoded ({err})"
        return self.transform(img), ""


class FeatureExtractor(torch.nn.Module):
    """forward(x (B, C, S, S)) -> h (B, F) = encoder(x), or z (B, P) = head(h) for layer 'z';
    rows divided by their L2 norm, max(||row||, 1e-12), with normalize=True."""

    def __init__(self, model, layer, normalize):
        super().__init__()
        self.encoder = model.encoder
        self.head = model.head if layer == "z" else torch.nn.Identity()
        self.normalize = normalize

    def forward(self, x):
        features = self.head(self.encoder(x)).float()
        return F.normalize(features, dim=1) if self.normalize else features


def feature_dim(meta, layer):
    """D, the width of a row: the encoder's feature size for h, the head's last width for z."""
    return FEATURE_DIMS[meta["arch"]] if layer == "h" else meta["proj_dims"][-1]


def open_rows(path, n_rows, dim):
    """A float32 (n_rows, dim) .npy memory map at `path`, its disk space reserved up front
    (posix_fallocate) so that a full disk is an error here, not a crash while writing."""
    rows = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_rows, dim))
    if hasattr(os, "posix_fallocate"):
        try:
            fd = os.open(path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, os.path.getsize(path))
            finally:
                os.close(fd)
        except OSError as err:
            raise UserError(f"cannot reserve {os.path.getsize(path) / 1e6:.1f} MB for "
                            f"{n_rows} x {dim} features in {os.path.dirname(path)} "
                            f"({err.strerror}); free some space or choose another OUT") from None
    return rows


@torch.no_grad()
def write_rows(extractor, loader, rows, device, n_images):
    """Run `extractor` over `loader` and write batch b into its rows of the memory map `rows`
    (N, D), in loader order; UserError naming the first image that fails to decode."""
    done = 0
    with tqdm(total=n_images, desc="embedding", unit="img", leave=False, disable=None) as bar:
        for x, problems in loader:
            failed = [p for p in problems if p]
            if failed:
                raise UserError(f"{failed[0]}; remove or replace the file (embed.py never "
                                f"substitutes another image) and run again")
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            rows[done:done + len(x)] = extractor(x).cpu().numpy()
            done += len(x)
            bar.update(len(x))
    rows.flush()


def main(args):
    if args.batch_size < 1:
        raise UserError(f"-bs {args.batch_size} must be at least 1")
    device = select_device(args.cuda)
    note_one_device(args, "embedding")
    out_npy, out_csv = output_paths(args.out)
    folder = os.path.dirname(os.path.abspath(out_npy))
    ensure_writable_dir(folder, "the folder of OUT")
    print_args(args)
    model, meta = load_trained_model(args.modelpath, settings=WeightSettings.from_args(args))
    sets = [(split, images.with_intensity_range(meta.get("intensity_range")))
            for split, images in image_sets(args)]
    warn_if_colour_dropped(sets[0][1], meta["in_channels"], f"DATAPATH {args.datapath}")
    n_images, dim = sum(len(images) for _, images in sets), feature_dim(meta, args.layer)
    table = csv_table(sets)

    transform = EvalTransform(meta["image_size"], meta["mean"], meta["std"])
    dataset = torch.utils.data.ConcatDataset(
        [DecodeCheckedDataset(images, meta["in_channels"], meta["image_size"], transform)
         for _, images in sets])
    loader = make_loader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                         pin_memory=device.type == "cuda")
    extractor = FeatureExtractor(model, args.layer, args.normalize).to(
        device, memory_format=torch.channels_last).eval()
    print(f"{n_images} images ({', '.join(f'{len(images)} {split}' for split, images in sets)})"
          if sets[0][0] is not None else f"{n_images} images", flush=True)

    tmp = os.path.join(folder, f".{os.path.basename(out_npy)}.tmp")
    start = time.perf_counter()
    try:
        rows = open_rows(tmp, n_images, dim)
        write_rows(extractor, loader, rows, device, n_images)
        del rows  # closes the memory map
        os.replace(tmp, out_npy)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_folder(folder)
    seconds = time.perf_counter() - start
    atomic_write_bytes(out_csv, table)
    print(f"embedded {n_images} images: D = {dim} ({args.layer}"
          f"{', L2-normalised' if args.normalize else ''}, {meta['arch']} {meta['stem']} stem), "
          f"{seconds:.1f} s, {n_images / seconds:.1f} img/s", flush=True)
    print(f"wrote {out_npy} ({os.path.getsize(out_npy) / 1e6:.1f} MB) and {out_csv} "
          f"({os.path.getsize(out_csv) / 1e3:.1f} kB)")
    return 0


if __name__ == "__main__":
    run_main(main, get_args_parser())
