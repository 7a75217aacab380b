"""The SimCLR training loop: `train_one_epoch` and `train` (epochs, schedule, checkpoints,
Ctrl-C). No argument parsing here; main.py builds everything and calls `train`.

One step: both views in one batch -> model -> (h, z) -> NT-Xent(z1, z2) -> backward -> step,
with the learning rate a pure function of the global step (linear warm-up, then cosine).
Under torchrun every rank runs the same loop on its slice of each global batch; one small
all-reduce per step gives every rank the same loss to log and the same stop/save decisions.
"""
import contextlib
import math
import time

import numpy as np
import torch
from tqdm import tqdm

from utils.checkpoint import rng_state
from utils.cli import UserError
from utils.distributed import (all_reduce_mean, get_world_size, is_main_process,
                               print0)
from utils.lars import LARS
from utils.training import GracefulStop

LR_REFERENCE_BATCH = 256


def scaled_learning_rate(lr_per_256, global_batch_size, rule):
    """The peak learning rate for a global batch of B images, from a rate given per 256:
    linear: lr * B / 256;  sqrt: lr * sqrt(B / 256);  none: lr as given (SimCLR paper, B.1)."""
    ratio = global_batch_size / LR_REFERENCE_BATCH
    if rule == "linear":
        return lr_per_256 * ratio
    if rule == "sqrt":
        return lr_per_256 * math.sqrt(ratio)
    if rule == "none":
        return lr_per_256
    raise ValueError(f"unknown learning-rate scaling {rule!r}: linear, sqrt or none")


