"""Images as microscopes and scanners write them (issue 28): 16-bit files with 12-bit values
(TIFF and PNG) keep their levels, float32 TIFFs are read with their own range, constant data
stops with one error line; every script scales images as pretraining did. Folders of two
classes, 12 images each, 36-40 px, are made here; references are computed from the files with
numpy."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from conftest import FAST_PRETRAIN, assert_one_line_error, run_in_process, run_script
from utils.checkpoint import load_pretrained
from utils.data import (ImageDataset, ImageList, TwoViewDataset, dataset_statistics,
                        decode_images, scan_high_depth)
from utils.gpu_decode import pil_pixels
from utils.model import build_model_from_meta
from utils.segmentation import JointTransform, SegmentationDataset
from utils.transforms import (AugmentationSettings, EvalTransform, RandomLumaEqualize,
                              SimCLRAugmentation, TwoViews)

TWELVE_BIT = 4095


def unit_pattern(label, index, size, rng):
    """A float64 (size, size) image in [0, 1]: stripes across (class 0) or down (class 1) with
    noise, so a 12-bit version has about 1,000-1,300 distinct values."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    stripes = 0.5 + 0.35 * np.sin(2 * np.pi * (3 + index % 3) * (xx if label == 0 else yy))
    return np.clip(stripes + rng.normal(0, 0.08, stripes.shape), 0, 1)


def write_folder(root, kind):
    """DATAPATH root/train/c0, c1 with 12 images each of `kind`: 'tif12' / 'png12' (uint16,
    values 0-4095), 'float' (float32 TIFF, values in [0.05, 0.95]), 'nan' (float32 TIFF, all
    NaN), 'const8' (8-bit PNG, every pixel 7), 'const16' (16-bit PNG, every pixel 1000),
    'constf' (float32 TIFF, every pixel 0.25). Returns (root, sorted file paths)."""
    rng = np.random.default_rng(0)
    paths = []
    for label in (0, 1):
        folder = os.path.join(root, "train", f"c{label}")
        os.makedirs(folder, exist_ok=True)
        for index in range(12):
            size = 36 + index % 5
            unit = unit_pattern(label, index, size, rng)
            ext = "png" if kind in ("png12", "const8", "const16") else "tif"
            pixels = {"tif12": lambda: np.rint(unit * TWELVE_BIT).astype(np.uint16),
                      "png12": lambda: np.rint(unit * TWELVE_BIT).astype(np.uint16),
                      "float": lambda: (0.05 + 0.9 * unit).astype(np.float32),
                      "nan": lambda: np.full((size, size), np.nan, np.float32),
                      "const8": lambda: np.full((size, size), 7, np.uint8),
                      "const16": lambda: np.full((size, size), 1000, np.uint16),
                      "constf": lambda: np.full((size, size), 0.25, np.float32)}[kind]()
            path = os.path.join(folder, f"{index:02d}.{ext}")
            Image.fromarray(pixels).save(path)
            paths.append(path)
    return str(root), sorted(paths)


def file_values(path):
    """The values stored in an image file, float64 (H, W), read by PIL without conversion."""
    with Image.open(path) as img:
        return np.asarray(img, dtype=np.float64)


