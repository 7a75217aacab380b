"""Pieces of the training loop: the learning-rate schedule, the optimizer's parameter groups,
per-epoch means of the history, and the Ctrl-C handler."""
import math
import os
import signal

import numpy as np
import pytest
import torch

from utils.engine import GracefulStop, History
from utils.optim import build_optimizer, learning_rate_at
from utils.model import build_model


def test_schedule_warmup_then_cosine():
    """Linear warm-up to the peak over 10 steps, then half a cosine period down to 0 at step
    100, checked against values worked out by hand."""
    lr = [learning_rate_at(s, base_lr=0.4, warmup_steps=10, total_steps=100) for s in range(100)]
    np.testing.assert_allclose(lr[:10], 0.4 * np.arange(1, 11) / 10)
    assert lr[10] == pytest.approx(0.4)
    assert lr[55] == pytest.approx(0.2)  # half way through the decay: cos(pi/2) = 0
    assert lr[99] == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert learning_rate_at(0, 1.0, 0, 10) == pytest.approx(1.0)  # no warm-up


def test_optimizer_excludes_batchnorm_and_bias_from_weight_decay():
    """Every 1-d parameter (BatchNorm weight/bias, Linear bias) sits in the group with weight
    decay 0; every conv/linear weight in the decayed group; nothing is left out."""
    model = build_model("resnet18", 1, "cifar", [32, 16])
    for name in ("sgd", "adamw"):
        opt = build_optimizer(model, name, lr=0.1, weight_decay=1e-3)
        decayed, plain = opt.param_groups
        assert decayed["weight_decay"] == 1e-3 and plain["weight_decay"] == 0.0
        by_id = {id(p): n for n, p in model.named_parameters()}
        plain_names = {by_id[id(p)] for p in plain["params"]}
        expected = {n for n, p in model.named_parameters() if "bn" in n or "bias" in n
                    or "downsample.1" in n or n.startswith("head.1.")}
        assert plain_names == expected
        assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    assert isinstance(build_optimizer(model, "sgd", 0.1, 0.0), torch.optim.SGD)


def test_history_epoch_means_ignore_partial_epoch():
    """Per-epoch values are means over complete epochs; a partial epoch is not reported."""
    history = History(3, ("loss", "top1"), {"loss": [1, 2, 3, 4, 5, 6, 7],
                                            "top1": [0, 0, 1, 1, 1, 1, 0]})
    np.testing.assert_allclose(history.epoch_means("loss"), [2.0, 5.0])
    np.testing.assert_allclose(history.epoch_means("top1"), [1 / 3, 1.0])


def test_graceful_stop_turns_sigint_into_a_flag():
    """Inside the context SIGINT sets `requested` instead of raising; a second one raises
    KeyboardInterrupt; the previous handler is restored on exit."""
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
