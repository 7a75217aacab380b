"""Data sources and loaders.

A training set is an `ImageList`: paths, integer labels (or None) and class names. It comes from
an ImageFolder tree (`DATAPATH/train/<class>/...`) or a plain folder of unlabeled images. Every
random choice the pretraining data makes (order and augmentation) is a pure function of
(seed, epoch, index): `EpochBatchSampler` yields keys `(index, epoch)` and `TwoViewDataset`
seeds the augmentation of that one image from them. A run therefore sees the same data whatever
the number of workers and whether it was resumed mid-epoch.
"""
import json
import os
import sys
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from utils.errors import UserError, warn


IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm",
                  ".pgm", ".pbm")
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# PIL modes of one channel with more than 8 bits: 16-bit and 32-bit integers, 32-bit floats.
# Their values are scaled to [0, 1] by the data set's intensity range (utils/data.py
# intensity_info); every other mode is 8-bit and is divided by 255.
HIGH_DEPTH_MODES = {"I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I;16N": "16-bit",
                    "I": "32-bit integer", "F": "32-bit float"}
STATS_MAX_IMAGES = 10_000
# The smallest std compute_mean_std reports; data whose every channel is at it is constant.
STD_FLOOR = 1e-3


class PathTable:
    """N path strings packed in numpy arrays: entry i is `root` joined with the UTF-8 bytes
    blob[starts[i]:ends[i]] (absolute entries ignore `root`).

    There is no Python object per entry, so DataLoader workers forked from the main process
    share the table instead of copying it page by page (a list of str is copied as soon as the
    workers touch its reference counts), and a table of 10^6 paths costs about its characters
    plus 16 bytes per entry. `take` selects entries without copying the characters.
    """

    def __init__(self, blob, starts, ends, root=""):
        self.blob, self.root = blob, root
        self.starts = np.asarray(starts, dtype=np.int64)
        self.ends = np.asarray(ends, dtype=np.int64)

    @classmethod
    def from_strings(cls, strings, root=""):
        """The table of `strings` (paths relative to `root`, or absolute)."""
        encoding = sys.getfilesystemencoding()  # os.fsencode, without a call per entry
        encoded = [s.encode(encoding, "surrogateescape") for s in strings]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        ends = np.cumsum(lengths)
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8), ends - lengths, ends, root)

    def __len__(self):
        return len(self.starts)

    def relative(self, index):
        """Entry `index` as stored (relative to root, or absolute)."""
        return os.fsdecode(self.blob[self.starts[index]:self.ends[index]].tobytes())

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        rel = self.relative(index)
        return os.path.join(self.root, rel) if self.root else rel

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other):
        """Entry by entry, as full paths; a list of str compares too."""
        if not isinstance(other, (PathTable, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def index(self, path):
        """The first entry equal to `path` (list.index)."""
        for i, entry in enumerate(self):
            if entry == path:
                return i
        raise ValueError(f"{path} is not in the table")

    def take(self, indices):
        """The entries at `indices` (ints), in that order; the characters are shared."""
        indices = np.asarray(indices, dtype=np.int64)
        return PathTable(self.blob, self.starts[indices], self.ends[indices], self.root)

    @property
    def nbytes(self):
        return self.blob.nbytes + self.starts.nbytes + self.ends.nbytes


@dataclass
class ImageList:
    """Images with optional integer labels and the class names they index.

    Images are files (`paths`, a PathTable; a list of str is converted) or, for array sources
    such as MedMNIST, rows of `pixels`, a uint8 array (N, H, W) or (N, H, W, 3) held in memory
    once; `paths` then holds display names ("FILE.npz:train[17]") used in messages. `labels`
    is an int64 array (N,) or None for unlabeled data. `intensity_range` (low, high) scales
    the values of 16-bit, 32-bit integer and float files to [0, 1] (load_image); it is the
    data set's (intensity_info), carried here so that DataLoader workers get it from the
    object they hold. None: the scaling of models pretrained before it existed (16-bit / 257).
    """
    paths: PathTable
    labels: np.ndarray = None
    classes: list = field(default_factory=list)
    pixels: np.ndarray = None
    intensity_range: tuple = None

    def __post_init__(self):
        if not isinstance(self.paths, PathTable):
            self.paths = PathTable.from_strings(list(self.paths))
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)

    def __len__(self):
        return len(self.paths)

    def label(self, index):
        """The label of image `index` as an int (-1 for unlabeled data)."""
        return -1 if self.labels is None else int(self.labels[index])

    def load(self, index, channels):
        """Image `index` as a PIL image with `channels` (load_image): 'L' or 'RGB' (8 bits), or
        for a 1-channel high-depth file with an intensity_range 'F' (float32 in [0, 1])."""
        if self.pixels is None:
            return load_image(self.paths[index], channels, self.intensity_range)
        img = Image.fromarray(self.pixels[index])
        return img.convert("L" if channels == 1 else "RGB")

    def subset(self, indices):
        """The images at `indices` (ints), in that order, with the same classes and range."""
        indices = np.asarray(indices, dtype=np.int64)
        return ImageList(self.paths.take(indices),
                         None if self.labels is None else self.labels[indices],
                         self.classes,
                         None if self.pixels is None else self.pixels[indices],
                         self.intensity_range)

    def with_intensity_range(self, intensity_range):
        """The same images scaled by `intensity_range` ((low, high), e.g. a model's
        model_meta["intensity_range"]; None: the scaling of older models, 16-bit / 257)."""
        return replace(self, intensity_range=None if intensity_range is None
                       else tuple(float(v) for v in intensity_range))


# The random streams of derive_seed: data order, per-image augmentation (CPU workers) and
# per-batch augmentation on the device (utils/gpu_augment.py, --gpu-aug).
ORDER_STREAM, AUGMENT_STREAM, DEVICE_AUGMENT_STREAM = 1, 2, 3
# The images that take the place of an unreadable one (load_with_substitute).
SUBSTITUTE_STREAM = 6


def derive_seed(stream, *numbers):
    """A well-mixed 63-bit seed for one random `stream` from non-negative integers < 2**64.

    Each number is fed to numpy's SeedSequence as two 32-bit words after the stream tag and the
    count, so (3, 5), (3, 5, 0) and (2**32, 5) all give different seeds, and the data order of
    an epoch never shares a stream with the augmentation of an image.
    """
    words = [stream, len(numbers)]
    for n in numbers:
        if not 0 <= n < 2 ** 64:
            raise ValueError(f"derive_seed takes integers in [0, 2**64), got {n}")
        words += [n & 0xFFFFFFFF, n >> 32]
    return int(np.random.SeedSequence(words).generate_state(2, np.uint64)[0] >> 1)


def is_image_file(name):
    """Whether a file name has an image extension and is not hidden."""
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def load_image(path, channels, intensity_range=None):
    """Open `path` as a PIL image with `channels` (1 -> 'L' or 'F', 3 -> 'RGB').

    8-bit images come back as stored (alpha dropped, palettes expanded): 'L' or 'RGB', which
    ToTensor divides by 255. A high-depth image (HIGH_DEPTH_MODES: 16-bit, 32-bit integer,
    float) with `intensity_range` (low, high) is scaled to x = clip((v - low) / (high - low),
    0, 1) (NaN -> 0): with 1 channel a float32 'F' image (every level kept; ToTensor keeps its
    values), with 3 an 8-bit 'RGB' one, round(255 x). Without a range (models pretrained
    before ranges existed) as then: 16-bit / 257, 32-bit integers / 257 when above 255, float
    images converted by PIL (which clips them to 0-255).
    """
    with Image.open(path) as img:
        if img.mode in HIGH_DEPTH_MODES and intensity_range is not None:
            scaled = scale_intensity(np.asarray(img), *intensity_range)
            if channels == 1:
                return Image.fromarray(scaled)
            img = Image.fromarray(eight_bit(scaled))
        elif img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            arr = np.asarray(img, dtype=np.float64)
            arr = np.clip(arr / 257.0 if img.mode != "I" or arr.max() > 255 else arr, 0, 255)
            img = Image.fromarray(arr.astype(np.uint8))
        return img.convert("L" if channels == 1 else "RGB")


def scale_intensity(values, low, high):
    """float32 array of `values` (any shape) mapped to [0, 1]: clip((v - low) / (high - low),
    0, 1), NaN to 0 (computed in float64, so 32-bit integers keep their precision)."""
    scaled = (np.asarray(values, dtype=np.float64) - low) / (high - low)
    return np.clip(np.nan_to_num(scaled, nan=0.0), 0.0, 1.0).astype(np.float32)


def eight_bit(unit):
    """uint8 array of values in [0, 1]: round(255 x), the 8-bit form ToTensor divides back."""
    return np.rint(np.asarray(unit, dtype=np.float32) * 255.0).astype(np.uint8)


def unit_pixels(img):
    """The pixels of PIL image `img` as float64 (H * W, C) in [0, 1] as ToTensor gives them:
    an 'F' image's values as they are, any other mode / 255."""
    arr = np.asarray(img, dtype=np.float64)
    arr = arr.reshape(arr.shape[0] * arr.shape[1], -1)
    return arr if img.mode == "F" else arr / 255.0


def uint8_pixels(img, channels, size):
    """PIL image `img` as the uint8 tensor (channels, size, size) of --gpu-aug and
    --gpu-decode: stretched to size x size (PIL bilinear, antialiased when shrinking; an 'F'
    image is resized in float), then an 'F' image's [0, 1] values rounded to 8 bits (round(255
    x): the one place the device paths reduce high-depth data to 8 bits of its range)."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = eight_bit(np.asarray(img)) if img.mode == "F" else np.array(img)
    return torch.from_numpy(arr.reshape(size, size, channels)).permute(2, 0, 1)


def detect_channels(images):
    """1 if every image of the ImageList `images` is grayscale (by PIL mode or array shape),
    else 3. Arrays (N, H, W, 3) whose three channels are equal everywhere count as grayscale."""
    if images.pixels is not None:
        px = images.pixels
        return 1 if px.ndim == 3 or bool(np.all(px == px[..., :1])) else 3
    for path in images.paths:
        try:
            with Image.open(path) as img:
                if img.mode == "P":
                    palette = np.asarray(img.getpalette() or [], dtype=np.int16).reshape(-1, 3)
                    if np.any(palette != palette[:, :1]):
                        return 3
                elif img.mode not in GRAY_MODES:
                    return 3
        except (OSError, ValueError):  # unreadable: the loaders report it by name
            continue
    return 1


# Mean per-pixel channel spread (max - min of R, G, B, in 0-255) above which an image is colour:
# grey content stored as RGB, JPEG included, stays well below it.
COLOUR_SPREAD = 2.0


def warn_if_colour_dropped(images, model_channels, what, sample_size=64):
    """One warning line when a model of `model_channels` = 1 (pretrained on grayscale) is given
    colour images: every script converts images to the model's channels, which here discards
    the colour. Looks at up to `sample_size` images spread evenly over the ImageList `images`
    (`what` names them, e.g. 'DATAPATH train'); an image is colour when the mean over its pixels
    of max(R, G, B) - min(R, G, B) exceeds COLOUR_SPREAD, so grey images stored as RGB do not
    count. Grey images for a 3-channel model are replicated and need no warning. Returns
    whether it warned."""
    if model_channels != 1 or len(images) == 0:
        return False
    picks = np.unique(np.linspace(0, len(images) - 1, min(sample_size, len(images))).astype(int))
    sample = images.subset(picks)
    for index in range(len(sample)):
        try:
            rgb = np.asarray(sample.load(index, 3), dtype=np.int16)
        except (OSError, ValueError):  # an unreadable file: the loaders report it by name
            continue
        if (rgb.max(axis=-1) - rgb.min(axis=-1)).mean() > COLOUR_SPREAD:
            warn(f"{what} has colour images (e.g. {sample.paths[index]}) but the model was "
                 f"pretrained on grayscale (1 channel): they are converted to grayscale; "
                 f"pretrain on colour images for a colour model")
            return True
    return False


def stats_sample(images, seed):
    """Up to STATS_MAX_IMAGES of `images` chosen reproducibly, for channel and mean/std
    estimates (an ImageList)."""
    if len(images) <= STATS_MAX_IMAGES:
        return images
    rng = np.random.default_rng(seed)
    return images.subset(sorted(rng.choice(len(images), STATS_MAX_IMAGES, replace=False)))


def compute_mean_std(images, channels, unreadable=None):
    """Per-channel mean and std of pixel values in [0, 1] over all pixels of `images`, as the
    model sees them: each image as images.load gives it, through unit_pixels (8-bit / 255,
    high-depth scaled by images.intensity_range).

    Returns two lists of length `channels`; std is at least STD_FLOOR. Uses float64 sums, one
    pass. Images that cannot be decoded are left out and their paths appended to the list
    `unreadable` when given.
    """
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    count = 0
    for index in range(len(images)):
        try:
            img = images.load(index, channels)
        except (OSError, ValueError):
            if unreadable is not None:
                unreadable.append(str(images.paths[index]))
            continue
        arr = unit_pixels(img)
        total += arr.sum(0)
        total_sq += (arr ** 2).sum(0)
        count += arr.shape[0]
    if not count:
        raise UserError(f"none of the {len(images)} images sampled for the mean/std could be "
                        f"decoded (e.g. {images.paths[0]}); check DATAPATH")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
    return mean.tolist(), np.maximum(std, STD_FLOOR).tolist()


def scan_high_depth(images):
    """What the high-depth files (HIGH_DEPTH_MODES) among `images` hold: {"files": how many,
    "stored": their storage names ("16-bit", "32-bit float" ...), "float": whether any is
    float, "min"/"max": over their finite values (None without any), "non_finite": NaN/inf
    pixels, "example": the first such file}. Files that cannot be read are skipped (the
    statistics pass names them); arrays (MedMNIST) are uint8 and have none."""
    found = {"files": 0, "stored": [], "float": False, "min": None, "max": None,
             "non_finite": 0, "example": None}
    if images.pixels is not None:
        return found
    for path in images.paths:
        try:
            with Image.open(path) as img:
                if img.mode not in HIGH_DEPTH_MODES:
                    continue
                stored, arr = HIGH_DEPTH_MODES[img.mode], np.asarray(img)
        except (OSError, ValueError):
            continue
        found["files"] += 1
        found["example"] = found["example"] or path
        found["stored"] = sorted(set(found["stored"]) | {stored})
        found["float"] |= arr.dtype.kind == "f"
        finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
        found["non_finite"] += int(arr.size - finite.size)
        if finite.size:
            low, high = finite.min().item(), finite.max().item()
            found["min"] = low if found["min"] is None else min(found["min"], low)
            found["max"] = high if found["max"] is None else max(found["max"], high)
    return found


def intensity_info(images, given=None):
    """The intensity range of a data set from its statistics sample `images`, JSON-ready:
    the scan_high_depth fields plus "range" [low, high] (None: 8-bit data, divided by 255),
    "bits" (integers) and "source".

    given (--intensity-range LOW HIGH): [LOW, HIGH]. Integer files: bits = max(8, number of
    bits of the largest value) and [0, 2^bits - 1] (values up to 4095: 12 bits, [0, 4095]);
    with negative values [min, max]. Float files: [min, max] of their finite values.
    UserError when a range is given for 8-bit data, or none can be taken from float data.
    """
    info = scan_high_depth(images)
    info.update(range=None, bits=None, source=None)
    if not info["files"]:
        if given is not None:
            raise UserError(f"--intensity-range applies to 16-bit, 32-bit integer and float "
                            f"images; the {len(images)} images sampled (e.g. {images.paths[0]}) "
                            f"are 8-bit, always divided by 255: drop --intensity-range")
        return info
    if given is not None:
        info.update(range=[float(v) for v in given], source="--intensity-range")
        return info
    example = info["example"]
    if info["min"] is None:
        raise UserError(f"{example}: the float images sampled hold no finite values (NaN or "
                        f"inf only); fix the files, or give the range with --intensity-range "
                        f"LOW HIGH")
    info["source"] = f"the {info['files']} high-depth images of the statistics sample"
    if info["float"] or info["min"] < 0:
        if info["min"] == info["max"]:
            raise UserError(f"{example}: the {'float' if info['float'] else 'integer'} images "
                            f"sampled all hold one value, {info['min']:g}, so no intensity "
                            f"range can be taken from them; check the files, or give the range "
                            f"with --intensity-range LOW HIGH")
        info["range"] = [float(info["min"]), float(info["max"])]
    else:
        info["bits"] = max(8, int(info["max"]).bit_length())
        info["range"] = [0.0, float(2 ** info["bits"] - 1)]
    return info


def describe_intensity(info, channels):
    """The log line of an intensity_info (None for 8-bit data), e.g. 'data: 16-bit images with
    values up to 4095: 12-bit, scaled by 4095 to [0, 1]; ...', with where the precision goes."""
    if info.get("range") is None:
        return None
    low, high = info["range"]
    stored = " and ".join(info["stored"])
    seen = (f"values up to {info['max']:g}" if info["min"] is not None and info["min"] >= 0
            and not info["float"] else
            f"values from {info['min']:g} to {info['max']:g}" if info["min"] is not None else
            "no finite values")
    if info["source"] == "--intensity-range":
        how = f"scaled from --intensity-range [{low:g}, {high:g}] to [0, 1], values outside clipped"
    elif info["bits"]:
        how = f"{info['bits']}-bit, scaled by {high:g} to [0, 1]"
    else:
        how = (f"scaled from [{low:g}, {high:g}] (their range) to [0, 1]; --intensity-range "
               f"LOW HIGH sets another")
    nan = f"; {info['non_finite']} NaN/inf pixels (NaN -> 0)" if info["non_finite"] else ""
    if channels == 1:
        kept = ("kept as float32 through loading, resizing and the CPU augmentations; 8 bits of "
                "this range only in --gpu-aug/--gpu-decode (uint8) and in the luma "
                "equalisation of --aug novel/greyscale")
    else:
        kept = "made 8-bit RGB, round(255 x), as the data has colour images"
    return f"data: {stored} images with {seen}: {how}{nan}; {kept}"


def check_not_constant(images, std, unreadable=()):
    """UserError naming a file of `images` when every channel's std (compute_mean_std's, in
    [0, 1] units) is at STD_FLOOR: the images are all one value, nothing to train on."""
    if max(std) > STD_FLOOR:
        return
    skipped = set(unreadable)
    example = next((p for p in images.paths if str(p) not in skipped), images.paths[0])
    raise UserError(f"the {len(images)} images sampled for the statistics are constant (std at "
                    f"its floor, {STD_FLOOR:g} of the [0, 1] range; e.g. {example}), so there is "
                    f"nothing to learn from; check that the files hold the images, and for "
                    f"16-bit or float images their range (--intensity-range LOW HIGH)")


def native_image_size(images):
    """Median shorter side of `images` (the first 1000), capped at 224."""
    if images.pixels is not None:
        return int(min(224, *images.pixels.shape[1:3]))
    sides = []
    for path in images.paths[:1000]:
        try:
            with Image.open(path) as img:
                sides.append(min(img.size))
        except (OSError, ValueError):  # unreadable: the loaders report it by name
            continue
    if not sides:
        raise UserError(f"none of the first {min(len(images), 1000)} image files can be read "
                        f"(e.g. {images.paths[0]}); check DATAPATH")
    return int(min(224, np.median(sides)))


def sample_statistics(sample, intensity_range=None):
    """{channels, intensity_range, intensity, mean, std, n_images_used, unreadable} of the
    ImageList `sample`: detect_channels, intensity_info (`intensity_range`: --intensity-range
    or None), compute_mean_std of the images so scaled, and check_not_constant."""
    channels, unreadable = detect_channels(sample), []
    intensity = intensity_info(sample, intensity_range)
    sample = sample.with_intensity_range(intensity["range"])
    mean, std = compute_mean_std(sample, channels, unreadable)
    check_not_constant(sample, std, unreadable)
    return {"channels": channels, "intensity_range": intensity["range"], "intensity": intensity,
            "mean": mean, "std": std, "n_images_used": len(sample) - len(unreadable),
            "unreadable": unreadable}


def dataset_statistics(images, cache_path, seed, intensity_range=None):
    """Channels, native size, intensity range, mean and std of the training images, cached in
    `cache_path`, with the intensity line (describe_intensity) printed.

    `intensity_range` is --intensity-range (low, high) or None (found from the data,
    intensity_info); stats["intensity_range"] is the range used (None: 8-bit data), which the
    caller keeps in model_meta and gives its ImageLists (with_intensity_range). The cache is
    reused only when it was computed for the same list of files and flag. UserError when the
    images are constant (check_not_constant).
    """
    key = {"n_images": len(images), "first": images.paths[0], "last": images.paths[-1]}
    if intensity_range is not None:
        key["intensity_range"] = [float(v) for v in intensity_range]
    stats = None
    if os.path.exists(cache_path):
        try:
            with open(cache_path) as f:
                cached = json.load(f)
            if cached.get("key") == key and "intensity" in cached["stats"]:
                stats = cached["stats"]
        except (OSError, ValueError, KeyError):
            pass
    if stats is None:
        sample = stats_sample(images, seed)
        stats = sample_statistics(sample, intensity_range)
        stats["native_size"] = native_image_size(sample)
        from utils.fileio import json_dump
        json_dump({"key": key, "stats": stats}, cache_path)
    warn_unreadable_in_statistics(stats.get("unreadable", []))
    line = describe_intensity(stats["intensity"], stats["channels"])
    if line:
        print(line, flush=True)
    return stats


def warn_unreadable_in_statistics(paths):
    """One warning line naming the images the statistics pass could not decode (they are left
    out of the mean/std; training replaces each by seed when it meets it, --max-unreadable)."""
    if paths:
        more = f" and {len(paths) - 1} more (data_stats.json lists them)" if len(paths) > 1 else ""
        warn(f"{paths[0]}{more} could not be decoded and {'was' if len(paths) == 1 else 'were'}"
             f" left out of the mean/std; fix or remove {'it' if len(paths) == 1 else 'them'}")


class UnreadableFiles:
    """The image files a run's loaders could not decode, reported from whichever process met
    them (DataLoader workers included) through a queue and counted in the main process.

    `report(path, error)` runs where the file was loaded; each process reports a file once.
    `count()` (main process) takes in the reports, warns once per file (the first
    MAX_WARNINGS files by name, then one line) and returns how many distinct files failed.
    `check(total)` stops the run (UserError) when `total` (over all processes) exceeds both
    one file and `max_fraction` of the `n_images`.
    """
    MAX_WARNINGS = 20

    def __init__(self, n_images, max_fraction):
        import multiprocessing
        self.n_images, self.max_fraction = n_images, max_fraction
        self._queue = multiprocessing.get_context().Queue()
        self._reported = set()  # in this process (each worker has its own copy)
        self.failed = {}  # main process: path -> first error
        self.total = 0  # over all processes, at the last check

    def report(self, path, error):
        if path not in self._reported:
            self._reported.add(path)
            self._queue.put((path, f"{type(error).__name__}: {error}"[:200]))

    def count(self):
        import queue
        while True:
            try:
                path, error = self._queue.get_nowait()
            except (queue.Empty, OSError, EOFError):
                break
            if path in self.failed:
                continue
            self.failed[path] = error
            if len(self.failed) <= self.MAX_WARNINGS:
                warn(f"{path} could not be decoded ({error}); another image (chosen by seed) "
                     f"takes its place. Remove or replace this file.")
            if len(self.failed) == self.MAX_WARNINGS:
                warn(f"{self.MAX_WARNINGS} unreadable files so far; further ones are counted in "
                     f"run.json without a warning each")
        return len(self.failed)

    def limit(self):
        """The most unreadable files a run tolerates: max(1, max_fraction * n_images)."""
        return max(1.0, self.max_fraction * self.n_images)

    def check(self, total):
        self.total = total
        if total > self.limit():
            example = next(iter(self.failed), "see the warnings above")
            raise UserError(f"{total} of the {self.n_images} images could not be decoded, more "
                            f"than --max-unreadable {self.max_fraction:g} allows (e.g. "
                            f"{example}); fix or remove them, or raise --max-unreadable (a "
                            f"checkpoint already in RESPATH is intact)", all_ranks=True)

    def summary(self):
        """{files, max_fraction, examples}: the distinct unreadable files (over all processes at
        the last check; examples from this one)."""
        return {"files": max(self.count(), self.total), "max_fraction": self.max_fraction,
                "examples": dict(list(self.failed.items())[:10])}

    def __getstate__(self):  # into a worker: its own empty record of what it reported
        return {**self.__dict__, "_reported": set(), "failed": {}}


# Images tried in place of an unreadable one before the data set is declared unreadable.
MAX_SUBSTITUTES = 10


def load_with_substitute(images, index, channels, key=(0, 0), unreadable=None):
    """(PIL image, index of the image used): image `index`, or when it cannot be decoded one of
    MAX_SUBSTITUTES others drawn from derive_seed(SUBSTITUTE_STREAM, *key, index) (key =
    (seed, epoch)), so the data a run sees stays a pure function of seed and epoch. Each
    failure goes to `unreadable` (UnreadableFiles) or, without one, is warned about here.
    UserError when every image tried fails."""
    rng = None
    candidate = index
    for attempt in range(MAX_SUBSTITUTES + 1):
        try:
            return images.load(candidate, channels), candidate
        except (OSError, ValueError, UnidentifiedImageError) as err:
            if unreadable is not None:
                unreadable.report(images.paths[candidate], err)
            else:
                warn(f"{images.paths[candidate]} could not be decoded ({err}); another image "
                     f"takes its place. Remove or replace this file.")
        if len(images) == 1:
            break
        if rng is None:
            rng = np.random.default_rng(derive_seed(SUBSTITUTE_STREAM, *key, index))
        candidate = int(rng.integers(len(images) - 1))
        candidate += candidate >= index  # any image but `index` itself
    raise UserError(f"{images.paths[index]} and the {min(MAX_SUBSTITUTES, len(images) - 1)} "
                    f"images tried in its place could not be decoded; the data is not "
                    f"readable as images (check DATAPATH)")


class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, label) for evaluation; label is -1 for unlabeled data. An unreadable file
    is replaced as in load_with_substitute (with that image's label)."""

    def __init__(self, images, channels, transform, unreadable=None):
        self.images = images
        self.channels = channels
        self.transform = transform
        self.unreadable = unreadable

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        img, used = load_with_substitute(self.images, index, self.channels,
                                         unreadable=self.unreadable)
        return self.transform(img), self.images.label(used)


class TwoViewDataset(torch.utils.data.Dataset):
    """Pretraining dataset: key (index, epoch) -> (view1, view2), two augmentations of one image;
    with `labels` (N,) int64 (the online probe's, utils/online_probe.py) -> ((view1, view2),
    label of the image used), so a batch is [(V1, V2), y].

    The augmentation of image `index` in `epoch` is seeded with
    derive_seed(AUGMENT_STREAM, seed, epoch, index), inside a forked torch RNG so the caller's
    RNG state is untouched. An unreadable file is replaced by an image chosen from (seed,
    epoch, index) (load_with_substitute) and reported to `unreadable`.
    """

    def __init__(self, images, channels, transform, seed, unreadable=None, labels=None):
        self.images = images
        self.channels = channels
        self.transform = transform
        self.seed = seed
        self.unreadable = unreadable
        self.labels = labels

    def __len__(self):
        return len(self.images)

    def load(self, key):
        """(transformed image, index of the image used) for key (index, epoch)."""
        index, epoch = key
        img, used = load_with_substitute(self.images, index, self.channels, (self.seed, epoch),
                                         self.unreadable)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(AUGMENT_STREAM, self.seed, epoch, index))
            return self.transform(img), used

    def __getitem__(self, key):
        views, used = self.load(key)
        return views if self.labels is None else (views, int(self.labels[used]))


