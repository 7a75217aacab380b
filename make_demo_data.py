"""Build the bundled demo data set: a class-balanced Fashion-MNIST subset as an ImageFolder tree.

    python make_demo_data.py demo_data --train-per-class 500 --test-per-class 100
    python make_demo_data.py demo_data --segmentation --seg-per-class 30 10 20

The second writes only demo_data/segmentation/: images, labelmaps (0 background, 1-10 the
garment class on pixels >= 32, 255 ignore on the faint pixels between) and pair lists.
Reads the IDX files of Debian's `dataset-fashion-mnist` package (no download). Where that
package is not installed, falls back to scikit-learn's handwritten digits (8x8, upscaled to
28x28) and says so.
"""
import argparse
import gzip
import os
import shutil
import sys

import numpy as np
from PIL import Image

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
SEGMENT_THRESHOLD, SEGMENT_IGNORE = 32, 255  # labelmaps of --segmentation
FASHION_CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle_boot"]


def read_idx(path):
    """Read a (gzipped) IDX file: 2 zero bytes, type byte 0x08 (uint8), ndim byte, ndim
    big-endian uint32 sizes, then the data in C order. Returns a uint8 array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(folder=FASHION_DIR):
    """{'train': (images (60000, 28, 28), labels), 'test': (10000 ...)} or None if absent."""
    names = {"train": "train", "test": "t10k"}
    try:
        return {split: (read_idx(os.path.join(folder, f"{p}-images-idx3-ubyte.gz")),
                        read_idx(os.path.join(folder, f"{p}-labels-idx1-ubyte.gz")))
                for split, p in names.items()}
    except FileNotFoundError:
        return None


def load_digits_upscaled():
    """scikit-learn's 1,797 8x8 digits scaled to 0-255 and resized to 28x28, split 80/20."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.stack([np.asarray(Image.fromarray((img * 255 / 16).astype(np.uint8)).resize(
        (28, 28), Image.BICUBIC)) for img in digits.images])
    order = np.random.default_rng(0).permutation(len(images))
    cut = int(0.8 * len(images))
    return {"train": (images[order[:cut]], digits.target[order[:cut]]),
            "test": (images[order[cut:]], digits.target[order[cut:]])}


