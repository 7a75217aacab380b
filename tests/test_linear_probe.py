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

from utils.linear_probe import LinearProbe, extract_features


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
