"""Data sources: folder scanning, unreadable and truncated files, image loading and channel
detection, mean/std against numpy, the statistics cache, the epoch batch sampler and seeds."""
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from utils.errors import UserError
from utils.data import (AUGMENT_STREAM, ORDER_STREAM, EpochBatchSampler, ImageDataset, ImageList,
                        TwoViewDataset, compute_mean_std, dataset_statistics, derive_seed,
                        detect_channels, load_image, warn_if_colour_dropped)
from utils.file_index import find_split, scan_image_folder


def write_png(path, array, mode=None):
    """Save a numpy array as PNG (creating folders) and return the path as str."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.fromarray(array, mode=mode).save(str(path))
    return str(path)


def gray(seed, shape=(8, 8)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def rgb(seed, shape=(8, 8)):
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


# --- scanning -------------------------------------------------------------------------------

def test_scan_class_folders_sorted_with_nested_images(tmp_path):
    """Class subfolders become sorted class names; labels follow them, nested images count."""
    root = tmp_path / "train"
    write_png(root / "zebra" / "a.png", gray(0))
    write_png(root / "zebra" / "b.png", gray(1))
    write_png(root / "apple" / "x.png", gray(2))
    write_png(root / "apple" / "deep" / "er" / "y.png", gray(3))
    write_png(root / "mango" / "m.jpg", rgb(4))
    (root / "mango" / "notes.txt").write_text("not an image")
    result = scan_image_folder(str(root), require_labels=True)
    assert result.classes == ["apple", "mango", "zebra"]
    rel = [os.path.relpath(p, root) for p in result.paths]
    got = dict(zip(rel, result.labels))
    assert got == {os.path.join("apple", "x.png"): 0,
                   os.path.join("apple", "deep", "er", "y.png"): 0,
                   os.path.join("mango", "m.jpg"): 1,
                   os.path.join("zebra", "a.png"): 2,
                   os.path.join("zebra", "b.png"): 2}


def test_scan_plain_folder_is_unlabeled(tmp_path):
    """A folder of images without subfolders gives all its images and labels None."""
    for i in range(3):
        write_png(tmp_path / f"{i}.png", gray(i))
    result = scan_image_folder(str(tmp_path), require_labels=False)
    assert result.labels is None
    assert sorted(os.path.basename(p) for p in result.paths) == ["0.png", "1.png", "2.png"]


def test_scan_empty_class_folder_names_it(tmp_path):
    """An empty class folder raises UserError whose message names that folder."""
    write_png(tmp_path / "cats" / "a.png", gray(0))
    (tmp_path / "dogs").mkdir()
    with pytest.raises(UserError, match="dogs"):
        scan_image_folder(str(tmp_path), require_labels=True)


def test_find_split_missing_datapath(tmp_path):
    """A DATAPATH that does not exist raises UserError naming it."""
    missing = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="nowhere"):
        find_split(missing, "train", require_labels=True)


def test_find_split_missing_train(tmp_path):
    """A DATAPATH without train/ (and no loose images) raises UserError mentioning train/."""
    write_png(tmp_path / "test" / "c" / "a.png", gray(0))
    with pytest.raises(UserError, match="train/"):
        find_split(str(tmp_path), "train", require_labels=False)
    with pytest.raises(UserError, match="train/"):
        find_split(str(tmp_path), "train", require_labels=True)


def test_find_split_loose_images_unlabeled(tmp_path):
    """Loose images directly in DATAPATH (no train/) are accepted as unlabeled training data,
    but not when labels are required."""
    for i in range(4):
        write_png(tmp_path / f"img{i}.png", gray(i))
    result = find_split(str(tmp_path), "train", require_labels=False)
    assert result.labels is None and len(result) == 4
    with pytest.raises(UserError):
        find_split(str(tmp_path), "train", require_labels=True)


def test_find_split_labelled(tiny_folder):
    """The conftest ImageFolder: 3 classes of 12 train images, labels 0..2 in class order."""
    result = find_split(tiny_folder, "train", require_labels=True)
    assert len(result.classes) == 3 and len(result) == 36
    assert sorted(set(result.labels)) == [0, 1, 2]
    for path, label in zip(result.paths, result.labels):
        assert os.path.basename(os.path.dirname(path)) == result.classes[label]


# --- unreadable and truncated files ---------------------------------------------------------

def test_find_split_opens_no_image(tmp_path, monkeypatch):
    """The scan lists files by name: random bytes named bad.png are listed (the loader finds
    them), and PIL is never asked to open a file."""
    train = tmp_path / "train"
    write_png(train / "c" / "good.png", gray(0))
    write_png(train / "c" / "good2.png", gray(1))
    (train / "c" / "bad.png").write_bytes(np.random.default_rng(0).bytes(300))

    def refuse(*args, **kwargs):
        raise AssertionError("an image was opened during the scan")
    monkeypatch.setattr(Image, "open", refuse)
    result = find_split(str(tmp_path), "train", require_labels=True)
    assert [os.path.basename(p) for p in result.paths] == ["bad.png", "good.png", "good2.png"]
    assert result.labels.tolist() == [0, 0, 0]


def _truncated_png(path, seed):
    """A PNG whose header is intact but whose image data is cut off."""
    buffer = io.BytesIO()
    Image.fromarray(gray(seed, (32, 32))).save(buffer, format="PNG")
    data = buffer.getvalue()
    path.write_bytes(data[:len(data) // 2])
    return str(path)


def test_truncated_png_substituted_in_datasets(tmp_path, capsys):
    """A truncated PNG passes the scan, but loading it in ImageDataset or TwoViewDataset gives
    another image in its place with a warning naming the file, not an exception."""
    train = tmp_path / "train" / "c"
    good = write_png(train / "a_good.png", gray(5, (32, 32)))
    truncated = _truncated_png(train / "b_trunc.png", 6)
    with pytest.raises(OSError):  # PIL itself cannot decode the file
        with Image.open(truncated) as img:
            img.load()
    images = find_split(str(tmp_path), "train", require_labels=True)
    assert truncated in images.paths  # header is fine: the scan keeps it
    capsys.readouterr()

    to_array = lambda img: torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # noqa: E731
    ds = ImageDataset(images, 1, to_array)
    x, label = ds[images.paths.index(truncated)]
    assert label == 0
    assert torch.equal(x, torch.from_numpy(gray(5, (32, 32))))  # the good image instead
    assert "b_trunc.png" in capsys.readouterr().err

    two = TwoViewDataset(images, 1, lambda img: (to_array(img), to_array(img)), seed=0)
    v1, v2 = two[(images.paths.index(truncated), 0)]
    assert torch.equal(v1, torch.from_numpy(gray(5, (32, 32))))
    assert "b_trunc.png" in capsys.readouterr().err
    assert good in images.paths


# --- loading and channels -------------------------------------------------------------------

def test_load_image_16bit_gray_to_8bit(tmp_path):
    """A 16-bit PNG (mode I;16) with values v*257 loads as 8-bit L with values v."""
    v = np.arange(256, dtype=np.uint16).reshape(16, 16)
    img16 = Image.fromarray(v * 257)
    assert img16.mode == "I;16"
    path = str(tmp_path / "deep.png")
    img16.save(path)
    out = load_image(path, channels=1)
    assert out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out), v.astype(np.uint8))


def test_load_image_rgba_to_rgb(tmp_path):
    """RGBA with channels=3 gives RGB with the colour channels unchanged (alpha dropped)."""
    arr = np.random.default_rng(0).integers(0, 256, (6, 7, 4), dtype=np.uint8)
    path = write_png(tmp_path / "rgba.png", arr, mode="RGBA")
    out = load_image(path, channels=3)
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), arr[..., :3])


def test_load_image_rgb_to_gray(tmp_path):
    """RGB with channels=1 gives L with ITU-R 601-2 luma L = (299 R + 587 G + 114 B)/1000."""
    arr = rgb(3, (5, 9))
    path = write_png(tmp_path / "rgb.png", arr)
    out = load_image(path, channels=1)
    assert out.mode == "L" and out.size == (9, 5)
    luma = (arr[..., 0] * 299.0 + arr[..., 1] * 587.0 + arr[..., 2] * 114.0) / 1000.0
    assert np.abs(np.asarray(out).astype(float) - luma).max() <= 1.0


def test_detect_channels(tmp_path):
    """All-grayscale files give 1 channel; a single RGB file among them gives 3."""
    grays = [write_png(tmp_path / f"g{i}.png", gray(i)) for i in range(3)]
    assert detect_channels(ImageList(grays)) == 1
    colour = write_png(tmp_path / "c.png", rgb(9))
    assert detect_channels(ImageList(grays + [colour])) == 3
    assert detect_channels(ImageList([colour] + grays)) == 3


def test_warn_if_colour_dropped(tmp_path, capsys):
    """A grayscale (1-channel) model given colour images warns in one line naming the data and
    the image; grey images, also stored as RGB PNG or JPEG, or a 3-channel model, do not;
    colour arrays whose channels are equal count as grey. The sample spreads over the list, so
    a colour image at the end is seen."""
    grays = [write_png(tmp_path / f"g{i}.png", gray(i)) for i in range(198)]
    grey_rgb = np.repeat(gray(5, (32, 32))[..., None], 3, axis=-1)
    grays.append(write_png(tmp_path / "grey_rgb.png", grey_rgb, mode="RGB"))
    Image.fromarray(grey_rgb, mode="RGB").save(tmp_path / "grey.jpg", quality=75)
    grays.append(str(tmp_path / "grey.jpg"))
    colour = write_png(tmp_path / "c.png", rgb(9))
    assert warn_if_colour_dropped(ImageList(grays + [colour]), 1, "DATAPATH d") is True
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: DATAPATH d has colour images")
    assert colour in err
    assert warn_if_colour_dropped(ImageList(grays[-2:]), 1, "d") is False  # RGB PNG, JPEG
    for images, channels in ((ImageList(grays), 1), (ImageList(grays + [colour]), 3),
                             (ImageList([], []), 1)):
        assert warn_if_colour_dropped(images, channels, "d") is False
    same = np.repeat(gray(0, (5, 8, 8))[..., None], 3, axis=-1)
    assert warn_if_colour_dropped(ImageList(["a"] * 5, pixels=same), 1, "d") is False
    distinct = same.copy()
    distinct[-1, 0, 0] = [0, 128, 255]
    assert warn_if_colour_dropped(ImageList(["a"] * 5, pixels=distinct), 1, "d") is True
    assert capsys.readouterr().err.count("\n") == 1


# --- statistics -----------------------------------------------------------------------------

def test_compute_mean_std_gray_matches_numpy(tmp_path):
    """Gray mean/std over all pixels of images of different sizes equals numpy on the
    concatenated pixels / 255."""
    arrays = [gray(0, (8, 8)), gray(1, (5, 11)), gray(2, (16, 3))]
    paths = [write_png(tmp_path / f"{i}.png", a) for i, a in enumerate(arrays)]
    pixels = np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float64) / 255
    mean, std = compute_mean_std(ImageList(paths), 1)
    np.testing.assert_allclose(mean, [pixels.mean()], rtol=1e-10)
    np.testing.assert_allclose(std, [pixels.std()], rtol=1e-8)


def test_compute_mean_std_rgb_matches_numpy(tmp_path):
    """Per-channel RGB mean/std equals numpy over the stacked arrays / 255, channel by channel
    (with channels of clearly different statistics)."""
    arrays = []
    for i in range(3):
        a = rgb(10 + i, (6, 7)).astype(np.float64)
        a[..., 1] *= 0.3
        a[..., 2] = 200 + a[..., 2] / 10
        arrays.append(a.astype(np.uint8))
    paths = [write_png(tmp_path / f"{i}.png", a) for i, a in enumerate(arrays)]
    stacked = np.stack(arrays).astype(np.float64) / 255
    mean, std = compute_mean_std(ImageList(paths), 3)
    np.testing.assert_allclose(mean, stacked.mean(axis=(0, 1, 2)), rtol=1e-10)
    np.testing.assert_allclose(std, stacked.std(axis=(0, 1, 2)), rtol=1e-8)


def test_dataset_statistics_cached_and_recomputed(tmp_path):
    """Statistics are written to the cache file and returned from it on a second call (even
    if the pixels changed meanwhile), and recomputed when the list of files changes."""
    folder = tmp_path / "imgs"
    arrays = [gray(i, (10, 12)) for i in range(4)]
    paths = [write_png(folder / f"{i}.png", a) for i, a in enumerate(arrays)]
    images = scan_image_folder(str(folder), require_labels=False)
    cache = str(tmp_path / "data_stats.json")
    first = dataset_statistics(images, cache, seed=0)
    pixels = np.concatenate([a.reshape(-1) for a in arrays]) / 255
    assert first["channels"] == 1 and first["native_size"] == 10
    np.testing.assert_allclose(first["mean"], [pixels.mean()], rtol=1e-10)
    np.testing.assert_allclose(first["std"], [pixels.std()], rtol=1e-8)
    with open(cache) as f:
        assert json.load(f)["stats"] == first

    write_png(folder / "0.png", np.full((10, 12), 255, np.uint8))  # same file list
    assert dataset_statistics(images, cache, seed=0) == first

    new = write_png(folder / "9.png", rgb(1, (10, 12)))
    images2 = scan_image_folder(str(folder), require_labels=False)
    assert new in images2.paths
    third = dataset_statistics(images2, cache, seed=0)
    assert third["channels"] == 3 and third != first
    all_rgb = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) / 255
               for p in images2.paths]
    np.testing.assert_allclose(third["mean"], np.stack(all_rgb).mean(axis=(0, 1, 2)), rtol=1e-10)
    assert paths[0] in images2.paths


# --- sampler and seeds ----------------------------------------------------------------------

def _epoch(n, b, seed, epoch, start=0):
    sampler = EpochBatchSampler(n, b, seed)
    sampler.set_epoch(epoch, start)
    return list(sampler), len(sampler)


@pytest.mark.parametrize("n,b", [(10, 3), (12, 4), (7, 2), (5, 5)])
def test_epoch_batch_sampler_full_batches_of_distinct_indices(n, b):
    """Each epoch gives floor(n/B) batches of exactly B distinct in-range keys (index, epoch)."""
    batches, length = _epoch(n, b, seed=1, epoch=3)
    assert len(batches) == length == n // b
    flat = [key for batch in batches for key in batch]
    assert all(len(batch) == b for batch in batches)
    assert all(epoch == 3 for _, epoch in flat)
    indices = [i for i, _ in flat]
    assert len(set(indices)) == len(indices) == (n // b) * b
    assert all(0 <= i < n for i in indices)


def test_epoch_batch_sampler_deterministic_and_varies_by_epoch():
    """The order is a function of (seed, epoch): repeatable, different across epochs and
    across seeds."""
    a, _ = _epoch(50, 5, seed=0, epoch=2)
    assert a == _epoch(50, 5, seed=0, epoch=2)[0]
    indices = lambda batches: [i for batch in batches for i, _ in batch]  # noqa: E731
    orders = {tuple(indices(_epoch(50, 5, seed=0, epoch=e)[0])) for e in range(5)}
    assert len(orders) == 5
    assert indices(_epoch(50, 5, seed=1, epoch=2)[0]) != indices(a)
    # the left-over images (n mod B) are not always the same ones
    leftovers = {frozenset(range(52)) - set(indices(_epoch(52, 5, 0, e)[0])) for e in range(5)}
    assert len(leftovers) > 1


def test_epoch_batch_sampler_resume_is_tail():
    """set_epoch(e, k) yields exactly the full epoch's batches after the first k."""
    full, _ = _epoch(23, 4, seed=3, epoch=6)
    for k in range(len(full) + 1):
        tail, length = _epoch(23, 4, seed=3, epoch=6, start=k)
        assert tail == full[k:]
        assert length == len(full) - k


