"""Frozen-feature extraction and the multinomial logistic-regression probe."""
import math

import torch
import torch.nn.functional as F
from tqdm import tqdm


@torch.no_grad()
def extract_features(model, loader, device, channels_last=False, desc="features"):
    """Run `model` (eval mode) over `loader`; returns (features (N, F) float32 CPU, labels (N,)).

    `model(x)` must return a (B, F) tensor. No gradient, no augmentation (the loader's transform).
    The features fill one (N, F) array allocated at the first batch (N = len(loader.dataset)),
    so the memory is that array plus one batch, not twice the features as a list + torch.cat.
    """
    model.eval()
    n, feats, labels, row = len(loader.dataset), None, None, 0
    for x, y in tqdm(loader, desc=desc, leave=False, disable=None):
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        f = model(x).float().cpu()
        if feats is None:
            feats = torch.empty((n, f.shape[1]), dtype=torch.float32)
            labels = torch.empty(n, dtype=torch.long)
        feats[row:row + len(f)] = f
        labels[row:row + len(f)] = torch.as_tensor(y)
        row += len(f)
    if feats is None:
        return torch.empty((0, 0)), torch.empty(0, dtype=torch.long)
    return feats[:row], labels[:row]


class LinearProbe:
    """Multinomial logistic regression on standardised features, fitted by full-batch L-BFGS.

    Minimises  mean_i CE(W x_i + b, y_i) + (weight_decay / 2) * ||W||^2  over the training
    features x_i = (f_i - mu) / sigma, the same convex objective as scikit-learn's
    LogisticRegression(C = 1 / (weight_decay * N)), so both reach the same solution.
    """

    def __init__(self, n_classes, weight_decay=1e-4, max_iter=500):
        self.n_classes, self.weight_decay, self.max_iter = n_classes, weight_decay, max_iter

    def fit(self, features, labels, start=None):
        """features (N, F), labels (N,) int64 -> self, with W (K, F), b (K,), mu, sigma.
        `start`: a probe fitted on the same features whose (W, b) L-BFGS starts from (the
        objective is convex, so only the iterations change)."""
        features = features.double()
        self.mu = features.mean(0)
        self.sigma = features.std(0).clamp_min(1e-6)
        x = (features - self.mu) / self.sigma
        w = torch.zeros(self.n_classes, x.shape[1], dtype=torch.float64)
        b = torch.zeros(self.n_classes, dtype=torch.float64)
        if start is not None:
            w, b = start.weight.clone(), start.bias.clone()
        w.requires_grad_(True)
        b.requires_grad_(True)
        optimizer = torch.optim.LBFGS([w, b], lr=1, max_iter=self.max_iter,
                                      tolerance_grad=1e-9, tolerance_change=1e-12,
                                      history_size=20, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(x @ w.T + b, labels) + 0.5 * self.weight_decay * (w * w).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        self.weight, self.bias = w.detach(), b.detach()
        return self

    def decision_function(self, features):
        """Logits (N, K) for features (N, F)."""
        x = (features.double() - self.mu) / self.sigma
        return x @ self.weight.T + self.bias

    def predict(self, features):
        return self.decision_function(features).argmax(1)

    def state_dict(self):
        return {"weight": self.weight.float(), "bias": self.bias.float(),
                "feature_mean": self.mu.float(), "feature_std": self.sigma.float()}


# 1e-5, 3e-5, ..., 0.3, 1: the L2 penalties the probe chooses from (the SimCLR paper chose its
# transfer probes' regularisation on validation data from a log-spaced range too)
WEIGHT_DECAY_GRID = tuple(float(f"{m}e{e}") for e in range(-5, 0) for m in (1, 3)) + (1.0,)
# L-BFGS iterations per fit while choosing: the held-out accuracy settles long before the loss
SELECTION_MAX_ITER = 100


def held_out_folds(labels, seed, folds):
    """[(train indices, held-out indices)]: `folds` stratified folds of (N,) labels when folds
    > 1, else one split holding out 20 % of each class; a class with a single image is never
    held out. Seeded by `seed` alone."""
    generator = torch.Generator().manual_seed(seed)
    held = []
    for c in labels.unique():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        if len(members) > 1:
            held.append(members)
    n = len(labels)
    splits = []
    for fold in range(max(folds, 1)):
        if folds > 1:
            parts = [m[fold::folds] for m in held]
        else:
            parts = [m[:max(1, math.floor(0.2 * len(m) + 0.5))] for m in held]
        out = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
        mask = torch.ones(n, dtype=torch.bool)
        mask[out] = False
        splits.append((torch.nonzero(mask).flatten(), out))
    return [(train, out) for train, out in splits if len(out)]


def select_weight_decay(features, labels, n_classes, grid=WEIGHT_DECAY_GRID, seed=0,
                        max_iter=SELECTION_MAX_ITER):
    """(chosen weight decay, {weight decay: held-out accuracy}) for LinearProbe on these
    training features (N, F) and labels (N,): each value of `grid` is fitted on part of them
    and scored on the rest (5 stratified folds for N <= 2,000, else one 80/20 split per
    class), the largest of the best-scoring values wins. No data beyond the training features
    are looked at. With no image to hold out (one per class), the earlier default 1e-4 is
    returned."""
    folds = held_out_folds(labels, seed, 5 if len(labels) <= 2000 else 1)
    if not folds:
        return 1e-4, {}
    correct = dict.fromkeys(grid, 0)
    for train, out in folds:
        probe = None
        for wd in sorted(grid, reverse=True):  # strongest first: each fit starts from the last
            probe = LinearProbe(n_classes, wd, max_iter).fit(features[train], labels[train],
                                                              start=probe)
            correct[wd] += (probe.predict(features[out]) == labels[out]).sum().item()
    held_out = sum(len(out) for _, out in folds)
    scores = {wd: correct[wd] / held_out for wd in grid}
    best = max(scores.values())
    return max(wd for wd in grid if scores[wd] == best), scores


def fit_probe(features, labels, n_classes, weight_decay=None, max_iter=500, seed=0):
    """LinearProbe fitted on features (N, F), labels (N,); weight_decay None chooses it with
    select_weight_decay on these features first. The probe keeps `.weight_decay` and
    `.selection` ({weight decay: held-out accuracy}, empty when given)."""
    selection = {}
    if weight_decay is None:
        weight_decay, selection = select_weight_decay(features, labels, n_classes, seed=seed)
    probe = LinearProbe(n_classes, weight_decay, max_iter).fit(features, labels)
    probe.selection = selection
    return probe


def describe_weight_decay(probe):
    """'3e-04 (chosen: 82.0 % of held-out training images)' for a fit_probe probe that chose
    it, else the given value ('1e-04')."""
    if not probe.selection:
        return f"{probe.weight_decay:.0e}"
    return (f"{probe.weight_decay:.0e} (chosen: {100 * probe.selection[probe.weight_decay]:.1f} % "
            f"of held-out training images)")
