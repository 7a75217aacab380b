"""Data sources on real images (Fashion-MNIST subsets): MedMNIST-format .npz files (by path and
by name), path lists, label-budget subsets, TIFF and mixed folders, and their errors through
the real command line."""
import argparse
import json
import os
import shutil
import sys
import types

import numpy as np
import pytest
from PIL import Image

from conftest import FAST_PRETRAIN, assert_one_line_error, run_in_process, run_script
from make_demo_data import balanced_subset
from utils.errors import UserError
from utils.data import ImageDataset, dataset_statistics, detect_channels
from utils.sources import load_split, read_path_list, select_subset
from utils.transforms import EvalTransform

PER_SPLIT = {"train": 10, "val": 3, "test": 5}  # images per class, 3 classes


def options(**kwargs):
    defaults = dict(data_root="~/.medmnist", size=28, download=False, train_list=None,
                    val_list=None, test_list=None)
    return argparse.Namespace(**{**defaults, **kwargs})


def medmnist_arrays(real_images, rgb=False, multilabel=False):
    """{split: (uint8 images, labels)} as the medmnist package stores them."""
    (data, _names) = real_images
    arrays = {}
    for split, per_class in PER_SPLIT.items():
        source = "test" if split == "test" else "train"
        images, labels = data[source]
        keep = balanced_subset(labels, per_class + (3 if split == "val" else 0), seed=1)
        keep = keep[labels[keep] < 3]
        if split == "val":  # disjoint from train: the last images of each class
            keep = np.concatenate([keep[labels[keep] == c][-per_class:] for c in range(3)])
        else:
            keep = np.concatenate([keep[labels[keep] == c][:per_class] for c in range(3)])
        x, y = images[keep], labels[keep].astype(np.uint8)
        if rgb:  # a tinted colour version, channels different
            x = np.stack([x, (x * 0.6).astype(np.uint8), 255 - x], axis=-1)
        y = np.eye(14, dtype=np.uint8)[y] if multilabel else y.reshape(-1, 1)
        arrays[split] = (x, y)
    return arrays


def write_npz(path, arrays):
    np.savez(path, **{f"{s}_images": x for s, (x, _) in arrays.items()},
             **{f"{s}_labels": y for s, (_, y) in arrays.items()})
    return str(path)


@pytest.fixture(scope="module")
def gray_npz(real_images, tmp_path_factory):
    return write_npz(tmp_path_factory.mktemp("npz") / "fashionmnist.npz",
                     medmnist_arrays(real_images))


def test_npz_splits_load_with_counts_labels_and_pixels(gray_npz, real_images):
    arrays = medmnist_arrays(real_images)
    for split, per_class in PER_SPLIT.items():
        images = load_split(gray_npz, split, True, options())
        assert len(images) == 3 * per_class
        assert images.labels.tolist() == arrays[split][1][:, 0].tolist()
        assert images.classes == ["0", "1", "2"]  # no medmnist metadata for this file
        assert detect_channels(images) == 1
        np.testing.assert_array_equal(np.asarray(images.load(4, 1)), arrays[split][0][4])
    stats = dataset_statistics(load_split(gray_npz, "train", False, options()),
                               str(os.path.join(os.path.dirname(gray_npz), "stats.json")), 0)
    expected = arrays["train"][0].astype(np.float64) / 255
    assert stats["channels"] == 1 and stats["native_size"] == 28
    np.testing.assert_allclose(stats["mean"], [expected.mean()], rtol=1e-9)
    np.testing.assert_allclose(stats["std"], [expected.std()], rtol=1e-7)


def test_rgb_npz_has_three_channels_and_exact_pixels(real_images, tmp_path):
    arrays = medmnist_arrays(real_images, rgb=True)
    path = write_npz(tmp_path / "bloodmnist_64.npz", arrays)
    images = load_split(path, "test", True, options())
    assert detect_channels(images) == 3
    np.testing.assert_array_equal(np.asarray(images.load(7, 3)), arrays["test"][0][7])
    x, label = ImageDataset(images, 3, EvalTransform(28, [0.5] * 3, [0.5] * 3))[7]
    assert tuple(x.shape) == (3, 28, 28) and label == arrays["test"][1][7, 0]


def test_multilabel_npz_is_reduced_to_finding_vs_no_finding(real_images, tmp_path):
    arrays = medmnist_arrays(real_images, multilabel=True)
    arrays["train"][1][:4] = 0  # four images without any finding
    path = write_npz(tmp_path / "chestmnist.npz", arrays)
    images = load_split(path, "train", True, options())
    assert images.classes == ["no finding", "finding"]
    assert images.labels.tolist() == (arrays["train"][1].max(1) > 0).astype(int).tolist()
    assert images.labels[:4].tolist() == [0, 0, 0, 0]


