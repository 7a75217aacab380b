"""Augmentations: output shapes and types on real images, the deterministic evaluation
transform against hand-computed values, pickling, and per-(seed, epoch, index) seeding that
makes worker processes (spawn) produce exactly what the main process produces."""
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data import EpochBatchSampler, TwoViewDataset, ignore_sigint_in_worker, make_loader
from utils.file_index import scan_image_folder
from utils.transforms import (AugmentationSettings, EvalTransform, SimCLRAugmentation, TwoViews,
                              blur_kernel_size)


def test_two_views_grayscale(gray_image):
    """channels=1: two float32 views (1, S, S) that differ from each other."""
    torch.manual_seed(0)
    aug = TwoViews(SimCLRAugmentation(AugmentationSettings(20, 1, [0.3], [0.3], blur=True)))
    v1, v2 = aug(gray_image)
    for v in (v1, v2):
        assert v.dtype == torch.float32 and v.shape == (1, 20, 20)
        assert torch.isfinite(v).all()
    assert not torch.equal(v1, v2)


def test_two_views_rgb(rgb_image):
    """channels=3 with an RGB image: two different float32 views (3, S, S)."""
    torch.manual_seed(0)
    aug = TwoViews(SimCLRAugmentation(AugmentationSettings(24, 3, [0.4, 0.5, 0.2],
                                                           [0.3, 0.3, 0.2], blur=True)))
    v1, v2 = aug(rgb_image)
    for v in (v1, v2):
        assert v.dtype == torch.float32 and v.shape == (3, 24, 24)
    assert not torch.equal(v1, v2)


