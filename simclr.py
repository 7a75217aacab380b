"""The SimCLR step and what pretraining gives the training engine (utils/engine.py runs the
loop: schedule, zero_grad, the task's step, optimizer step, logging, saves, resume).

One step, SimCLRTask.step:
    x = make_views(batch, step)      # cat(view1, view2) (2B, C, S, S) on the device:
                                     # transfer_views (CPU workers) or gpu_augment (--gpu-aug)
    h, z = model(x)                  # utils/model.py: encoder, projection head
    loss = NT-Xent(z1, z2)           # utils/ntxent.py (negatives from every rank under torchrun)
    loss.backward()                  # forward_backward, also chunk by chunk (--chunk-size)
    probe.step(h1.detach(), y)       # the online probe on labelled data (utils/online_probe.py)
Mixed precision: autocast around the model's forward pass only, the loss in float32.

Beside the step: PretrainingOutputs (model.pth, optimizer.pth, lossesfile.npz, the plot,
run.json at every save) and PretrainingTensorBoard (its extra views); main.py builds the run.
"""
import contextlib
import copy
import functools
import os
import time

import numpy as np
import torch

from utils.checkpoint import save_checkpoint
from utils.distributed import print0
from utils.engine import Task, epoch_means, peak_memory_mb
from utils.fileio import atomic_savez, atomic_torch_save, json_dump
from utils.plotfuncs import plot_training_losses
from utils.precision import FLOAT32
from utils.sources import has_split, load_split


