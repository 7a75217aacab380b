"""Augmentation presets (simclr, and natural, novel, simple, greyscale as j-freddy published
them) and the extras (noise, rotate, cutout): the documented step sequences written out by hand,
simclr against the pre-existing pipeline, the luma equalisation and random sharpness against
their definitions, seeding from torch's RNG only, the measured effect of noise/rotation/cutout, pickling,
the command-line flags, and data_preview.py end to end."""
import argparse
import json
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

from conftest import FAST_PRETRAIN, REPO, assert_one_line_error, run_in_process, run_script
from utils.errors import UserError
from utils.cli import add_augmentation_args
from utils.data import TwoViewDataset
from utils.file_index import scan_image_folder
from torchvision.transforms import functional as TF

from utils.transforms import (AUGMENTATION_PRESETS, AddGaussianNoise, AugmentationSettings,
                              RandomLumaEqualize, RandomSharpness, SimCLRAugmentation, TwoViews)

PRESETS = ("simclr", "natural", "novel", "simple", "greyscale")
MEAN = {1: [0.3], 3: [0.4, 0.5, 0.2]}
STD = {1: [0.3], 3: [0.3, 0.3, 0.2]}


def image_for(channels, gray_image, rgb_image):
    return gray_image if channels == 1 else rgb_image


def augmentation(image_size, channels, mean, std, **settings):
    """SimCLRAugmentation of AugmentationSettings(image_size, channels, mean, std, **settings)."""
    return SimCLRAugmentation(AugmentationSettings(image_size, channels, mean, std, **settings))


def make(preset, channels, size=32, s=0.5, blur=True, min_scale=0.2, **extras):
    return augmentation(size, channels, MEAN[channels], STD[channels], jitter_strength=s,
                        blur=blur, min_scale=min_scale, preset=preset, **extras)


def step_summary(t):
    """(type name, key parameters read straight from the torchvision object)."""
    name = type(t).__name__
    if isinstance(t, T.RandomResizedCrop):
        return name, tuple(t.size), tuple(t.scale)
    if isinstance(t, (T.RandomHorizontalFlip, T.RandomGrayscale, T.RandomEqualize)):
        return name, t.p
    if isinstance(t, T.RandomApply):
        return (name, t.p) + tuple(step_summary(inner) for inner in t.transforms)
    if isinstance(t, T.ColorJitter):
        return (name,) + tuple(None if v is None else tuple(round(x, 6) for x in v)
                               for v in (t.brightness, t.contrast, t.saturation, t.hue))
    if isinstance(t, T.GaussianBlur):
        return name, tuple(t.kernel_size), tuple(t.sigma)
    if isinstance(t, T.RandomAdjustSharpness):
        return name, t.sharpness_factor, t.p
    if isinstance(t, T.RandomRotation):
        return name, tuple(t.degrees), t.interpolation, t.fill
    if isinstance(t, AddGaussianNoise):
        return name, t.sigma
    if isinstance(t, RandomLumaEqualize):
        return name, t.p
    if isinstance(t, RandomSharpness):
        return name, t.low, t.high
    if isinstance(t, T.Normalize):
        return name, tuple(t.mean), tuple(t.std)
    if isinstance(t, T.RandomErasing):
        return name, t.p, tuple(t.scale), tuple(t.ratio), t.value
    return (name,)


def summary(aug):
    return [step_summary(t) for t in aug.transform.transforms]