def reference_mean_std(paths, low, high):
    """Mean and std over every pixel of the files scaled as (v - low) / (high - low)."""
    values = np.concatenate([((file_values(p) - low) / (high - low)).ravel() for p in paths])
    return values.mean(), values.std()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{kind: (DATAPATH, file paths)} for the kinds of write_folder."""
    kinds = ("tif12", "png12", "float", "nan", "const8", "const16", "constf")
    return {kind: write_folder(tmp_path_factory.mktemp(kind), kind) for kind in kinds}


@pytest.fixture(scope="module")
def twelve_bit_run(folders, tmp_path_factory):
    """main.py for one epoch on the 12-bit TIFF folder: (RESPATH, CompletedProcess)."""
    respath = str(tmp_path_factory.mktemp("run12"))
    result = run_script("main.py", folders["tif12"][0], respath, "--epochs", "1",
                        *FAST_PRETRAIN)
    assert result.returncode == 0, result.stdout + result.stderr
    return respath, result


def test_the_test_files_hold_what_the_issue_describes(folders):
    """12-bit files span 0-4095 with about 1,000+ distinct values each (the issue's image
    had 1,323); /257 would leave 16 grey levels (0-15)."""
    for kind in ("tif12", "png12"):
        values = [file_values(p) for p in folders[kind][1]]
        assert min(v.min() for v in values) == 0 and max(v.max() for v in values) == 4095
        assert min(len(np.unique(v)) for v in values) > 800
        assert max(len(np.unique(np.floor(v / 257))) for v in values) <= 16
    np.testing.assert_array_equal(file_values(folders["tif12"][1][3]),
                                  file_values(folders["png12"][1][3]))


def test_twelve_bit_pretraining_scales_by_4095_and_keeps_the_levels(folders, twelve_bit_run):
    respath, result = twelve_bit_run
    paths = folders["tif12"][1]
    lines = [line for line in result.stdout.splitlines()
             if "16-bit images with values up to 4095: 12-bit, scaled by 4095" in line]
    assert len(lines) == 1, result.stdout
    with open(os.path.join(respath, "data_stats.json")) as f:
        stats = json.load(f)["stats"]
    assert stats["intensity_range"] == [0, TWELVE_BIT]
    assert stats["intensity"]["bits"] == 12 and stats["intensity"]["stored"] == ["16-bit"]
    mean, std = reference_mean_std(paths, 0, TWELVE_BIT)
    assert stats["mean"][0] == pytest.approx(mean, abs=1e-6)  # float32 pixels
    assert stats["std"][0] == pytest.approx(std, abs=1e-6)
    assert 0.2 < std  # the issue's run: mean 0.029, std 0.018
    with open(os.path.join(respath, "run.json")) as f:
        assert json.load(f)["model_meta"]["intensity_range"] == [0, TWELVE_BIT]
    _, meta = load_pretrained(os.path.join(respath, "model", "model.pth"))
    assert meta["intensity_range"] == [0, TWELVE_BIT]

    # the tensors the model gets: the evaluation transform at the file's own size (no
    # resampling) gives back every level, v / 4095 exactly
    images = ImageList(paths).with_intensity_range(meta["intensity_range"])
    for index in (0, 7, 18):
        values = file_values(paths[index])
        size = values.shape[0]
        x, _ = ImageDataset(images, 1, EvalTransform(size, [0.0], [1.0]))[index]
        np.testing.assert_allclose(x[0].numpy(), values / TWELVE_BIT, rtol=0, atol=1e-6)
        assert len(np.unique(x.numpy())) == len(np.unique(values)) > 256
    # an augmented view (crop, flip, jitter, blur as float tensors) keeps far more than 8 bits
    augmentation = SimCLRAugmentation(AugmentationSettings(40, 1, [0.5], [0.25], blur=True))
    view1, view2 = TwoViewDataset(images, 1, TwoViews(augmentation), seed=0)[(18, 0)]
    assert min(len(np.unique(view1.numpy())), len(np.unique(view2.numpy()))) > 256
    # a model without a range (pretrained before it existed) still sees what it saw: /257
    legacy, _ = ImageDataset(ImageList(paths), 1, EvalTransform(40, [0.0], [1.0]))[18]
    assert len(np.unique(legacy.numpy())) <= 16


def test_sixteen_bit_png_gives_the_same_statistics_as_tiff(folders, tmp_path):
    """The 16-bit PNG folder holds the TIFF folder's values: the same range, mean and std."""
    png = dataset_statistics(ImageList(folders["png12"][1]), tmp_path / "png.json", 0)
    tif = dataset_statistics(ImageList(folders["tif12"][1]), tmp_path / "tif.json", 0)
    assert png["intensity_range"] == tif["intensity_range"] == [0, TWELVE_BIT]
    assert png["mean"] == pytest.approx(tif["mean"], abs=1e-12)
    assert png["std"] == pytest.approx(tif["std"], abs=1e-12)


def test_resume_with_another_intensity_range_is_refused(folders, twelve_bit_run):
    respath, _ = twelve_bit_run
    result = run_in_process("main.py", folders["tif12"][0], respath, "--epochs", "2",
                            *FAST_PRETRAIN, "--intensity-range", "0", "65535")
    assert_one_line_error(result, "--intensity-range", "--fresh")


def test_embed_scales_images_as_pretraining_did(folders, twelve_bit_run, tmp_path):
    """embed.py's h equals h of the files scaled by hand, v / 4095 (not by 257)."""
    respath, _ = twelve_bit_run
    model_path = os.path.join(respath, "model", "model.pth")
    result = run_script("embed.py", folders["tif12"][0], model_path, tmp_path / "emb", "-nw",
                        "0")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = np.load(tmp_path / "emb.npy")
    with open(tmp_path / "emb.csv") as f:
        listed = [line.split(",")[2] for line in f.read().splitlines()[1:]]
    state, meta = load_pretrained(model_path)
    model = build_model_from_meta(meta)
    model.load_state_dict(state)
    transform = EvalTransform(meta["image_size"], meta["mean"], meta["std"])
    picks = [0, 11, 23]
    by_hand = torch.stack([transform(Image.fromarray(
        (file_values(listed[i]) / TWELVE_BIT).astype(np.float32))) for i in picks])
    with torch.no_grad():
        expected = model.eval().encoder(by_hand).numpy()
    np.testing.assert_allclose(rows[picks], expected, rtol=1e-4, atol=1e-4)


