"""NT-Xent loss and positive-pair accuracy against an independent loop implementation of the
SimCLR paper's formula (Chen et al. 2020, eq. 1), evaluated in float64 with autograd."""
import math

import pytest
import torch

from utils.ntxent import NTXentLoss, positive_pair_top1


def _rows(z1, z2):
    """The 2N views as a list of float64 row vectors: z1 rows first, then z2 rows."""
    return [z1[i] for i in range(z1.shape[0])] + [z2[i] for i in range(z2.shape[0])]


def reference_ntxent(z1, z2, tau):
    """Paper formula with explicit loops: u_k = z_k/||z_k||, partner p(k) = k+N mod 2N,
    l_k = -log(exp(u_k.u_p/tau) / sum_{j != k} exp(u_k.u_j/tau)), loss = mean_k l_k."""
    n = z1.shape[0]
    views = _rows(z1, z2)
    m = 2 * n
    u = [v / torch.sqrt(torch.dot(v, v)) for v in views]
    total = torch.zeros((), dtype=torch.float64)
    for k in range(m):
        p = (k + n) % m
        numerator = torch.exp(torch.dot(u[k], u[p]) / tau)
        denominator = torch.zeros((), dtype=torch.float64)
        for j in range(m):
            if j != k:
                denominator = denominator + torch.exp(torch.dot(u[k], u[j]) / tau)
        total = total + (-torch.log(numerator / denominator))
    return total / m


def reference_with_grads(z1, z2, tau):
    """(loss, dloss/dz1, dloss/dz2) of the float64 reference."""
    a = z1.detach().double().clone().requires_grad_(True)
    b = z2.detach().double().clone().requires_grad_(True)
    loss = reference_ntxent(a, b, tau)
    loss.backward()
    return loss.detach(), a.grad, b.grad


def module_with_grads(module, z1, z2):
    """(loss, dloss/dz1, dloss/dz2) of the code under test."""
    a = z1.detach().clone().requires_grad_(True)
    b = z2.detach().clone().requires_grad_(True)
    loss = module(a, b)
    loss.backward()
    return loss.detach(), a.grad, b.grad


def pair_embeddings(n, d, noise, seed, dtype=torch.float32):
    """Two views per image: z2 = z1 + noise, so positives are more similar than negatives."""
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    z2 = z1 + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return z1.to(dtype), z2.to(dtype)


@pytest.mark.parametrize("tau", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 16])
def test_loss_and_gradients_match_paper_formula(n, tau):
    """NTXentLoss and its gradients w.r.t. both views equal the float64 loop reference for
    even and odd batch sizes and a range of temperatures (float32 inputs)."""
    z1, z2 = pair_embeddings(n, 8, noise=0.7, seed=100 * n + int(tau * 100))
    loss, g1, g2 = module_with_grads(NTXentLoss(tau), z1, z2)
    ref, r1, r2 = reference_with_grads(z1, z2, tau)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5, rel=1e-5)
    torch.testing.assert_close(g1.double(), r1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g2.double(), r2, atol=1e-5, rtol=1e-4)


def test_n_equals_one_has_zero_loss():
    """With one image the only other view is the partner, so every l_k = -log(1) = 0."""
    z1, z2 = pair_embeddings(1, 5, noise=3.0, seed=7)
    assert NTXentLoss(0.3)(z1, z2).item() == pytest.approx(0.0, abs=1e-6)