def test_epoch_batch_sampler_batch_larger_than_data():
    """Batch size above the number of images raises UserError pointing at -bs."""
    with pytest.raises(UserError, match="-bs"):
        EpochBatchSampler(5, 6, seed=0)


def test_derive_seed_deterministic_and_distinct():
    """derive_seed is a pure function of (stream, numbers), below 2**63, and tuples that differ
    in order, in values, by a trailing zero, by a large value or by stream give different seeds
    (numpy's SeedSequence alone maps (3, 5) and (3, 5, 0), or (2**32, 5) and (0, 1, 5), to one
    seed, which tied the epoch order to the augmentation of image 0)."""
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    tuples = [(0,), (1,), (0, 1), (1, 3), (1, 2), (2, 1), (0, 1, 2), (0, 2, 1), (7, 3, 5),
              (7, 3, 6), (7, 4, 5), (8, 3, 5), (1, 2, 3), (1, 2, 3, 4), (3, 5), (3, 5, 0),
              (2 ** 32, 5), (0, 1, 5), (0, 2 ** 32 + 5)]
    for stream in (ORDER_STREAM, AUGMENT_STREAM):
        seeds = [derive_seed(stream, *t) for t in tuples]
        assert len(set(seeds)) == len(tuples)
        assert all(0 <= s < 2 ** 63 for s in seeds)
    assert derive_seed(ORDER_STREAM, 0, 3) != derive_seed(AUGMENT_STREAM, 0, 3)
    assert derive_seed(ORDER_STREAM, 0, 3) != derive_seed(AUGMENT_STREAM, 0, 3, 0)
    epoch_index = {derive_seed(AUGMENT_STREAM, 0, e, i) for e in range(20) for i in range(50)}
    assert len(epoch_index) == 20 * 50
    with pytest.raises(ValueError):
        derive_seed(ORDER_STREAM, -1)
