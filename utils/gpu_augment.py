"""SimCLR augmentation of whole batches on the device (main.py --gpu-aug).

`BatchSimCLRAugmentation` takes the AugmentationSettings of utils.transforms.SimCLRAugmentation,
builds that per-image pipeline and turns each of its steps into a batched step with per-view random
parameters, reading the ranges and probabilities from the torchvision objects themselves, so a
preset is defined in one place only. Parameters are drawn as torchvision's `get_params` draws
them (same distributions; tests/test_speed_path.py compares them with KS and binomial tests):

    RandomResizedCrop    up to 10 tries of area fraction ~ U(scale), log aspect ~ U(log ratio),
                         w = round(sqrt(A r)), h = round(sqrt(A / r)); the first that fits,
                         else the central crop; top/left uniform over the positions
    RandomHorizontalFlip flip with probability p
    RandomRotation       angle ~ U(-deg, deg), bilinear, corners 0
    ColorJitter          applied with p (RandomApply); brightness, contrast, saturation, hue
                         factors ~ U(their ranges), the four in a random order per view
    RandomGrayscale      with probability p (ITU-R 601 luma, as torchvision)
    GaussianBlur         applied with p; sigma ~ U(0.1, 2), the preset's kernel size, reflect
                         padding
    RandomEqualize, RandomAdjustSharpness   with probability p (torchvision.transforms.v2's
                         equalize; its adjust_sharpness, redone here with a cached kernel)
    AddGaussianNoise     N(0, sigma^2) per pixel on [0, 1], clamped
    Normalize            (x - mean) / std
    RandomErasing        applied with p; up to 10 tries of area ~ U(scale), log ratio ~ U(log
                         ratio), the first that fits, else none; set to `value`

Input: uint8 images (B, C, H, W) on the device, normally already at the training size S
(utils.data.decode_images), so every crop is resized up, never down (no antialiasing is
needed; downsizing a larger input would alias). Output: (B, C, S, S) float32, normalised.
The steps work on float images in [0, 1] where the per-image pipeline works on 8-bit PIL
images, so pixel values differ by rounding; crop + flip equal torchvision's tensor
resized_crop + hflip. A step that only some views take is computed for the whole batch and
selected per view with torch.where (no host synchronisation); the colour jitter in its
per-view order costs six blend passes and one hue pass over the batch. Constant tensors (luma
weights, mean and std, the sharpness kernel) are `DeviceConstant`s, made on the device once, so
a batch copies nothing from the host.
"""
import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as v2F

from utils.data import DEVICE_AUGMENT_STREAM, derive_seed
from utils.errors import UserError
from utils.transforms import AddGaussianNoise, SimCLRAugmentation

LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
SHARPNESS_KERNEL = ((1 / 13, 1 / 13, 1 / 13), (1 / 13, 5 / 13, 1 / 13), (1 / 13, 1 / 13, 1 / 13))


class DeviceConstant:
    """A constant tensor of Python numbers, made on each (device, dtype) once, on first use.

    constant(device, dtype) -> tensor of `shape` holding `values` (as torch.tensor(values,
    dtype=dtype) would), the same object on every later call with that device and dtype, so the
    per-batch path copies no constants from the host (on CUDA each copy is a small transfer in
    the stream). Shared and read-only: callers must not modify it in place.
    """

    def __init__(self, values, shape):
        self.values, self.shape = values, tuple(shape)
        self.made = {}

    def __call__(self, device, dtype):
        key = (torch.device(device), dtype)
        tensor = self.made.get(key)
        if tensor is None:
            with torch.inference_mode(False):  # usable outside inference_mode later on
                tensor = torch.tensor(self.values, dtype=dtype, device=device).view(self.shape)
            if torch.compiler.is_compiling():
                return tensor  # a traced (fake) tensor must not outlive the trace
            self.made[key] = tensor
        return tensor


LUMA_WEIGHTS = DeviceConstant(LUMA, (1, 3, 1, 1))
SHARPNESS_WEIGHTS = DeviceConstant(SHARPNESS_KERNEL, (1, 1, 3, 3))