def build_optimizer(model, name, lr, weight_decay):
    """SGD (momentum 0.9), AdamW or LARS (momentum 0.9, eta 0.001).

    BatchNorm weights and biases (the 1-d tensors) get no weight decay and, with LARS, no
    trust-ratio adaptation, as in the SimCLR paper.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:  # frozen parameters (fine-tuning --freeze) are not optimised
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "lars":
        groups[1]["lars_adapt"] = False
        return LARS(groups, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name}")


class History:
    """Per-step losses and positive-pair top-1; per-epoch values are means over epoch slices."""

    def __init__(self, steps_per_epoch, step_losses=(), step_top1=(), knn=()):
        self.steps_per_epoch = steps_per_epoch
        self.step_losses = list(step_losses)
        self.step_top1 = list(step_top1)
        self.knn = [tuple(row) for row in knn]  # (epoch, kNN accuracy of h on the test split)

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


def forward_backward(model, criterion, x, chunk_size=None):
    """Loss of the views x = cat(view1, view2) (2B, C, S, S) and its parameter gradients
    (accumulated into .grad; zero them first). Returns (loss, positive-pair top-1), detached.

    chunk_size None or >= B: one forward of all 2B views, whose BatchNorm statistics are those
    of the whole batch, then backward.
    chunk_size C < B, gradient caching (Gao et al. 2021), for batches larger than memory:
      1. embed the views chunk by chunk (C images, 2C views) without a graph -> z (2B, D);
      2. loss and its gradient dL/dz over the full batch (negatives of every chunk and rank);
      3. embed each chunk again with a graph and backpropagate dL/dz of its rows.
    Since L depends on the parameters only through z, the chain rule makes the gradient that of
    the plain step, and only one chunk's activations are held at a time. What differs: in
    training mode each chunk's BatchNorm normalises with its own 2C-view statistics (with
    eval-mode BatchNorm or GroupNorm the step equals the plain one exactly), and the running
    statistics are updated once per chunk. Gradient synchronisation under DDP happens once, in
    the last chunk's backward.
    """
    b = x.shape[0] // 2
    if not chunk_size or chunk_size >= b:
        _, z = model(x)  # both views in one pass: they share BatchNorm statistics
        loss, top1 = criterion.loss_and_top1(*z.chunk(2))
        loss.backward()
        return loss.detach(), top1
    view1, view2 = x[:b], x[b:]
    chunks = [torch.cat([view1[i:i + chunk_size], view2[i:i + chunk_size]])
              for i in range(0, b, chunk_size)]
    saved_buffers = [t.clone() for t in model.buffers()]
    with torch.no_grad():
        z = [model(chunk)[1].chunk(2) for chunk in chunks]
    for t, saved in zip(model.buffers(), saved_buffers):
        t.copy_(saved)  # the graph pass below updates the running statistics
    z1 = torch.cat([z1c for z1c, _ in z]).requires_grad_()
    z2 = torch.cat([z2c for _, z2c in z]).requires_grad_()
    loss, top1 = criterion.loss_and_top1(z1, z2)
    loss.backward()  # only to dL/dz1, dL/dz2: the model is not in this graph
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    for k, chunk in enumerate(chunks):
        rows = slice(k * chunk_size, k * chunk_size + chunk.shape[0] // 2)
        with no_sync() if k < len(chunks) - 1 else contextlib.nullcontext():
            _, zc = model(chunk)
            zc.backward(torch.cat([z1.grad[rows], z2.grad[rows]]))
    return loss.detach(), top1


def train_one_epoch(model, criterion, optimizer, loader, device, epoch, history, schedule,
                    channels_last, chunk_size, stop, checkpoint_due, save_checkpoint):
    """Train over `loader` (which may start mid-epoch); returns False if stopped by a signal.

    `schedule(step)` gives the learning rate of global step `step`; `checkpoint_due()` and
    `save_checkpoint(draw_plot)` let a long epoch be checkpointed at step boundaries.
    """
    model.train()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True,
               mininterval=1.0, disable=None if is_main_process() else True)
    tic = time.perf_counter()
    for view1, view2 in bar:
        step = len(history.step_losses)
        lr = schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr

        x = torch.cat([view1, view2]).to(device, non_blocking=True)  # (2B, C, S, S)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        loss, top1 = forward_backward(model, criterion, x, chunk_size)
        # One collective (and host sync) per step: the global loss for the log, and the same
        # stop/save decisions on every rank.
        flags = torch.tensor([stop.requested, checkpoint_due()], dtype=loss.dtype,
                             device=loss.device)
        loss_value, top1_value, stop_now, save_now = all_reduce_mean(
            torch.cat([loss.view(1), top1.view(1).to(loss.dtype), flags])).tolist()
        if not math.isfinite(loss_value):
            raise UserError(f"the loss became {loss_value} at step {step} (the last checkpoint "
                            f"is intact); start again with a lower --lr and --fresh",
                            all_ranks=True)
        optimizer.step()

        history.step_losses.append(loss_value)
        history.step_top1.append(top1_value)
        toc = time.perf_counter()
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.3g}",
                        img_s=f"{view1.shape[0] * get_world_size() / (toc - tic):.0f}")
        tic = toc
        if stop_now:
            save_checkpoint(draw_plot=True)
            return False
        if save_now:
            save_checkpoint(draw_plot=False)
    return True


def checkpoint_state(model, optimizer, history, schedule_info, args, model_meta, data_info):
    """The one checkpoint dict (see utils/checkpoint.py for how it is written)."""
    step = len(history.step_losses)
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": schedule_info, "scaler": None,
            "epoch": step // history.steps_per_epoch, "step": step,
            "losses": {"step_losses": torch.tensor(history.step_losses, dtype=torch.float64),
                       "step_top1": torch.tensor(history.step_top1, dtype=torch.float64),
                       "knn": torch.tensor(history.knn, dtype=torch.float64).reshape(-1, 2)},
            "args": args, "model_meta": model_meta, "data": data_info, "rng": rng_state()}


def train(model, criterion, optimizer, sampler, loader, device, history, epochs, schedule,
          channels_last, chunk_size, save, checkpoint_minutes, knn_every=0, knn_monitor=None):
    """Run epochs until `epochs` are complete, resuming from len(history.step_losses).

    `save(draw_plot)` writes the checkpoint and outputs (the loss plot only if draw_plot).
    Every `knn_every` epochs (and after the last), `knn_monitor()` gives the kNN accuracy of h,
    recorded in history.knn (rank 0 computes it; the other ranks wait at the save's barrier).
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
                                       history, schedule, channels_last, chunk_size, stop,
                                       checkpoint_due, save_checkpoint)
            if not finished:
                return "stopped"
            seconds = time.perf_counter() - tic
            images = (spe - start_batch) * sampler.global_batch_size
            print0(f"epoch {epoch + 1}/{epochs}  loss {history.epoch_losses[-1]:.4f}  "
                   f"positive-pair top-1 {history.epoch_top1[-1]:.3f}  "
                   f"lr {schedule(len(history.step_losses) - 1):.4g}  "
                   f"{images / seconds:.0f} img/s  {seconds:.0f} s", flush=True)
            done = epoch + 1
            if knn_every and (done % knn_every == 0 or done == epochs) and is_main_process():
                accuracy = knn_monitor()
                history.knn.append((done, accuracy))
                print0(f"epoch {done}: kNN accuracy of h on the test split {100 * accuracy:.2f} %",
                       flush=True)
                model.train()
            save_checkpoint(draw_plot=True)
            # a signal that arrived after the last step's all-reduce reached some ranks only
            stop_now = all_reduce_mean(torch.tensor([float(stop.requested)], device=device))
            if stop_now.item() > 0:
                return "stopped" if len(history.step_losses) < epochs * spe else "finished"
    return "finished"
