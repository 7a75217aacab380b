"""The SimCLR step: both views of B images in one batch -> model -> (h, z) -> NT-Xent(z1, z2)
-> backward, and `SimCLRTask`, which gives that step (and the kNN monitor and the online probe
as its evaluation) to the training engine. main.py builds the run; utils/engine.py runs the loop.

The loop, as the engine runs it for this task (utils/engine.py, Trainer.train_one_epoch):
    for batch in loader:                          # (view1, view2) or uint8 images (--gpu-aug),
                                                  # with the images' labels y for the probe
        lr = schedule(step)                       # linear warm-up, then cosine, per step
        optimizer.zero_grad()
        x = make_views(batch, step)               # cat(view1, view2) (2B, C, S, S) on the device
        loss, top1 = forward_backward(model, criterion, x, chunk_size, precision)
        probe.step(h1, y)                         # online probe (labelled data): h1 = view 1's
                                                  # h of that forward pass, detached; own AdamW
        precision.step(optimizer)                 # GradScaler under fp16
        every log_every steps: one all-reduce + transfer of the window's losses and top-1s
Under torchrun (or --multiple_gpus) every rank runs the same loop on its slice of each global
batch; `criterion` then gathers every rank's z as negatives (utils/distributed.py).
Mixed precision: autocast around the model's forward pass only, the loss in float32.
"""
import contextlib
import functools

import torch

from utils.distributed import print0
from utils.engine import Task
from utils.precision import FLOAT32


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
        if "online_probe" in extra:
            self.probe.load_state_dict(extra["online_probe"])
        else:
            print0("online probe: none in the run resumed, a fresh probe starts", flush=True)

    def start_tensorboard(self, logger, trainer):
        if self.tensorboard is not None:
            self.tensorboard.start(logger, trainer)

    def finish_tensorboard(self, logger, trainer):
        if self.tensorboard is not None:
            self.tensorboard.finish(logger, trainer)
