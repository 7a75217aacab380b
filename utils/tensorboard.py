"""TensorBoard monitoring of a training run (--tensorboard of main.py, finetune.py, segment.py),
written by the engine on rank 0 only.

tensorboard is an optional dependency: this module imports it only when a logger is created.

Tags (RESPATH/tensorboard/):
    train/loss, train/lr        every training step, and train/NAME for the script's other
                                per-step values (train/positive_pair_top1 for pretraining,
                                train/accuracy for fine-tuning)
    eval/NAME                   each evaluation (eval/knn_accuracy of --knn-every,
                                eval/val_accuracy of finetune.py, eval/miou of segment.py)
main.py adds:
    collapse/z_std_mean         mean over dimensions of the per-dimension std, over the batch,
                                of the L2-normalised projection z: about 1/sqrt(D) when the
                                views spread over the sphere, 0 when they collapse to one point
    collapse/z_std              histogram of the per-dimension std
    views/pairs                 image grid: view 1 above view 2 for a few training images
    projector                   embedding projector of h for test (or training) images, with
                                thumbnails and class names, at the end of the run
"""
import os

import torch
import torch.nn.functional as F

from utils.errors import UserError
from utils.data import ImageDataset, TwoViewDataset, make_loader
from utils.transforms import EvalTransform, TwoViews, denormalize

PAIRS_SHOWN = 8
PROJECTOR_IMAGES = 500


def normalized_std_per_dim(z):
    """(D,) std over the batch of each dimension of the L2-normalised rows of z (B, D)."""
    return F.normalize(z.detach().float(), dim=1).std(0)


class CollapseMonitor:
    """Forward hook on the projection head that keeps normalized_std_per_dim of the last batch
    it saw, on the device (no host synchronisation until it is read)."""

    def __init__(self, head):
        self.latest = None
        self.handle = head.register_forward_hook(self._record)

    def _record(self, module, inputs, output):
        if module.training and output.shape[0] > 1:
            self.latest = normalized_std_per_dim(output)

    def remove(self):
        self.handle.remove()


class TensorBoardLogger:
    """A SummaryWriter with the toolkit's tags (see the module docstring)."""

    def __init__(self, logdir, first_step=0):
        """Events of steps >= first_step left by an interrupted run are dropped (purge_step),
        so a resumed run continues the curves without duplicates."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install "
                            "tensorboard (or leave out --tensorboard)") from None
        self.logdir = logdir
        self.writer = SummaryWriter(logdir, purge_step=first_step or None)
        self.collapse = None

    def watch_collapse(self, head):
        """Record the spread of z from the head's forward passes (see CollapseMonitor)."""
        self.collapse = CollapseMonitor(head)

    def log_steps(self, first_step, series, lrs):
        """Per-step scalars train/NAME of each series {name: values} and train/lr for the
        steps first_step, first_step + 1, ...; the collapse statistic of the latest batch at
        the last of them."""
        for name, values in series.items():
            for i, value in enumerate(values):
                self.writer.add_scalar(f"train/{name}", value, first_step + i)
        for i, lr in enumerate(lrs):
            self.writer.add_scalar("train/lr", lr, first_step + i)
        if self.collapse is not None and self.collapse.latest is not None and lrs:
            std = self.collapse.latest.cpu()
            last = first_step + len(lrs) - 1
            self.writer.add_scalar("collapse/z_std_mean", std.mean().item(), last)
            self.writer.add_histogram("collapse/z_std", std, last)
        self.writer.flush()

    def log_evaluation(self, step, metrics):
        """eval/NAME of each evaluation metric {name: value} at global step `step`."""
        for name, value in metrics.items():
            self.writer.add_scalar(f"eval/{name}", value, step)
        self.writer.flush()

    def log_view_pairs(self, view1, view2, mean, std, step=0):
        """Grid of normalised views (B, C, S, S): row 1 view 1, row 2 view 2 of the same
        images, undone back to [0, 1] for display."""
        from torchvision.utils import make_grid
        pairs = torch.cat([denormalize(view1, mean, std), denormalize(view2, mean, std)])
        self.writer.add_image("views/pairs", make_grid(pairs, nrow=view1.shape[0], padding=2,
                                                       pad_value=1.0), step)
        self.writer.flush()

    def log_augmented_pairs(self, images, channels, augmentation, mean, std, seed, epoch, step):
        """The views the CPU pipeline makes of the first PAIRS_SHOWN `images` in `epoch`
        (the same seeded views training sees with CPU augmentation)."""
        dataset = TwoViewDataset(images, channels, TwoViews(augmentation), seed)
        pairs = [dataset[(i, epoch)] for i in range(min(PAIRS_SHOWN, len(images)))]
        self.log_view_pairs(torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs]),
                            mean, std, step)

    def log_projector(self, encoder, images, meta, device, batch_size, step):
        """h of the first PROJECTOR_IMAGES of `images` (ImageList, labels optional) with their
        thumbnails and class names, for the embedding projector; scaled by meta's intensity
        range, as the model saw its images."""
        images = images.subset(list(range(min(PROJECTOR_IMAGES, len(images))))
                               ).with_intensity_range(meta.get("intensity_range"))
        loader = make_loader(ImageDataset(images, meta["in_channels"], EvalTransform(
            meta["image_size"], meta["mean"], meta["std"])), batch_size=batch_size)
        features, thumbnails = [], []
        encoder.eval()
        with torch.no_grad():
            for x, _ in loader:
                features.append(encoder(x.to(device)).float().cpu())
                thumbnails.append(denormalize(x, meta["mean"], meta["std"]))
        self.log_embedding(torch.cat(features), images.labels, images.classes,
                           torch.cat(thumbnails), step)

    def log_embedding(self, features, labels, class_names, thumbnails, step):
        """The projector: features (N, F), labels (N,) (or None), thumbnails (N, C, H, W) in
        [0, 1]."""
        metadata = None if labels is None else [class_names[int(y)] for y in labels]
        self.writer.add_embedding(features, metadata=metadata, label_img=thumbnails,
                                  global_step=step, tag="h")
        self.writer.flush()

    def close(self):
        if self.collapse is not None:
            self.collapse.remove()
        self.writer.close()


def tensorboard_dir(respath):
    """Where a run's event files go: RESPATH/tensorboard (tensorboard --logdir RESPATH)."""
    return os.path.join(respath, "tensorboard")
