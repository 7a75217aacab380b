"""The SimCLR training loop: `train_one_epoch` and `train` (epochs, schedule, checkpoints,
Ctrl-C). No argument parsing here; main.py builds everything and calls `train`.

One step: both views in one batch -> model -> (h, z) -> NT-Xent(z1, z2) -> backward -> step,
with the learning rate a pure function of the global step (linear warm-up, then cosine).
"""
import math
import signal
import time

import numpy as np
import torch
from tqdm import tqdm

from utils.checkpoint import rng_state
from utils.cli import UserError
from utils.ntxent import positive_pair_top1


def learning_rate_at(step, base_lr, warmup_steps, total_steps):
    """Linear warm-up from base_lr/warmup_steps to base_lr over `warmup_steps`, then cosine
    decay to 0 at `total_steps`: lr = base_lr * 0.5 * (1 + cos(pi * t)), t in [0, 1]."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def build_optimizer(model, name, lr, weight_decay):
    """SGD (momentum 0.9) or AdamW; BatchNorm weights and biases get no weight decay."""
    decay, no_decay = [], []
    for param in model.parameters():
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name}")


class GracefulStop:
    """Context manager: SIGINT/SIGTERM set `requested` instead of killing the process, so the
    loop can finish its step and write a checkpoint. A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping: finishing this step and saving a checkpoint "
              "(Ctrl-C again to abort without saving)", flush=True)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class History:
    """Per-step losses and positive-pair top-1; per-epoch values are means over epoch slices."""

    def __init__(self, steps_per_epoch, step_losses=(), step_top1=()):
        self.steps_per_epoch = steps_per_epoch
        self.step_losses = list(step_losses)
        self.step_top1 = list(step_top1)

    def epoch_means(self, values):
        n = len(values) // self.steps_per_epoch
        return np.asarray(values[:n * self.steps_per_epoch], dtype=np.float64).reshape(
            n, self.steps_per_epoch).mean(1)

    @property
    def epoch_losses(self):
        return self.epoch_means(self.step_losses)

    @property
    def epoch_top1(self):
        return self.epoch_means(self.step_top1)


def train_one_epoch(model, criterion, optimizer, loader, device, epoch, history, schedule,
                    channels_last, stop, checkpoint_due, save_checkpoint):
    """Train over `loader` (which may start mid-epoch); returns False if stopped by a signal.

    `schedule(step)` gives the learning rate of global step `step`; `checkpoint_due()` and
    `save_checkpoint(draw_plot)` let a long epoch be checkpointed at step boundaries.
    """
    model.train()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True,
               mininterval=1.0, disable=None)
    tic = time.perf_counter()
    for view1, view2 in bar:
        step = len(history.step_losses)
        lr = schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr

        x = torch.cat([view1, view2]).to(device, non_blocking=True)  # (2B, C, S, S)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        _, z = model(x)  # both views in one pass: they share BatchNorm statistics
        z1, z2 = z.chunk(2)
        loss = criterion(z1, z2)
        if not torch.isfinite(loss):
            raise UserError(f"the loss became {loss.item()} at step {step} (the checkpoint of "
                            f"the last epoch is intact); start again with a lower --lr and "
                            f"--fresh")

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        history.step_losses.append(loss.item())
        history.step_top1.append(positive_pair_top1(z1, z2).item())
        toc = time.perf_counter()
        bar.set_postfix(loss=f"{history.step_losses[-1]:.4f}", lr=f"{lr:.3g}",
                        img_s=f"{view1.shape[0] / (toc - tic):.0f}")
        tic = toc
        if stop.requested:
            save_checkpoint(draw_plot=True)
            return False
        if checkpoint_due():
            save_checkpoint(draw_plot=False)
    return True


def checkpoint_state(model, optimizer, history, schedule_info, args, model_meta, data_info):
    """The one checkpoint dict (see utils/checkpoint.py for how it is written)."""
    step = len(history.step_losses)
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": schedule_info, "scaler": None,
            "epoch": step // history.steps_per_epoch, "step": step,
            "losses": {"step_losses": torch.tensor(history.step_losses, dtype=torch.float64),
                       "step_top1": torch.tensor(history.step_top1, dtype=torch.float64)},
            "args": args, "model_meta": model_meta, "data": data_info, "rng": rng_state()}


def train(model, criterion, optimizer, sampler, loader, device, history, epochs, schedule,
          channels_last, save, checkpoint_minutes):
    """Run epochs until `epochs` are complete, resuming from len(history.step_losses).

    `save(draw_plot)` writes the checkpoint and outputs (the loss plot only if draw_plot).
    Returns 'finished' or 'stopped'.
    """
    last_save = time.monotonic()

    def checkpoint_due():
        return checkpoint_minutes > 0 and time.monotonic() - last_save > 60 * checkpoint_minutes

    def save_checkpoint(draw_plot):
        nonlocal last_save
        save(draw_plot)
        last_save = time.monotonic()

    spe = history.steps_per_epoch
    with GracefulStop() as stop:
        while len(history.step_losses) < epochs * spe:
            step = len(history.step_losses)
            epoch, start_batch = divmod(step, spe)
            sampler.set_epoch(epoch, start_batch)
            tic = time.perf_counter()
            finished = train_one_epoch(model, criterion, optimizer, loader, device, epoch,
                                       history, schedule, channels_last, stop, checkpoint_due,
                                       save_checkpoint)
            if not finished:
                return "stopped"
            seconds = time.perf_counter() - tic
            images = (spe - start_batch) * sampler.batch_size
            print(f"epoch {epoch + 1}/{epochs}  loss {history.epoch_losses[-1]:.4f}  "
                  f"positive-pair top-1 {history.epoch_top1[-1]:.3f}  "
                  f"lr {schedule(len(history.step_losses) - 1):.4g}  "
                  f"{images / seconds:.0f} img/s  {seconds:.0f} s", flush=True)
            save_checkpoint(draw_plot=True)
            if stop.requested:
                return "stopped" if len(history.step_losses) < epochs * spe else "finished"
    return "finished"
