"""Augmentations. Every transform is a class built once from plain numbers (no lambdas, no
globals), so it pickles into DataLoader workers under both fork and spawn. Every random choice
draws from torch's global RNG (never python's `random` or numpy), which the pretraining dataset
seeds per image (utils/data.py)."""
import torch
from torchvision import transforms as T

AUGMENTATION_PRESETS = ("natural", "novel", "simple", "greyscale")


def blur_kernel_size(image_size):
    """Odd Gaussian-blur kernel of about 10 % of the image side (at least 3)."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


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


class SimCLRAugmentation:
    """Augmentation of one PIL image into a normalised tensor (C, S, S), by preset.

    S = image_size, s = jitter_strength; "blur" below is
    RandomApply(GaussianBlur(kernel ~10 % of S, odd, >= 3; sigma 0.1-2), p=0.5) and is present
    only with blur=True, in every preset. Every preset ends with ToTensor -> Normalize(mean, std).

    natural (default; the SimCLR paper's sequence):
        RandomResizedCrop(S, scale=(min_scale, 1)) -> RandomHorizontalFlip(p=0.5) ->
        RandomApply(ColorJitter(0.8s, 0.8s, 0.8s, min(0.5, 0.2s)), p=0.8) ->
        RandomGrayscale(p=0.2) -> blur
    novel (natural with half-strength jitter, plus equalisation and sharpening, for
    low-contrast medical images):
        RandomResizedCrop(S, scale=(min_scale, 1)) -> RandomHorizontalFlip(p=0.5) ->
        RandomApply(ColorJitter(0.4s, 0.4s, 0.4s, min(0.5, 0.1s)), p=0.8) ->
        RandomGrayscale(p=0.2) -> blur -> RandomEqualize(p=0.5) ->
        RandomAdjustSharpness(sharpness_factor=2, p=0.5)
    simple (no flip, no grayscale):
        RandomResizedCrop(S, scale=(min_scale, 1)) ->
        RandomApply(ColorJitter(0.8s, 0.8s, 0.8s, min(0.5, 0.2s)), p=0.8) -> blur
    greyscale (no colour jitter at all; jitter_strength is ignored):
        RandomResizedCrop(S, scale=(min_scale, 1)) -> RandomHorizontalFlip(p=0.5) -> blur

    For 1-channel data saturation, hue and random grayscale mean nothing and are left out: the
    jitter is brightness and contrast only (0.8s, or 0.4s for novel) and there is no
    RandomGrayscale. With s = 0 there is no jitter step in any preset.
    RandomEqualize equalises each channel's histogram separately (PIL ImageOps.equalize).

    Extras, each off at 0 and inserted at a fixed place in any preset:
        rotate=DEG: RandomRotation(degrees=(-DEG, DEG), bilinear, corners filled with 0 = black)
            right after the geometric steps (after the flip; after the crop in simple).
        noise=SIGMA: AddGaussianNoise(SIGMA) on the [0, 1] tensor between ToTensor and
            Normalize, always applied, clamped to [0, 1].
        cutout=P: RandomErasing(p=P, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0) after
            Normalize: one rectangle of 2-33 % of the area set to 0, i.e. to the data set mean.
    """

    def __init__(self, image_size, channels, mean, std, jitter_strength=1.0, blur=False,
                 min_scale=0.08, preset="natural", noise=0.0, rotate=0.0, cutout=0.0):
        if preset not in AUGMENTATION_PRESETS:
            raise ValueError(f"unknown augmentation preset {preset!r}; choose one of "
                             f"{', '.join(AUGMENTATION_PRESETS)}")
        if noise < 0 or rotate < 0 or not 0 <= cutout <= 1:
            raise ValueError(f"noise and rotate must be >= 0 and cutout in [0, 1], got "
                             f"noise={noise}, rotate={rotate}, cutout={cutout}")
        self.preset, self.noise, self.rotate, self.cutout = preset, noise, rotate, cutout
        s = jitter_strength
        steps = [T.RandomResizedCrop(image_size, scale=(min_scale, 1.0), antialias=True)]
        if preset != "simple":
            steps.append(T.RandomHorizontalFlip())
        if rotate > 0:
            steps.append(T.RandomRotation(rotate, interpolation=T.InterpolationMode.BILINEAR,
                                          fill=0))
        if s > 0 and preset != "greyscale":
            k = 0.5 if preset == "novel" else 1.0  # novel: half-strength jitter
            if channels == 1:
                jitter = T.ColorJitter(brightness=0.8 * k * s, contrast=0.8 * k * s)
            else:
                jitter = T.ColorJitter(0.8 * k * s, 0.8 * k * s, 0.8 * k * s,
                                       min(0.5, 0.2 * k * s))
            steps.append(T.RandomApply([jitter], p=0.8))
        if channels == 3 and preset in ("natural", "novel"):
            steps.append(T.RandomGrayscale(p=0.2))
        if blur:
            steps.append(T.RandomApply(
                [T.GaussianBlur(blur_kernel_size(image_size), sigma=(0.1, 2.0))], p=0.5))
        if preset == "novel":
            steps += [T.RandomEqualize(p=0.5), T.RandomAdjustSharpness(2.0, p=0.5)]
        steps.append(T.ToTensor())
        if noise > 0:
            steps.append(AddGaussianNoise(noise))
        steps.append(T.Normalize(mean, std))
        if cutout > 0:
            steps.append(T.RandomErasing(p=cutout, scale=(0.02, 0.33), ratio=(0.3, 3.3),
                                         value=0))
        self.transform = T.Compose(steps)

    def __call__(self, img):
        return self.transform(img)

    def describe(self):
        """The steps in order as JSON-ready dicts: {"step": class name, parameter: value, ...};
        RandomApply lists its inner steps under "transforms"."""
        return [describe_step(t) for t in self.transform.transforms]

    def __repr__(self):
        return (f"SimCLRAugmentation(preset={self.preset!r}, noise={self.noise}, "
                f"rotate={self.rotate}, cutout={self.cutout}): {self.transform!r}")


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
