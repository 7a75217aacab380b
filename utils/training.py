"""Training machinery every loop shares (SimCLR pretraining, fine-tuning, segmentation): the
learning-rate schedule, Ctrl-C handling and the resume check."""
import math
import signal

import numpy as np

from utils.errors import UserError
from utils.distributed import launched_by_torchrun, print0

POSITIONALS = ("datapath", "modelpath")  # run-defining arguments given without a flag


def learning_rate_at(step, base_lr, warmup_steps, total_steps):
    """Linear warm-up from base_lr/warmup_steps to base_lr over `warmup_steps`, then cosine
    decay to 0 at `total_steps`: lr = base_lr * 0.5 * (1 + cos(pi * t)), t in [0, 1]."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def epoch_means(values, steps_per_epoch):
    """(E,) mean of each of the E complete epochs of per-step `values`; NaN entries (fp16
    steps the GradScaler skipped) are left out of the mean."""
    n = len(values) // steps_per_epoch
    values = np.asarray(values[:n * steps_per_epoch], dtype=np.float64).reshape(n, steps_per_epoch)
    counted = ~np.isnan(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counted, values, 0.0).sum(1) / counted.sum(1)


class GracefulStop:
    """Context manager: SIGINT/SIGTERM set `requested` instead of killing the process, so the
    loop can finish its step and write a checkpoint. A second Ctrl-C stops at once, except
    under torchrun, whose agent forwards the Ctrl-C it received itself (the agent kills the
    workers if they have not finished after its 30 s grace period)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT and not launched_by_torchrun():
            raise KeyboardInterrupt
        if self.requested:
            return
        self.requested = True
        print0("\nstopping: saving a checkpoint at the next step boundary where all "
               "processes agree (Ctrl-C again to abort without saving)", flush=True)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def check_resume_compatible(ckpt, args, checkpoint_path, run_defining, legacy=None):
    """UserError naming the first run-defining flag whose value differs from the stored run.

    `ckpt["args"]` holds the stored run's arguments; `legacy` gives the value a checkpoint
    written before a flag existed meant by it.
    """
    stored = {**(legacy or {}), **ckpt["args"]}
    for name in run_defining:
        if stored.get(name) != getattr(args, name):
            flag = name.upper() if name in POSITIONALS else "--" + name.replace("_", "-")
            raise UserError(
                f"{checkpoint_path} is a run with {flag} {stored.get(name)}, this command asks for "
                f"{getattr(args, name)}; pass the same value to resume it, --fresh to start over "
                f"(replacing it), or another RESPATH")
