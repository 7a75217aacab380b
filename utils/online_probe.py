"""The online linear probe of pretraining (as solo-learn's): a linear classifier on the detached
encoder output h, trained alongside SimCLR with its own optimizer, so that the validation
accuracy of h can be followed epoch by epoch. It never changes the encoder: its input is
h.detach(), its parameters are not in the model (model.pth keeps its layout) and its optimizer
is its own.

h is standardised per feature before the linear layer (as MAE's linear probe: a BatchNorm
without affine parameters), with the global batch's mean and variance while training and their
running averages for the accuracy: on raw h, whose features differ in scale and drift as the
encoder learns, the same AdamW trailed it (docs/evaluation.md, tools/probe_ceiling.py).

Images whose label is IGNORE_INDEX (unlabelled, or held out as validation queries) do not
train it. Under torchrun every rank computes the summed loss of its own rows; one all-reduce of
(gradient, number of labelled rows) per step gives every rank the gradient of the mean over the
global batch (one more all-reduce gives the standardisation the global batch's moments), so
the probe stays identical on every rank and a run's probe does not depend on the number of
processes.
"""
import torch
import torch.nn.functional as F
from torch import nn

from utils.distributed import all_reduce_sum

IGNORE_INDEX = -100  # cross_entropy's: rows with this label add nothing to the loss
PROBE_LR, PROBE_WEIGHT_DECAY = 1e-3, 0.0  # AdamW, constant rate
NORM_MOMENTUM, NORM_EPS = 0.1, 1e-5  # BatchNorm's


class Standardise:
    """Per-feature standardisation of h (N, F) without learned parameters:
        training: (h - mean) / sqrt(var + eps), mean and (biased) var over the global batch
                  (all ranks' rows, one all-reduce of [sum h, sum h^2, N] in float64), and
                  running <- (1 - m) running + m batch (the unbiased var), as BatchNorm1d;
        evaluation: the same with the running mean and var.
    A batch whose moments are not finite (h of an fp16 step that overflowed) leaves the running
    statistics as they were (no host sync)."""

    def __init__(self, dim, device):
        self.mean = torch.zeros(dim, device=device)
        self.var = torch.ones(dim, device=device)

    @torch.no_grad()
    def train(self, h):
        x = h.double()
        count = torch.full((1,), float(len(x)), dtype=x.dtype, device=x.device)
        sums = all_reduce_sum(torch.cat([x.sum(0), x.pow(2).sum(0), count]))
        n = sums[-1].clamp(min=1)
        mean = sums[:h.shape[1]] / n
        var = (sums[h.shape[1]:-1] / n - mean.pow(2)).clamp(min=0)
        finite = torch.isfinite(sums).all()
        unbiased = var * n / (n - 1).clamp(min=1)
        for running, batch in ((self.mean, mean), (self.var, unbiased)):
            running.copy_(torch.where(finite, running + NORM_MOMENTUM * (batch - running),
                                      running))
        return ((x - mean) * torch.rsqrt(var + NORM_EPS)).to(h.dtype)

    @torch.no_grad()
    def __call__(self, h):
        return (h - self.mean) * torch.rsqrt(self.var + NORM_EPS)

    def state_dict(self):
        return {"mean": self.mean, "var": self.var}

    def load_state_dict(self, state):
        self.mean.copy_(state["mean"])
        self.var.copy_(state["var"])


class OnlineProbe:
    """nn.Linear(feat_dim, n_classes) on detached, standardised features (Standardise),
    AdamW (PROBE_LR, constant).

    Initialised from `seed` inside a forked RNG, so building it leaves the global random state
    (and hence the rest of the run) as it was.
    """

    def __init__(self, feat_dim, n_classes, device, seed=0, lr=PROBE_LR,
                 weight_decay=PROBE_WEIGHT_DECAY):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.linear = nn.Linear(feat_dim, n_classes).to(device)
        self.norm = Standardise(feat_dim, device)
        self.optimizer = torch.optim.AdamW(self.linear.parameters(), lr=lr,
                                           weight_decay=weight_decay)

    def loss_and_grad(self, h, y):
        """Cross-entropy of h (B, F) against y (B,) int64 (IGNORE_INDEX rows skipped) summed
        over the rows; its gradient is left in the probe's .grad (zeroed first). Returns
        (summed loss, number of labelled rows), device scalars, no host sync."""
        self.optimizer.zero_grad(set_to_none=False)
        logits = self.linear(self.norm.train(h.detach().float()))
        loss = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
        loss.backward()
        return loss.detach(), (y != IGNORE_INDEX).sum()

    def step(self, h, y):
        """One training step on features h (B, F) (detached here) and labels y (B,): the
        gradient of the mean loss over the labelled rows of the global batch (summed over
        ranks), then AdamW. A batch without a labelled row, or whose gradient is not finite
        (h of an fp16 step that overflowed), gives zero gradients (AdamW's moments still
        decay). No host sync. Returns the mean loss of this rank's labelled rows (device
        scalar, 0 when there are none)."""
        loss, count = self.loss_and_grad(h, y)
        params = list(self.linear.parameters())
        flat = torch.cat([*(p.grad.reshape(-1) for p in params),
                          count.reshape(1).to(params[0].grad.dtype)])
        flat = all_reduce_sum(flat)
        grads = flat[:-1] / flat[-1].clamp(min=1)
        grads = torch.where(torch.isfinite(grads).all(), grads, torch.zeros_like(grads))
        offset = 0
        for p in params:
            p.grad.copy_(grads[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self.optimizer.step()
        return loss / count.clamp(min=1)

    @torch.no_grad()
    def accuracy(self, h, y):
        """Share of rows of h (N, F) whose arg-max class equals y (N,); NaN for N = 0."""
        if len(y) == 0:
            return float("nan")
        logits = self.linear(self.norm(h.to(self.linear.weight.device).float()))
        return (logits.argmax(1).cpu() == y.cpu()).double().mean().item()

    def state_dict(self):
        """The probe's weights, standardisation and optimizer state (the checkpoint's "extra")."""
        return {"linear": self.linear.state_dict(), "norm": self.norm.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        """Loads a state_dict(); False (nothing loaded) for a probe saved before the
        standardisation, whose weights were fitted on raw h."""
        if "norm" not in state:
            return False
        self.linear.load_state_dict(state["linear"])
        self.norm.load_state_dict(state["norm"])
        self.optimizer.load_state_dict(state["optimizer"])
        return True


def probe_labels(images, held_out=()):
    """The labels (N,) int64 the probe trains on: the images' labels, with IGNORE_INDEX for the
    indices `held_out` (validation queries carved from these images) and for unlabelled images
    (negative labels)."""
    labels = torch.as_tensor(images.labels, dtype=torch.long).clone()
    labels[labels < 0] = IGNORE_INDEX
    if len(held_out):
        labels[torch.as_tensor(held_out, dtype=torch.long)] = IGNORE_INDEX
    return labels