class LabelledViewDataset(TwoViewDataset):
    """Supervised training dataset: key (index, epoch) -> (augmented image, label), seeded like
    TwoViewDataset so a fine-tuning run resumed mid-epoch sees the same images and crops."""

    def __getitem__(self, key):
        image, used = self.load(key)
        return image, self.images.label(used)


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of keys (index, epoch) in an order that is a pure function of (seed, epoch).

    `batch_size` is the global batch size. With `world_size` W processes, rank r gets rows
    r*B/W .. (r+1)*B/W of every global batch: the ranks together see exactly the batches one
    process would, so a run gives the same result on any number of processes (this is the
    distributed sampler; torch's DistributedSampler pads the data and cannot start mid-epoch).
    Only full batches are yielded (the few left-over images differ every epoch).
    `set_epoch(epoch, start_batch)` selects the epoch and skips its first `start_batch` batches,
    which is how a run resumed mid-epoch continues exactly where it stopped.
    """

    def __init__(self, n_items, batch_size, seed, rank=0, world_size=1):
        if batch_size > n_items:
            raise UserError(f"batch size {batch_size} is larger than the {n_items} training "
                            f"images; use -bs {n_items} or less")
        if batch_size < 2:
            raise UserError("batch size must be at least 2: SimCLR contrasts images in a batch")
        if batch_size % world_size:
            lower = batch_size - batch_size % world_size
            raise UserError(f"-bs {batch_size} (the global batch) does not split evenly over "
                            f"{world_size} processes; use -bs {lower or world_size} or "
                            f"-bs {lower + world_size}", all_ranks=True)
        self.n_items, self.global_batch_size, self.seed = n_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batch_size = batch_size // world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return self.n_items // self.global_batch_size - self.start_batch

    def __iter__(self):
        seed = derive_seed(ORDER_STREAM, self.seed, self.epoch)
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(self.n_items, generator=generator).tolist()
        for b in range(self.start_batch, self.n_items // self.global_batch_size):
            first = b * self.global_batch_size + self.rank * self.batch_size
            yield [(i, self.epoch) for i in order[first:first + self.batch_size]]


def ignore_sigint_in_worker(_worker_id):
    """worker_init_fn: Ctrl-C reaches the whole process group; only the main process handles it
    (it saves a checkpoint and stops the workers itself)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset, batch_size=None, batch_sampler=None, num_workers=0, pin_memory=False,
                collate_fn=None):
    """A DataLoader with the project's settings (Ctrl-C-safe workers, no random state);
    `collate_fn` None is torch's default (stacked tensors).

    Workers persist across epochs (no fork and dataset copy per epoch); a batch_sampler is
    still iterated anew each epoch in this process, so set_epoch applies. Pass pin_memory=True
    for a CUDA device: batches then arrive in page-locked memory, which `.to(device,
    non_blocking=True)` copies asynchronously.
    """
    return torch.utils.data.DataLoader(
        dataset, batch_size=1 if batch_sampler is not None else batch_size,
        batch_sampler=batch_sampler, shuffle=False, num_workers=num_workers,
        pin_memory=pin_memory, worker_init_fn=ignore_sigint_in_worker if num_workers else None,
        persistent_workers=num_workers > 0, collate_fn=collate_fn)


