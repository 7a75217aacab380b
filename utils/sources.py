"""Where the images of a split come from: ImageFolder trees and plain folders (utils/data.py),
MedMNIST `.npz` files (by path or by name), and path lists. Every script that takes DATAPATH
calls `load_split` with the same flags (`utils.cli.add_data_source_args`), then `select_subset`.

    DATAPATH                     train / val / test
    folder                       DATAPATH/train|val|test (ImageFolder or plain images)
    FILE.npz (MedMNIST format)   the arrays {split}_images, {split}_labels
    pathmnist, chestmnist, ...   DATA_ROOT/NAME.npz, or NAME_SIZE.npz with --size 64|128|224
    FILE.txt (a path list)       train only; other splits from --val-list / --test-list
    --train-list/--val-list/--test-list FILE override DATAPATH for their split.

A path list has one image per line, `path` or `path,label`, relative to the list's folder or
absolute; blank lines and lines starting with # are skipped.
"""
import os
import stat

import numpy as np

from utils.checkpoint import DATA_INDEX
from utils.data import ImageList, PathTable, derive_seed
from utils.distributed import decide_on_main
from utils.errors import UserError
from utils.file_index import Listing, find_split, indexed

MEDMNIST_2D = ("pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist",
               "retinamnist", "breastmnist", "bloodmnist", "tissuemnist", "organamnist",
               "organcmnist", "organsmnist")
MEDMNIST_SIZES = (28, 64, 128, 224)
MULTILABEL = ("chestmnist",)
SPLITS = ("train", "val", "test")
SUBSET_STREAM = 3
VALIDATION_STREAM = 4
TEST_STREAM = 5


def medmnist_file(name, data_root, size):
    """Path of MedMNIST data set `name` under `data_root`: NAME.npz (28 px) or NAME_SIZE.npz."""
    root = os.path.expanduser(data_root)
    return os.path.join(root, f"{name}.npz" if size == 28 else f"{name}_{size}.npz")


def download_medmnist(name, data_root, size):
    """Fetch `name` at `size` px into `data_root` through the optional `medmnist` package."""
    try:
        import medmnist
    except ImportError:
        raise UserError("--download needs the optional package medmnist: pip install medmnist "
                        "(or put the .npz file under --data-root yourself)") from None
    info = medmnist.INFO[name]
    data_class = getattr(medmnist, info["python_class"])
    os.makedirs(os.path.expanduser(data_root), exist_ok=True)
    try:
        kwargs = {} if size == 28 else {"size": size}
        data_class(split="train", download=True, root=os.path.expanduser(data_root), **kwargs)
    except Exception as err:  # network errors come in many types
        raise UserError(f"downloading {name} ({size} px) failed ({type(err).__name__}: "
                        f"{str(err)[:150]}); check the connection or fetch the file by "
                        f"hand into {data_root}") from None


def medmnist_class_names(name, n_classes):
    """Class names from the medmnist package's metadata when installed, else '0', '1', ..."""
    try:
        import medmnist
        labels = medmnist.INFO[name]["label"]
        return [labels[str(i)] for i in range(n_classes)]
    except (ImportError, KeyError):
        return [str(i) for i in range(n_classes)]


