"""The SimCLR training loop: `train_one_epoch` and `train` (epochs, schedule, checkpoints,
Ctrl-C). No argument parsing here; main.py builds everything and calls `train`.

One step: both views in one batch -> model -> (h, z) -> NT-Xent(z1, z2) -> backward -> step,
with the learning rate a pure function of the global step (linear warm-up, then cosine).
Under torchrun every rank runs the same loop on its slice of each global batch.

No host-device synchronisation inside a step: the per-step loss and top-1 stay on the device
and every `log_every` steps (and at the end of an epoch) one small all-reduce and one transfer
bring the whole window to the host, giving every rank the same losses to log and the same
stop/save decisions; checkpoints are written only at those points. Mixed precision
(`MixedPrecision`): autocast around the model's forward pass only, the loss in float32.
"""
import contextlib
import functools
import math
import time

import torch
from tqdm import tqdm

from utils.checkpoint import rng_state
from utils.cli import UserError, warn
from utils.distributed import (all_reduce_mean, get_world_size, is_main_process,
                               print0)
from utils.lars import LARS
from utils.training import GracefulStop, epoch_means

LR_REFERENCE_BATCH = 256
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# fp16: a non-finite loss is a step GradScaler skips; this many in a row is an overflow that
# skipping does not cure (the forward pass itself overflows), so the run stops.
MAX_SKIPPED_STEPS_IN_A_ROW = 20


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
        return epoch_means(values, self.steps_per_epoch)

    @property
    def epoch_losses(self):
        return self.epoch_means(self.step_losses)

    @property
    def epoch_top1(self):
        return self.epoch_means(self.step_top1)


def resolve_amp(mode, device):
    """The precision of --amp on `device`: 'auto' is bf16 on CUDA devices that support it and
    off elsewhere; UserError for bf16 on a GPU without it, a warning for bf16/fp16 on a CPU
    without fast kernels for them."""
    if mode == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--amp bf16: this GPU does not support bfloat16; use --amp fp16 (with "
                        "loss scaling) or --amp off", all_ranks=True)
    if mode not in ("off", *AMP_DTYPES):
        raise ValueError(f"unknown precision {mode!r}: auto, off, bf16 or fp16")
    if device.type == "cpu" and mode != "off" and not cpu_has_fast(mode) and is_main_process():
        dtype = str(AMP_DTYPES[mode]).removeprefix("torch.")
        warn(f"--amp {mode}: this CPU has no fast {dtype} kernels, so the step runs "
             f"many times slower than float32 (17x for bf16, 22x for fp16 on an AVX2 CPU, "
             f"bench.py, ResNet-18, 32 px); use --amp off here")
    return mode


def cpu_has_fast(mode):
    """Whether torch's oneDNN reports fast kernels for the --amp dtype on this CPU: bf16 needs
    AVX-512 (BW, VL and DQ) on x86, fp16 AVX512-FP16 or AMX-FP16."""
    name = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}[mode]
    try:
        return bool(getattr(torch.ops.mkldnn, name)())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


class MixedPrecision:
    """Autocast and loss scaling for one of the --amp modes ('off', 'bf16', 'fp16').

    `autocast()` wraps the model's forward pass (bf16/fp16 matmuls and convolutions, float32
    elsewhere); fp16 adds a torch.amp.GradScaler: the loss is multiplied by the scale S before
    backward, the gradients divided by S before the step, and a step whose gradients are not
    finite is skipped with S halved (S doubles after 2000 finite steps). GradScaler.step reads
    that finite flag on the host: fp16 has one synchronisation per step, bf16 none.
    """

    def __init__(self, mode, device):
        self.mode = mode
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None

    def autocast(self):
        if self.mode == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=AMP_DTYPES[self.mode])

    def backward(self, loss):
        """loss.backward(), of the scaled loss with fp16."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, optimizer):
        """optimizer.step(), through the scaler with fp16 (which then may skip it)."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self):
        """The scaler's state for the checkpoint's "scaler" entry (None without a scaler)."""
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state):
        """Restore what state_dict returned; a checkpoint without scaler state leaves it fresh."""
        if self.scaler is not None and state is not None:
            self.scaler.load_state_dict(state)


FLOAT32 = MixedPrecision("off", torch.device("cpu"))