def uniform(shape, low, high, generator):
    """Float32 tensor of `shape` (an int or a tuple), uniform on [low, high), on the
    generator's device."""
    return low + (high - low) * torch.rand(shape, generator=generator, device=generator.device)


def chance(n, p, generator):
    """(n,) bool, each True with probability p (torchvision: applied when rand < p)."""
    return torch.rand(n, generator=generator, device=generator.device) < p


def grayscale(x):
    """(B, 1, H, W) luma of (B, 3, H, W) images (the image itself for 1 channel)."""
    if x.shape[1] == 1:
        return x
    return (x * LUMA_WEIGHTS(x.device, x.dtype)).sum(1, keepdim=True)


def adjust_sharpness(x, factor):
    """(B, C, H, W) float images in [0, 1] sharpened as torchvision.transforms.v2's
    adjust_sharpness (same operations, same results): the interior pixels blended with the
    3x3 smoothing [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 as  x + (1 - factor) (smooth - x),
    the one-pixel border unchanged, clamped to [0, 1]; the kernel is a DeviceConstant where
    torchvision builds it from a list on every call."""
    channels, height, width = x.shape[-3:]
    if x.numel() == 0 or height <= 2 or width <= 2:
        return x
    kernel = SHARPNESS_WEIGHTS(x.device, x.dtype).expand(channels, 1, 3, 3)
    out = x.clone()
    smooth = F.conv2d(out, kernel, groups=channels)
    interior = out[..., 1:-1, 1:-1]
    interior.add_(smooth.sub_(interior), alpha=1.0 - factor)
    return out.clamp_(0, 1)


def per_view(values):
    """(B,) per-view values (factors or masks) shaped (B, 1, 1, 1) to broadcast over images."""
    return values.view(-1, 1, 1, 1)


def first_fitting_box(n, area, scale, log_ratio, fits, generator):
    """Boxes of up to 10 tries each, as torchvision draws them: returns (found (n,) bool,
    a (n,), b (n,)) with a = round(sqrt(area * r)), b = round(sqrt(area / r)) of the first try
    for which fits(a, b) holds (undefined where none does)."""
    target = area * uniform((n, 10), scale[0], scale[1], generator)
    aspect = torch.exp(uniform((n, 10), log_ratio[0], log_ratio[1], generator))
    a = torch.round(torch.sqrt(target * aspect))
    b = torch.round(torch.sqrt(target / aspect))
    ok = fits(a, b)
    first = ok.to(torch.uint8).argmax(1, keepdim=True)  # index of the first True
    return ok.any(1), a.gather(1, first).squeeze(1), b.gather(1, first).squeeze(1)


def uniform_position(n, room, generator):
    """(n,) integer offsets uniform on 0 .. room - 1 (room (n,) float >= 1)."""
    return torch.floor(torch.rand(n, generator=generator, device=generator.device) * room)


class ResizedCropStep:
    """RandomResizedCrop(size, scale, ratio): integer boxes drawn as torchvision does, resized
    to size x size by bilinear interpolation (align_corners=False, sample positions clamped
    to the box as F.interpolate does)."""
    name = "RandomResizedCrop"

    def __init__(self, t):
        self.size = tuple(t.size)
        self.scale, self.ratio = tuple(t.scale), tuple(t.ratio)

    def sample(self, n, generator, hw):
        height, width = hw
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        found, w, h = first_fitting_box(
            n, height * width, self.scale, log_ratio,
            lambda a, b: (a > 0) & (a <= width) & (b > 0) & (b <= height), generator)
        fallback_w, fallback_h = self.central_crop(height, width)
        w = torch.where(found, w, torch.full_like(w, fallback_w))
        h = torch.where(found, h, torch.full_like(h, fallback_h))
        top = torch.where(found, uniform_position(n, height - h + 1, generator),
                          torch.div(height - h, 2, rounding_mode="floor"))
        left = torch.where(found, uniform_position(n, width - w + 1, generator),
                           torch.div(width - w, 2, rounding_mode="floor"))
        return {"top": top, "left": left, "height": h, "width": w}

    def central_crop(self, height, width):
        """(w, h) of torchvision's fallback: the whole image, clipped to the ratio range."""
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            return width, round(width / min(self.ratio))
        if in_ratio > max(self.ratio):
            return round(height * max(self.ratio)), height
        return width, height

    def apply(self, x, p, generator):
        height, width = x.shape[-2:]
        out_h, out_w = self.size
        ys = self.sample_positions(p["top"], p["height"], out_h)  # (B, out_h) in pixels
        xs = self.sample_positions(p["left"], p["width"], out_w)
        grid = torch.stack([((2 * xs + 1) / width - 1)[:, None, :].expand(-1, out_h, -1),
                            ((2 * ys + 1) / height - 1)[:, :, None].expand(-1, -1, out_w)], -1)
        return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border",
                             align_corners=False)

    @staticmethod
    def sample_positions(start, length, out):
        """(B, out) source pixel coordinates of out samples over [start, start + length):
        start + (k + 0.5) * length / out - 0.5, clamped to the box's first and last pixel."""
        k = torch.arange(out, device=start.device, dtype=torch.float32)
        pos = start[:, None] + (k[None] + 0.5) * (length[:, None] / out) - 0.5
        return torch.minimum(torch.maximum(pos, start[:, None]), (start + length - 1)[:, None])