def read_npz_split(path, split, name=None):
    """One split of a MedMNIST-format .npz file as an in-memory ImageList.

    Labels (N, 1) are class indices. Multi-label files (chestmnist, labels (N, 14)) are reduced
    to one binary label, 'no finding' (all 14 zero) vs 'finding' (any one); pretraining does
    not use labels at all.
    """
    try:
        data = np.load(path)
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable .npz file ({err})") from None
    with data:
        needed = {f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels")}
        missing = sorted(needed - set(data.files))
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)} (it has {', '.join(data.files)}); "
                            f"a MedMNIST file holds train/val/test _images and _labels")
        pixels = np.ascontiguousarray(data[f"{split}_images"])
        labels = np.asarray(data[f"{split}_labels"])
    if pixels.dtype != np.uint8 or pixels.ndim not in (3, 4) or (
            pixels.ndim == 4 and pixels.shape[3] not in (1, 3)):
        raise UserError(f"{path}: {split}_images must be uint8 (N, H, W) or (N, H, W, 3), got "
                        f"{pixels.dtype} {pixels.shape}")
    if pixels.ndim == 4 and pixels.shape[3] == 1:
        pixels = pixels[..., 0]
    if len(labels) != len(pixels):
        raise UserError(f"{path}: {len(pixels)} {split} images but {len(labels)} labels")
    labels = labels.reshape(len(labels), -1)
    name = name or os.path.basename(path).split(".")[0].split("_")[0]
    if labels.shape[1] > 1:
        classes = ["no finding", "finding"]
        label_list = (labels.max(1) > 0).astype(int).tolist()
    else:
        label_list = labels[:, 0].astype(int).tolist()
        classes = medmnist_class_names(name, int(labels.max()) + 1 if len(labels) else 0)
    names = [f"{os.path.basename(path)}:{split}[{i}]" for i in range(len(pixels))]
    return ImageList(names, label_list, classes, pixels)