def forward_backward(model, criterion, x, chunk_size=None, precision=FLOAT32):
    """Loss of the views x = cat(view1, view2) (2B, C, S, S) and its parameter gradients
    (accumulated into .grad; zero them first). Returns (loss, positive-pair top-1), detached.
    `precision` (MixedPrecision) autocasts the model's forward passes; z is cast to float32,
    so the loss is float32, and with fp16 the scaled loss is backpropagated.

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
    embed = functools.partial(embed_views, model, precision)
    if not chunk_size or chunk_size >= b:
        z = embed(x)  # both views in one pass: they share BatchNorm statistics
        loss, top1 = criterion.loss_and_top1(*z.chunk(2))
        precision.backward(loss)
        return loss.detach(), top1
    view1, view2 = x[:b], x[b:]
    chunks = [torch.cat([view1[i:i + chunk_size], view2[i:i + chunk_size]])
              for i in range(0, b, chunk_size)]
    saved_buffers = [t.clone() for t in model.buffers()]
    with torch.no_grad():
        z = [embed(chunk).chunk(2) for chunk in chunks]
    for t, saved in zip(model.buffers(), saved_buffers):
        t.copy_(saved)  # the graph pass below updates the running statistics
    z1 = torch.cat([z1c for z1c, _ in z]).requires_grad_()
    z2 = torch.cat([z2c for _, z2c in z]).requires_grad_()
    loss, top1 = criterion.loss_and_top1(z1, z2)
    precision.backward(loss)  # only to dL/dz1, dL/dz2 (scaled): the model is not in this graph
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    for k, chunk in enumerate(chunks):
        rows = slice(k * chunk_size, k * chunk_size + chunk.shape[0] // 2)
        with no_sync() if k < len(chunks) - 1 else contextlib.nullcontext():
            embed(chunk).backward(torch.cat([z1.grad[rows], z2.grad[rows]]))
    return loss.detach(), top1


def embed_views(model, precision, x):
    """z of the views x under `precision`'s autocast, cast to float32 (or kept float64)."""
    with precision.autocast():
        _, z = model(x)
    return z.to(torch.promote_types(z.dtype, torch.float32))


def transfer_views(batch, step, device):
    """The default `make_views` of train: a loader batch (view1, view2), each (B, C, S, S), to
    x = cat(view1, view2) (2B, C, S, S) on `device`. Each view is copied on its own, so a
    pinned batch travels asynchronously (a concatenation on the host would not be pinned)."""
    view1, view2 = batch
    return torch.cat([view1.to(device, non_blocking=True), view2.to(device, non_blocking=True)])


def train_one_epoch(model, criterion, optimizer, loader, device, epoch, history, schedule,
                    channels_last, chunk_size, stop, checkpoint_due, save_checkpoint,
                    precision=FLOAT32, log_every=10, on_log=None, make_views=None):
    """Train over `loader` (which may start mid-epoch); returns False if stopped by a signal.

    `schedule(step)` gives the learning rate of global step `step`; `checkpoint_due()` and
    `save_checkpoint(draw_plot)` let a long epoch be checkpointed at logging points.
    `make_views(batch, step)` turns a loader batch into the views x (2B, C, S, S) on `device`
    (default transfer_views; utils.gpu_augment.DeviceTwoViews augments uint8 batches there).
    Steps stay on the device; every `log_every` global steps, at the end of the epoch and
    (single process) when a stop is requested, the window of steps is logged: appended to
    `history`, shown on the bar, passed to `on_log(first_step, losses, top1s, lrs)` (lists of
    python floats, on every rank), then the stop/save decisions are taken.
    """
    model.train()
    make_views = make_views or functools.partial(transfer_views, device=device)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True,
               mininterval=1.0, disable=None if is_main_process() else True)
    first = len(history.step_losses)
    window = []  # (loss, top1) device tensors and lr of the steps since the last log
    tic = time.perf_counter()
    for k, batch in enumerate(bar):
        step = first + k
        lr = schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = make_views(batch, step)  # (2B, C, S, S)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        loss, top1 = forward_backward(model, criterion, x, chunk_size, precision)
        precision.step(optimizer)
        window.append((loss, top1, lr))
        if not is_logging_point(step, log_every, history.steps_per_epoch, stop):
            continue
        stop_now, save_now = log_window(window, step + 1 - len(window), history, precision,
                                        stop, checkpoint_due, on_log)
        toc = time.perf_counter()
        images = len(window) * x.shape[0] // 2 * get_world_size()
        bar.set_postfix(loss=f"{finite_mean(history.step_losses[-len(window):]):.4f}",
                        lr=f"{lr:.3g}", img_s=f"{images / (toc - tic):.0f}")
        window, tic = [], toc
        if stop_now:
            save_checkpoint(draw_plot=True)
            return False
        if save_now:
            save_checkpoint(draw_plot=False)
    return True


