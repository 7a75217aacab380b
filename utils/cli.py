"""Command-line plumbing shared by every script: the wrapper that turns a UserError into a
one-line message, argument groups, device selection and run descriptions."""
import os
import shutil
import subprocess
import sys
import platform

from utils.errors import UserError
from utils.launch import launch_workers, wants_launch


def run_main(main, parser, launches_workers=False):
    """Parse the command line with `parser`, call `main(args)`, and print UserError as one line.
    `launches_workers` (the scripts that train with the engine): with --multiple_gpus / --nproc
    start the worker processes instead, each of which runs `main` (utils/launch.py)."""
    args = parser.parse_args()
    respath = getattr(args, "respath", None)
    before = respath_entries(respath)
    try:
        status = None
        if launches_workers and wants_launch(args):
            status = launch_workers(args, sys.argv[0], sys.argv[1:])
        if status is None:
            status = main(args)
    except UserError as err:
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0 or not err.all_ranks:
            where = f"(rank {rank}) " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
            print(f"error: {where}{user_message(err)}", file=sys.stderr, flush=True)
        if rank == 0 and respath:
            undo_setup_writes(respath, before, args.respath)
        sys.exit(2)
    sys.exit(status or 0)


def respath_entries(respath):
    """The names in folder `respath` (None when it does not exist)."""
    return set(os.listdir(respath)) if respath and os.path.isdir(respath) else None


def undo_setup_writes(respath, before, final):
    """After a refusal, leave RESPATH as the run found it: remove what this process created
    there before any training (the data caches of checkpoint.SETUP_CACHES, its lock, and the
    folder itself if it made it and nothing else is in it). `before` holds respath's names at
    the start, `final` is RESPATH after --fout. Anything else new (a model, a checkpoint: a run
    that had started) leaves every file in place."""
    from utils.checkpoint import SETUP_CACHES
    from utils.runlock import LOCK_NAME, release_run_lock

    made = [] if before is not None else [respath]  # folders this process created
    if final != respath:  # --fout NAME: a folder inside RESPATH, new unless it was there
        if before is not None and os.path.basename(os.path.normpath(final)) in before:
            return
        before, made = None, [final] + made
    created = (respath_entries(final) or set()) - (before or set())
    if not created <= {*SETUP_CACHES, LOCK_NAME}:
        return
    if LOCK_NAME in created:
        release_run_lock(os.path.join(final, LOCK_NAME))
    for name in created - {LOCK_NAME}:
        path = os.path.join(final, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    for folder in made:
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)


def user_message(err):
    """The one line of a UserError. One raised in a DataLoader worker reaches the main process
    as "Caught UserError in DataLoader worker ... Original Traceback ...": its last line
    holds the message."""
    text = str(err)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split("UserError: ", 1)[-1]
    return text


def non_negative_int(text):
    """argparse type: an integer >= 0 (seeds feed numpy's SeedSequence, which needs that)."""
    import argparse

    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; use 0 or more")
    return value


ONE_DEVICE_HELP = ("with -c: accepted for the commands of the original project; this script "
                   "runs on one GPU (feature extraction is a small share of the time next to "
                   "training, which uses every GPU)")


def add_data_loading_args(parser, batch_size, multiple_gpus_help=None):
    """Flags every script that reads images shares: batch size, workers, device, seed.
    `multiple_gpus_help` describes --multiple_gpus for a script that does not train with the
    engine (no --nproc there); training scripts keep the default (worker processes)."""
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
                       help=multiple_gpus_help or
                       "with -c, one process per visible GPU (DistributedDataParallel, the "
                       "same processes torchrun starts; -bs stays the global batch); for "
                       "several machines use torchrun (see README)")
    if multiple_gpus_help is None:
        group.add_argument("--nproc", type=int, default=None, metavar="K",
                           help="--multiple_gpus with K processes: K of the visible GPUs with "
                                "-c, else K CPU processes (gloo)")
    group.add_argument("--seed", type=non_negative_int, default=0,
                       help="seed for initialisation, data order, augmentation and subsets")
    return group


def add_labelled_data_and_model_args(parser, output_name, output_help, datapath_help=None):
    """The positionals of every evaluation script: DATAPATH, MODELPATH and an output folder."""
    parser.add_argument("datapath", metavar="DATAPATH", help=datapath_help or (
        "folder with train/ and test/, each with one subfolder per class; or a MedMNIST .npz "
        "file or name; or a path list of 'path,label' lines (with --test-list)"))
    parser.add_argument("modelpath", metavar="MODELPATH",
                        help="model.pth or checkpoint.pth written by main.py, or a ResNet "
                             "state dict in torchvision's layout (see --mean/--std)")
    parser.add_argument(output_name, metavar=output_name.upper(), help=output_help)