# The documented sequences for S=32, s=0.5, min_scale=0.2, blur on, written out by hand.
# simclr: jitter 0.8s = 0.4 (factors 0.6-1.4), hue 0.2s = 0.1.
CROP = ("RandomResizedCrop", (32, 32), (0.2, 1.0))
FLIP = ("RandomHorizontalFlip", 0.5)
BLUR = ("RandomApply", 0.5, ("GaussianBlur", (3, 3), (0.1, 2.0)))
GRAY = ("RandomGrayscale", 0.2)
TAIL = {c: [("ToTensor",), ("Normalize", tuple(MEAN[c]), tuple(STD[c]))] for c in (1, 3)}
JITTER_1 = ("RandomApply", 0.8, ("ColorJitter", (0.6, 1.4), (0.6, 1.4), None, None))
JITTER_3 = ("RandomApply", 0.8, ("ColorJitter", (0.6, 1.4), (0.6, 1.4), (0.6, 1.4),
                                 (-0.1, 0.1)))
# j-freddy/simclr-medical-imaging, pretrain/simclr/aug_sequences.py (newest version), at 28 px:
# ColorJitter(0.5, 0.5, 0.5, 0.1) or (0.2, 0.2, 0.2, 0.04) with p 0.8, GaussianBlur(9) always
# (here 32 px: round(9 * 32 / 28) = 10, made odd: 11), equalisation p 0.5, sharpness U(1, 10).
STRONG = ("RandomApply", 0.8, ("ColorJitter", (0.5, 1.5), (0.5, 1.5), (0.5, 1.5), (-0.1, 0.1)))
WEAK = ("RandomApply", 0.8, ("ColorJitter", (0.8, 1.2), (0.8, 1.2), (0.8, 1.2), (-0.04, 0.04)))
BLUR9 = ("GaussianBlur", (11, 11), (0.1, 2.0))
CONTRAST = [("RandomLumaEqualize", 0.5), ("RandomSharpness", 1.0, 10.0)]
PUBLISHED = {"natural": [FLIP, CROP, STRONG, GRAY, BLUR9],
             "simple": [CROP, STRONG, BLUR9],
             "novel": [FLIP, CROP, WEAK, GRAY, BLUR9] + CONTRAST,
             "greyscale": [FLIP, CROP, BLUR9] + CONTRAST}
EXPECTED = {("simclr", 1): [CROP, FLIP, JITTER_1, BLUR],
            ("simclr", 3): [CROP, FLIP, JITTER_3, GRAY, BLUR],
            **{(name, c): steps for name, steps in PUBLISHED.items() for c in (1, 3)}}


def test_preset_names():
    """The presets, in the documented order, and the --aug choices are the same names."""
    assert AUGMENTATION_PRESETS == PRESETS
    parser = argparse.ArgumentParser()
    add_augmentation_args(parser)
    choices = next(a.choices for a in parser._actions if a.dest == "aug")
    assert tuple(choices) == PRESETS


@pytest.mark.parametrize("preset,channels", sorted(EXPECTED))
def test_preset_sequence(preset, channels):
    """Each preset's steps (types and key parameters), for 1 and 3 channels, as documented."""
    assert summary(make(preset, channels)) == EXPECTED[preset, channels] + TAIL[channels]


@pytest.mark.parametrize("preset", PRESETS)
def test_without_blur_or_jitter(preset):
    """In simclr blur=False drops the blur step and s=0 the jitter step, nothing else; the
    published presets keep their own blur and jitter."""
    full = summary(make(preset, 3))
    if preset == "simclr":
        assert summary(make(preset, 3, blur=False)) == [s for s in full if s != BLUR]
        assert summary(make(preset, 3, s=0)) == [s for s in full if s != JITTER_3]
    else:
        assert summary(make(preset, 3, blur=False)) == summary(make(preset, 3, s=0)) == full


@pytest.mark.parametrize("size, kernel", [(16, 5), (28, 9), (64, 21), (224, 73)])
def test_published_blur_kernel_scales_with_the_image(size, kernel):
    blur = [t for t in make("natural", 3, size=size).transform.transforms
            if isinstance(t, T.GaussianBlur)]
    assert [tuple(t.kernel_size) for t in blur] == [(kernel, kernel)]