def test_one_instance_handles_changing_batch_sizes():
    """One module instance gives reference losses for a full batch and then a smaller last
    batch, and again a full batch (nothing is cached from a previous batch size)."""
    criterion = NTXentLoss(0.2)
    for n, seed in ((8, 1), (5, 2), (8, 3)):
        z1, z2 = pair_embeddings(n, 6, noise=0.5, seed=seed)
        loss, g1, g2 = module_with_grads(criterion, z1, z2)
        ref, r1, r2 = reference_with_grads(z1, z2, 0.2)
        assert loss.item() == pytest.approx(ref.item(), abs=1e-5, rel=1e-5)
        torch.testing.assert_close(g1.double(), r1, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(g2.double(), r2, atol=1e-5, rtol=1e-4)


def test_low_temperature_is_finite_and_matches_reference():
    """At tau = 0.01 (logits up to 100, exp overflows float32) the loss and gradients are
    finite and match the float64 reference."""
    z1, z2 = pair_embeddings(6, 8, noise=2.0, seed=11, dtype=torch.float64)
    loss, g1, g2 = module_with_grads(NTXentLoss(0.01), z1, z2)
    ref, r1, r2 = reference_with_grads(z1, z2, 0.01)
    assert torch.isfinite(loss) and torch.isfinite(g1).all() and torch.isfinite(g2).all()
    assert ref.item() > 0.1  # a non-trivial loss, not a saturated zero
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-4)
    torch.testing.assert_close(g1.double(), r1, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(g2.double(), r2, atol=1e-3, rtol=1e-3)


def test_low_temperature_nearly_identical_embeddings():
    """At tau = 0.01 with all 2N embeddings almost the same vector every logit is ~100; the
    loss is finite, close to log(2N - 1) (uniform softmax) and to the reference."""
    n = 5
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1, 16, generator=g, dtype=torch.float64)
    z1 = base + 1e-4 * torch.randn(n, 16, generator=g, dtype=torch.float64)
    z2 = base + 1e-4 * torch.randn(n, 16, generator=g, dtype=torch.float64)
    loss, g1, g2 = module_with_grads(NTXentLoss(0.01), z1, z2)
    ref, _, _ = reference_with_grads(z1, z2, 0.01)
    assert torch.isfinite(loss) and torch.isfinite(g1).all() and torch.isfinite(g2).all()
    assert ref.item() == pytest.approx(math.log(2 * n - 1), abs=0.05)
    assert loss.item() == pytest.approx(ref.item(), abs=0.05)


def test_zero_embedding_row_is_finite():
    """An all-zero embedding (undefined direction) gives a finite loss and finite gradients."""
    z1, z2 = pair_embeddings(4, 8, noise=0.5, seed=5)
    z1[0] = 0.0
    loss, g1, g2 = module_with_grads(NTXentLoss(0.5), z1, z2)
    assert torch.isfinite(loss)
    assert torch.isfinite(g1).all() and torch.isfinite(g2).all()
    # the other anchors still see a proper loss: the zero row only has cosine 0 with everyone
    assert loss.item() > 0


def test_bfloat16_autocast_close_to_float32():
    """Under CPU autocast (bf16), embeddings from a bf16 Linear give a float32 loss within 2 %
    of the same network evaluated fully in float32."""
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(32, 16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(16, 32, generator=g) / math.sqrt(32))
        layer.bias.copy_(0.1 * torch.randn(16, generator=g))
    x1 = torch.randn(12, 32, generator=g)
    x2 = x1 + 0.6 * torch.randn(12, 32, generator=g)
    criterion = NTXentLoss(0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e1, e2 = layer(x1), layer(x2)
        loss_bf16 = criterion(e1, e2)
    assert e1.dtype == torch.bfloat16  # the embeddings really are bf16
    assert loss_bf16.dtype == torch.float32
    loss_fp32 = criterion(layer(x1), layer(x2))
    assert loss_fp32.dtype == torch.float32
    ref = reference_ntxent(layer(x1).double().detach(), layer(x2).double().detach(), 0.2)
    assert loss_fp32.item() == pytest.approx(ref.item(), rel=1e-5)
    assert loss_bf16.item() == pytest.approx(loss_fp32.item(), rel=2e-2)


def reference_top1(z1, z2):
    """Loop: fraction of anchors k whose most cosine-similar view j != k is the partner."""
    n = z1.shape[0]
    views = [v.double() for v in _rows(z1, z2)]
    u = [v / torch.sqrt(torch.dot(v, v)) for v in views]
    hits = 0
    for k in range(2 * n):
        best_j, best = None, -math.inf
        for j in range(2 * n):
            if j != k:
                s = torch.dot(u[k], u[j]).item()
                if s > best:
                    best_j, best = j, s
        hits += best_j == (k + n) % (2 * n)
    return hits / (2 * n)


@pytest.mark.parametrize("noise,seed", [(0.3, 0), (1.2, 1), (1.6, 2), (5.0, 3)])
def test_positive_pair_top1_matches_loop(noise, seed):
    """positive_pair_top1 equals the loop-computed fraction of anchors whose nearest other
    view is their partner (from all-correct to mostly wrong)."""
    z1, z2 = pair_embeddings(10, 6, noise=noise, seed=seed)
    expected = reference_top1(z1, z2)
    got = positive_pair_top1(z1, z2)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_positive_pair_top1_covers_partial_accuracy():
    """The parametrised cases above are not all 0 or 1: some give a fraction strictly between
    (so the comparison checks the per-anchor partner logic, not just a constant)."""
    values = {reference_top1(*pair_embeddings(10, 6, noise=s, seed=i))
              for s, i in [(0.3, 0), (1.2, 1), (1.6, 2), (5.0, 3)]}
    assert any(0 < v < 1 for v in values)
