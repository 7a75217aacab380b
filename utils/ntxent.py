"""NT-Xent, the SimCLR contrastive loss."""
import torch
import torch.nn.functional as F
from torch import nn


def ntxent_logits(z1, z2, temperature):
    """Masked cosine-similarity logits and targets for the 2N anchors of two views.

    z1, z2: (N, D), row i of z1 and row i of z2 are the two views of image i.
    With u = normalize(cat(z1, z2)) (2N, D), logits = u u^T / tau (2N, 2N) in float32, the
    diagonal (self-similarity) set to -inf; the target of anchor k is its partner k +- N.
    Computed with one matmul; a zero embedding normalises to 0 and stays finite.
    """
    n = z1.shape[0]
    with torch.autocast(z1.device.type, enabled=False):  # bf16 similarities lose ~1e-2
        u = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        logits = (u @ u.T) / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=u.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(u.device)
    return logits, targets


class NTXentLoss(nn.Module):
    """Normalised temperature-scaled cross-entropy (SimCLR, Chen et al. 2020, eq. 1).

    For anchor k among the 2N views with partner p(k) and sim = cosine similarity,
        l_k = -log( exp(sim(u_k, u_p(k)) / tau) / sum_{j != k} exp(sim(u_k, u_j) / tau) )
    and the loss is the mean of l_k over all 2N anchors. It is evaluated as cross-entropy over
    the masked logits of `ntxent_logits` (log-sum-exp, never a raw exp), so it is exact for any
    N >= 1, finite at tau = 0.01 and for zero embeddings (whose gradient is finite but large,
    as normalising a zero vector is), and computed in float32 even under autocast.
    """

    def __init__(self, temperature=0.5):
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        self.temperature = temperature

    def forward(self, z1, z2):
        """z1, z2: (N, D) -> scalar mean loss over 2N anchors."""
        logits, targets = ntxent_logits(z1, z2, self.temperature)
        return F.cross_entropy(logits, targets)


@torch.no_grad()
def positive_pair_top1(z1, z2):
    """Fraction of the 2N anchors whose most similar other view is their partner."""
    logits, targets = ntxent_logits(z1, z2, 1.0)
    return (logits.argmax(dim=1) == targets).float().mean()