def add_weight_description_args(parser, image_size=True):
    """--image-size, --mean, --std: what a MODELPATH in torchvision's layout (another project's
    weights, ImageNet weights, a bare backbone) does not record. Our own files ignore them."""
    group = parser.add_argument_group("weights in torchvision's layout")
    if image_size:
        group.add_argument("--image-size", type=int, default=None,
                           help="input side in pixels for such weights (default 224 for a 7x7 "
                                "stem, 32 for a 3x3 one)")
    group.add_argument("--mean", type=float, nargs="+", default=None,
                       help="per-channel normalisation mean for such weights (default ImageNet's)")
    group.add_argument("--std", type=float, nargs="+", default=None,
                       help="per-channel normalisation std for such weights (default ImageNet's)")
    return group


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
    group.add_argument("--test-fraction", type=float, default=None, metavar="F",
                       help="evaluation scripts, data without a test split: hold out F of each "
                            "class of train as the test split, chosen by --seed (e.g. 0.2)")
    group.add_argument("--rescan", action="store_true",
                       help="list the image folder or path list again instead of reusing the "
                            "file index in RESPATH/data_index (it is rebuilt by itself when "
                            "files are added, removed or renamed)")
    group.add_argument("--samples", type=int, default=None,
                       help="use only N training images, chosen by --seed")
    group.add_argument("--samples-per-class", type=int, default=None,
                       help="use only K training images of every class, chosen by --seed "
                            "(the same images in every script for the same seed)")
    group.add_argument("--label-fraction", type=float, default=None,
                       help="use only the fraction F of every class's training images "
                            "(F * n_c rounded half up, at least 1), chosen by --seed")
    return group


def add_intensity_range_arg(group):
    """--intensity-range LOW HIGH, for the scripts that compute the data statistics (main.py,
    finetune.py and segment.py without MODELPATH, data_preview.py): the values of 16-bit,
    32-bit integer and float images that map to 0 and 1 (utils/data.py intensity_info)."""
    group.add_argument("--intensity-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                       default=None,
                       help="16-bit, 32-bit integer and float images: the values that become 0 "
                            "and 1 (values outside are clipped), instead of the range found in "
                            "the data (integers: 2^bits - 1 of the largest value, e.g. 4095 "
                            "for 12-bit data; floats: their smallest and largest value); "
                            "8-bit images are always divided by 255")


def check_intensity_range(args, model_given=False):
    """UserError for an --intensity-range that cannot scale anything: LOW >= HIGH, a value
    that is not finite, or (`model_given`) a MODELPATH, whose own range applies."""
    import math

    given = getattr(args, "intensity_range", None)
    if given is None:
        return
    low, high = given
    if model_given:
        raise UserError(f"--intensity-range {low:g} {high:g}: MODELPATH scales images by the "
                        f"range it was pretrained with; drop --intensity-range (it is for "
                        f"statistics computed from the data: --baseline without MODELPATH)")
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise UserError(f"--intensity-range {low:g} {high:g}: give two finite values LOW < "
                        f"HIGH, the values that become 0 and 1, e.g. --intensity-range 0 4095")


def add_augmentation_args(parser):
    """The "augmentation" argument group: --aug PRESET, the extras --noise/--rotate/--cutout and
    --image-size, --jitter-strength, --blur/--no-blur, --min-scale. Defines, validates nothing.

    The preset names are utils.transforms.AUGMENTATION_PRESETS (repeated here so that building
    a parser does not import torch; a test checks they agree).
    """
    import argparse

    presets = {"simclr": "the SimCLR paper's crop, flip, colour jitter, random grayscale, blur "
                         "(--jitter-strength, --blur)",
               "natural": "j-freddy's natural: flip, crop, jitter 0.5/0.5/0.5/0.1, grayscale, "
                          "blur 9 px at 28",
               "novel": "j-freddy's novel: flip, crop, jitter 0.2/0.2/0.2/0.04, grayscale, "
                        "blur, luma equalisation p 0.5, sharpness U(1, 10)",
               "simple": "j-freddy's simple: crop, jitter 0.5/0.5/0.5/0.1, blur",
               "greyscale": "j-freddy's greyscale: flip, crop, blur, luma equalisation, "
                            "sharpness"}
    group = parser.add_argument_group("augmentation")
    group.add_argument("--aug", choices=tuple(presets), default="simclr",
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
                       help="--aug simclr: colour-jitter strength s, brightness/contrast/"
                            "saturation 0.8s, hue 0.2s (the published presets have their own)")
    group.add_argument("--blur", action=argparse.BooleanOptionalAction, default=None,
                       help="--aug simclr: Gaussian blur p=0.5 (default: on for images larger "
                            "than 32 px); the published presets always blur, as published")
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


