"""Preview an augmentation preset on your own training images, before pretraining with it.

    python data_preview.py DATAPATH --aug PRESET [--n 8] [--views 6] [--out FILE] [--seed 0]
    python data_preview.py DATAPATH --aug novel --noise 0.05 --rotate 15 --cutout 0.5

DATAPATH is what main.py takes, with the same data-source flags (ImageFolder `train/`, a plain
folder of images, a MedMNIST .npz file or name, a path list; --samples/--samples-per-class pick
the same subset as main.py with the same --seed). --n of those training images are chosen by
--seed; each becomes one row of a PNG grid: the image resized to the training
size, then --views augmented views. The views of image i are drawn exactly as pretraining with the
same --seed draws them in epoch 0 (views 1 and 2 are that epoch's pair). The channel count,
size, intensity range, mean and std come from a small sample of the images, as main.py finds
them (16-bit and float images are scaled to [0, 1] by that range, or --intensity-range LOW
HIGH, and shown so: the grid is what the model sees; the range is printed and in the title);
nothing is written into DATAPATH.
The grid goes to --out (default preview_<preset>.png in the current folder); a window opens
too when a display is available.
"""
import argparse
import os

import numpy as np

from utils.errors import UserError, warn
from utils.cli import (add_augmentation_args, add_data_source_args, add_intensity_range_arg,
                       check_augmentation_args, check_intensity_range, run_main)

STATS_SAMPLE = 500  # images used for channels, size, mean and std
CELL_INCHES = 2.0   # each image cell is CELL_INCHES x CELL_INCHES
TITLE_INCHES = 0.75  # the strip above the grid for the figure title
DPI = 80            # so a cell is 160 px and the title strip 60 px


def figure_size_px(n_rows, n_cols):
    """(width, height) in pixels of the saved grid for n_rows images and n_cols columns."""
    return (round(n_cols * CELL_INCHES * DPI),
            round((n_rows * CELL_INCHES + TITLE_INCHES) * DPI))


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Save a grid of augmented views of training images for one augmentation "
                    "preset.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("datapath", metavar="DATAPATH",
                        help="folder with train/ (ImageFolder or plain images), a plain folder "
                             "of images, a MedMNIST .npz file or name, or a path list (as "
                             "main.py)")
    parser.add_argument("--n", type=int, default=8, help="images to show (rows)")
    parser.add_argument("--views", type=int, default=6, help="augmented views per image")
    parser.add_argument("--out", default=None,
                        help="PNG to write (default: preview_<preset>.png in the current folder)")
    parser.add_argument("--seed", type=int, default=0,
                        help="chooses the images and seeds their views as main.py --seed does")
    add_intensity_range_arg(add_data_source_args(parser))
    add_augmentation_args(parser)
    return parser


def check_args(args):
    """UserError naming the flag for values the preview cannot use."""
    if args.n < 1:
        raise UserError(f"--n {args.n}: show at least 1 image, e.g. --n 8")
    if args.views < 1:
        raise UserError(f"--views {args.views}: show at least 1 view per image, e.g. --views 6")
    check_augmentation_args(args)
    check_intensity_range(args)


def extras_text(args):
    """'noise 0.05, rotate 15, cutout 0.5', or 'no extras'."""
    parts = [f"{name} {getattr(args, name):g}" for name in ("noise", "rotate", "cutout")
             if getattr(args, name) > 0]
    return ", ".join(parts) or "no extras"


def has_display():
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def backend_is_interactive(matplotlib):
    """Whether the current matplotlib backend opens windows."""
    backend = matplotlib.get_backend().lower()
    try:
        from matplotlib.backends import BackendFilter, backend_registry
        interactive = backend_registry.list_builtin(BackendFilter.INTERACTIVE)
    except ImportError:  # matplotlib < 3.9
        interactive = matplotlib.rcsetup.interactive_bk
    return backend in {b.lower() for b in interactive}