def is_logging_point(step, log_every, steps_per_epoch, stop):
    """Whether global step `step` (just done) ends a logging window: every log_every steps, at
    the end of an epoch, and in a single process as soon as a stop is requested (under
    torchrun the ranks only agree on a stop at the regular points)."""
    return ((step + 1) % log_every == 0 or (step + 1) % steps_per_epoch == 0
            or (stop.requested and get_world_size() == 1))


def log_window(window, first_step, history, precision, stop, checkpoint_due, on_log):
    """Bring the window's losses and top-1s (device tensors) to the host with one all-reduce
    (the mean over ranks) together with the stop/save flags; check them, append them to
    `history`, call `on_log`. Returns (stop_now, save_now), the same on every rank.

    A non-finite loss is the UserError of a diverged run (the last checkpoint, written after a
    finite window, is intact), except with fp16 loss scaling: there it makes the gradients
    non-finite, so GradScaler skips that step (weights untouched) and it is recorded as NaN;
    MAX_SKIPPED_STEPS_IN_A_ROW such steps in a row stop the run (an overflow in the forward
    pass, which a smaller scale does not cure).
    """
    n = len(window)
    losses = torch.stack([loss for loss, _, _ in window])
    flags = torch.tensor([stop.requested, checkpoint_due()], dtype=losses.dtype,
                         device=losses.device)
    values = all_reduce_mean(torch.cat([losses, torch.stack([t for _, t, _ in window]).to(
        losses.dtype), flags])).tolist()
    losses, top1s, (stop_now, save_now) = values[:n], values[n:2 * n], values[2 * n:]
    lrs = [lr for _, _, lr in window]
    for k, value in enumerate(losses):
        if math.isfinite(value):
            continue
        if precision.scaler is None:
            raise UserError(f"the loss became {value} at step {first_step + k} (the last "
                            f"checkpoint is intact); start again with a lower --lr and --fresh",
                            all_ranks=True)
        losses[k] = top1s[k] = math.nan  # a step GradScaler skipped
    history.step_losses.extend(losses)
    history.step_top1.extend(top1s)
    skipped = trailing_nans(history.step_losses)
    if skipped >= MAX_SKIPPED_STEPS_IN_A_ROW:
        raise UserError(f"--amp fp16 overflows: the loss was not finite in the last {skipped} "
                        f"steps (all skipped); resume from the last checkpoint with --amp bf16 "
                        f"or --amp off", all_ranks=True)
    if on_log is not None:
        on_log(first_step, losses, top1s, lrs)
    return bool(stop_now), bool(save_now)


def finite_mean(values):
    """Mean of the values that are not NaN (NaN if there are none)."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def trailing_nans(values):
    """How many of the last values in a row are NaN."""
    count = 0
    for value in reversed(values):
        if not math.isnan(value):
            break
        count += 1
    return count


def checkpoint_state(model, optimizer, history, schedule_info, args, model_meta, data_info,
                     scaler=None):
    """The one checkpoint dict (see utils/checkpoint.py for how it is written); `scaler` is the
    fp16 GradScaler's state (MixedPrecision.state_dict), None otherwise."""
    step = len(history.step_losses)
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": schedule_info, "scaler": scaler,
            "epoch": step // history.steps_per_epoch, "step": step,
            "losses": {"step_losses": torch.tensor(history.step_losses, dtype=torch.float64),
                       "step_top1": torch.tensor(history.step_top1, dtype=torch.float64),
                       "knn": torch.tensor(history.knn, dtype=torch.float64).reshape(-1, 2)},
            "args": args, "model_meta": model_meta, "data": data_info, "rng": rng_state()}


def train(model, criterion, optimizer, sampler, loader, device, history, epochs, schedule,
          channels_last, chunk_size, save, checkpoint_minutes, knn_every=0, knn_monitor=None,
          precision=FLOAT32, log_every=10, on_log=None, make_views=None):
    """Run epochs until `epochs` are complete, resuming from len(history.step_losses).

    `save(draw_plot)` writes the checkpoint and outputs (the loss plot only if draw_plot).
    Every `knn_every` epochs (and after the last), `knn_monitor()` gives the kNN accuracy of h,
    recorded in history.knn (rank 0 computes it; the other ranks wait at the save's barrier).
    `precision`, `log_every`, `on_log` and `make_views`: see train_one_epoch.
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
                                       checkpoint_due, save_checkpoint, precision, log_every,
                                       on_log, make_views)
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