def balanced_subset(labels, per_class, seed):
    """Indices of up to `per_class` items of each label, chosen reproducibly, sorted (none
    for no labels: the digits fallback leaves no training images over for the val split)."""
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def write_image_folder(images, labels, class_names, folder):
    """Write images as PNG files under folder/<class name>/<index>.png."""
    for name in class_names:
        os.makedirs(os.path.join(folder, name), exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(os.path.join(folder, class_names[label], f"{i:05d}.png"))


def load_source(source):
    """(data as load_fashion_mnist returns it, class names, name of the source used) for
    --source auto (Fashion-MNIST, else digits), fashion-mnist or digits."""
    data = load_fashion_mnist() if source in ("auto", "fashion-mnist") else None
    if data is not None:
        return data, FASHION_CLASSES, "fashion-mnist"
    if source == "fashion-mnist":
        raise SystemExit(f"error: Fashion-MNIST not found in {FASHION_DIR}; install it with "
                         f"'apt-get install dataset-fashion-mnist' or use --source digits")
    if source == "auto":
        print(f"note: {FASHION_DIR} not found (Debian package dataset-fashion-mnist); using "
              f"scikit-learn's 8x8 digits upscaled to 28x28 instead", file=sys.stderr)
    return load_digits_upscaled(), [str(d) for d in range(10)], "digits"


def build_demo_data(out, train_per_class, test_per_class, source="auto", seed=0):
    """Create out/train and out/test; returns the name of the source used."""
    data, classes, used = load_source(source)
    if os.path.exists(out):
        shutil.rmtree(out)
    splits = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = data[split]
        keep = balanced_subset(labels, per_class, seed)
        splits[split] = (images[keep], labels[keep])
        write_image_folder(images[keep], labels[keep], classes, os.path.join(out, split))
    images, labels = data["train"]
    unused = np.setdiff1d(np.arange(len(labels)), balanced_subset(labels, train_per_class, seed))
    val = unused[balanced_subset(labels[unused], test_per_class, seed + 1)]
    splits["val"] = (images[val], labels[val])
    write_other_formats(splits, classes, out)
    return used


def write_other_formats(splits, class_names, out):
    """The same images in the other formats the scripts read: out/fashion_mnist.npz in the
    MedMNIST layout ({split}_images uint8 (N, 28, 28), {split}_labels (N, 1); its val split is
    extra, disjoint from train) and path lists out/train.txt, out/test.txt ('path,class')."""
    np.savez_compressed(os.path.join(out, "fashion_mnist.npz"),
                        **{f"{s}_images": x for s, (x, _) in splits.items()},
                        **{f"{s}_labels": y.reshape(-1, 1).astype(np.uint8)
                           for s, (_, y) in splits.items()})
    for split in ("train", "test"):
        with open(os.path.join(out, f"{split}.txt"), "w") as f:
            f.write(f"# {split} images of this folder, as 'path,class' relative to it\n")
            for i, label in enumerate(splits[split][1]):
                name = class_names[label]
                f.write(f"{split}/{name}/{i:05d}.png,{name}\n")


def labelmaps_from_pixels(images, labels, threshold=SEGMENT_THRESHOLD):
    """Labelmaps (N, H, W) uint8 for images (N, H, W) of classes `labels` (N,): 0 (background)
    where the pixel is 0, the image's class + 1 where it is >= threshold (the garment), and
    the ignore value 255 on the faint pixels in between (edges, where the class is unclear).
    `labels` all 0 gives object (1) / background (0) labelmaps."""
    maps = np.full(images.shape, SEGMENT_IGNORE, np.uint8)
    maps[images == 0] = 0
    objects = images >= threshold
    maps[objects] = np.broadcast_to(np.asarray(labels).reshape(-1, 1, 1) + 1,
                                    images.shape)[objects]
    return maps


def build_segmentation_data(out, per_class, source="auto", seed=0, garments=True):
    """Create out/images, out/masks, the pair lists out/train.txt, val.txt, test.txt
    ('images/NAME.png,masks/NAME.png') and out/classes.txt (one name per line: background, then
    the image classes, or with garments=False one class 'object' for every image); per_class =
    images of every class in (train, val, test). Train and val come from the source's training
    split (disjoint), test from its test split. Returns the name of the source used and the
    number of pairs of each split."""
    data, classes, used = load_source(source)
    if os.path.exists(out):
        shutil.rmtree(out)
    for folder in ("images", "masks"):
        os.makedirs(os.path.join(out, folder))
    train_images, train_labels = data["train"]
    train = balanced_subset(train_labels, per_class[0], seed)
    unused = np.setdiff1d(np.arange(len(train_labels)), train)
    val = unused[balanced_subset(train_labels[unused], per_class[1], seed + 1)]
    test_images, test_labels = data["test"]
    test = balanced_subset(test_labels, per_class[2], seed)
    counts = {}
    for split, (images, labels) in (("train", (train_images[train], train_labels[train])),
                                    ("val", (train_images[val], train_labels[val])),
                                    ("test", (test_images[test], test_labels[test]))):
        counts[split] = len(images)
        objects = f"1-{len(classes)} the image's class" if garments else "1 object"
        lines = [(f"# {split} pairs 'image,labelmap' relative to this folder; labelmap pixels: "
                  f"0 background, {objects} on pixels >= {SEGMENT_THRESHOLD}, "
                  f"{SEGMENT_IGNORE} ignore")]
        maps = labelmaps_from_pixels(images, labels if garments else np.zeros_like(labels))
        for i, (img, labelmap) in enumerate(zip(images, maps)):
            name = f"{split}_{i:05d}.png"
            Image.fromarray(img).save(os.path.join(out, "images", name))
            Image.fromarray(labelmap).save(os.path.join(out, "masks", name))
            lines.append(f"images/{name},masks/{name}")
        with open(os.path.join(out, f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "classes.txt"), "w") as f:
        f.write("\n".join(["background"] + (classes if garments else ["object"])) + "\n")
    return used, counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out", help="folder to create (replaced if it exists)")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--source", choices=("auto", "fashion-mnist", "digits"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--segmentation", action="store_true",
                        help="write only OUT/segmentation (image/labelmap pairs, see "
                             "build_segmentation_data), leaving the rest of OUT as it is")
    parser.add_argument("--seg-per-class", type=int, nargs=3, default=[30, 10, 20],
                        metavar=("TRAIN", "VAL", "TEST"),
                        help="with --segmentation: images of every class in each split")
    args = parser.parse_args()
    if args.segmentation:
        folder = os.path.join(args.out, "segmentation")
        used, counts = build_segmentation_data(folder, args.seg_per_class, args.source,
                                               args.seed)
        print(f"wrote {counts['train']} train, {counts['val']} val and {counts['test']} test "
              f"image/labelmap pairs of {used} to {folder}")
        return
    used = build_demo_data(args.out, args.train_per_class, args.test_per_class, args.source,
                           args.seed)
    n_train = sum(len(f) for _, _, f in os.walk(os.path.join(args.out, "train")))
    n_test = sum(len(f) for _, _, f in os.walk(os.path.join(args.out, "test")))
    print(f"wrote {n_train} training and {n_test} test images of {used} to {args.out}")


if __name__ == "__main__":
    main()
