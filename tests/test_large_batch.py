"""Large-batch pieces: LARS against updates worked out by hand, the learning-rate scaling
rule, and the distributed sampler's split of each global batch."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from utils.errors import UserError
from utils.optim import build_optimizer, scaled_learning_rate
from utils.data import EpochBatchSampler
from utils.lars import LARS


def test_lars_step_worked_out_by_hand():
    """w = [3, 4] (norm 5), g = [0.3, 0.4] (norm 0.5), eta 0.001, lr 1, no decay:
    trust ratio 0.001 * 5 / 0.5 = 0.01, v = 0.01 * g, w - v = [2.997, 3.996]. Second step with
    the same gradient: d = g, ratio = 0.001 * |w| / 0.5, v = 0.9 v + ratio * g."""
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LARS([w], lr=1.0, momentum=0.9, eta=0.001)
    w.grad = torch.tensor([0.3, 0.4], dtype=torch.float64)
    opt.step()
    np.testing.assert_allclose(w.detach().numpy(), [2.997, 3.996], atol=1e-12)
    opt.step()
    ratio = 0.001 * math.hypot(2.997, 3.996) / 0.5
    v = 0.9 * np.array([0.003, 0.004]) + ratio * np.array([0.3, 0.4])
    np.testing.assert_allclose(w.detach().numpy(), np.array([2.997, 3.996]) - v, atol=1e-12)


def test_lars_weight_decay_enters_the_trust_ratio():
    """w = [1, 0], g = [0, 1], wd 0.5: d = [0.5, 1], |d| = sqrt(1.25), ratio = 0.1 / |d|,
    lr 2: w - 2 * ratio * d."""
    w = nn.Parameter(torch.tensor([1.0, 0.0], dtype=torch.float64))
    opt = LARS([w], lr=2.0, momentum=0.9, weight_decay=0.5, eta=0.1)
    w.grad = torch.tensor([0.0, 1.0], dtype=torch.float64)
    opt.step()
    d = np.array([0.5, 1.0])
    expected = np.array([1.0, 0.0]) - 2.0 * (0.1 / math.sqrt(1.25)) * d
    np.testing.assert_allclose(w.detach().numpy(), expected, atol=1e-12)


def test_lars_moves_zero_initialised_weights():
    """A zero tensor has trust ratio 1 (not 0, which would freeze it forever)."""
    w = nn.Parameter(torch.zeros(3, 2))
    opt = LARS([w], lr=0.1, momentum=0.9)
    w.grad = torch.ones(3, 2)
    opt.step()
    np.testing.assert_allclose(w.detach().numpy(), -0.1 * np.ones((3, 2)), atol=1e-7)


def test_lars_on_a_model_matches_a_numpy_loop():
    """Two steps on Linear-BatchNorm-Linear through build_optimizer('lars'): weights adapt and
    decay; BatchNorm parameters and biases are plain momentum SGD without decay."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)).double()
    lr, wd, eta, m = 0.7, 1e-2, 1e-3, 0.9
    opt = build_optimizer(model, "lars", lr, wd)
    assert [g["lars_adapt"] for g in opt.param_groups] == [True, False]
    weights = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    buffers = {n: np.zeros_like(w) for n, w in weights.items()}
    x = torch.randn(8, 5, dtype=torch.float64)
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
        opt.step()
        for name, w in weights.items():
            adapt = w.ndim > 1
            d = grads[name] + (wd * w if adapt else 0)
            ratio = eta * np.linalg.norm(w) / np.linalg.norm(d) if adapt else 1.0
            buffers[name] = m * buffers[name] + lr * ratio * d
            weights[name] = w - buffers[name]
        for name, p in model.named_parameters():
            np.testing.assert_allclose(p.detach().numpy(), weights[name], rtol=1e-10,
                                       atol=1e-12, err_msg=name)


def loop_lars_step(groups, buffers):
    """The per-parameter LARS update of the docstring, one tensor at a time (the reference for
    the grouped torch._foreach_* step): d = g + wd w, r = eta |w| / |d| if the group adapts and
    both norms are > 0 else 1, v = m v + lr r d, w = w - v; tensors without grad are skipped.
    `buffers` maps a parameter to its v (missing: zeros)."""
    with torch.no_grad():
        for group in groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                d = w.grad + group["weight_decay"] * w
                ratio = 1.0
                w_norm, d_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(d)
                if group["lars_adapt"] and w_norm > 0 and d_norm > 0:
                    ratio = group["eta"] * w_norm / d_norm
                v = group["momentum"] * buffers.get(w, torch.zeros_like(w)) + group["lr"] * ratio * d
                buffers[w] = v
                w.sub_(v)


