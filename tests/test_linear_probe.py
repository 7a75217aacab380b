"""The L-BFGS logistic-regression probe against scikit-learn's LogisticRegression on the same
objective, and frozen-feature extraction against a direct forward pass."""
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits
from torch import nn

from utils.linear_probe import (LinearProbe, extract_features, fit_probe, held_out_folds,
                                 select_weight_decay)


@pytest.fixture
def one_thread():
    """Small full-batch problems run much faster single-threaded on a shared 2-core CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits_split():
    X, y = load_digits(return_X_y=True)
    return train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)


@pytest.mark.parametrize("wd", [1e-2, 3e-2])
def test_probe_matches_sklearn_logistic_regression(digits_split, one_thread, wd):
    """LinearProbe(weight_decay=wd) reaches scikit-learn's multinomial LogisticRegression
    solution with C = 1/(wd N) on features standardised the same way (training mean, ddof=1
    std): near-identical test predictions, accuracies and coefficients."""
    X_train, X_test, y_train, y_test = digits_split
    probe = LinearProbe(10, weight_decay=wd, max_iter=1000)
    probe.fit(torch.tensor(X_train, dtype=torch.float32), torch.tensor(y_train))
    probe_pred = probe.predict(torch.tensor(X_test, dtype=torch.float32)).numpy()

    mu = X_train.mean(0)
    sd = np.maximum(X_train.std(0, ddof=1), 1e-6)  # digits has constant (all-zero) pixels
    reference = LogisticRegression(C=1.0 / (wd * len(X_train)), max_iter=5000, tol=1e-8)
    reference.fit((X_train - mu) / sd, y_train)
    ref_pred = reference.predict((X_test - mu) / sd)

    assert (probe_pred == ref_pred).mean() >= 0.99
    probe_acc, ref_acc = (probe_pred == y_test).mean(), (ref_pred == y_test).mean()
    assert ref_acc > 0.9  # the reference itself is a sensible classifier
    assert abs(probe_acc - ref_acc) <= 0.01
    weight = probe.weight.numpy()
    assert weight.shape == reference.coef_.shape == (10, 64)
    rel = np.linalg.norm(weight - reference.coef_) / np.linalg.norm(reference.coef_)
    assert rel < 5e-2
    np.testing.assert_allclose(probe.mu.numpy(), mu, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_per_class, folds", [(30, 5), (250, 1)])
def test_held_out_folds_are_stratified_and_disjoint(n_per_class, folds):
    """Each split partitions the images; the held-out parts of 5 folds cover every image of
    the classes with 2+ images once, and one split holds out 20 % of each class; a class of
    one image stays in training."""
    labels = torch.cat([torch.full((n_per_class,), c) for c in range(3)] + [torch.tensor([3])])
    splits = held_out_folds(labels, seed=1, folds=folds)
    assert len(splits) == folds
    for train, out in splits:
        assert sorted(torch.cat([train, out]).tolist()) == list(range(len(labels)))
        assert 3 * n_per_class in train.tolist()  # the single image of class 3
        counts = torch.bincount(labels[out], minlength=4).tolist()
        assert counts == [n_per_class // 5] * 3 + [0]
    if folds > 1:
        held = torch.cat([out for _, out in splits]).sort().values
        assert held.tolist() == list(range(3 * n_per_class))


def test_selection_scores_equal_scikit_learn_on_the_same_folds(digits_split, one_thread):
    """select_weight_decay's held-out accuracy for every penalty equals scikit-learn's
    LogisticRegression(C = 1/(wd N_fold)) fitted on the same folds (standardised by the fold's
    training mean and std) to within one image in a hundred; the chosen penalty is the largest
    of the best, and fit_probe refits with it on all the training features."""
    X_train, _, y_train, _ = digits_split
    x, y = torch.tensor(X_train[:400], dtype=torch.float32), torch.tensor(y_train[:400])
    grid = (1e-3, 1e-2, 1e-1, 1.0)
    chosen, scores = select_weight_decay(x, y, 10, grid=grid, seed=0)
    folds = held_out_folds(y, 0, 5)
    for wd in grid:
        correct = 0
        for train, out in folds:
            xt, xo = X_train[:400][train.numpy()], X_train[:400][out.numpy()]
            mu, sd = xt.mean(0), np.maximum(xt.std(0, ddof=1), 1e-6)
            reference = LogisticRegression(C=1.0 / (wd * len(train)), max_iter=5000, tol=1e-8)
            reference.fit((xt - mu) / sd, y_train[:400][train.numpy()])
            correct += (reference.predict((xo - mu) / sd) == y_train[:400][out.numpy()]).sum()
        assert scores[wd] == pytest.approx(correct / 400, abs=0.01), wd
    assert chosen == max(wd for wd in grid if scores[wd] == max(scores.values()))
    probe = fit_probe(x, y, 10, seed=0)
    assert probe.weight_decay in probe.selection and probe.selection[probe.weight_decay] == \
        max(probe.selection.values())
    direct = LinearProbe(10, probe.weight_decay).fit(x, y)
    torch.testing.assert_close(probe.weight, direct.weight)


def test_selection_prefers_strong_penalties_on_noise(one_thread):
    """On 60 images whose one informative feature is buried among 199 noise features, a
    strong penalty scores better on held-out images than the weakest and is chosen."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 2
    x = torch.randn(60, 200, generator=g)
    x[:, 0] += 1.5 * (2 * y - 1)
    chosen, scores = select_weight_decay(x, y, 2, seed=0)
    assert chosen >= 0.1 and scores[chosen] > scores[1e-5]


def test_extract_features_in_loader_order(one_thread):
    """extract_features returns the features in the loader's order (here reversed, with a
    partial last batch) equal to the eval-mode model applied to the whole stacked batch, and
    the labels in the same order; the model is left in eval mode."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 1, 3, 3, generator=g)
    y = torch.arange(10) * 7 % 10
    model = nn.Sequential(nn.Flatten(), nn.Linear(9, 5), nn.BatchNorm1d(5), nn.Dropout(0.5))
    with torch.no_grad():
        model[2].running_mean.copy_(torch.randn(5, generator=g))
        model[2].running_var.copy_(torch.rand(5, generator=g) + 0.5)
    model.train()  # extract_features must switch to eval itself
    order = list(range(9, -1, -1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4,
                                         sampler=order)
    feats, labels = extract_features(model, loader, torch.device("cpu"))
    assert not model.training
    with torch.no_grad():
        full = model.eval()(x)
    assert feats.dtype == torch.float32 and feats.shape == (10, 5)
    torch.testing.assert_close(feats, full[order])
    assert torch.equal(labels, y[order])