def test_finetune_baseline_finds_the_range_and_keeps_it(folders, tmp_path):
    """finetune.py --baseline without MODELPATH computes the statistics as main.py does."""
    result = run_script("finetune.py", folders["tif12"][0], tmp_path / "ft", "--baseline",
                        "--arch", "resnet18", "--image-size", "16", "--epochs", "1", "-bs", "8",
                        "-nw", "0", "--test-fraction", "0.25")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "16-bit images with values up to 4095: 12-bit, scaled by 4095" in result.stdout
    ckpt = torch.load(tmp_path / "ft" / "checkpoint.pth", weights_only=True)
    assert ckpt["model_meta"]["intensity_range"] == [0, TWELVE_BIT]
    # the training images are a subset (test and validation held out): their mean is near the
    # folder's, 0.50 (scaled by 257 it would be 0.03)
    assert ckpt["model_meta"]["mean"][0] == pytest.approx(
        reference_mean_std(folders["tif12"][1], 0, TWELVE_BIT)[0], abs=0.05)


def test_float_tiffs_train_on_their_own_range(folders, tmp_path):
    datapath, paths = folders["float"]
    result = run_script("main.py", datapath, tmp_path / "run", "--epochs", "1", *FAST_PRETRAIN)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "32-bit float images with values from 0.05 to 0.95" in result.stdout
    with open(tmp_path / "run" / "data_stats.json") as f:
        stats = json.load(f)["stats"]
    low = min(file_values(p).min() for p in paths)
    high = max(file_values(p).max() for p in paths)
    assert stats["intensity_range"] == pytest.approx([low, high], abs=0)
    mean, std = reference_mean_std(paths, low, high)
    assert stats["mean"][0] == pytest.approx(mean, abs=1e-6)
    assert stats["std"][0] == pytest.approx(std, abs=1e-6)
    assert std > 0.2  # the issue's run: every image all zeros, std at its floor 0.001


