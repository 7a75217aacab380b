"""tools/bench_grid.py --sections augment: ways of producing SimCLR views, ms per batch of views.

    batched      utils/gpu_augment.BatchSimCLRAugmentation on a uint8 batch (what --gpu-aug
                 runs): every view's parameters drawn at once, each step one batched op
    v2-per-view  torchvision.transforms.v2 with the same steps, one call per view on its uint8
                 tensor (v2 draws one set of parameters per call)
    pil          utils/transforms.SimCLRAugmentation on PIL images, one view after another in
                 this process (what one DataLoader worker does)
    kornia       kornia.augmentation with the same steps, batched (only where kornia is
                 installed: it is not a dependency)

for each configuration (views, image size S, blur) of the simclr preset on RGB images of
S x S (noise, seeded), jitter strength 1. Each figure is the least of `repeats` timed calls
after one untimed call (the least disturbed by other work), and the median beside it.
"""
import statistics
import time

import numpy as np
import torch
from PIL import Image

from utils.gpu_augment import BatchSimCLRAugmentation
from utils.transforms import AugmentationSettings, SimCLRAugmentation, blur_kernel_size

CONFIGS = ((256, 32, False), (256, 32, True), (32, 224, True))
QUICK_CONFIGS = ((16, 16, True),)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def v2_pipeline(size, blur):
    """torchvision.transforms.v2 with the simclr preset's steps, uint8 tensor in."""
    from torchvision.transforms import v2
    steps = [v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
             v2.RandomHorizontalFlip(), v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)],
                                                       p=0.8),
             v2.RandomGrayscale(p=0.2)]
    if blur:
        steps.append(v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size), (0.1, 2.0))],
                                    p=0.5))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    return v2.Compose(steps)


def kornia_pipeline(size, blur):
    """kornia.augmentation with the same steps, or None where kornia is not installed."""
    try:
        import kornia.augmentation as K
    except ImportError:
        return None
    steps = [K.RandomResizedCrop((size, size), scale=(0.08, 1.0)), K.RandomHorizontalFlip(),
             K.ColorJitter(0.8, 0.8, 0.8, 0.2, p=0.8), K.RandomGrayscale(p=0.2)]
    if blur:
        k = blur_kernel_size(size)
        steps.append(K.RandomGaussianBlur((k, k), (0.1, 2.0), p=0.5))
    steps.append(K.Normalize(torch.tensor(MEAN), torch.tensor(STD)))
    return K.AugmentationSequential(*steps)


def view_makers(views, size, blur):
    """{method: zero-argument function producing `views` views (views, 3, S, S)}."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (views, size, size, 3), dtype=np.uint8)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    pil = [Image.fromarray(p) for p in pixels]
    settings = AugmentationSettings(image_size=size, channels=3, mean=MEAN, std=STD, blur=blur)
    batched = BatchSimCLRAugmentation(settings)
    generator = torch.Generator().manual_seed(0)
    per_view = v2_pipeline(size, blur)
    per_image = SimCLRAugmentation(settings)
    makers = {"batched": lambda: batched(images, generator),
              "v2-per-view": lambda: torch.stack([per_view(x) for x in images]),
              "pil": lambda: torch.stack([per_image(p) for p in pil])}
    kornia = kornia_pipeline(size, blur)
    if kornia is not None:
        makers["kornia"] = lambda: kornia(images.float().div(255))
    return makers


def library_version(method):
    """The version of the library a method runs on (torch for our own batched ops)."""
    import torchvision
    if method == "kornia":
        try:
            import kornia
        except ImportError:
            return None
        return kornia.__version__
    return {"batched": torch.__version__, "v2-per-view": torchvision.__version__,
            "pil": Image.__version__}[method]


def bench_augment(repeats, quick=False):
    """Rows {views, image_size, blur, method, version, ms, median_ms} (or "skipped") per
    configuration and method; see the module docstring."""
    rows = []
    for views, size, blur in QUICK_CONFIGS if quick else CONFIGS:
        makers = view_makers(views, size, blur)
        for method in ("batched", "v2-per-view", "pil", "kornia"):
            row = {"views": views, "image_size": size, "blur": blur, "method": method,
                   "version": library_version(method)}
            if method not in makers:
                rows.append({**row, "skipped": "kornia is not installed"})
                continue
            out = makers[method]()  # untimed: first-call costs
            assert out.shape == (views, 3, size, size), (method, out.shape)
            seconds = []
            for _ in range(repeats):
                tic = time.perf_counter()
                makers[method]()
                seconds.append(time.perf_counter() - tic)
            rows.append({**row, "ms": 1e3 * min(seconds),
                         "median_ms": 1e3 * statistics.median(seconds)})
    return rows
