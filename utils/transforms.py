"""Augmentations. Every transform is a class built once from plain numbers (no lambdas, no
globals), so it pickles into DataLoader workers under both fork and spawn."""
import torch
from torchvision import transforms as T


def blur_kernel_size(image_size):
    """Odd Gaussian-blur kernel of about 10 % of the image side (at least 3)."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


class SimCLRAugmentation:
    """The SimCLR paper's augmentation of one PIL image into a normalised tensor (C, S, S).

    RandomResizedCrop(S, scale=(min_scale, 1)) -> horizontal flip p=0.5 -> colour jitter of
    strength s, (brightness, contrast, saturation, hue) = (0.8s, 0.8s, 0.8s, 0.2s), applied with
    p=0.8 -> random grayscale p=0.2 -> Gaussian blur (kernel ~10 % of S, sigma 0.1-2) p=0.5 ->
    ToTensor -> Normalize(mean, std).
    For 1-channel data, saturation, hue and random grayscale have no meaning and are left out:
    the jitter is brightness and contrast of 0.8s.
    """

    def __init__(self, image_size, channels, mean, std, jitter_strength=1.0, blur=False,
                 min_scale=0.08):
        s = jitter_strength
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
        steps += [T.ToTensor(), T.Normalize(mean, std)]
        self.transform = T.Compose(steps)

    def __call__(self, img):
        return self.transform(img)

    def __repr__(self):
        return repr(self.transform)


class TwoViews:
    """Apply `transform` twice to one image: returns (view1, view2)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img):
        return self.transform(img), self.transform(img)


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