def test_medmnist_name_is_found_under_data_root_by_size(gray_npz, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(gray_npz, root / "pathmnist.npz")
    os.symlink(gray_npz, root / "pathmnist_64.npz")
    assert len(load_split("pathmnist", "val", True, options(data_root=str(root)))) == 9
    assert len(load_split("PathMNIST", "val", True, options(data_root=str(root), size=64))) == 9
    with pytest.raises(UserError, match="--download"):
        load_split("dermamnist", "train", False, options(data_root=str(root)))
    with pytest.raises(UserError, match="pathmnist_128.npz"):
        load_split("pathmnist", "train", False, options(data_root=str(root), size=128))


def test_npz_with_wrong_keys_names_them(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=np.zeros((2, 28, 28), np.uint8), y_train=np.zeros(2))
    with pytest.raises(UserError, match="lacks test_images"):
        load_split(str(path), "train", False, options())


@pytest.fixture(scope="module")
def listed(tiny_folder, tmp_path_factory):
    """Path lists of the tiny folder: train with relative paths, test with absolute ones."""
    root = tmp_path_factory.mktemp("lists")
    entries = {}
    for split in ("train", "test"):
        folder = os.path.join(tiny_folder, split)
        entries[split] = [(os.path.join(folder, c, f), c) for c in sorted(os.listdir(folder))
                          for f in sorted(os.listdir(os.path.join(folder, c)))]
    with open(root / "train.txt", "w") as f:
        f.write("# Fashion-MNIST, three classes\n\n")
        for path, label in entries["train"]:
            f.write(f"{os.path.relpath(path, root)},{label}\n")
    with open(root / "test.txt", "w") as f:
        for path, label in entries["test"]:
            f.write(f"{path}, {label}\n")
    with open(root / "unlabelled.txt", "w") as f:
        f.write("\n".join(os.path.relpath(p, root) for p, _ in entries["train"]) + "\n")
    return root, entries


def test_path_lists_relative_absolute_and_unlabelled(listed, tiny_folder):
    root, entries = listed
    train = read_path_list(str(root / "train.txt"), True)
    assert [os.path.realpath(p) for p in train.paths] == \
        [os.path.realpath(p) for p, _ in entries["train"]]
    assert train.classes == sorted(os.listdir(os.path.join(tiny_folder, "train")))
    assert train.labels.tolist() == [train.classes.index(c) for _, c in entries["train"]]
    test = read_path_list(str(root / "test.txt"), True)
    assert len(test) == len(entries["test"]) and test.classes == train.classes
    unlabelled = read_path_list(str(root / "unlabelled.txt"), False)
    assert unlabelled.labels is None and len(unlabelled) == len(train)
    with pytest.raises(UserError, match="has no labels"):
        read_path_list(str(root / "unlabelled.txt"), True)
    with pytest.raises(UserError, match="--test-list FILE"):
        load_split(str(root / "train.txt"), "test", True, options())
    explicit = load_split(str(root / "train.txt"), "test", True,
                          options(test_list=str(root / "test.txt")))
    assert explicit.paths == test.paths


def test_path_list_errors_name_the_line(listed, tmp_path):
    root, entries = listed
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{entries['train'][0][0]},a\n\n{tmp_path / 'gone.png'},b\n")
    with pytest.raises(UserError, match="line 3: image .*gone.png does not exist"):
        read_path_list(str(bad), True)
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(f"{entries['train'][0][0]},a\n{entries['train'][1][0]}\n")
    with pytest.raises(UserError, match="some lines have a label"):
        read_path_list(str(mixed), False)
    with pytest.raises(UserError, match="does not exist"):
        read_path_list(str(tmp_path / "none.txt"), False)


def test_samples_per_class_picks_exactly_k_reproducibly(gray_npz):
    images = load_split(gray_npz, "train", True, options())
    a = select_subset(images, samples_per_class=4, seed=5)
    b = select_subset(images, samples_per_class=4, seed=5)
    c = select_subset(images, samples_per_class=4, seed=6)
    assert np.bincount(a.labels).tolist() == [4, 4, 4]
    assert a.paths == b.paths and a.paths != c.paths
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert set(a.paths) <= set(images.paths) and a.paths == sorted(a.paths, key=images.paths.index)
    n = select_subset(images, samples=7, seed=5)
    assert len(n) == 7 and n.paths == select_subset(images, samples=7, seed=5).paths
    with pytest.raises(UserError, match="fewer than --samples-per-class 11"):
        select_subset(images, samples_per_class=11, seed=0)
    with pytest.raises(UserError, match="--samples 31"):
        select_subset(images, samples=31, seed=0)


def test_tiff_and_mixed_gray_rgb_folder_load_as_rgb(real_images, tmp_path):
    (data, _names) = real_images
    x = data["train"][0][:4]
    folder = tmp_path / "mixed" / "train"
    folder.mkdir(parents=True)
    Image.fromarray(x[0]).save(folder / "a.tif")
    Image.fromarray(np.stack([x[1]] * 3 + [np.full_like(x[1], 128)], -1), "RGBA").save(
        folder / "b.png")
    Image.fromarray((x[2].astype(np.uint16) * 257)).save(folder / "c.png")  # 16 bit
    Image.fromarray(np.stack([x[3], x[3] // 2, x[3]], -1)).save(folder / "d.tiff")
    images = load_split(str(tmp_path / "mixed"), "train", False, options())
    assert len(images) == 4 and detect_channels(images) == 3
    loaded = [np.asarray(images.load(i, 3)) for i in range(4)]
    np.testing.assert_array_equal(loaded[0][..., 1], x[0])  # gray TIFF -> equal RGB channels
    np.testing.assert_array_equal(loaded[1][..., 0], x[1])  # RGBA: alpha dropped
    np.testing.assert_array_equal(loaded[2][..., 2], x[2])  # 16 bit scaled to 8 bit
    np.testing.assert_array_equal(loaded[3][..., 1], x[3] // 2)


def test_npz_end_to_end_pretraining_and_linear_evaluation(gray_npz, tmp_path):
    respath = tmp_path / "run"
    result = run_script("main.py", gray_npz, respath, "--epochs", "1", *FAST_PRETRAIN,
                        "--samples-per-class", "8")
    assert result.returncode == 0, result.stderr
    assert "data: 24 training images, 1 channel(s)" in result.stdout
    evaluation = run_script("linear_evaluation.py", gray_npz, respath / "model" / "model.pth",
                            tmp_path / "eval", "-bs", "12", "-nw", "0")
    assert evaluation.returncode == 0, evaluation.stderr
    report = json.load(open(tmp_path / "eval" / "report.json"))
    assert report["macro avg"]["support"] == 15  # the test split of the file


def test_path_list_end_to_end(listed, tmp_path):
    root, _ = listed
    respath = tmp_path / "run"
    result = run_script("main.py", root / "unlabelled.txt", respath, "--epochs", "1",
                        *FAST_PRETRAIN)
    assert result.returncode == 0, result.stderr
    assert "data: 36 training images" in result.stdout
    evaluation = run_script("linear_evaluation.py", root / "train.txt",
                            respath / "model" / "model.pth", tmp_path / "eval", "-bs", "12",
                            "-nw", "0", "--test-list", root / "test.txt",
                            "--samples-per-class", "5")
    assert evaluation.returncode == 0, evaluation.stderr
    assert "features: (15, 512) train, (18, 512) test" in evaluation.stdout


def test_source_errors_are_one_line(listed, tmp_path):
    _, entries = listed
    bad_npz = tmp_path / "bad.npz"
    np.savez(bad_npz, images=np.zeros((2, 28, 28), np.uint8))
    assert_one_line_error(run_in_process("main.py", bad_npz, tmp_path / "r1", *FAST_PRETRAIN),
                          "train_images")
    assert_one_line_error(run_in_process("main.py", "organcmnist", tmp_path / "r2", "--data-root",
                                         tmp_path, *FAST_PRETRAIN), "--download")
    missing = tmp_path / "missing.txt"
    missing.write_text(f"{entries['train'][0][0]}\nno/such/image.png\n")
    assert_one_line_error(run_in_process("main.py", missing, tmp_path / "r3", *FAST_PRETRAIN),
                          "line 2", "no/such/image.png")


def test_demo_data_holds_the_same_images_as_npz_and_path_lists(tmp_path):
    """make_demo_data.py writes the folders, a MedMNIST-format .npz and path lists of the same
    images: every source gives the same pixels and class of each training image."""
    from make_demo_data import build_demo_data
    out = str(tmp_path / "demo")
    build_demo_data(out, train_per_class=3, test_per_class=2)
    folder = load_split(out, "train", True, options())
    listed = load_split(os.path.join(out, "train.txt"), "train", True, options())
    npz = load_split(os.path.join(out, "fashion_mnist.npz"), "train", True, options())
    assert len(folder) == len(listed) == len(npz) == 30
    assert len(load_split(os.path.join(out, "fashion_mnist.npz"), "val", True, options())) == 20
    by_path = {os.path.realpath(p): (np.asarray(folder.load(i, 1)), folder.classes[label])
               for i, (p, label) in enumerate(zip(folder.paths, folder.labels))}
    for i in range(len(listed)):  # list order = npz order = the index in the file names
        pixels, name = by_path[os.path.realpath(listed.paths[i])]
        assert listed.classes[listed.labels[i]] == name
        np.testing.assert_array_equal(np.asarray(npz.load(i, 1)), pixels)
    names = [listed.classes[label] for label in listed.labels]
    npz_names = sorted(set(zip(npz.labels, names)))
    assert len(npz_names) == 10  # one npz class index per class name


def test_demo_data_from_the_digits_fallback(tmp_path):
    """make_demo_data.py --source digits (what a machine without Debian's Fashion-MNIST gets):
    fewer images than 500 a class, so every training image goes to train/ and the npz's extra
    val split is empty, instead of a crash."""
    out = tmp_path / "demo"
    result = run_script("make_demo_data.py", out, "--source", "digits")
    assert result.returncode == 0, result.stderr
    train = load_split(str(out), "train", True, options())
    assert 0 < len(train) < 5000 and len(train.classes) == 10
    assert len(load_split(str(out), "test", True, options())) > 0
    assert len(np.load(out / "fashion_mnist.npz")["val_labels"]) == 0


def test_download_without_the_medmnist_package_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "medmnist", None)  # import medmnist -> ImportError
    with pytest.raises(UserError, match="pip install medmnist"):
        load_split("breastmnist", "train", False,
                   options(data_root=str(tmp_path), download=True))


def test_download_goes_through_the_medmnist_package(monkeypatch, gray_npz, tmp_path):
    """A stand-in medmnist module (no network): --download asks the data set's class for the
    train split at the requested size under --data-root, then reads the file it wrote, with
    class names from the package's INFO."""
    calls = []

    class BreastMNIST:
        def __init__(self, split, download, root, size=28):
            calls.append((split, download, root, size))
            shutil.copy(gray_npz, os.path.join(root, f"breastmnist_{size}.npz"))

    fake = types.SimpleNamespace(
        BreastMNIST=BreastMNIST,
        INFO={"breastmnist": {"python_class": "BreastMNIST",
                              "label": {"0": "malignant", "1": "normal, benign", "2": "other"}}})
    monkeypatch.setitem(sys.modules, "medmnist", fake)
    root = str(tmp_path / "root")
    images = load_split("breastmnist", "test", True,
                        options(data_root=root, size=64, download=True))
    assert calls == [("train", True, root, 64)]
    assert len(images) == 15 and images.classes == ["malignant", "normal, benign", "other"]
    offline = types.SimpleNamespace(BreastMNIST=None, INFO=fake.INFO)

    def fail(**kwargs):
        raise ConnectionError("no route to host")
    offline.BreastMNIST = fail
    monkeypatch.setitem(sys.modules, "medmnist", offline)
    with pytest.raises(UserError, match="downloading breastmnist .*ConnectionError"):
        load_split("breastmnist", "test", True,
                   options(data_root=str(tmp_path / "other"), size=128, download=True))


def test_binary_file_as_datapath_is_one_line_error(real_images, tmp_path):
    image = tmp_path / "photo.png"
    Image.fromarray(real_images[0]["train"][0][0]).save(image)
    assert_one_line_error(run_in_process("main.py", image, tmp_path / "r", *FAST_PRETRAIN),
                          "not a text file of image paths")


def test_label_fraction_sizes_are_exact_per_class(gray_npz, tiny_folder, tmp_path):
    images = load_split(gray_npz, "train", True, options())  # 10 images in each of 3 classes
    for fraction, per_class in ((0.25, 3), (0.1, 1), (0.01, 1), (0.5, 5), (1.0, 10)):
        subset = select_subset(images, seed=2, label_fraction=fraction)
        assert np.bincount(subset.labels).tolist() == [per_class] * 3, fraction
    assert select_subset(images, seed=2, label_fraction=0.5).paths == \
        select_subset(images, seed=2, label_fraction=0.5).paths
    with pytest.raises(UserError, match="not both"):
        select_subset(images, samples_per_class=2, label_fraction=0.5)
    with pytest.raises(UserError, match=r"must be in \(0, 1\]"):
        select_subset(images, label_fraction=1.5)
