"""main.py --fin (start from an earlier model, adapting the channel count) and --fout."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import FAST_PRETRAIN, assert_one_line_error, run_in_process, run_script
from utils.model import adapt_input_channels


def test_adapted_first_convolution_answers_like_the_original():
    """3 -> 1: a gray image through the summed filters = the replicated image through the RGB
    filters. 1 -> 3: an RGB image with equal channels through the repeated filters / 3 = the
    gray image through the gray filter."""
    g = torch.Generator().manual_seed(0)
    rgb_weight = torch.randn(8, 3, 3, 3, generator=g, dtype=torch.float64)
    gray_image = torch.rand(2, 1, 9, 9, generator=g, dtype=torch.float64)
    gray_weight = adapt_input_channels({"encoder.conv1.weight": rgb_weight}, 1)[
        "encoder.conv1.weight"]
    np.testing.assert_allclose(F.conv2d(gray_image, gray_weight),
                               F.conv2d(gray_image.repeat(1, 3, 1, 1), rgb_weight), atol=1e-12)
    back = adapt_input_channels({"encoder.conv1.weight": gray_weight, "other": rgb_weight}, 3)
    assert back["other"] is rgb_weight
    rgb_image = gray_image.repeat(1, 3, 1, 1)
    np.testing.assert_allclose(F.conv2d(rgb_image, back["encoder.conv1.weight"]),
                               F.conv2d(gray_image, gray_weight), atol=1e-12)


@pytest.fixture(scope="module")
def rgb_folder(tiny_folder, tmp_path_factory):
    """The tiny training images, tinted into genuine RGB."""
    root = tmp_path_factory.mktemp("rgb")
    train = os.path.join(tiny_folder, "train")
    for name in sorted(os.listdir(train)):
        os.makedirs(root / "train" / name)
        for f in sorted(os.listdir(os.path.join(train, name))):
            x = np.asarray(Image.open(os.path.join(train, name, f)))
            Image.fromarray(np.stack([x, x // 2, 255 - x], -1)).save(root / "train" / name / f)
    return str(root)


def test_fin_on_rgb_data_adapts_the_gray_model_and_fout_names_the_folder(pretrained,
                                                                         rgb_folder, tmp_path):
    respath, _ = pretrained
    fin = os.path.join(respath, "model", "model.pth")
    result = run_script("main.py", rgb_folder, tmp_path, "--fout", "further", "--fin", fin,
                        "--epochs", "1", *FAST_PRETRAIN, "--lr", "0")
    assert result.returncode == 0, result.stderr
    assert "takes 1 channel(s), this data has 3" in result.stdout
    out = tmp_path / "further"
    ckpt = torch.load(out / "checkpoint.pth")
    assert ckpt["model_meta"]["in_channels"] == 3 and ckpt["args"]["fin"] == fin
    start = torch.load(fin)
    expected = adapt_input_channels(start, 3)
    params = {n for n, t in ckpt["model"].items() if "running" not in n and "num_batches" not in n}
    for name in params:  # lr 0: the parameters are exactly the adapted --fin weights
        torch.testing.assert_close(ckpt["model"][name], expected[name], rtol=0, atol=0)
    assert ckpt["optimizer"]["state"]  # a fresh optimizer took (zero-sized) steps
    assert not os.path.exists(tmp_path / "model")  # nothing outside RESPATH/NAME


def test_fin_must_exist(rgb_folder, tmp_path):
    result = run_in_process("main.py", rgb_folder, tmp_path, "--fin", tmp_path / "none.pth",
                            *FAST_PRETRAIN)
    assert_one_line_error(result, "--fin", "does not exist")
