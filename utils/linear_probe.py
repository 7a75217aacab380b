"""Frozen-feature extraction and the multinomial logistic-regression probe."""
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

    def fit(self, features, labels):
        """features (N, F), labels (N,) int64 -> self, with W (K, F), b (K,), mu, sigma."""
        features = features.double()
        self.mu = features.mean(0)
        self.sigma = features.std(0).clamp_min(1e-6)
        x = (features - self.mu) / self.sigma
        w = torch.zeros(self.n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(self.n_classes, dtype=torch.float64, requires_grad=True)
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
