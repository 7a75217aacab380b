"""Build the bundled demo data set: a class-balanced Fashion-MNIST subset as an ImageFolder tree.

    python make_demo_data.py demo_data --train-per-class 500 --test-per-class 100

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
    """Indices of up to `per_class` items of each label, chosen reproducibly, sorted."""
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def write_image_folder(images, labels, class_names, folder):
    """Write images as PNG files under folder/<class name>/<index>.png."""
    for name in class_names:
        os.makedirs(os.path.join(folder, name), exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(os.path.join(folder, class_names[label], f"{i:05d}.png"))


def build_demo_data(out, train_per_class, test_per_class, source="auto", seed=0):
    """Create out/train and out/test; returns the name of the source used."""
    data = load_fashion_mnist() if source in ("auto", "fashion-mnist") else None
    if data is not None:
        classes, used = FASHION_CLASSES, "fashion-mnist"
    elif source == "fashion-mnist":
        raise SystemExit(f"error: Fashion-MNIST not found in {FASHION_DIR}; install it with "
                         f"'apt-get install dataset-fashion-mnist' or use --source digits")
    else:
        if source == "auto":
            print(f"note: {FASHION_DIR} not found (Debian package dataset-fashion-mnist); using "
                  f"scikit-learn's 8x8 digits upscaled to 28x28 instead", file=sys.stderr)
        data, classes, used = load_digits_upscaled(), [str(d) for d in range(10)], "digits"
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out", help="folder to create (replaced if it exists)")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--source", choices=("auto", "fashion-mnist", "digits"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    used = build_demo_data(args.out, args.train_per_class, args.test_per_class, args.source,
                           args.seed)
    n_train = sum(len(f) for _, _, f in os.walk(os.path.join(args.out, "train")))
    n_test = sum(len(f) for _, _, f in os.walk(os.path.join(args.out, "test")))
    print(f"wrote {n_train} training and {n_test} test images of {used} to {args.out}")


if __name__ == "__main__":
    main()