def lars_test_model(dtype):
    """Linear-BatchNorm-Linear-Linear with the first layer's weight zero-initialised and an
    extra parameter the forward never uses (it never gets a gradient)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 4),
                          nn.Linear(4, 3)).to(dtype)
    with torch.no_grad():
        model[0].weight.zero_()
    model.unused = nn.Parameter(torch.ones(2, dtype=dtype))
    return model


def lars_test_groups(model):
    """Four groups: adapt + decay, adapt without decay (holding the zero tensor), plain momentum
    SGD, and no adaptation with decay (the unused parameter); each its own lr, m and eta."""
    return [{"params": [model[3].weight, model[4].weight], "weight_decay": 1e-2, "lr": 0.9,
             "momentum": 0.9, "eta": 1e-3, "lars_adapt": True},
            {"params": [model[0].weight, model[4].bias], "weight_decay": 0.0, "lr": 0.5,
             "momentum": 0.8, "eta": 2e-2, "lars_adapt": True},
            {"params": [model[0].bias, model[1].weight, model[1].bias], "weight_decay": 0.0,
             "lr": 0.1, "momentum": 0.9, "eta": 1e-3, "lars_adapt": False},
            {"params": [model[3].bias, model.unused], "weight_decay": 0.1, "lr": 0.2,
             "momentum": 0.5, "eta": 1e-3, "lars_adapt": False}]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_grouped_lars_matches_the_per_parameter_loop(dtype, tol):
    """Five steps of LARS and of the per-parameter loop from the same model (adapt or not,
    weight decay or not, a zero-initialised weight, a parameter without grad), the loop's copy
    given the model's gradients of each step so that only the updates can differ: parameters
    and momentum buffers agree to 1e-6 (float32) / 1e-12 (float64); the zero weight moves, the
    parameter without grad stays and gets no buffer."""
    model, reference = lars_test_model(dtype), lars_test_model(dtype)
    opt = LARS(lars_test_groups(model), lr=1.0)
    ref_groups, ref_buffers = lars_test_groups(reference), {}
    x = torch.randn(16, 6, dtype=dtype, generator=torch.Generator().manual_seed(2))
    for _ in range(5):
        model.zero_grad(set_to_none=True)
        model(x).sin().sum().backward()
        for p, q in zip(model.parameters(), reference.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
        opt.step()
        loop_lars_step(ref_groups, ref_buffers)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, atol=tol, rtol=0, msg=name)
            if q in ref_buffers:
                torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_buffers[q],
                                           atol=tol, rtol=0, msg=name)
            else:
                assert "momentum_buffer" not in opt.state[p], name
    assert model.unused.grad is None and torch.equal(model.unused, torch.ones(2, dtype=dtype))
    assert model[0].weight.abs().min() > 0  # the zero-initialised weight moved

def test_learning_rate_scaling_rules():
    assert scaled_learning_rate(0.3, 4096, "linear") == pytest.approx(4.8)  # the paper's 4.8
    assert scaled_learning_rate(1.2, 4096, "sqrt") == pytest.approx(0.075 * math.sqrt(4096))
    assert scaled_learning_rate(0.5, 128, "linear") == pytest.approx(0.25)
    assert scaled_learning_rate(0.5, 128, "none") == 0.5
    with pytest.raises(ValueError):
        scaled_learning_rate(0.5, 128, "cubic")


def test_ranks_together_load_exactly_the_one_process_batches():
    """With W ranks each global batch is split into W disjoint slices whose concatenation, in
    rank order, is the batch of a single process, for every epoch and resume position."""
    single = EpochBatchSampler(50, 12, seed=3)
    ranks = [EpochBatchSampler(50, 12, seed=3, rank=r, world_size=3) for r in range(3)]
    for epoch, start in ((0, 0), (1, 0), (2, 2)):
        for s in (single, *ranks):
            s.set_epoch(epoch, start)
        expected = list(single)
        per_rank = [list(s) for s in ranks]
        assert all(len(p) == len(expected) == 4 - start for p in per_rank)
        for b, batch in enumerate(expected):
            assert sum((p[b] for p in per_rank), []) == batch
            assert all(len(p[b]) == 4 for p in per_rank)


def test_global_batch_must_split_evenly():
    with pytest.raises(UserError, match="-bs 12 or -bs 15"):
        EpochBatchSampler(50, 13, seed=0, rank=0, world_size=3)