def test_float_range_from_the_flag_in_the_preview(folders, tmp_path):
    """data_preview.py shows the images scaled by --intensity-range and says so."""
    out = tmp_path / "preview.png"
    result = run_in_process("data_preview.py", folders["float"][0], "--n", "2", "--views", "2",
                            "--intensity-range", "0", "1", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "32-bit float images with values from 0.05 to 0.95: scaled from --intensity-range " \
           "[0, 1] to [0, 1]" in result.stdout
    assert os.path.getsize(out) > 0
    result = run_in_process("data_preview.py", folders["png12"][0], "--n", "2", "--views", "2",
                            "--out", out)
    assert result.returncode == 0, result.stderr
    assert "12-bit, scaled by 4095 to [0, 1]" in result.stdout


@pytest.mark.parametrize("kind, fragments", [
    ("const8", ("constant", "std at its floor", "--intensity-range")),
    ("const16", ("constant", "std at its floor", "--intensity-range")),
    ("constf", ("all hold one value, 0.25", "--intensity-range LOW HIGH")),
    ("nan", ("no finite values", "--intensity-range LOW HIGH"))])
def test_data_without_a_usable_range_or_contrast_stops(folders, tmp_path, kind, fragments):
    datapath, paths = folders[kind]
    result = run_in_process("main.py", datapath, tmp_path / "run", "--epochs", "1",
                            *FAST_PRETRAIN)
    line = assert_one_line_error(result, *fragments)
    assert any(path in line for path in paths), line
    assert not os.path.exists(tmp_path / "run" / "model")


@pytest.mark.parametrize("argv, fragments", [
    (["--intensity-range", "10", "10"], ("LOW < HIGH",)),
    (["--intensity-range", "0", "inf"], ("finite",)),
])
def test_bad_intensity_range_values(folders, tmp_path, argv, fragments):
    result = run_in_process("main.py", folders["tif12"][0], tmp_path / "run", *argv)
    assert_one_line_error(result, "--intensity-range", *fragments)


def test_intensity_range_on_eight_bit_data_is_refused(tiny_folder, tmp_path):
    result = run_in_process("main.py", tiny_folder, tmp_path / "run", *FAST_PRETRAIN,
                            "--intensity-range", "0", "4095")
    assert_one_line_error(result, "--intensity-range", "8-bit", "drop --intensity-range")


def test_intensity_range_with_a_model_is_refused(folders, twelve_bit_run, tmp_path):
    respath, _ = twelve_bit_run
    result = run_in_process("finetune.py", folders["tif12"][0],
                            os.path.join(respath, "model", "model.pth"), tmp_path / "ft",
                            "--intensity-range", "0", "4095")
    assert_one_line_error(result, "--intensity-range", "MODELPATH")


def test_gpu_aug_pixels_are_8_bits_of_the_data_range(folders):
    """--gpu-aug (decode_images) and --gpu-decode (pil_pixels) hold round(255 v / 4095)."""
    paths = [p for p in folders["tif12"][1] if file_values(p).shape == (40, 40)]
    images = ImageList(paths).with_intensity_range([0, TWELVE_BIT])
    expected = np.stack([np.rint(file_values(p) / TWELVE_BIT * 255) for p in paths])
    decoded = decode_images(images, 1, 40)
    assert decoded.dtype == torch.uint8
    np.testing.assert_array_equal(decoded[:, 0].numpy(), expected)
    np.testing.assert_array_equal(pil_pixels(images, 1, 1, 40)[0].numpy(), expected[1])
    assert len(np.unique(decoded[0].numpy())) > 16 * 8  # 8 bits of the range, not 4


def test_segmentation_dataset_scales_by_the_range(folders, tmp_path):
    """segment.py's images: v / 4095 at their own size (the eval transform's Resize)."""
    class Pairs:
        images = folders["tif12"][1][:2]
        masks = []
    mask = tmp_path / "mask.png"
    Image.fromarray(np.zeros((36, 36), np.uint8)).save(mask)
    Pairs.masks = [str(mask)] * 2
    dataset = SegmentationDataset(Pairs, 1, JointTransform(36, [0.0], [1.0], False),
                                  intensity_range=(0, TWELVE_BIT))
    image, _ = dataset[0]
    np.testing.assert_allclose(image[0].numpy(), file_values(Pairs.images[0]) / TWELVE_BIT,
                               atol=1e-6)


def test_float_augmentation_draws_as_the_8_bit_one_and_stays_close():
    """An 'F' image goes through the same steps as tensors: the same random draws (the RNG
    ends in the same state) and, for an image on 256 levels, nearly the same view as its 'L'
    copy (resampling differs a little between PIL and tensors, and random sharpness
    amplifies that: novel is compared without rotation)."""
    rng = np.random.default_rng(0)
    unit = np.rint(unit_pattern(0, 1, 40, rng) * 255) / 255
    float_img = Image.fromarray(unit.astype(np.float32))
    byte_img = Image.fromarray(np.rint(unit * 255).astype(np.uint8))
    for preset, rotate in (("simclr", 10), ("novel", 0)):  # novel's sharpness (up to 10x)
        aug = SimCLRAugmentation(AugmentationSettings(32, 1, [0.5], [0.25], blur=True,
                                                      preset=preset, rotate=rotate))
        torch.manual_seed(3)
        from_float, after_float = aug(float_img), torch.rand(1)
        torch.manual_seed(3)
        from_byte, after_byte = aug(byte_img), torch.rand(1)
        assert after_float == after_byte
        assert (from_float - from_byte).abs().mean() < 0.1  # in units of std 0.25


def test_luma_equalisation_of_a_float_image_is_pil_on_its_8_bits():
    rng = np.random.default_rng(2)
    unit = rng.beta(2, 5, (37, 40)).astype(np.float32)
    eight = np.rint(unit * 255).astype(np.uint8)
    equalised = RandomLumaEqualize(p=1.0)(torch.from_numpy(unit)[None])
    expected = np.asarray(ImageOps.equalize(Image.fromarray(eight))) / 255.0
    np.testing.assert_allclose(equalised[0].numpy(), expected, atol=1e-6)


def test_scan_finds_the_largest_value_and_skips_eight_bit_files(folders, tiny_folder):
    found = scan_high_depth(ImageList(folders["tif12"][1]))
    assert (found["files"], found["min"], found["max"], found["float"]) == (24, 0, 4095, False)
    eight_bit = [os.path.join(root, name) for root, _, names in
                 os.walk(os.path.join(tiny_folder, "train")) for name in names][:5]
    assert scan_high_depth(ImageList(eight_bit))["files"] == 0