def select_device(cuda):
    """The device of the flag -c: cuda (UserError without CUDA) or cpu."""
    import torch

    if not cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("-c asks for CUDA but no CUDA device is available; run without -c to use "
                        "the CPU")
    return torch.device("cuda")


def note_one_device(args, what):
    """The note of a script without worker processes that was given --multiple_gpus."""
    if getattr(args, "multiple_gpus", False):
        print(f"note: --multiple_gpus: {what} runs on one device (it is a small share of the "
              f"time next to training; the training scripts use every GPU)", flush=True)


def add_training_args(parser):
    """The flags of the training engine (utils/engine.py), the same in every training script:
    precision, compilation, memory format, logging window, checkpoint cadence, TensorBoard and
    global-batch BatchNorm."""
    import argparse

    group = parser.add_argument_group("training engine")
    group.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
                       help="mixed precision of the forward pass (the loss stays float32): auto "
                            "= bf16 on GPUs with native bf16, off on the CPU (no fast bf16 "
                            "here); fp16 adds loss scaling (GradScaler)")
    group.add_argument("--compile", metavar="BACKEND", nargs="?", const="inductor",
                       default=None,
                       help="torch.compile the model (backend inductor unless named; the first "
                            "steps then take longer; checkpoints keep plain keys)")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                       help="channels-last memory format (about 1.4x faster on CPU here)")
    group.add_argument("--log-every", type=int, default=10, metavar="N",
                       help="bring the losses to the host (and decide on stopping and "
                            "checkpoints) every N steps and at epoch ends; the steps in between "
                            "run without waiting for the device")
    group.add_argument("--sync-debug", action="store_true",
                       help="CUDA: record every host-GPU synchronisation inside the training "
                            "steps (torch.cuda.set_sync_debug_mode) and print them at the end "
                            "(utils/sync_audit.py; tools/gpu_check.py uses it)")
    group.add_argument("--print-freq", type=int, default=50, metavar="N",
                       help="without a terminal (a log file, a batch job): print a progress "
                            "line (epoch, step, loss, lr, images/s, ETA) every N steps; with "
                            "one, the progress bar shows them. Not --log-every: that one is how "
                            "often the device waits for the host (speed), this one how often "
                            "a person reads a line")
    group.add_argument("--checkpoint-minutes", type=float, default=10.0,
                       help="also checkpoint mid-epoch every this many minutes (0: epoch ends "
                            "only)")
    group.add_argument("--tensorboard", action="store_true",
                       help="log to RESPATH/tensorboard: per-step loss, lr and the script's "
                            "other values, evaluations, and the script's own views "
                            "(optional dependency: pip install tensorboard)")
    group.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                       help="with several processes, BatchNorm statistics over the global batch "
                            "(utils/distributed.GlobalBatchNorm); --no-sync-bn keeps them per "
                            "process")
    return group


def add_unreadable_arg(group):
    """--max-unreadable, for the scripts whose training images come from utils.data's datasets
    (main.py, finetune.py)."""
    group.add_argument("--max-unreadable", type=float, default=0.01, metavar="F",
                       help="stop when more than this fraction of the training images (and "
                            "more than one) cannot be decoded; each such file is replaced by "
                            "another image chosen by seed and named in a warning once")


def check_training_args(args):
    """UserError naming the flag for engine settings no run can use."""
    if args.log_every < 1:
        raise UserError(f"--log-every {args.log_every} must be at least 1 step, e.g. 10")
    if args.print_freq < 1:
        raise UserError(f"--print-freq {args.print_freq} must be at least 1 step, e.g. 50")
    if not 0 <= getattr(args, "max_unreadable", 0) <= 1:
        raise UserError(f"--max-unreadable {args.max_unreadable} must be a fraction in [0, 1], "
                        f"e.g. 0.01")
    if args.checkpoint_minutes < 0:
        raise UserError(f"--checkpoint-minutes {args.checkpoint_minutes} must be >= 0 (0: at "
                        f"epoch ends only)")
    if args.epochs < 1:
        raise UserError(f"--epochs {args.epochs} must be at least 1")


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


def cpu_model():
    """The CPU's model name from /proc/cpuinfo, else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info(device):
    """Library versions, commit and device description for run.json."""
    import numpy
    import torch
    import torchvision

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            "git_commit": git_commit(), "device": str(device),
            "cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def print_args(args):
    """Print every argument, one per line, at the start of a run."""
    print(" ".join(f"{k}={v}" for k, v in sorted(vars(args).items())), flush=True)