class RotationStep:
    """RandomRotation(degrees): angle ~ U(degrees), counter-clockwise for positive angles,
    about the centre, bilinear, outside filled with 0 (torchvision's tensor rotate)."""
    name = "RandomRotation"

    def __init__(self, t):
        self.degrees = tuple(t.degrees)
        fill = t.fill if isinstance(t.fill, (int, float)) else None
        if fill != 0:
            raise ValueError(f"batched RandomRotation supports fill=0 only, got {t.fill}")

    def sample(self, n, generator, hw):
        return {"angle": uniform(n, self.degrees[0], self.degrees[1], generator)}

    def apply(self, x, p, generator):
        a = torch.deg2rad(p["angle"]).to(x.dtype)
        cos, sin = torch.cos(a), torch.sin(a)
        zero = torch.zeros_like(a)
        aspect = x.shape[-1] / x.shape[-2]  # normalised coordinates of a non-square image
        theta = torch.stack([torch.stack([cos, -sin / aspect, zero], -1),
                             torch.stack([sin * aspect, cos, zero], -1)], 1)  # output -> input
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # x and a mask of ones in one pass; x * mask fills as torchvision's tensor rotate does
        both = F.grid_sample(torch.cat([x, torch.ones_like(x[:, :1])], 1), grid, mode="bilinear",
                             padding_mode="zeros", align_corners=False)
        return both[:, :-1] * both[:, -1:]


class ColorJitterStep:
    """RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p): per view, the
    factors of the jitter's ranges in a random order, as ColorJitter.get_params draws them.
    Brightness, contrast and saturation are blends  x' = clamp(f x + (1 - f) ref, 0, 1)  with
    ref = 0, the mean luma of the image, and the luma of each pixel; hue shifts H in HSV."""
    name = "ColorJitter"
    OPS = ("brightness", "contrast", "saturation", "hue")

    def __init__(self, apply_step):
        self.p = apply_step.p
        jitter = apply_step.transforms[0]
        self.ranges = {op: getattr(jitter, op) for op in self.OPS}

    def sample(self, n, generator, hw):
        params = {"applied": chance(n, self.p, generator),
                  "order": torch.argsort(torch.rand((n, 4), generator=generator,
                                                    device=generator.device), dim=1)}
        for op, bounds in self.ranges.items():
            if bounds is not None:
                params[op] = uniform(n, bounds[0], bounds[1], generator)
        return params

    def apply(self, x, p, generator):
        if "hue" not in p:
            for position in range(4):
                x = self.blend_at(x, p, position, p["applied"])
            return x
        # Each view's blends before its hue shift, the shift (once), then the blends after it:
        # six cheap blend passes and one hue pass instead of four of each.
        hue_position = (p["order"] == self.OPS.index("hue")).to(torch.uint8).argmax(1)
        for position in range(3):
            x = self.blend_at(x, p, position, p["applied"] & (position < hue_position))
        x = torch.where(per_view(p["applied"]), shift_hue(x, p["hue"]), x)
        for position in range(1, 4):
            x = self.blend_at(x, p, position, p["applied"] & (position > hue_position))
        return x

    def blend_at(self, x, p, position, enabled):
        """The brightness, contrast or saturation blend that is each view's op at `position`
        in its order, for the views where `enabled`; the others pass unchanged."""
        op_here = p["order"][:, position]
        active = {op: enabled & (op_here == self.OPS.index(op)) if op in p else None
                  for op in ("brightness", "contrast", "saturation")}
        factor = torch.ones_like(x[:, 0, 0, 0])
        for op, mask in active.items():
            if mask is not None:
                factor = torch.where(mask, p[op].to(x.dtype), factor)
        luma = grayscale(x)
        reference = torch.zeros_like(luma)
        if active["saturation"] is not None:
            reference = torch.where(per_view(active["saturation"]), luma, reference)
        if active["contrast"] is not None:
            reference = torch.where(per_view(active["contrast"]),
                                    luma.mean((1, 2, 3), keepdim=True), reference)
        f = per_view(factor)
        return (f * x + (1 - f) * reference).clamp(0, 1)