def test_augmentation_non_square_image_gives_square_output():
    """A non-square (40 x 25) input gives S x S views for both channel settings."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (25, 40, 3), dtype=np.uint8)
    torch.manual_seed(1)
    v = SimCLRAugmentation(AugmentationSettings(16, 3, [0.5] * 3, [0.25] * 3))(
        Image.fromarray(arr, "RGB"))
    assert v.shape == (3, 16, 16)
    v = SimCLRAugmentation(AugmentationSettings(16, 1, [0.5], [0.25]))(
        Image.fromarray(arr[..., 0], "L"))
    assert v.shape == (1, 16, 16)


def test_eval_transform_deterministic(gray_image):
    """EvalTransform gives the same tensor whatever the global RNG state."""
    t = EvalTransform(20, [0.3], [0.3])
    torch.manual_seed(0)
    a = t(gray_image)
    torch.manual_seed(123)
    torch.rand(10)
    b = t(gray_image)
    assert a.shape == (1, 20, 20) and a.dtype == torch.float32
    assert torch.equal(a, b)


def test_eval_transform_constant_gray_by_hand():
    """A constant non-square gray image maps to (value/255 - mean)/std everywhere, S x S."""
    img = Image.new("L", (45, 30), color=100)
    out = EvalTransform(16, [0.3], [0.2])(img)
    assert out.shape == (1, 16, 16)
    expected = (100 / 255 - 0.3) / 0.2
    assert torch.allclose(out, torch.full_like(out, expected), atol=1e-6)


def test_eval_transform_constant_rgb_by_hand():
    """Per-channel normalisation of a constant RGB image (portrait, non-square) by hand."""
    value, mean, std = (10, 120, 250), [0.1, 0.5, 0.9], [0.2, 0.25, 0.05]
    out = EvalTransform(12, mean, std)(Image.new("RGB", (20, 33), color=value))
    assert out.shape == (3, 12, 12)
    for c in range(3):
        expected = (value[c] / 255 - mean[c]) / std[c]
        assert torch.allclose(out[c], torch.full((12, 12), expected), atol=1e-5)


def test_transforms_pickle_and_behave_the_same(gray_image):
    """SimCLRAugmentation, TwoViews and EvalTransform survive pickling and give the same
    output as the original under the same seed."""
    aug = TwoViews(SimCLRAugmentation(AugmentationSettings(16, 1, [0.3], [0.3], blur=True)))
    ev = EvalTransform(16, [0.3], [0.3])
    aug2, ev2 = pickle.loads(pickle.dumps(aug)), pickle.loads(pickle.dumps(ev))
    torch.manual_seed(5)
    a1, a2 = aug(gray_image)
    torch.manual_seed(5)
    b1, b2 = aug2(gray_image)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert torch.equal(ev(gray_image), ev2(gray_image))


@pytest.fixture(scope="module")
def few_images(real_images, tmp_path_factory):
    """Six real images written as PNG in a plain folder, as an ImageList."""
    root = tmp_path_factory.mktemp("few")
    images = real_images[0]["train"][0][:6]
    for i, img in enumerate(images):
        Image.fromarray(img, mode="L").save(os.path.join(root, f"{i}.png"))
    return scan_image_folder(str(root), require_labels=False)


def _two_view_dataset(images, seed=7):
    aug = TwoViews(SimCLRAugmentation(AugmentationSettings(12, 1, [0.3], [0.3], blur=True)))
    return TwoViewDataset(images, 1, aug, seed=seed)


def test_two_view_dataset_pickles(few_images):
    """TwoViewDataset pickles; the copy produces the same views for the same key."""
    ds = _two_view_dataset(few_images)
    copy = pickle.loads(pickle.dumps(ds))
    a, b = ds[(3, 2)], copy[(3, 2)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_same_key_same_views_other_epoch_other_views(few_images):
    """The views depend only on (seed, epoch, index): the same key twice (with the global RNG
    disturbed in between) is identical, another epoch or seed differs, and the caller's RNG
    stream is left untouched."""
    ds = _two_view_dataset(few_images)
    torch.manual_seed(0)
    first = ds[(2, 1)]
    torch.rand(100)
    again = ds[(2, 1)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], first[1])
    other_epoch = ds[(2, 2)]
    assert not torch.equal(first[0], other_epoch[0])
    other_seed = _two_view_dataset(few_images, seed=8)[(2, 1)]
    assert not torch.equal(first[0], other_seed[0])
    torch.manual_seed(42)
    expected = torch.rand(5)
    torch.manual_seed(42)
    ds[(0, 0)]
    assert torch.equal(torch.rand(5), expected)


def _collect(loader):
    return [(v1.clone(), v2.clone()) for v1, v2 in loader]


def test_spawn_worker_gives_same_batches_as_main_process(few_images):
    """A DataLoader with one spawn worker over TwoViewDataset with EpochBatchSampler keys
    returns exactly the batches the main process (num_workers=0) returns."""
    ds = _two_view_dataset(few_images)
    sampler = EpochBatchSampler(len(ds), 3, seed=7)
    sampler.set_epoch(1)
    torch.manual_seed(0)
    main = _collect(make_loader(ds, batch_sampler=sampler, num_workers=0))
    spawned_loader = torch.utils.data.DataLoader(
        ds, batch_sampler=sampler, num_workers=1, multiprocessing_context="spawn",
        worker_init_fn=ignore_sigint_in_worker)
    torch.manual_seed(999)  # a different main-process RNG state must not matter
    spawned = _collect(spawned_loader)
    assert len(main) == len(spawned) == 2
    for (a1, a2), (b1, b2) in zip(main, spawned):
        assert a1.shape == (3, 1, 12, 12)
        assert torch.equal(a1, b1) and torch.equal(a2, b2)


@pytest.mark.parametrize("side,expected", [(224, 23), (32, 3), (96, 9), (100, 11), (10, 3),
                                           (64, 7), (160, 17)])
def test_blur_kernel_size_examples(side, expected):
    """Known kernel sizes: 224 -> 23, 32 -> 3, and a few others (odd, about 10 % of the side)."""
    assert blur_kernel_size(side) == expected


def test_blur_kernel_size_odd_and_about_ten_percent():
    """For every side 8..512 the kernel is odd, at least 3 and within 1 of 10 % of the side."""
    for side in range(8, 513):
        k = blur_kernel_size(side)
        assert k % 2 == 1 and k >= 3
        assert abs(k - 0.1 * side) <= 1 or (k == 3 and side < 30)
