"""Command-line plumbing shared by every script: the user-error type, the wrapper that turns it
into a one-line message, argument groups, device selection and small output helpers."""
import json
import os
import subprocess
import sys
import platform


class UserError(Exception):
    """A problem with what the user gave us (paths, data, flags, checkpoints).

    Raised where the problem is found, with the fix in the message; `run_main` prints it as one
    line and exits with status 2. Anything else is a bug and keeps its traceback.
    `all_ranks=True` marks an error every process of a torchrun job raises alike: only rank 0
    prints it.
    """

    def __init__(self, message, all_ranks=False):
        super().__init__(message)
        self.all_ranks = all_ranks


def run_main(main, parser):
    """Parse the command line with `parser`, call `main(args)`, and print UserError as one line."""
    args = parser.parse_args()
    try:
        status = main(args)
    except UserError as err:
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0 or not err.all_ranks:
            where = f"(rank {rank}) " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
            print(f"error: {where}{err}", file=sys.stderr, flush=True)
        sys.exit(2)
    sys.exit(status or 0)


def warn(message):
    """Print a one-line warning to stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def non_negative_int(text):
    """argparse type: an integer >= 0 (seeds feed numpy's SeedSequence, which needs that)."""
    import argparse

    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; use 0 or more")
    return value


def add_data_loading_args(parser, batch_size):
    """Flags every script that reads images shares: batch size, workers, device, seed."""
    group = parser.add_argument_group("data loading and device")
    group.add_argument("-bs", "--batch-size", "--batch_size", dest="batch_size", type=int,
                       default=batch_size,
                       help="images per batch (the global batch under torchrun)")
    group.add_argument("-nw", "--num-workers", "--num_workers", dest="num_workers", type=int,
                       default=2,
                       help="DataLoader worker processes; 0 loads in the main process")
    group.add_argument("-c", "--cuda", action="store_true",
                       help="run on the GPU; stops with an error when no CUDA device is present")
    group.add_argument("--multiple_gpus", "--multiple-gpus", dest="multiple_gpus",
                       action="store_true",
                       help="with -c, split each batch over all visible GPUs (nn.DataParallel); "
                            "for several machines or best scaling use torchrun (see README)")
    group.add_argument("--seed", type=non_negative_int, default=0,
                       help="seed for initialisation, data order, augmentation and subsets")
    return group


def add_labelled_data_and_model_args(parser, output_name, output_help, datapath_help=None):
    """The positionals of every evaluation script: DATAPATH, MODELPATH and an output folder."""
    parser.add_argument("datapath", metavar="DATAPATH", help=datapath_help or (
        "folder with train/ and test/, each with one subfolder per class; or a MedMNIST .npz "
        "file or name; or a path list of 'path,label' lines (with --test-list)"))
    parser.add_argument("modelpath", metavar="MODELPATH",
                        help="model.pth or checkpoint.pth written by main.py")
    parser.add_argument(output_name, metavar=output_name.upper(), help=output_help)


def add_data_source_args(parser):
    """Flags that say where the images come from (see utils/sources.py), for every script that
    takes DATAPATH, and the subset flags of label-budget experiments."""
    group = parser.add_argument_group("data source")
    group.add_argument("--data-root", default="~/.medmnist",
                       help="folder of MedMNIST .npz files, when DATAPATH is a MedMNIST name "
                            "such as pathmnist (the medmnist package's default folder)")
    group.add_argument("--size", type=int, choices=(28, 64, 128, 224), default=28,
                       help="MedMNIST image size: NAME.npz is 28 px, NAME_SIZE.npz the others")
    group.add_argument("--download", action="store_true",
                       help="fetch a missing MedMNIST data set with the optional medmnist "
                            "package (pip install medmnist)")
    for split in ("train", "val", "test"):
        group.add_argument(f"--{split}-list", metavar="FILE", default=None,
                           help=f"text file of {split} images, one 'path' or 'path,label' per "
                                f"line (relative to the file's folder); overrides DATAPATH "
                                f"for the {split} split")
    group.add_argument("--samples", type=int, default=None,
                       help="use only N training images, chosen by --seed")
    group.add_argument("--samples-per-class", type=int, default=None,
                       help="use only K training images of every class, chosen by --seed "
                            "(the same images in every script for the same seed)")
    group.add_argument("--label-fraction", type=float, default=None,
                       help="use only the fraction F of every class's training images "
                            "(F * n_c rounded half up, at least 1), chosen by --seed")
    return group


def add_augmentation_args(parser):
    """The "augmentation" argument group: --aug PRESET, the extras --noise/--rotate/--cutout and
    --image-size, --jitter-strength, --blur/--no-blur, --min-scale. Defines, validates nothing.

    The preset names are utils.transforms.AUGMENTATION_PRESETS (repeated here so that building
    a parser does not import torch; a test checks they agree).
    """
    import argparse

    presets = {"natural": "the SimCLR paper's crop, flip, colour jitter, random grayscale, blur",
               "novel": "natural with half-strength jitter plus random histogram equalisation "
                        "and sharpening (low-contrast medical images)",
               "simple": "crop, colour jitter, blur (no flip, no grayscale)",
               "greyscale": "crop, flip, blur; no colour jitter (grayscale modalities)"}
    group = parser.add_argument_group("augmentation")
    group.add_argument("--aug", choices=tuple(presets), default="natural",
                       help="augmentation preset: " +
                            "; ".join(f"{name} = {what}" for name, what in presets.items()))
    group.add_argument("--noise", metavar="SIGMA", type=float, default=0.0,
                       help="add Gaussian noise of std SIGMA (in units of the [0, 1] pixel range) "
                            "to every view, clamped to [0, 1]; 0 = off")
    group.add_argument("--rotate", metavar="DEG", type=float, default=0.0,
                       help="random rotation by up to +-DEG degrees (corners black); 0 = off")
    group.add_argument("--cutout", metavar="P", type=float, default=0.0,
                       help="with probability P erase one rectangle (2-33 %% of the area) to the "
                            "data set mean (RandomErasing); 0 = off")
    group.add_argument("--image-size", type=int, default=None,
                       help="training resolution in px (default: the images' median shorter "
                            "side, at most 224)")
    group.add_argument("--jitter-strength", type=float, default=0.5,
                       help="colour-jitter strength s: brightness/contrast/saturation 0.8s, hue "
                            "0.2s")
    group.add_argument("--blur", action=argparse.BooleanOptionalAction, default=None,
                       help="Gaussian blur p=0.5 (default: on for images larger than 32 px)")
    group.add_argument("--min-scale", type=float, default=0.08,
                       help="smallest RandomResizedCrop area fraction (the paper's 0.08)")
    return group


def check_augmentation_args(args):
    """UserError naming the flag for augmentation values no transform can use."""
    if args.noise < 0:
        raise UserError(f"--noise {args.noise}: the noise std must be >= 0, e.g. --noise 0.05")
    if args.rotate < 0:
        raise UserError(f"--rotate {args.rotate}: give the largest angle as a positive number "
                        f"of degrees, e.g. --rotate 15")
    if not 0 <= args.cutout <= 1:
        raise UserError(f"--cutout {args.cutout}: a probability must be in [0, 1], e.g. "
                        f"--cutout 0.5")
    if not 0 < args.min_scale <= 1:
        raise UserError(f"--min-scale {args.min_scale} must be in (0, 1], e.g. 0.08")
    if args.jitter_strength < 0:
        raise UserError(f"--jitter-strength {args.jitter_strength} must be >= 0, e.g. 0.5")
    if args.image_size is not None and args.image_size < 1:
        raise UserError(f"--image-size {args.image_size} must be at least 1 px, e.g. 32")


def select_device(cuda, multiple_gpus):
    """Return (device, n_gpus_to_use) for the flags -c and --multiple_gpus.

    Raises UserError for -c without CUDA; --multiple_gpus with fewer than 2 GPUs warns and
    continues on one device.
    """
    import torch

    if multiple_gpus and not cuda:
        raise UserError("--multiple_gpus needs -c (CUDA); add -c, or drop --multiple_gpus to "
                        "run on the CPU")
    if not cuda:
        return torch.device("cpu"), 0
    if not torch.cuda.is_available():
        raise UserError("-c asks for CUDA but no CUDA device is available; run without -c to use "
                        "the CPU")
    n = torch.cuda.device_count()
    if multiple_gpus and n < 2:
        warn(f"--multiple_gpus: only {n} GPU visible, running on one GPU")
    return torch.device("cuda"), (n if multiple_gpus else 1)


def ensure_writable_dir(path, what="RESPATH"):
    """Create `path` (and parents) and check that a file can be written there."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise UserError(f"{what} {path} is not writable ({err.strerror}); choose a folder you "
                        f"can write to") from None


def git_commit():
    """The commit of the code being run, or None outside a git checkout."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_info(device):
    """Library versions, commit and device description for run.json."""
    import numpy
    import torch
    import torchvision

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            "git_commit": git_commit(), "device": str(device),
            "cpu_threads": torch.get_num_threads(), "platform": platform.platform()}
    if device.type == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def print_args(args):
    """Print every argument, one per line, at the start of a run."""
    print(" ".join(f"{k}={v}" for k, v in sorted(vars(args).items())), flush=True)


def json_dump(obj, path):
    """Write `obj` as indented JSON atomically."""
    from utils.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