def pil_equalize_reference(channel):
    """Histogram equalisation of one 8-bit channel (H, W) as PIL defines it, in numpy: the
    step is (pixels - count of the highest level) // 255, lut[i] = (step // 2 + pixels below
    level i) // step."""
    h = np.bincount(channel.ravel(), minlength=256)
    step = (h.sum() - h[np.nonzero(h)[0][-1]]) // 255
    if step == 0:
        return channel
    lut = np.minimum((step // 2 + np.concatenate([[0], np.cumsum(h)[:-1]])) // step, 255)
    return lut[channel].astype(np.uint8)


def test_luma_equalisation_equalises_y_and_keeps_the_chroma(rgb_image, gray_image):
    """p=1 on RGB: the image is PIL's YCbCr (ITU-R 601 luma) with Y equalised by the numpy
    reference and Cb, Cr as they were, back in RGB; a 1-channel image is equalised directly;
    p=0 never changes the image."""
    low_contrast = rgb_image.point(lambda v: 100 + v // 4)
    y_in, cb_in, cr_in = low_contrast.convert("YCbCr").split()
    rgb = np.asarray(low_contrast, float)
    assert np.abs(np.asarray(y_in) - rgb @ [0.299, 0.587, 0.114]).max() <= 1
    equalised = Image.fromarray(pil_equalize_reference(np.asarray(y_in)))
    expected = Image.merge("YCbCr", (equalised, cb_in, cr_in)).convert("RGB")
    out = RandomLumaEqualize(1.0)(low_contrast)
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(expected))
    y_out = np.asarray(out.convert("L"), float)
    assert y_out.std() > 2 * np.asarray(y_in, float).std()
    gray = np.asarray(gray_image)
    assert np.array_equal(np.asarray(RandomLumaEqualize(1.0)(gray_image)),
                          pil_equalize_reference(gray))
    assert RandomLumaEqualize(0.0)(rgb_image) is rgb_image


def test_random_sharpness_draws_its_factor_uniformly_from_torch(rgb_image):
    """The factor is 1 + 9 u with u = torch.rand(1) (so the torch seed fixes it), applied by
    torchvision's adjust_sharpness; over 2000 draws u is uniform (KS distance < 0.04)."""
    step = RandomSharpness(1.0, 10.0)
    torch.manual_seed(5)
    u = torch.rand(1).item()
    torch.manual_seed(5)
    assert np.array_equal(np.asarray(step(rgb_image)),
                          np.asarray(TF.adjust_sharpness(rgb_image, 1 + 9 * u)))
    torch.manual_seed(0)
    draws = np.sort(torch.rand(2000).numpy())
    assert np.abs(draws - (np.arange(1, 2001) / 2000)).max() < 0.04


def previous_pipeline(image_size, channels, mean, std, s, blur, min_scale):
    """The augmentation as utils/transforms.py built it before presets existed (copied)."""
    steps = [T.RandomResizedCrop(image_size, scale=(min_scale, 1.0), antialias=True),
             T.RandomHorizontalFlip()]
    if s > 0:
        if channels == 1:
            jitter = T.ColorJitter(brightness=0.8 * s, contrast=0.8 * s)
        else:
            jitter = T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, min(0.5, 0.2 * s))
        steps.append(T.RandomApply([jitter], p=0.8))
    if channels == 3:
        steps.append(T.RandomGrayscale(p=0.2))
    if blur:
        steps.append(T.RandomApply([T.GaussianBlur(max(3, int(0.1 * image_size) // 2 * 2 + 1),
                                                   sigma=(0.1, 2.0))], p=0.5))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


@pytest.mark.parametrize("channels", (1, 3))
@pytest.mark.parametrize("s,blur,min_scale", [(1.0, False, 0.08), (0.5, True, 0.3),
                                              (3.0, True, 0.08), (0.0, False, 0.5)])
def test_simclr_is_the_previous_pipeline(channels, s, blur, min_scale, gray_image, rgb_image):
    """preset simclr (and settings without a preset, which default to it) is the pre-existing
    pipeline step for step (same reprs) and gives the same tensors under the same seed."""
    old = previous_pipeline(24, channels, MEAN[channels], STD[channels], s, blur, min_scale)
    default = augmentation(24, channels, MEAN[channels], STD[channels], jitter_strength=s,
                           blur=blur, min_scale=min_scale)
    named = make("simclr", channels, size=24, s=s, blur=blur, min_scale=min_scale)
    for aug in (default, named):
        assert [repr(t) for t in aug.transform.transforms] == [repr(t) for t in old.transforms]
    img = image_for(channels, gray_image, rgb_image)
    for seed in range(5):
        outputs = []
        for t in (old, default, named):
            torch.manual_seed(seed)
            outputs.append(t(img))
        assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_constructor_defaults():
    """The defaults of AugmentationSettings: s=1, no blur, min_scale 0.08, simclr, no
    extras."""
    aug = augmentation(16, 3, MEAN[3], STD[3])
    assert (aug.preset, aug.noise, aug.rotate, aug.cutout) == ("simclr", 0.0, 0.0, 0.0)
    assert summary(aug) == [("RandomResizedCrop", (16, 16), (0.08, 1.0)), FLIP,
                            ("RandomApply", 0.8, ("ColorJitter", (0.2, 1.8), (0.2, 1.8),
                                                  (0.2, 1.8), (-0.2, 0.2))),
                            GRAY] + TAIL[3]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("channels", (1, 3))
def test_extras_add_exactly_their_steps(preset, channels):
    """rotate adds RandomRotation(+-DEG) after the geometric steps, noise AddGaussianNoise
    between ToTensor and Normalize, cutout RandomErasing(p) at the end; nothing else moves."""
    base = summary(make(preset, channels))
    geometric_end = 1 if preset == "simple" else 2  # after the crop (and the flip)
    rotation = ("RandomRotation", (-12.5, 12.5), T.InterpolationMode.BILINEAR, 0)
    noise = ("AddGaussianNoise", 0.07)
    erasing = ("RandomErasing", 0.4, (0.02, 0.33), (0.3, 3.3), 0)
    assert summary(make(preset, channels, rotate=12.5)) == \
        base[:geometric_end] + [rotation] + base[geometric_end:]
    assert summary(make(preset, channels, noise=0.07)) == base[:-1] + [noise] + base[-1:]
    assert summary(make(preset, channels, cutout=0.4)) == base + [erasing]
    all_three = base[:geometric_end] + [rotation] + base[geometric_end:-1] + [noise] + \
        base[-1:] + [erasing]
    assert summary(make(preset, channels, rotate=12.5, noise=0.07, cutout=0.4)) == all_three


def test_unknown_preset_and_bad_extras():
    """An unknown preset is a ValueError listing the four names; so are negative extras. The
    settings check themselves, before any augmentation is built from them."""
    with pytest.raises(ValueError) as err:
        make("medical", 1)
    for name in PRESETS:
        assert name in str(err.value)
    for bad in ({"noise": -0.1}, {"rotate": -5}, {"cutout": 1.5}, {"cutout": -0.1}):
        with pytest.raises(ValueError):
            make("natural", 1, **bad)
        with pytest.raises(ValueError, match="noise and rotate must be >= 0"):
            AugmentationSettings(16, 1, MEAN[1], STD[1], **bad)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("channels", (1, 3))
def test_same_torch_seed_same_views_other_seed_differs(preset, channels, gray_image,
                                                       rgb_image):
    """With every extra on, the torch seed alone fixes the view: python's `random` and numpy's
    global RNG neither change it nor are consumed by it."""
    aug = make(preset, channels, noise=0.05, rotate=20, cutout=0.5)
    img = image_for(channels, gray_image, rgb_image)
    views = []
    for py_seed in (1, 2):
        random.seed(py_seed)
        np.random.seed(py_seed)
        py_state, np_state = random.getstate(), np.random.get_state()
        torch.manual_seed(11)
        views.append(aug(img))
        assert random.getstate() == py_state
        assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state))
    assert torch.equal(views[0], views[1])
    torch.manual_seed(12)
    assert not torch.equal(views[0], aug(img))