def decoded_size_bytes(n_images, channels, size):
    """Bytes of `n_images` decoded as uint8 (channels, size, size): n * C * S * S."""
    return n_images * channels * size * size


def fits_in_memory(n_images, channels, size, max_memory_gb):
    """Whether `n_images` decoded as uint8 (channels, size, size) take at most max_memory_gb
    GiB: the test of --max-memory-gb (--gpu-aug, and main.py's CUDA default path)."""
    return decoded_size_bytes(n_images, channels, size) <= max_memory_gb * 2 ** 30


def decode_images(images, channels, size):
    """Every image of the ImageList `images` decoded once: a uint8 tensor (N, channels, size,
    size) in memory (the data of --gpu-aug).

    An image that is not size x size already is resized to size x size as a whole (PIL
    bilinear, antialiased when shrinking): a non-square image is stretched, its aspect ratio is
    not kept, so crops are drawn from all of it. High-depth images (scaled by
    images.intensity_range) are resized in float, then rounded to 8 bits (uint8_pixels). Array
    sources (MedMNIST) of that size are copied without decoding. A file that fails to decode is
    replaced as in training (warning).
    """
    px = images.pixels
    if px is not None and px.shape[1:3] == (size, size) and (channels == 1 or px.ndim == 4):
        arr = px[..., None] if px.ndim == 3 else px[..., :channels]  # gray RGB rows: equal
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()
    out = torch.empty((len(images), channels, size, size), dtype=torch.uint8)
    for index in range(len(images)):
        img, _ = load_with_substitute(images, index, channels)
        out[index] = uint8_pixels(img, channels, size)
    return out


class InMemoryBatches:
    """The batches of `sampler` (keys (index, epoch)) as slices of `pixels`, uint8 (N, C, H, W)
    decoded once (decode_images) and usually already on the training device: yields uint8
    (b, C, H, W) on pixels' device, or with `labels` (N,) int64 (the online probe's) the pairs
    (pixels (b, C, H, W), labels (b,)), both on pixels' device. Takes the place of the
    DataLoader with --gpu-aug (no worker processes: indexing a tensor is all the loading there
    is)."""

    def __init__(self, pixels, sampler, labels=None):
        self.pixels, self.sampler = pixels, sampler
        self.labels = None if labels is None else labels.to(pixels.device)

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        for keys in self.sampler:
            index = torch.tensor([i for i, _ in keys], dtype=torch.long)
            if self.pixels.is_cuda:
                index = index.pin_memory()  # a copy from pageable memory would wait for the GPU
            index = index.to(self.pixels.device, non_blocking=True)
            batch = self.pixels.index_select(0, index)
            yield batch if self.labels is None else (batch, self.labels.index_select(0, index))