def read_list_lines(list_path, line_format="'path' or 'path,label'",
                    fix="pass a folder, a .npz file or a path list"):
    """The entries of a path list as (line number, stripped line): blank lines and lines
    starting with # are skipped. UserError for a missing file, or one that is not text (the
    message shows `line_format`, what a line should hold, and `fix`)."""
    if not os.path.isfile(list_path):
        raise UserError(f"path list {list_path} does not exist")
    try:
        with open(list_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{list_path} is not a text file of image paths (a path list has one "
                        f"{line_format} per line); {fix}") from None
    stripped = ((number, line.strip()) for number, line in enumerate(lines, 1))
    return [(number, line) for number, line in stripped if line and line[0] != "#"]


def listed_file(list_path, number, path, what="image"):
    """`path` from line `number` of `list_path` as an existing file's path: relative paths
    start at the list's folder. UserError naming the line when there is no such file."""
    if not os.path.isabs(path):
        path = os.path.join(os.path.dirname(os.path.abspath(list_path)), path)
    if not os.path.isfile(path):
        raise UserError(f"{list_path} line {number}: {what} {path} does not exist; fix "
                        f"the path (relative paths start at the list's folder)")
    return path


def scan_path_list(list_path):
    """The Listing of a path list (see the module docstring): entries as written (relative to
    the list's folder, or absolute), labels numbered in numeric-then-text order of their
    names, the list file itself as the stamp. Every listed file must exist (one stat each;
    none is opened); UserError naming the line otherwise."""
    entries, labels = [], []
    total_bytes, newest = 0, 0
    folder = os.path.dirname(os.path.abspath(list_path))
    prefix = os.path.join(folder, "")
    for number, line in read_list_lines(list_path):
        path, comma, label = line.partition(",")
        if comma:
            path, label = path.rstrip(), label.strip()
        full = path if path[:1] == os.sep else prefix + path  # os.path.isabs, inlined
        try:
            st = os.stat(full)
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise UserError(f"{list_path} line {number}: image {full} does not exist; fix "
                            f"the path (relative paths start at the list's folder)")
        total_bytes += st.st_size
        if st.st_mtime_ns > newest:
            newest = st.st_mtime_ns
        entries.append(path)
        labels.append(label or None)
    if not entries:
        raise UserError(f"path list {list_path} names no images")
    given = [label is not None for label in labels]
    if any(given) and not all(given):
        first = given.index(False) if given[0] else given.index(True)
        raise UserError(f"{list_path}: some lines have a label and some do not (e.g. entry "
                        f"{first + 1}); give every line as path,label or none")
    paths = PathTable.from_strings(entries, folder)
    if all(given):
        names = sorted(set(labels), key=lambda v: (not v.lstrip("-").isdigit(),
                                                   int(v) if v.lstrip("-").isdigit() else 0, v))
        index = {name: i for i, name in enumerate(names)}
        images = ImageList(paths, np.fromiter((index[v] for v in labels), np.int64,
                                              len(labels)), names)
    else:
        images = ImageList(paths)
    st = os.stat(list_path)
    return Listing(images, [(os.path.abspath(list_path), st.st_mtime_ns, st.st_size)],
                   {"count": len(entries), "total_bytes": total_bytes, "newest_mtime_ns": newest})


def read_path_list(list_path, require_labels, index_dir=None, split="train", rescan=False):
    """ImageList from a text file of `path` or `path,label` lines (scan_path_list), through the
    index in `index_dir` when given."""
    images = indexed(index_dir, split, ("list", os.path.abspath(list_path)),
                     lambda: scan_path_list(list_path), rescan)
    if require_labels and images.labels is None:
        raise UserError(f"{list_path} has no labels; labelled evaluation needs lines "
                        f"'path,label'")
    return images


def index_dir_of(options):
    """Where load_split keeps its file index: RESPATH/data_index for scripts with a RESPATH
    (`options.respath`), else nowhere (every start scans)."""
    respath = getattr(options, "respath", None)
    return os.path.join(respath, DATA_INDEX) if respath else None


def _is_list_file(path):
    return os.path.isfile(path) and not path.endswith(".npz")


def load_split(datapath, split, require_labels, options):
    """The `split` ('train', 'val' or 'test') of DATAPATH as an ImageList.

    `options` holds the flags of add_data_source_args: data_root, size, download, train_list,
    val_list, test_list. UserError names the missing piece and the fix.
    """
    explicit = getattr(options, f"{split}_list", None)
    index_dir, rescan = index_dir_of(options), getattr(options, "rescan", False)
    if explicit:
        return decide_on_main(lambda: read_path_list(explicit, require_labels, index_dir, split,
                                                     rescan))
    name = datapath.lower()
    size = getattr(options, "size", 28) or 28
    if not os.path.exists(datapath) and name in MEDMNIST_2D:
        path = medmnist_file(name, options.data_root, size)
        if not os.path.exists(path):
            if not getattr(options, "download", False):
                raise UserError(f"{name} ({size} px) is not in {options.data_root} (looked for "
                                f"{path}); add --download to fetch it, or --data-root to "
                                f"point at the folder holding it")
            download_medmnist(name, options.data_root, size)
        return read_npz_split(path, split, name)
    if datapath.endswith(".npz"):
        if not os.path.isfile(datapath):
            raise UserError(f"DATAPATH {datapath} does not exist")
        return read_npz_split(datapath, split)
    if _is_list_file(datapath):
        if split != "train":
            raise UserError(f"DATAPATH {datapath} is a path list, which gives the train split "
                            f"only; pass the {split} images with --{split}-list FILE")
        return decide_on_main(lambda: read_path_list(datapath, require_labels, index_dir, split,
                                                     rescan))
    if not os.path.exists(datapath) and "mnist" in name:
        raise UserError(f"DATAPATH {datapath} is neither a folder nor a known MedMNIST name "
                        f"({', '.join(MEDMNIST_2D)})")
    return decide_on_main(lambda: find_split(datapath, split, require_labels, index_dir, rescan))


def select_subset(images, samples=None, samples_per_class=None, seed=0, label_fraction=None):
    """A reproducible subset of `images`: `samples_per_class` K images of every class, or
    `label_fraction` F of every class (round(F * n_c), at least 1), and/or `samples` N images
    in all, chosen by `seed` alone (so every script picks the same ones). Returns `images`
    itself when none is given. Indices stay in their original order."""
    if samples is None and samples_per_class is None and label_fraction is None:
        return images
    rng = np.random.default_rng(derive_seed(SUBSET_STREAM, seed))
    chosen = np.arange(len(images))
    if samples_per_class is not None or label_fraction is not None:
        flag = "--samples-per-class" if samples_per_class is not None else "--label-fraction"
        if samples_per_class is not None and label_fraction is not None:
            raise UserError("give --samples-per-class or --label-fraction, not both")
        if images.labels is None:
            raise UserError(f"{flag} needs labelled data (class folders, MedMNIST or a path "
                            f"list with labels)")
        if samples_per_class is not None and samples_per_class < 1:
            raise UserError("--samples-per-class must be at least 1")
        if label_fraction is not None and not 0 < label_fraction <= 1:
            raise UserError(f"--label-fraction {label_fraction} must be in (0, 1], e.g. 0.1")
        labels = np.asarray(images.labels)
        picked = []
        for label, name in enumerate(images.classes):
            members = np.flatnonzero(labels == label)
            k = samples_per_class if samples_per_class is not None else max(
                1, int(np.floor(label_fraction * len(members) + 0.5)))  # half rounds up
            if len(members) < k or not len(members):
                raise UserError(f"class {name} has {len(members)} images, fewer than "
                                f"{flag} {samples_per_class or label_fraction} asks for; use "
                                f"{len(members)} or less")
            picked.append(rng.permutation(members)[:k])
        chosen = np.sort(np.concatenate(picked))
    if samples is not None:
        if not 1 <= samples <= len(chosen):
            raise UserError(f"--samples {samples} is not between 1 and the {len(chosen)} "
                            f"images available")
        chosen = np.sort(rng.permutation(chosen)[:samples])
    return images.subset(chosen.tolist())


def has_split(datapath, split, options):
    """Whether DATAPATH (or --{split}-list) provides `split` itself: a MedMNIST file always has
    train/val/test, a folder has it when DATAPATH/split/ exists, a path list only through
    --{split}-list."""
    if getattr(options, f"{split}_list", None):
        return True
    if datapath.endswith(".npz") or (not os.path.exists(datapath)
                                     and datapath.lower() in MEDMNIST_2D):
        return True
    return os.path.isdir(os.path.join(datapath, split))


def split_off_validation(images, fraction, seed, stream=VALIDATION_STREAM, flag="--val-fraction"):
    """(train, val): round(fraction * n_c) images of every class c (at least 1 when the class
    has 2 or more) moved to a validation split, chosen by `seed` alone, stratified so the
    validation split keeps the class proportions. `stream`/`flag`: another held-out split
    (the test hold-out of --test-fraction)."""
    train, val = validation_indices(images, fraction, seed, stream, flag)
    return images.subset(train.tolist()), images.subset(val.tolist())


def validation_indices(images, fraction, seed, stream=VALIDATION_STREAM, flag="--val-fraction"):
    """(train indices, val indices), sorted int arrays, of split_off_validation."""
    if not 0 < fraction < 1:
        raise UserError(f"{flag} {fraction} must be in (0, 1), e.g. 0.1")
    rng = np.random.default_rng(derive_seed(stream, seed))
    labels = np.asarray(images.labels)
    val = []
    for label in range(len(images.classes)):
        members = np.flatnonzero(labels == label)
        k = min(len(members) - 1, max(1, int(np.floor(fraction * len(members) + 0.5))))
        val.append(rng.permutation(members)[:max(k, 0)])
    val = np.sort(np.concatenate(val)).astype(int)
    train = np.setdiff1d(np.arange(len(images)), val)
    return train, val


def train_and_test(args):
    """(every labelled training image, test ImageList). Without a test split in DATAPATH,
    --test-fraction F holds out F of each class of train, chosen by --seed (as dmolony3
    evaluated UTKFace); the training images are then the rest."""
    fraction = getattr(args, "test_fraction", None)
    if fraction is None or has_split(args.datapath, "test", args):
        return (load_split(args.datapath, "train", True, args),
                load_split(args.datapath, "test", True, args))
    train, test = split_off_validation(load_split(args.datapath, "train", True, args), fraction,
                                       args.seed, TEST_STREAM, "--test-fraction")
    print(f"test: {len(test)} training images held out (--test-fraction {fraction:g} of each "
          f"class, seed {args.seed}); {len(train)} remain for training", flush=True)
    return train, test


def labelled_train_test(args):
    """(train ImageList, test ImageList) of DATAPATH with the same classes (train_and_test);
    the train split reduced by --samples / --samples-per-class / --label-fraction."""
    train, test = train_and_test(args)
    if train.classes != test.classes:
        raise UserError(f"the train and test splits of {args.datapath} have different classes "
                        f"({len(train.classes)} vs {len(test.classes)}); they must match")
    return select_subset(train, args.samples, args.samples_per_class, args.seed,
                         args.label_fraction), test