def augmented_views(augmentation, img, n_views, seed, index):
    """n_views augmentations of img, seeded as TwoViewDataset seeds image `index` in epoch 0."""
    import torch
    from utils.data import AUGMENT_STREAM, derive_seed

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(AUGMENT_STREAM, seed, 0, index))
        return torch.stack([augmentation(img) for _ in range(n_views)])


def main(args):
    check_args(args)
    import matplotlib
    if not has_display():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision import transforms as T

    from utils.data import describe_intensity, native_image_size, sample_statistics
    from utils.sources import load_split, select_subset
    from utils.transforms import AugmentationSettings, SimCLRAugmentation, denormalize

    images = select_subset(load_split(args.datapath, "train", False, args), args.samples,
                           args.samples_per_class, args.seed)
    rng = np.random.default_rng(args.seed)
    sample = images.subset(
        sorted(rng.choice(len(images), min(STATS_SAMPLE, len(images)), replace=False).tolist()))
    stats = sample_statistics(sample, args.intensity_range)
    channels, mean, std, scaling = (stats[k] for k in ("channels", "mean", "std",
                                                       "intensity_range"))
    images = images.with_intensity_range(scaling)  # shown as the model will see them
    print(describe_intensity(stats["intensity"], channels) or "data: 8-bit images, divided by "
          "255", flush=True)
    size = args.image_size or native_image_size(sample)
    blur = args.blur if args.blur is not None else size > 32
    augmentation = SimCLRAugmentation(AugmentationSettings(
        image_size=size, channels=channels, mean=mean, std=std,
        jitter_strength=args.jitter_strength, blur=blur, min_scale=args.min_scale,
        preset=args.aug, noise=args.noise, rotate=args.rotate, cutout=args.cutout))
    n = args.n
    if n > len(images):
        warn(f"--n {n}: DATAPATH has only {len(images)} training images; showing all of them")
        n = len(images)
    chosen = sorted(np.random.default_rng(args.seed).choice(len(images), n, replace=False))
    original = T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size), T.ToTensor()])

    cols = args.views + 1
    width, height = figure_size_px(n, cols)
    fig, axes = plt.subplots(n, cols, figsize=(width / DPI, height / DPI), dpi=DPI,
                             squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, wspace=0.05, hspace=0.05,
                        top=1 - TITLE_INCHES * DPI / height)
    for row, index in enumerate(chosen):
        img = images.load(int(index), channels)
        views = denormalize(augmented_views(augmentation, img, args.views, args.seed,
                                            int(index)), mean, std)
        shown = [original(img)] + list(views)
        for col, tensor in enumerate(shown):
            ax = axes[row, col]
            arr = tensor.permute(1, 2, 0).numpy()
            if channels == 1:
                ax.imshow(arr[..., 0], cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(arr)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title("original" if col == 0 else f"view {col}", fontsize=10)
    settings = (f"{'blur' if blur else 'no blur'}, jitter strength {args.jitter_strength:g}"
                if args.aug == "simclr" else "j-freddy's published sequence")
    values = (f"values [{scaling[0]:g}, {scaling[1]:g}] -> [0, 1]" if scaling else
              "8-bit / 255")
    fig.suptitle(f"augmentation preset '{args.aug}' ({extras_text(args)})\n{size} px, {values}, "
                 f"{settings}", fontsize=9, y=1 - 0.1 * TITLE_INCHES * DPI / height)
    out = args.out or f"preview_{args.aug}.png"
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UserError(f"--out {out}: folder {folder} does not exist; create it or choose "
                        f"another path")
    try:
        fig.savefig(out, dpi=DPI)
    except OSError as err:
        raise UserError(f"--out {out} cannot be written ({err.strerror}); choose another "
                        f"path") from None
    print(out, flush=True)
    if has_display() and backend_is_interactive(matplotlib):
        plt.show()
    plt.close(fig)
    return 0


if __name__ == "__main__":
    run_main(main, get_args_parser())
