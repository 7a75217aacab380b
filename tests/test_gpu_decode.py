"""--gpu-decode (utils/gpu_decode.py) on the CPU: the batch decoder against PIL (decode_images,
the data of --gpu-aug), a corrupt JPEG replaced with a warning, the views equal to --gpu-aug's
for the same pixels, and main.py --gpu-decode through the command line."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST_PRETRAIN, assert_one_line_error, run_in_process, run_script
from utils.data import ImageList, decode_images
from utils.file_index import find_split
from utils.gpu_augment import BatchSimCLRAugmentation, DeviceTwoViews
from utils.gpu_decode import (BatchDecoder, DecodedTwoViews, EncodedImageDataset,
                              collate_encoded, to_channels)
from utils.transforms import AugmentationSettings

CPU = torch.device("cpu")
# (height, width, PIL mode, format) of the files written: JPEGs of three sizes, colour and
# gray, and a PNG (decoded by the worker)
FILES = [(28, 28, "RGB", "JPEG"), (40, 52, "RGB", "JPEG"), (28, 28, "L", "JPEG"),
         (64, 48, "L", "JPEG"), (33, 30, "RGB", "PNG"), (28, 28, "RGB", "JPEG")]


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory, real_images):
    """ImageFolder train/ (2 classes) and test/ of real images saved as JPEG (and one PNG)."""
    root = tmp_path_factory.mktemp("jpegs")
    images = real_images[0]["train"][0]
    for split, copies in (("train", 4), ("test", 1)):
        for k in range(copies * len(FILES)):
            h, w, mode, fmt = FILES[k % len(FILES)]
            gray = images[k]
            pixels = np.stack([gray, 255 - gray, gray // 2], -1) if mode == "RGB" else gray
            folder = root / split / f"class{k % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(pixels).resize((w, h), Image.BILINEAR)
            img.save(folder / f"{k:03d}.{'jpg' if fmt == 'JPEG' else 'png'}", fmt, quality=90)
    return str(root)


def decoded_batch(images, channels, size):
    dataset = EncodedImageDataset(images, channels, size)
    batch = collate_encoded([dataset[(i, 0)] for i in range(len(images))])
    return batch, BatchDecoder(images, channels, size, CPU)(batch)


@pytest.mark.parametrize("channels", [1, 3])
def test_batch_decoder_matches_pil(jpeg_folder, channels):
    """Every image as decode_images gives it (PIL decode, convert, bilinear resize): equal for
    images already 28 x 28, within 1 grey level where resized (rounding of the filters)."""
    images = find_split(jpeg_folder, "train", require_labels=False)
    batch, pixels = decoded_batch(images, channels, 28)
    assert pixels.shape == (len(images), channels, 28, 28) and pixels.dtype == torch.uint8
    reference = decode_images(images, channels, 28)
    assert sum(jpeg is None for _, jpeg, _ in batch) == 4  # the PNGs came decoded
    for k, path in enumerate(images.paths):
        difference = (pixels[k].int() - reference[k].int()).abs()
        with Image.open(path) as img:
            same_size = img.size == (28, 28)
        assert difference.max() <= (0 if same_size else 1), path
        assert difference.float().mean() < 0.2, path


def test_luma_is_pils():
    rgb = np.random.default_rng(0).integers(0, 256, (17, 19, 3), dtype=np.uint8)
    expected = np.array(Image.fromarray(rgb).convert("L"))
    luma = to_channels(torch.from_numpy(rgb).permute(2, 0, 1), 1)
    np.testing.assert_array_equal(luma[0].numpy(), expected)


def test_corrupt_jpeg_is_replaced_with_a_warning(jpeg_folder, tmp_path, capsys):
    """A file that starts like a JPEG but does not decode is named in a warning and replaced
    by another image; the other rows of the batch are decoded as without it."""
    images = find_split(jpeg_folder, "train", require_labels=False)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(200))
    paths = list(images.paths)
    paths[3] = str(bad)
    images = ImageList(paths)
    _, pixels = decoded_batch(images, 3, 28)
    assert str(bad) in capsys.readouterr().err
    reference = decode_images(images, 3, 28)  # replaces it the same way, warning again
    good = [k for k in range(len(images)) if k != 3]
    assert (pixels[good].int() - reference[good].int()).abs().max() <= 1
    assert torch.equal(pixels[3], reference[3])


def test_views_equal_gpu_augs(jpeg_folder):
    """For the same pixels, step and seed, --gpu-decode's views are --gpu-aug's, bitwise."""
    images = find_split(jpeg_folder, "train", require_labels=False)
    keep = [k for k, path in enumerate(images.paths) if Image.open(path).size == (28, 28)]
    images = images.subset(keep)
    augmentation = BatchSimCLRAugmentation(AugmentationSettings(28, 3, [0.5] * 3, [0.25] * 3,
                                                                jitter_strength=0.5))
    two_views = DeviceTwoViews(augmentation, seed=3, global_batch_size=len(images))
    dataset = EncodedImageDataset(images, 3, 28)
    batch = collate_encoded([dataset[(i, 0)] for i in range(len(images))])
    views = DecodedTwoViews(BatchDecoder(images, 3, 28, CPU), two_views)(batch, 7)
    expected = two_views(decode_images(images, 3, 28), 7)
    assert views.shape == (2 * len(images), 3, 28, 28)
    assert torch.equal(views, expected)


def test_main_with_gpu_decode(jpeg_folder, tmp_path):
    """main.py --gpu-decode trains with workers reading bytes; run.json says where the JPEGs
    were decoded; --gpu-aug with it is a one-line error."""
    out = tmp_path / "out"
    result = run_script("main.py", jpeg_folder, out, *FAST_PRETRAIN, "-nw", "1", "--epochs",
                        "1", "--gpu-decode")
    assert result.returncode == 0, result.stderr
    assert "each batch decoded there (JPEG)" in result.stdout
    run = json.loads((out / "run.json").read_text())
    assert run["augmentation"]["decode"] == "device" and run["speed"]["gpu_decode"]
    losses = np.load(out / "model" / "lossesfile.npz")
    assert np.isfinite(losses[losses.files[0]]).all()
    result = run_in_process("main.py", jpeg_folder, tmp_path / "x", "--gpu-decode", "--gpu-aug")
    assert_one_line_error(result, "--gpu-aug and --gpu-decode")
