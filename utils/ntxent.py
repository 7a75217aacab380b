"""NT-Xent, the SimCLR contrastive loss."""
import torch
import torch.nn.functional as F
from torch import nn


def ntxent_targets(n, offset, device):
    """(2N,) int64 [N .. 2N-1, 0 .. N-1] + offset on `device`: the column of each anchor's
    partner among the candidates of `ntxent_logits`. Made on the device (torch.arange: two
    small kernels, no host-to-device copy, which on CUDA would synchronise the stream)."""
    return torch.cat([torch.arange(n, 2 * n, device=device),
                      torch.arange(0, n, device=device)]) + offset


def ntxent_logits(z1, z2, temperature, gather=None):
    """Masked cosine-similarity logits and targets for the 2N anchors of two views.

    z1, z2: (N, D), row i of z1 and row i of z2 are the two views of image i.
    With u = normalize(cat(z1, z2)) (2N, D), logits = u u^T / tau (2N, 2N) in float32 (float64
    for float64 input), the diagonal (self-similarity) set to -inf; the target of anchor k is
    its partner k +- N.
    Computed with one matmul; a zero embedding normalises to 0 and stays finite.

    `gather(u) -> (candidates (M, D), offset)` makes the candidates the views of every process
    (utils.distributed.gather_with_grad: M = 2NW, this process's rows at offset..offset+2N,
    offset a Python int): the logits are then (2N, M), this process's 2N anchors against all
    M views.

    Returns (logits (2N, M) float, targets (2N,) int64 = [N .. 2N-1, 0 .. N-1] + offset on u's
    device), made there by `ntxent_targets`: a step copies nothing from the host.
    """
    n = z1.shape[0]
    with torch.autocast(z1.device.type, enabled=False):  # bf16 similarities lose ~1e-2
        z = torch.cat([z1, z2])
        u = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)
        candidates, offset = (u, 0) if gather is None else gather(u)
        # 1/tau scales the (2N, D) anchors, not the (2N, M) logits: one pass less over the
        # largest tensor, forward and backward
        logits = (u * (1.0 / temperature)) @ candidates.T
        logits.diagonal(offset).fill_(float("-inf"))  # anchor k against itself, column k + offset
    return logits, ntxent_targets(n, offset, u.device)


class NTXentLoss(nn.Module):
    """Normalised temperature-scaled cross-entropy (SimCLR, Chen et al. 2020, eq. 1).

    For anchor k among the 2N views with partner p(k) and sim = cosine similarity,
        l_k = -log( exp(sim(u_k, u_p(k)) / tau) / sum_{j != k} exp(sim(u_k, u_j) / tau) )
    and the loss is the mean of l_k over all 2N anchors. It is evaluated as cross-entropy over
    the masked logits of `ntxent_logits` (log-sum-exp, never a raw exp), so it is exact for any
    N >= 1, finite at tau = 0.01 and for zero embeddings (whose gradient is finite but large,
    as normalising a zero vector is), and computed in float32 even under autocast.

    With `gather` (see ntxent_logits) each process averages l_k over its own anchors, the sum
    running over the views of all processes; the mean of these per-process losses is the loss
    of the global batch, and with DDP's gradient averaging so is the gradient.
    """

    def __init__(self, temperature=0.5, gather=None):
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        self.temperature = temperature
        self.gather = gather

    def forward(self, z1, z2):
        """z1, z2: (N, D) -> scalar mean loss over 2N anchors."""
        return self.loss_and_top1(z1, z2)[0]

    def loss_and_top1(self, z1, z2):
        """(loss, positive-pair top-1 of this process's anchors, detached) from one matmul."""
        logits, targets = ntxent_logits(z1, z2, self.temperature, self.gather)
        top1 = (logits.detach().argmax(dim=1) == targets).float().mean()
        return F.cross_entropy(logits, targets), top1


@torch.no_grad()
def positive_pair_top1(z1, z2):
    """Fraction of the 2N anchors whose most similar other view is their partner (the top-1
    the training loop logs, from NTXentLoss.loss_and_top1; the temperature does not matter)."""
    return NTXentLoss(1.0).loss_and_top1(z1, z2)[1]
