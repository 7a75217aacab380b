"""Saves that do not stall training (utils/writer.py): the background writer's order, one job
in flight and errors raised on the training thread; host snapshots that later training does
not change."""
import copy
import threading
import time
from collections import OrderedDict

import pytest
import torch
from torch import nn

from utils.errors import UserError
from utils.writer import BackgroundWriter, host_copy


def assert_same_tree(actual, expected):
    """Equal nested dicts/lists/tuples: same container types, keys and plain values; tensors
    with the same dtype, shape, strides and values."""
    assert type(actual) is type(expected)
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.stride() == expected.stride()
        assert torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            assert_same_tree(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_same_tree(a, e)
    else:
        assert actual == expected


def test_writer_runs_jobs_in_order_one_at_a_time_on_its_own_thread():
    """submit returns at once while no job is in flight, waits for the one in flight
    otherwise; jobs run in order on one thread that is not the caller's; close ends it."""
    writer, log, release = BackgroundWriter(), [], threading.Event()

    def job(k):
        def run():
            if k == 0:
                assert release.wait(30)
            log.append((k, threading.current_thread().name))
        return run

    tic = time.monotonic()
    writer.submit(job(0))
    assert time.monotonic() - tic < 0.2 and log == []  # job 0 is held: submit did not wait
    threading.Timer(0.5, release.set).start()
    writer.submit(job(1))  # waits for job 0
    assert time.monotonic() - tic >= 0.45 and log[0][0] == 0
    writer.wait()
    assert log == [(0, "checkpoint-writer"), (1, "checkpoint-writer")]
    assert threading.current_thread().name != "checkpoint-writer"
    assert writer.close() is None
    assert "checkpoint-writer" not in [t.name for t in threading.enumerate()]


def test_writer_error_is_raised_on_the_calling_thread_at_the_next_submit_or_wait():
    """A job's error (e.g. a full disk's one-line UserError) is raised, unchanged, by the next
    submit (whose job then does not run) or wait, once; close hands back an error not yet
    raised instead of raising it."""
    writer, ran = BackgroundWriter(), []
    message = "no space left on the device for /x/model.pth: it needs 1.0 MB, 0.0 MB are free"

    def full_disk():
        raise UserError(message)

    writer.submit(full_disk)
    with pytest.raises(UserError) as err:
        writer.submit(lambda: ran.append("not run"))
    assert str(err.value) == message and ran == []
    writer.submit(lambda: ran.append("next"))
    writer.wait()
    assert ran == ["next"]
    writer.submit(full_disk)
    with pytest.raises(UserError, match="no space left"):
        writer.wait()
    writer.wait()  # raised once only
    writer.submit(full_disk)
    assert str(writer.close()) == message
    assert writer.close() is None


def sgd_step(model, optimizer, seed):
    """One SGD step on a random batch: changes weights, BatchNorm buffers and momentum in
    place."""
    x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(seed))
    optimizer.zero_grad()
    model(x.contiguous(memory_format=torch.channels_last)).square().mean().backward()
    optimizer.step()


def test_host_copy_keeps_the_state_of_the_moment_it_was_taken():
    """A snapshot of a channels-last model's and its optimizer's state equals a deep copy taken
    at the same moment (container types, a state dict's version metadata, dtypes, strides,
    values), shares no memory with the live tensors, and keeps those values after training
    changed the live ones in place."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).to(
        memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sgd_step(model, optimizer, 0)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1,
             "history": {"series": {"loss": torch.tensor([1.5], dtype=torch.float64)},
                         "evaluations": [{"epoch": 1, "knn_accuracy": 0.5}]},
             "rng": {"torch": torch.get_rng_state(), "python": [1, 2, 0.0]}, "scaler": None}
    reference = copy.deepcopy(state)
    snapshot = host_copy(state, torch.device("cpu"))
    assert isinstance(snapshot["model"], OrderedDict)
    assert snapshot["model"]._metadata == reference["model"]._metadata
    live = [*state["model"].values(), state["optimizer"]["state"][0]["momentum_buffer"]]
    copied = [*snapshot["model"].values(), snapshot["optimizer"]["state"][0]["momentum_buffer"]]
    assert not {t.untyped_storage().data_ptr() for t in live} & {
        t.untyped_storage().data_ptr() for t in copied}
    sgd_step(model, optimizer, 1)
    state["history"]["evaluations"].append({"epoch": 2})
    assert not torch.equal(model.state_dict()["0.weight"], reference["model"]["0.weight"])
    assert_same_tree(snapshot, reference)