def forward_backward(model, criterion, x, chunk_size=None, precision=FLOAT32, return_h=False):
    """Loss of the views x = cat(view1, view2) (2B, C, S, S) and its parameter gradients
    (accumulated into .grad; zero them first). Returns (loss, positive-pair top-1), detached,
    and with `return_h` also h1 (B, F), the encoder output of view 1 from the same forward
    pass (of the no-grad pass with chunks), detached (the online probe's input).
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
        h, z = embed(x)  # both views in one pass: they share BatchNorm statistics
        loss, top1 = criterion.loss_and_top1(*z.chunk(2))
        precision.backward(loss)
        return (loss.detach(), top1, h[:b].detach()) if return_h else (loss.detach(), top1)
    view1, view2 = x[:b], x[b:]
    chunks = [torch.cat([view1[i:i + chunk_size], view2[i:i + chunk_size]])
              for i in range(0, b, chunk_size)]
    saved_buffers = [t.clone() for t in model.buffers()]
    with torch.no_grad():
        hz = [embed(chunk) for chunk in chunks]
    for t, saved in zip(model.buffers(), saved_buffers):
        t.copy_(saved)  # the graph pass below updates the running statistics
    z1 = torch.cat([z.chunk(2)[0] for _, z in hz]).requires_grad_()
    z2 = torch.cat([z.chunk(2)[1] for _, z in hz]).requires_grad_()
    h1 = torch.cat([h.chunk(2)[0] for h, _ in hz]) if return_h else None
    del hz
    loss, top1 = criterion.loss_and_top1(z1, z2)
    precision.backward(loss)  # only to dL/dz1, dL/dz2 (scaled): the model is not in this graph
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    for k, chunk in enumerate(chunks):
        rows = slice(k * chunk_size, k * chunk_size + chunk.shape[0] // 2)
        with no_sync() if k < len(chunks) - 1 else contextlib.nullcontext():
            embed(chunk)[1].backward(torch.cat([z1.grad[rows], z2.grad[rows]]))
    return (loss.detach(), top1, h1) if return_h else (loss.detach(), top1)


def embed_views(model, precision, x):
    """(h, z) of the views x under `precision`'s autocast: h (n, F) as the encoder gives it
    (bfloat16/float16 under autocast), z (n, D) cast to float32 (or kept float64)."""
    with precision.autocast():
        h, z = model(x)
    return h, z.to(torch.promote_types(z.dtype, torch.float32))


def transfer_views(batch, step, device):
    """The `make_views` of CPU-augmented batches: a loader batch (view1, view2), each (B, C, S, S), to
    x = cat(view1, view2) (2B, C, S, S) on `device`. Each view is copied on its own, so a
    pinned batch travels asynchronously (a concatenation on the host would not be pinned)."""
    view1, view2 = batch
    return torch.cat([view1.to(device, non_blocking=True), view2.to(device, non_blocking=True)])


class SimCLRTask(Task):
    """The SimCLR step for the engine: per-step loss and positive-pair top-1, the kNN monitor
    (`knn(encoder) -> accuracy` with `knn.split` naming its query images and `knn.due(epoch)`,
    or None) and the online probe as the evaluation.

    make_views(batch, step) -> x (2B, C, S, S) on the device: transfer_views for CPU-augmented
    loader batches, utils.gpu_augment.DeviceTwoViews for --gpu-aug. `tensorboard` (optional)
    has start(logger, trainer) and finish(logger, trainer) for the script's extra views.

    `probe` (a utils.online_probe.OnlineProbe, or None): batches are then (batch, labels (b,))
    and every step trains the probe on the detached h of view 1 (no gradient reaches the
    model); `probe_eval(encoder, probe) -> accuracy`, with `probe_eval.split` naming its
    images, evaluates it after every epoch. Its state travels in the checkpoint's "extra".
    """
    script = "main"
    series = {"loss": "loss", "positive_pair_top1": "positive-pair top-1"}

    def __init__(self, criterion, make_views, chunk_size=None, knn=None, tensorboard=None,
                 probe=None, probe_eval=None):
        self.criterion, self.make_views, self.chunk_size = criterion, make_views, chunk_size
        self.knn, self.tensorboard = knn, tensorboard
        self.probe, self.probe_eval = probe, probe_eval

    def step(self, trainer, batch, step):
        if self.probe is not None:
            batch, y = batch
        x = self.make_views(batch, step)  # (2B, C, S, S)
        if trainer.settings.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.probe is None:
            loss, top1 = forward_backward(trainer.model, self.criterion, x, self.chunk_size,
                                          trainer.precision)
            return loss, (top1,)
        loss, top1, h1 = forward_backward(trainer.model, self.criterion, x, self.chunk_size,
                                          trainer.precision, return_h=True)
        self.probe.step(h1, y.to(h1.device, non_blocking=True))
        return loss, (top1,)

    def evaluate(self, model, epoch):
        result = {}
        if self.knn is not None and self.knn.due(epoch):
            accuracy = self.knn(model.encoder)
            print0(f"epoch {epoch}: kNN accuracy of h on the {self.knn.split} "
                   f"{100 * accuracy:.2f} %", flush=True)
            result["knn_accuracy"] = accuracy
        if self.probe is not None:
            accuracy = self.probe_eval(model.encoder, self.probe)
            print0(f"epoch {epoch}: online probe accuracy of h on the {self.probe_eval.split} "
                   f"{100 * accuracy:.2f} %", flush=True)
            result["online_probe_accuracy"] = accuracy
        return result or None

    def extra_state(self):
        return {} if self.probe is None else {"online_probe": self.probe.state_dict()}

    def load_extra_state(self, extra):
        if self.probe is None:
            return
        if "online_probe" not in extra:
            print0("online probe: none in the run resumed, a fresh probe starts", flush=True)
        elif not self.probe.load_state_dict(extra["online_probe"]):
            print0("online probe: the run resumed has one fitted on raw h (before the "
                   "standardisation), a fresh probe starts", flush=True)

    def start_tensorboard(self, logger, trainer):
        if self.tensorboard is not None:
            self.tensorboard.start(logger, trainer)

    def finish_tensorboard(self, logger, trainer):
        if self.tensorboard is not None:
            self.tensorboard.finish(logger, trainer)


class PretrainingTensorBoard:
    """Pretraining's TensorBoard extras (SimCLRTask's `tensorboard`): the spread of z (collapse
    check) and the view pairs of the current epoch at the start, the embedding projector of h
    at the end."""

    def __init__(self, args, images, meta, augmentation):
        self.args, self.images, self.meta, self.augmentation = args, images, meta, augmentation

    def start(self, logger, trainer):
        step = trainer.history.step
        logger.watch_collapse(trainer.plain.head)
        logger.log_augmented_pairs(self.images, self.meta["in_channels"], self.augmentation,
                                   self.meta["mean"], self.meta["std"], self.args.seed,
                                   step // trainer.settings.steps_per_epoch, step)

    def finish(self, logger, trainer):
        args = self.args
        shown = (load_split(args.datapath, "test", False, args)
                 if has_split(args.datapath, "test", args) else self.images)
        logger.log_projector(trainer.plain.encoder, shown, self.meta, trainer.device,
                             args.batch_size, trainer.history.step)


class PretrainingOutputs:
    """What pretraining writes beside checkpoint.pth at every save (rank 0): model.pth,
    optimizer.pth, lossesfile.npz (the original project's files), the loss plot and run.json.
    Called on the training thread with the save's host snapshot; the engine's background
    writer then writes the files from that snapshot and the values captured with it."""

    def __init__(self, paths, run_info, unreadable):
        self.paths, self.run_info, self.unreadable = paths, run_info, unreadable

    def __call__(self, trainer, state, draw_plot):
        """The writes of this save (a function of no arguments, for the background writer):
        from `state`, the checkpoint's host snapshot, and what only the live trainer knows
        (time, speed, memory, unreadable files, save waits), taken now."""
        now = {"unreadable_images": copy.deepcopy(self.unreadable.summary()),
               "wall_time_s": round(time.perf_counter() - trainer.started, 1),
               "images_per_s": trainer.images_per_second(),
               "peak_memory_mb": round(peak_memory_mb(trainer.device), 1),
               "save_wait_s": trainer.save_wait_summary()}
        return functools.partial(self.write, state, now, draw_plot)

    def keep_snapshot(self, state):
        """--save-every E: at the end of every E-th epoch, model/epoch_NNNN.pth with the weights
        and what rebuilding them needs (a checkpoint dict load_pretrained reads)."""
        every, step = self.run_info["args"]["save_every"], state["step"]
        epoch, mid_epoch = divmod(step, state["steps_per_epoch"])
        if not every or mid_epoch or epoch % every or not epoch:
            return
        path = self.paths.snapshot(epoch)
        if not os.path.exists(path):
            save_checkpoint({"script": "main", "model": state["model"],
                             "model_meta": self.run_info["model_meta"], "epoch": epoch,
                             "step": step, "snapshot": True}, path)

    def write(self, state, now, draw_plot):
        """model.pth, optimizer.pth, the --save-every snapshot, lossesfile.npz, the loss plot
        (when `draw_plot`) and run.json, from the snapshot `state` and the values `now`."""
        paths, steps_per_epoch = self.paths, state["steps_per_epoch"]
        atomic_torch_save(state["model"], paths.model)
        atomic_torch_save(state["optimizer"], paths.optimizer)
        self.keep_snapshot(state)
        series = {name: values.numpy() for name, values in state["history"]["series"].items()}
        losses, top1 = series["loss"], series["positive_pair_top1"]
        epoch_losses, epoch_top1 = (epoch_means(values, steps_per_epoch)
                                    for values in (losses, top1))
        knn, probe = [np.asarray([(e["epoch"], e[key]) for e in state["history"]["evaluations"]
                                  if key in e], dtype=float).reshape(-1, 2)
                      for key in ("knn_accuracy", "online_probe_accuracy")]
        atomic_savez(paths.losses, step_losses=losses, epoch_losses=epoch_losses,
                     step_top1=top1, epoch_top1=epoch_top1, knn=knn, online_probe=probe,
                     steps_per_epoch=steps_per_epoch)
        if draw_plot and len(losses):
            plot_training_losses(losses, steps_per_epoch, paths.loss_plot,
                                 knn=[tuple(row) for row in knn.tolist()],
                                 online_probe=[tuple(row) for row in probe.tolist()])
        json_dump({**self.run_info, "epochs_done": len(epoch_losses),
                   "steps_done": len(losses), "epoch_losses": epoch_losses.tolist(),
                   "epoch_positive_pair_top1": epoch_top1.tolist(),
                   "knn_accuracy": knn.tolist(), "online_probe_accuracy": probe.tolist(),
                   **now}, paths.run_json)
