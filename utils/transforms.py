"""Augmentations. Every transform is a class built once from plain numbers (no lambdas, no
globals), so it pickles into DataLoader workers under both fork and spawn. Every random choice
draws from torch's global RNG (never python's `random` or numpy), which the pretraining dataset
seeds per image (utils/data.py)."""
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image, ImageOps
from torchvision import transforms as T
from torchvision.transforms import functional as TF

AUGMENTATION_PRESETS = ("simclr", "natural", "novel", "simple", "greyscale")
# j-freddy/simclr-medical-imaging, pretrain/simclr/aug_sequences.py (newest version): the
# sequences of its four presets, stated for 28 px images.
PUBLISHED_PRESETS = ("natural", "novel", "simple", "greyscale")
PUBLISHED_BLUR_KERNEL, PUBLISHED_SIZE = 9, 28


def blur_kernel_size(image_size):
    """Odd Gaussian-blur kernel of about 10 % of the image side (at least 3)."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def published_blur_kernel(image_size):
    """The published 9 px kernel at 28 px, scaled in proportion to `image_size` and made odd:
    9 at 28 px, 5 at 16, 11 at 32, 21 at 64, 73 at 224."""
    k = round(PUBLISHED_BLUR_KERNEL * image_size / PUBLISHED_SIZE)
    return max(3, k if k % 2 else k + 1)


class RandomLumaEqualize:
    """With probability p, histogram-equalise the luma of a PIL image: RGB through YCbCr with
    Y equalised and Cb, Cr kept (as j-freddy's RandomEqualize); a 1-channel image is its own
    luma. A float tensor (1, H, W) in [0, 1] (a high-depth image, SimCLRAugmentation) is
    equalised on 256 levels: round(255 x) equalised, / 255 (8 bits of the data's range). The
    draw is torch.rand (torch's global RNG)."""

    def __init__(self, p=0.5):
        self.p = float(p)

    def __call__(self, img):
        if torch.rand(1).item() >= self.p:
            return img
        if isinstance(img, torch.Tensor):
            levels = (img * 255.0).round_().clamp_(0, 255).to(torch.uint8)
            return TF.equalize(levels).to(img.dtype) / 255.0
        if img.mode == "L":
            return ImageOps.equalize(img)
        y, cb, cr = img.convert("YCbCr").split()
        return Image.merge("YCbCr", (ImageOps.equalize(y), cb, cr)).convert(img.mode)

    def __repr__(self):
        return f"{type(self).__name__}(p={self.p})"


class RandomSharpness:
    """Sharpness of a PIL image adjusted by a factor ~ U(low, high), every time (1 = the
    image, higher = sharper; torchvision's adjust_sharpness, i.e. PIL's ImageEnhance)."""

    def __init__(self, low=1.0, high=10.0):
        self.low, self.high = float(low), float(high)

    def __call__(self, img):
        factor = self.low + (self.high - self.low) * torch.rand(1).item()
        return TF.adjust_sharpness(img, factor)

    def __repr__(self):
        return f"{type(self).__name__}(low={self.low}, high={self.high})"


def published_steps(preset, image_size, min_scale):
    """The geometric and photometric steps of one of j-freddy's presets, in its order (the
    flip comes before the crop there); the blur kernel scaled by published_blur_kernel."""
    flip = T.RandomHorizontalFlip()
    crop = T.RandomResizedCrop(image_size, scale=(min_scale, 1.0), antialias=True)
    strong = T.RandomApply([T.ColorJitter(0.5, 0.5, 0.5, 0.1)], p=0.8)
    weak = T.RandomApply([T.ColorJitter(0.2, 0.2, 0.2, 0.04)], p=0.8)
    gray, blur = T.RandomGrayscale(p=0.2), T.GaussianBlur(published_blur_kernel(image_size))
    contrast = [RandomLumaEqualize(0.5), RandomSharpness(1.0, 10.0)]
    return {"natural": [flip, crop, strong, gray, blur],
            "simple": [crop, strong, blur],
            "novel": [flip, crop, weak, gray, blur, *contrast],
            "greyscale": [flip, crop, blur, *contrast]}[preset]


class AddGaussianNoise:
    """Add N(0, sigma^2) noise to every pixel of a [0, 1] tensor, then clamp to [0, 1].

    Drawn with torch.randn_like (torch's global RNG). Meant between ToTensor and Normalize, so
    sigma is in units of the [0, 1] pixel range (0.05 = 5 % of the full range).
    """

    def __init__(self, sigma):
        self.sigma = float(sigma)

    def __call__(self, tensor):
        return (tensor + self.sigma * torch.randn_like(tensor)).clamp_(0.0, 1.0)

    def __repr__(self):
        return f"{type(self).__name__}(sigma={self.sigma})"


@dataclass(frozen=True)
class AugmentationSettings:
    """What SimCLRAugmentation and BatchSimCLRAugmentation build: the numbers of one
    augmentation, checked when made (ValueError for an unknown preset or an extra out of range).

    image_size: S, the side of the square views (C, S, S) in px.
    channels: C, 1 (gray) or 3 (RGB).
    mean, std: the C per-channel values of the final Normalize (the data set's statistics).
    jitter_strength: s of the simclr preset's ColorJitter(0.8s, 0.8s, 0.8s, min(0.5, 0.2s))
        (brightness and contrast only on 1 channel); 0 drops the jitter; other presets ignore it.
    blur: whether the simclr preset ends with its random Gaussian blur (p = 0.5, kernel ~10 %
        of S, sigma 0.1-2); other presets ignore it (they always blur).
    min_scale: the smallest area fraction of RandomResizedCrop (crops of min_scale .. 1).
    preset: one of AUGMENTATION_PRESETS: "simclr" (the SimCLR paper's sequence) or one of
        j-freddy/simclr-medical-imaging's sequences (PUBLISHED_PRESETS).
    noise: SIGMA >= 0 of the Gaussian pixel noise added to the [0, 1] tensor (0 = off).
    rotate: DEG >= 0, rotations by an angle ~ U(-DEG, DEG) after the crop and flip (0 = off).
    cutout: P in [0, 1], the probability of erasing one rectangle after Normalize (0 = off).
    """
    image_size: int
    channels: int
    mean: Sequence[float]
    std: Sequence[float]
    jitter_strength: float = 1.0
    blur: bool = False
    min_scale: float = 0.08
    preset: str = "simclr"
    noise: float = 0.0
    rotate: float = 0.0
    cutout: float = 0.0

    def __post_init__(self):
        if self.preset not in AUGMENTATION_PRESETS:
            raise ValueError(f"unknown augmentation preset {self.preset!r}; choose one of "
                             f"{', '.join(AUGMENTATION_PRESETS)}")
        if self.noise < 0 or self.rotate < 0 or not 0 <= self.cutout <= 1:
            raise ValueError(f"noise and rotate must be >= 0 and cutout in [0, 1], got "
                             f"noise={self.noise}, rotate={self.rotate}, cutout={self.cutout}")


class SimCLRAugmentation:
    """Augmentation of one PIL image into a normalised tensor (C, S, S), by preset, built from
    an AugmentationSettings (the names below are its fields).

    S = image_size, s = jitter_strength. Every preset ends with ToTensor -> Normalize(mean, std).
    A float image (PIL mode 'F', values in [0, 1]: a 16-bit or float file scaled by its data
    set's intensity range, utils/data.py load_image) goes through the same steps as a float
    tensor instead, ToTensor first, so every level is kept; the random draws are the same.
    The one step that works on 256 levels there is the luma equalisation of novel/greyscale.

    simclr (default; the SimCLR paper's sequence):
        RandomResizedCrop(S, scale=(min_scale, 1)) -> RandomHorizontalFlip(p=0.5) ->
        RandomApply(ColorJitter(0.8s, 0.8s, 0.8s, min(0.5, 0.2s)), p=0.8) ->
        RandomGrayscale(p=0.2) -> blur, where blur = RandomApply(GaussianBlur(kernel ~10 % of
        S, odd, >= 3; sigma 0.1-2), p=0.5), present only with blur=True. For 1-channel data the
        jitter is brightness and contrast only and there is no RandomGrayscale; s = 0 drops the
        jitter.

    natural, simple, novel, greyscale: j-freddy/simclr-medical-imaging's sequences exactly
    (aug_sequences.py, newest version); jitter_strength and blur do not apply. "blur9" is
    GaussianBlur(9 px at 28 px, scaled to S: published_blur_kernel; sigma ~ U(0.1, 2)), always;
    the crop is RandomResizedCrop(S, scale=(min_scale, 1)) (published: torchvision's default
    0.08).
        natural:   RandomHorizontalFlip(0.5) -> crop -> RandomApply(ColorJitter(0.5, 0.5, 0.5,
                   0.1), p=0.8) -> RandomGrayscale(0.2) -> blur9
        simple:    crop -> RandomApply(ColorJitter(0.5, 0.5, 0.5, 0.1), p=0.8) -> blur9
        novel:     RandomHorizontalFlip(0.5) -> crop -> RandomApply(ColorJitter(0.2, 0.2, 0.2,
                   0.04), p=0.8) -> RandomGrayscale(0.2) -> blur9 -> RandomLumaEqualize(0.5) ->
                   RandomSharpness(U(1, 10))
        greyscale: RandomHorizontalFlip(0.5) -> crop -> blur9 -> RandomLumaEqualize(0.5) ->
                   RandomSharpness(U(1, 10))
    On 1-channel images saturation, hue and grayscale leave the image as it is, as they do on
    the RGB copy of a gray image that the published code makes.

    Extras, each off at 0 and inserted at a fixed place in any preset:
        rotate=DEG: RandomRotation(degrees=(-DEG, DEG), bilinear, corners filled with 0 = black)
            right after the geometric steps (the crop and the flip, whichever comes last).
        noise=SIGMA: AddGaussianNoise(SIGMA) on the [0, 1] tensor between ToTensor and
            Normalize, always applied, clamped to [0, 1].
        cutout=P: RandomErasing(p=P, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0) after
            Normalize: one rectangle of 2-33 % of the area set to 0, i.e. to the data set mean.
    """

    def __init__(self, settings):
        """settings: an AugmentationSettings (checked when it was made)."""
        self.settings = settings
        preset, noise, rotate, cutout = (settings.preset, settings.noise, settings.rotate,
                                         settings.cutout)
        self.preset, self.noise, self.rotate, self.cutout = preset, noise, rotate, cutout
        if preset == "simclr":
            steps = simclr_steps(settings.image_size, settings.channels,
                                 settings.jitter_strength, settings.blur, settings.min_scale)
        else:
            steps = published_steps(preset, settings.image_size, settings.min_scale)
        if rotate > 0:
            geometric_end = 1 + max(i for i, t in enumerate(steps) if isinstance(
                t, (T.RandomResizedCrop, T.RandomHorizontalFlip)))
            steps.insert(geometric_end, T.RandomRotation(
                rotate, interpolation=T.InterpolationMode.BILINEAR, fill=0))
        tensor_steps = [AddGaussianNoise(noise)] if noise > 0 else []
        tensor_steps.append(T.Normalize(settings.mean, settings.std))
        if cutout > 0:
            tensor_steps.append(T.RandomErasing(p=cutout, scale=(0.02, 0.33), ratio=(0.3, 3.3),
                                                value=0))
        self.transform = T.Compose(steps + [T.ToTensor()] + tensor_steps)
        self.float_transform = T.Compose([T.ToTensor()] + steps + tensor_steps)

    def __call__(self, img):
        """PIL image -> normalised tensor (C, S, S); an 'F' image through float_transform."""
        if getattr(img, "mode", None) == "F":
            return self.float_transform(img)
        return self.transform(img)

    def describe(self):
        """The steps in order as JSON-ready dicts: {"step": class name, parameter: value, ...};
        RandomApply lists its inner steps under "transforms"."""
        return [describe_step(t) for t in self.transform.transforms]

    def __repr__(self):
        return (f"SimCLRAugmentation(preset={self.preset!r}, noise={self.noise}, "
                f"rotate={self.rotate}, cutout={self.cutout}): {self.transform!r}")


def simclr_steps(image_size, channels, s, blur, min_scale):
    """The SimCLR paper's steps (the simclr preset of SimCLRAugmentation)."""
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
        steps.append(T.RandomApply(
            [T.GaussianBlur(blur_kernel_size(image_size), sigma=(0.1, 2.0))], p=0.5))
    return steps


def _plain(value):
    """Tuples to lists and numbers to python floats/ints/strings, for JSON."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, T.InterpolationMode):
        return value.value
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


# The parameters describe() shows for each step type (attribute names of the torchvision object).
_STEP_PARAMETERS = {
    "RandomResizedCrop": ("size", "scale", "ratio", "interpolation"),
    "RandomHorizontalFlip": ("p",),
    "RandomRotation": ("degrees", "interpolation", "fill"),
    "RandomApply": ("p",),
    "ColorJitter": ("brightness", "contrast", "saturation", "hue"),
    "RandomGrayscale": ("p",),
    "GaussianBlur": ("kernel_size", "sigma"),
    "RandomEqualize": ("p",),
    "RandomAdjustSharpness": ("sharpness_factor", "p"),
    "RandomLumaEqualize": ("p",),
    "RandomSharpness": ("low", "high"),
    "ToTensor": (),
    "AddGaussianNoise": ("sigma",),
    "Normalize": ("mean", "std"),
    "RandomErasing": ("p", "scale", "ratio", "value"),
}


def describe_step(t):
    """One transform as a plain dict: {"step": class name, **its key parameters}."""
    name = type(t).__name__
    out = {"step": name}
    for attr in _STEP_PARAMETERS.get(name, ()):
        out[attr] = _plain(getattr(t, attr))
    if name == "RandomApply":
        out["transforms"] = [describe_step(inner) for inner in t.transforms]
    return out


class TwoViews:
    """Apply `transform` twice to one image: returns (view1, view2)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img):
        return self.transform(img), self.transform(img)


class SupervisedAugmentation:
    """Standard supervised training augmentation of one PIL image into a normalised tensor
    (C, S, S): RandomResizedCrop(S, scale=(min_scale, 1)), horizontal flip with p = 0.5,
    ToTensor, Normalize(mean, std). min_scale 1 and flip False give EvalTransform's output
    up to the crop's aspect ratio."""

    def __init__(self, image_size, mean, std, min_scale=0.5, flip=True):
        steps = [T.RandomResizedCrop(image_size, scale=(min_scale, 1.0), antialias=True)]
        if flip:
            steps.append(T.RandomHorizontalFlip())
        self.transform = T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])

    def __call__(self, img):
        return self.transform(img)


class EvalTransform:
    """Deterministic evaluation transform: resize the shorter side to S, centre-crop S x S,
    ToTensor, Normalize(mean, std). Works for non-square images."""

    def __init__(self, image_size, mean, std):
        self.transform = T.Compose([T.Resize(image_size, antialias=True),
                                    T.CenterCrop(image_size), T.ToTensor(),
                                    T.Normalize(mean, std)])

    def __call__(self, img):
        return self.transform(img)


def denormalize(batch, mean, std):
    """Undo Normalize on a batch (B, C, H, W) for display; returns values clipped to [0, 1]."""
    mean = torch.tensor(mean, dtype=batch.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=batch.dtype).view(1, -1, 1, 1)
    return (batch * std + mean).clamp(0, 1)