@pytest.mark.parametrize("value,sigma", [(128, 0.05), (128, 0.2), (10, 0.1)])
def test_noise_changes_pixels_by_sigma(value, sigma):
    """On a constant image (crop and flip cannot change it, identity Normalize) the difference
    to the clean value has the std and mean of clamp(v + N(0, sigma^2), 0, 1) - v, computed
    independently with numpy (the clamp matters near black)."""
    aug = augmentation(64, 1, [0.0], [1.0], jitter_strength=0, blur=False, min_scale=1.0,
                       preset="simclr", noise=sigma)
    clean = value / 255
    torch.manual_seed(0)
    diff = torch.stack([aug(Image.new("L", (64, 64), value)) for _ in range(8)]) - clean
    noise = np.random.default_rng(0).standard_normal(2_000_000) * sigma
    expected = np.clip(clean + noise, 0, 1) - clean
    assert diff.std().item() == pytest.approx(expected.std(), rel=0.03)
    assert diff.mean().item() == pytest.approx(expected.mean(), abs=0.1 * sigma)
    assert diff.min().item() >= -clean - 1e-6 and diff.max().item() <= 1 - clean + 1e-6


def test_noise_is_independent_per_channel_and_pixel():
    """On RGB the noise of the three channels is uncorrelated, and so is that of neighbours."""
    aug = augmentation(64, 3, [0.0] * 3, [1.0] * 3, jitter_strength=0, blur=False,
                       min_scale=1.0, preset="simclr", noise=0.1)
    torch.manual_seed(1)
    d = aug(Image.new("RGB", (64, 64), (128, 128, 128))) - 128 / 255
    assert abs(np.corrcoef(d[0].flatten(), d[1].flatten())[0, 1]) < 0.1
    assert abs(np.corrcoef(d[0, :, :-1].flatten(), d[0, :, 1:].flatten())[0, 1]) < 0.1