def shift_hue(x, shift):
    """(B, 3, H, W) images in [0, 1] with the HSV hue of view b moved by shift[b] (a fraction
    of the circle), as torchvision's adjust_hue, computed without building the HSV image:
    with V = max, delta = max - min and hue h in sixths of the circle,
        channel n (R: 5, G: 3, B: 1) = V - delta * clamp(min(k, 4 - k), 0, 1),
        k = (n + 6 (h + shift)) mod 6."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = h + 6 * per_view(shift.to(x.dtype))[:, 0]
    out = torch.empty_like(x)
    for c, n in enumerate((5.0, 3.0, 1.0)):
        k = n + h
        k = k - 6.0 * torch.floor(k / 6.0)  # mod 6 (torch.remainder is slower on the CPU)
        out[:, c] = maxc - delta * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return out


class BlurStep:
    """RandomApply([GaussianBlur(k, sigma)], p): separable Gaussian of sigma ~ U(sigma range),
    kernel exp(-t^2 / (2 sigma^2)) / sum over t = -(k-1)/2 .. (k-1)/2, reflect padding; views
    not blurred get the identity kernel."""
    name = "GaussianBlur"

    def __init__(self, apply_step):
        self.p = apply_step.p
        blur = apply_step.transforms[0]
        self.kernel_size = tuple(blur.kernel_size)
        self.sigma = tuple(blur.sigma)
        if self.kernel_size[0] != self.kernel_size[1]:
            raise ValueError(f"batched GaussianBlur needs a square kernel, got {self.kernel_size}")

    def sample(self, n, generator, hw):
        return {"applied": chance(n, self.p, generator),
                "sigma": uniform(n, self.sigma[0], self.sigma[1], generator)}

    def apply(self, x, p, generator):
        b, c, h, w = x.shape
        k = self.kernel_size[0]
        t = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, device=x.device, dtype=x.dtype)
        pdf = torch.exp(-0.5 * (t[None] / p["sigma"][:, None].to(x.dtype)) ** 2)
        identity = (t == 0).to(x.dtype).expand(b, k)
        kernel = torch.where(p["applied"][:, None], pdf / pdf.sum(1, keepdim=True), identity)
        kernel = kernel.repeat_interleave(c, 0)  # (B*C, k): one per channel of each view
        padded = F.pad(x, [k // 2] * 4, mode="reflect").reshape(1, b * c, h + k - 1, w + k - 1)
        padded = F.conv2d(padded, kernel.view(b * c, 1, 1, k), groups=b * c)
        padded = F.conv2d(padded, kernel.view(b * c, 1, k, 1), groups=b * c)
        return padded.view(b, c, h, w)


class ChanceStep:
    """A deterministic image function applied to each view with probability p, computed for the
    whole batch: RandomHorizontalFlip, RandomGrayscale (the luma in all three channels),
    RandomEqualize (torchvision.transforms.v2's batched equalize) and RandomAdjustSharpness
    (adjust_sharpness, equal to v2's)."""

    def __init__(self, t):
        self.name, self.p = type(t).__name__, t.p
        self.sharpness_factor = getattr(t, "sharpness_factor", None)

    def sample(self, n, generator, hw):
        return {"applied": chance(n, self.p, generator)}

    def changed(self, x):
        if self.name == "RandomHorizontalFlip":
            return x.flip(-1)
        if self.name == "RandomGrayscale":
            return grayscale(x).expand_as(x)
        if self.name == "RandomEqualize":
            return v2F.equalize(x)
        return adjust_sharpness(x, self.sharpness_factor)

    def apply(self, x, p, generator):
        return torch.where(per_view(p["applied"]), self.changed(x), x)


class NoiseStep:
    """AddGaussianNoise(sigma): x + sigma N(0, 1) per pixel, clamped to [0, 1]; the pixels'
    noise comes from the generator given to apply."""
    name = "AddGaussianNoise"

    def __init__(self, t):
        self.sigma = t.sigma

    def sample(self, n, generator, hw):
        return {}

    def apply(self, x, p, generator):
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (x + self.sigma * noise).clamp(0, 1)


class NormalizeStep:
    """Normalize(mean, std)."""
    name = "Normalize"

    def __init__(self, t):
        self.mean, self.std = list(t.mean), list(t.std)
        self.mean_constant = DeviceConstant(self.mean, (1, -1, 1, 1))
        self.std_constant = DeviceConstant(self.std, (1, -1, 1, 1))

    def sample(self, n, generator, hw):
        return {}

    def apply(self, x, p, generator):
        return (x - self.mean_constant(x.device, x.dtype)) / self.std_constant(x.device, x.dtype)


class ErasingStep:
    """RandomErasing(p, scale, ratio, value): with probability p, up to 10 tries of a box
    h = round(sqrt(A r)), w = round(sqrt(A / r)) that must be smaller than the image; the first
    that fits is set to `value`, else nothing is erased (torchvision's get_params)."""
    name = "RandomErasing"

    def __init__(self, t):
        if not isinstance(t.value, (int, float)):
            raise TypeError(f"batched RandomErasing supports a number as value, got {t.value}")
        self.p, self.scale, self.ratio, self.value = t.p, tuple(t.scale), tuple(t.ratio), t.value

    def sample(self, n, generator, hw):
        height, width = hw
        applied = chance(n, self.p, generator)
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        found, h, w = first_fitting_box(n, height * width, self.scale, log_ratio,
                                        lambda a, b: (a < height) & (b < width), generator)
        h, w = torch.where(found, h, 0), torch.where(found, w, 0)
        return {"applied": applied & found, "top": uniform_position(n, height - h + 1, generator),
                "left": uniform_position(n, width - w + 1, generator), "height": h, "width": w}

    def apply(self, x, p, generator):
        rows = torch.arange(x.shape[-2], device=x.device)[None]
        cols = torch.arange(x.shape[-1], device=x.device)[None]
        in_rows = (rows >= p["top"][:, None]) & (rows < (p["top"] + p["height"])[:, None])
        in_cols = (cols >= p["left"][:, None]) & (cols < (p["left"] + p["width"])[:, None])
        box = in_rows[:, :, None] & in_cols[:, None, :] & p["applied"][:, None, None]
        return x.masked_fill(box[:, None], self.value)


def batched_step(t):
    """The batched version of one step of SimCLRAugmentation's pipeline (None for ToTensor,
    which the uint8 -> [0, 1] conversion at the start replaces)."""
    name = type(t).__name__
    if name == "RandomApply":
        inner = type(t.transforms[0]).__name__
        if len(t.transforms) == 1 and inner == "ColorJitter":
            return ColorJitterStep(t)
        if len(t.transforms) == 1 and inner == "GaussianBlur":
            return BlurStep(t)
        raise ValueError(f"no batched version of RandomApply({inner}, ...)")
    simple = {"RandomResizedCrop": ResizedCropStep, "RandomHorizontalFlip": ChanceStep,
              "RandomRotation": RotationStep, "RandomGrayscale": ChanceStep,
              "RandomEqualize": ChanceStep, "RandomAdjustSharpness": ChanceStep,
              "Normalize": NormalizeStep, "RandomErasing": ErasingStep}
    if isinstance(t, AddGaussianNoise):
        return NoiseStep(t)
    if name == "ToTensor":
        return None
    if name not in simple:
        raise ValueError(f"no batched version of the augmentation step {name}")
    return simple[name](t)


class BatchSimCLRAugmentation:
    """SimCLRAugmentation (same AugmentationSettings, same preset semantics) for whole uint8
    batches on the device, with independent random parameters for every image of the batch.

    aug(images uint8 (B, C, H, W), generator) -> (B, C, S, S) float32 normalised; all random
    numbers come from `generator` (a torch.Generator on the images' device), parameters first
    (`sample_parameters`), then the pixels' noise of --noise.
    """

    def __init__(self, settings):
        """settings: an AugmentationSettings of the simclr preset (UserError for another)."""
        if settings.preset != "simclr":
            raise UserError(f"--gpu-aug has the steps of --aug simclr only, not "
                            f"{settings.preset}; drop --gpu-aug to augment in the CPU workers")
        self.reference = SimCLRAugmentation(settings)
        steps = [batched_step(t) for t in self.reference.transform.transforms]
        self.steps = [s for s in steps if s is not None]
        self.image_size = settings.image_size

    def sample_parameters(self, n, generator, hw):
        """{step name: {parameter: (n,) tensor}} for n views of images of size hw = (H, W),
        drawn from `generator` step by step in pipeline order; the steps after the crop see
        S x S images."""
        params = {}
        for step in self.steps:
            params[step.name] = step.sample(n, generator, hw)
            if step.name == "RandomResizedCrop":
                hw = (self.image_size, self.image_size)
        return params

    def apply(self, images, params, generator):
        """The pipeline on uint8 images (B, C, H, W) with the given parameters (rows = views)."""
        x = images.float().div_(255)
        for step in self.steps:
            x = step.apply(x, params[step.name], generator)
        return x

    def __call__(self, images, generator):
        params = self.sample_parameters(images.shape[0], generator, images.shape[-2:])
        return self.apply(images, params, generator)

    def describe(self):
        """The steps of the per-image pipeline this reproduces (utils.transforms.describe)."""
        return self.reference.describe()


def select_views(params, rows):
    """The parameters of views `rows` (a LongTensor) only."""
    return {name: {k: v[rows] for k, v in p.items()} for name, p in params.items()}


class DeviceTwoViews:
    """The `make_views` of simclr.train for --gpu-aug: (images uint8 (b, C, H, W) on the device,
    global step) -> both views (2b, C, S, S), view 1 of every image first.

    The parameters of the 2B views of global batch `step` (B = global batch size) are drawn
    from a generator seeded with derive_seed(DEVICE_AUGMENT_STREAM, seed, step), and rank r
    takes the rows of its images r*b .. (r+1)*b, so crops, flips and jitter do not depend on
    the number of processes; the pixel noise of --noise is drawn per rank
    (derive_seed(DEVICE_AUGMENT_STREAM, seed, step, rank)). A pure function of (seed, step), so
    a resumed run augments exactly as an uninterrupted one.
    """

    def __init__(self, augmentation, seed, global_batch_size, rank=0):
        self.augmentation, self.seed = augmentation, seed
        self.global_batch_size, self.rank = global_batch_size, rank

    def __call__(self, images, step):
        b, device = images.shape[0], images.device
        draw = torch.Generator(device=device)
        draw.manual_seed(derive_seed(DEVICE_AUGMENT_STREAM, self.seed, step))
        params = self.augmentation.sample_parameters(2 * self.global_batch_size, draw,
                                                     images.shape[-2:])
        mine = torch.arange(self.rank * b, (self.rank + 1) * b, device=device)
        params = select_views(params, torch.cat([mine, mine + self.global_batch_size]))
        noise = torch.Generator(device=device)
        noise.manual_seed(derive_seed(DEVICE_AUGMENT_STREAM, self.seed, step, self.rank))
        return self.augmentation.apply(torch.cat([images, images]), params, noise)