def _white_views(rotate, n=20):
    """n views of a white 32x32 image with only crop (whole image), flip and rotation."""
    aug = augmentation(32, 1, [0.0], [1.0], jitter_strength=0, blur=False, min_scale=1.0,
                       preset="simclr", rotate=rotate)
    views = []
    for seed in range(n):
        torch.manual_seed(seed)
        views.append(aug(Image.new("L", (32, 32), 255))[0])
    return torch.stack(views)


def test_rotate_turns_the_image():
    """A rotated white square gets black (fill 0) corners while its centre stays white; without
    --rotate it stays white everywhere."""
    plain = _white_views(0)
    assert torch.all(plain == 1.0)
    rotated = _white_views(45)
    corners = rotated[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners.mean(1) < 0.5).sum() >= 15  # |angle| of a few degrees blackens corners
    assert torch.all(rotated[:, 12:20, 12:20] > 0.99)
    # Never more than 45 degrees: the inscribed disc (radius 16) stays white in every view
    # except for the bilinear edge.
    yy, xx = torch.meshgrid(torch.arange(32) - 15.5, torch.arange(32) - 15.5, indexing="ij")
    assert torch.all(rotated[:, (yy ** 2 + xx ** 2) < 14 ** 2] > 0.99)


def test_cutout_p1_erases_one_rectangle(gray_image):
    """cutout=1 sets one filled axis-aligned rectangle of 2-33 % of the area to exactly 0 (the
    mean after Normalize) in every view; without cutout no pixel is exactly 0."""
    mean, std = [0.123456], [0.3]
    for cutout, seeds in ((0.0, range(3)), (1.0, range(10))):
        aug = augmentation(28, 1, mean, std, jitter_strength=0, blur=False, preset="simclr",
                           cutout=cutout)
        for seed in seeds:
            torch.manual_seed(seed)
            zero = (aug(gray_image)[0] == 0).numpy()
            if cutout == 0:
                assert not zero.any()
                continue
            rows, cols = np.flatnonzero(zero.any(1)), np.flatnonzero(zero.any(0))
            box = zero[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            assert box.all() and box.size == zero.sum()
            assert 0.02 * 28 * 28 - 2 <= box.size <= 0.33 * 28 * 28 + 2


def test_cutout_probability(gray_image):
    """cutout=P erases in about a fraction P of the views (binomial, 200 views)."""
    aug = augmentation(16, 1, [0.123456], [0.3], jitter_strength=0, preset="simclr",
                       cutout=0.3)
    torch.manual_seed(0)
    erased = sum(bool((aug(gray_image) == 0).any()) for _ in range(200))
    assert 40 <= erased <= 80  # mean 60, std 6.5


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("channels", (1, 3))
def test_every_augmentation_pickles(preset, channels, gray_image, rgb_image):
    """Every preset with every extra pickles (as DataLoader workers under spawn need) to an
    equivalent transform: same description, same repr, same views under the same seed."""
    aug = TwoViews(make(preset, channels, noise=0.05, rotate=10, cutout=0.5))
    copy = pickle.loads(pickle.dumps(aug))
    assert copy.transform.describe() == aug.transform.describe()
    assert repr(copy.transform) == repr(aug.transform)
    img = image_for(channels, gray_image, rgb_image)
    torch.manual_seed(3)
    a = aug(img)
    torch.manual_seed(3)
    b = copy(img)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_describe_is_plain_json_and_repr_names_the_preset():
    """describe() is JSON-ready and lists the steps with their parameters; repr names the
    preset, the extras and every step."""
    aug = make("novel", 3, noise=0.05, rotate=10, cutout=0.25)
    steps = json.loads(json.dumps(aug.describe()))
    assert [s["step"] for s in steps] == [
        "RandomHorizontalFlip", "RandomResizedCrop", "RandomRotation", "RandomApply",
        "RandomGrayscale", "GaussianBlur", "RandomLumaEqualize", "RandomSharpness", "ToTensor",
        "AddGaussianNoise", "Normalize", "RandomErasing"]
    assert steps[1]["scale"] == [0.2, 1.0] and steps[1]["size"] == [32, 32]
    assert steps[2]["degrees"] == [-10.0, 10.0]
    jitter = steps[3]["transforms"][0]
    assert jitter["step"] == "ColorJitter" and steps[3]["p"] == 0.8
    assert jitter["brightness"] == pytest.approx([0.8, 1.2])
    assert jitter["hue"] == pytest.approx([-0.04, 0.04])
    assert steps[5] == {"step": "GaussianBlur", "kernel_size": [11, 11], "sigma": [0.1, 2.0]}
    assert steps[6] == {"step": "RandomLumaEqualize", "p": 0.5}
    assert steps[7] == {"step": "RandomSharpness", "low": 1.0, "high": 10.0}
    assert steps[9] == {"step": "AddGaussianNoise", "sigma": 0.05}
    assert steps[11]["p"] == 0.25 and steps[11]["value"] == 0
    text = repr(aug)
    for fragment in ("novel", "noise=0.05", "rotate=10", "cutout=0.25", "RandomLumaEqualize",
                     "RandomSharpness", "AddGaussianNoise(sigma=0.05)", "RandomErasing"):
        assert fragment in text


def test_augmentation_flags():
    """add_augmentation_args: the defaults and parsing of the new flags; the four moved flags
    have main.py's names, dests, defaults and help; utils.cli does not import torch."""
    parser = argparse.ArgumentParser()
    add_augmentation_args(parser)
    args = parser.parse_args([])
    assert (args.aug, args.noise, args.rotate, args.cutout) == ("simclr", 0.0, 0.0, 0.0)
    assert (args.image_size, args.jitter_strength, args.blur, args.min_scale) == \
        (None, 0.5, None, 0.08)
    args = parser.parse_args(["--aug", "greyscale", "--noise", "0.1", "--rotate", "15",
                              "--cutout", "0.3", "--no-blur", "--image-size", "64"])
    assert (args.aug, args.noise, args.rotate, args.cutout, args.blur, args.image_size) == \
        ("greyscale", 0.1, 15.0, 0.3, False, 64)
    with pytest.raises(SystemExit):
        parser.parse_args(["--aug", "medical"])
    help_text = parser.format_help()
    for name in PRESETS:
        assert name in help_text

    import main
    ours = {a.dest: a for a in parser._actions}
    for action in main.get_args_parser()._actions:
        if action.dest in ("image_size", "jitter_strength", "blur", "min_scale"):
            mine = ours[action.dest]
            assert (mine.option_strings, mine.default, mine.help, mine.type) == \
                (action.option_strings, action.default, action.help, action.type)
    code = "import sys, utils.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# data_preview.py: the grid is CELL px per image cell plus a TITLE px strip (160 and 60).
CELL_PX, TITLE_PX = 160, 60
NO_DISPLAY = {"DISPLAY": "", "WAYLAND_DISPLAY": "", "MPLBACKEND": "Agg"}


def _files_below(folder):
    return sorted(os.path.join(r, f) for r, _, files in os.walk(folder) for f in files)


def test_data_preview_end_to_end(tiny_folder, tmp_path):
    """The real command line writes a PNG of n rows x (views + 1) cells, prints its path, and
    writes nothing into DATAPATH."""
    before = _files_below(tiny_folder)
    out = tmp_path / "grid.png"
    result = run_script("data_preview.py", tiny_folder, "--aug", "novel", "--n", "3",
                        "--views", "4", "--noise", "0.05", "--rotate", "10", "--cutout", "0.5",
                        "--out", out, timeout=120, env=NO_DISPLAY)
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert img.size == (5 * CELL_PX, 3 * CELL_PX + TITLE_PX)
        arr = np.asarray(img.convert("L"), dtype=float)
    assert arr[TITLE_PX:].std() > 10  # images, not a blank canvas
    assert _files_below(tiny_folder) == before


def test_data_preview_default_out_and_training_views(tiny_folder, tmp_path, monkeypatch):
    """Without --out the grid is preview_<preset>.png in the current folder. The views of image
    i are seeded as pretraining seeds it in epoch 0: views 1 and 2 are that epoch's pair."""
    import data_preview

    monkeypatch.chdir(tmp_path)
    for var in ("DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(var, raising=False)
    args = data_preview.get_args_parser().parse_args(
        [tiny_folder, "--aug", "greyscale", "--n", "1", "--views", "2"])
    assert data_preview.main(args) == 0
    with Image.open(tmp_path / "preview_greyscale.png") as img:
        assert img.size == (3 * CELL_PX, CELL_PX + TITLE_PX)

    images = scan_image_folder(os.path.join(tiny_folder, "train"), require_labels=False)
    aug = make("simple", 1, size=28, noise=0.02)
    pair = TwoViewDataset(images, 1, TwoViews(aug), seed=4)[(5, 0)]
    views = data_preview.augmented_views(aug, images.load(5, 1), 3, 4, 5)
    assert torch.equal(views[0], pair[0]) and torch.equal(views[1], pair[1])
    assert not torch.equal(views[2], views[1])


@pytest.mark.parametrize("argv,flag", [(["--n", "0"], "--n"), (["--views", "0"], "--views"),
                                       (["--noise", "-0.1"], "--noise"),
                                       (["--rotate", "-3"], "--rotate"),
                                       (["--cutout", "-0.5"], "--cutout")])
def test_data_preview_bad_flags(tiny_folder, argv, flag):
    """Each bad value is a UserError naming its flag (checked before any image is read)."""
    import data_preview

    args = data_preview.get_args_parser().parse_args([tiny_folder, *argv])
    with pytest.raises(UserError, match=flag):
        data_preview.main(args)


def test_data_preview_missing_datapath(tmp_path):
    """A DATAPATH that does not exist is a UserError naming it."""
    import data_preview

    args = data_preview.get_args_parser().parse_args([str(tmp_path / "missing")])
    with pytest.raises(UserError, match="missing does not exist"):
        data_preview.main(args)


def test_data_preview_bad_input_one_line(tiny_folder, tmp_path):
    """Through the real command line: --cutout outside [0, 1] stops with one 'error:' line
    naming the flag and the valid range, no traceback and no PNG."""
    result = run_in_process("data_preview.py", tiny_folder, "--cutout", "1.5", "--out",
                            tmp_path / "x.png", env=NO_DISPLAY)
    assert_one_line_error(result, "--cutout 1.5", "[0, 1]")
    assert not (tmp_path / "x.png").exists()


def test_pretraining_stores_the_preset_and_refuses_to_resume_with_another(tiny_folder, tmp_path):
    """main.py --aug novel --rotate 10 --cutout 0.5: run.json lists the steps, the checkpoint
    keeps the flags, and resuming with another preset is a one-line error naming --aug."""
    respath = tmp_path / "run"
    result = run_script("main.py", tiny_folder, respath, "--epochs", "1", *FAST_PRETRAIN,
                        "--aug", "novel", "--rotate", "10", "--cutout", "0.5")
    assert result.returncode == 0, result.stderr
    run = json.load(open(respath / "run.json"))
    assert run["augmentation"]["preset"] == "novel"
    steps = [s["step"] for s in run["augmentation"]["steps"]]
    assert steps[:3] == ["RandomHorizontalFlip", "RandomResizedCrop", "RandomRotation"]
    assert {"RandomLumaEqualize", "RandomSharpness", "RandomErasing"} <= set(steps)
    ckpt = torch.load(respath / "checkpoint.pth")
    assert (ckpt["args"]["aug"], ckpt["args"]["rotate"], ckpt["args"]["cutout"]) == \
        ("novel", 10.0, 0.5)
    again = run_in_process("main.py", tiny_folder, respath, "--epochs", "2", *FAST_PRETRAIN,
                           "--aug", "greyscale", "--rotate", "10", "--cutout", "0.5")
    assert_one_line_error(again, "--aug", "novel", "greyscale")


def test_checkpoints_of_the_earlier_presets_resume_as_they_were_trained(pretrained, tiny_folder,
                                                                       tmp_path):
    """A checkpoint written before the published presets (no extra["aug_presets"]): its
    "natural" was the SimCLR paper's pipeline and resumes under today's default, simclr; its
    "novel" was a variant that no preset reproduces, so resuming asks for --fresh."""
    import shutil
    for stored, command, resumes in (("natural", [], True), ("novel", ["--aug", "novel"], False)):
        copy = tmp_path / stored
        shutil.copytree(pretrained[0], copy)
        path = copy / "checkpoint.pth"
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["args"]["aug"] == "simclr" and ckpt["extra"]["aug_presets"] == 2
        ckpt["args"]["aug"] = stored
        del ckpt["extra"]["aug_presets"]
        torch.save(ckpt, path)
        result = run_script("main.py", tiny_folder, copy, "--epochs", "3", *FAST_PRETRAIN,
                            *command)
        if resumes:
            assert result.returncode == 0, result.stderr
            assert "resuming" in result.stdout and "epoch 3/3" in result.stdout
            assert torch.load(path, weights_only=True)["args"]["aug"] == "simclr"
        else:
            assert_one_line_error(result, "--aug novel (the earlier variant)", "--fresh")

