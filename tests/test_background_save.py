"""Saves that do not stall training (utils/writer.py, Trainer.save): the background writer's
order, one job in flight and errors raised on the training thread; host snapshots that later
training does not change; the engine's checkpoints written while training goes on, equal to
the state of their save; the loss plot's schedule; a stop that waits for its save."""
import copy
import functools
import os
import shutil
import signal
import threading
import time
from collections import OrderedDict

import pytest
import torch
from torch import nn

import utils.engine as engine
from simclr import SimCLRTask, transfer_views
from test_speed_path import TinySimCLR, view_batches
from utils.checkpoint import RunPaths
from utils.engine import LoopSettings, RunSetup, Trainer
from utils.errors import UserError
from utils.ntxent import NTXentLoss
from utils.optim import WarmupCosine, build_optimizer
from utils.precision import FLOAT32
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


class SameBatchesEveryEpoch:
    """Loader and sampler in one: `batches` every epoch, from the batch set_epoch names."""
    global_batch_size = 4

    def __init__(self, batches):
        self.batches, self.start = batches, 0

    def set_epoch(self, epoch, start_batch):
        self.start = start_batch

    def __iter__(self):
        return iter(self.batches[self.start:])


def tiny_trainer(folder, epochs, batches, write_outputs=None):
    """The engine's Trainer with main.py's SimCLR task on TinySimCLR (seed 0), checkpoints in
    `folder` at epoch ends only."""
    torch.manual_seed(0)
    model, cpu = TinySimCLR(), torch.device("cpu")
    loader = SameBatchesEveryEpoch(batches)
    return Trainer(RunSetup(
        task=SimCLRTask(NTXentLoss(0.2), functools.partial(transfer_views, device=cpu)),
        model=model, optimizer=build_optimizer(model, "sgd", 0.1, 1e-4),
        schedule=WarmupCosine(0.1, 0, 100), sampler=loader, loader=loader, precision=FLOAT32,
        settings=LoopSettings(epochs=epochs, steps_per_epoch=len(batches), log_every=1,
                              checkpoint_minutes=0),
        paths=RunPaths(str(folder)), device=cpu,
        write_outputs=write_outputs))


def load(path):
    """The checkpoint (or any weights_only file) at `path`."""
    return torch.load(path, weights_only=True)


def test_checkpoint_written_while_training_goes_on_holds_the_state_of_its_save(tmp_path,
                                                                               monkeypatch):
    """The epoch-1 checkpoint, held back in the writer until a step of epoch 2 has changed the
    weights and momentum in place, holds the end of epoch 1: the live state of a 1-epoch run
    trained separately; the epoch-2 checkpoint, on disk when fit returns, the live state of
    the 2-epoch run. Both are written on the writer thread, in order."""
    batches = view_batches(3)
    one = tiny_trainer(tmp_path / "one", 1, batches)
    assert one.fit() == "finished"
    two = tiny_trainer(tmp_path / "two", 2, batches)
    epoch_2_stepped, real_step = threading.Event(), two.train_step

    def train_step(batch, step):
        out = real_step(batch, step)
        if step == 3:
            epoch_2_stepped.set()
        return out

    written, real_save = [], engine.save_checkpoint

    def held_back(state, path):
        if not written:
            assert epoch_2_stepped.wait(60)
        written.append((state["step"], threading.current_thread().name))
        real_save(state, path)
        shutil.copy(path, tmp_path / f"step{state['step']}.pth")

    two.train_step = train_step
    monkeypatch.setattr(engine, "save_checkpoint", held_back)
    assert two.fit() == "finished"
    assert written == [(3, "checkpoint-writer"), (6, "checkpoint-writer")]
    epoch_1, final = load(tmp_path / "step3.pth"), load(tmp_path / "two" / "checkpoint.pth")
    assert_same_tree(epoch_1["model"], one.plain.state_dict())
    assert_same_tree(epoch_1["optimizer"], one.optimizer.state_dict())
    assert epoch_1["history"]["series"]["loss"].tolist() == one.history.series["loss"]
    assert final["step"] == 6
    assert_same_tree(final["model"], two.plain.state_dict())
    assert_same_tree(final["optimizer"], two.optimizer.state_dict())
    assert final["history"]["series"]["loss"].tolist() == two.history.series["loss"]


@pytest.mark.parametrize("epochs", [1, 2])
def test_failed_background_write_is_raised_at_the_next_save_or_the_end(tmp_path, monkeypatch,
                                                                       epochs):
    """A checkpoint write that fails in the writer (a full disk's UserError) is raised by fit,
    unchanged: at the next save, after epoch 2 trained (so nothing more was written), or when
    it was the last save, by fit's end; no writer thread is left behind."""
    attempts = []

    def full_disk(state, path):
        attempts.append(state["step"])
        raise UserError(f"no space left on the device for {path}")

    monkeypatch.setattr(engine, "save_checkpoint", full_disk)
    trainer = tiny_trainer(tmp_path, epochs, view_batches(3))
    with pytest.raises(UserError, match="^no space left on the device for .*checkpoint.pth$"):
        trainer.fit()
    assert attempts == [3] and trainer.history.step == 3 * epochs
    assert "checkpoint-writer" not in [t.name for t in threading.enumerate()]


def test_failed_write_behind_a_training_error_is_printed_not_lost(tmp_path, monkeypatch,
                                                                  capsys):
    """Training fails (a UserError at step 4) while the epoch-1 write's failure is not raised
    yet: fit raises the training's error, after waiting for the write, and prints the write's
    error in a note."""
    def full_disk(state, path):
        raise UserError(f"no space left on the device for {path}")

    monkeypatch.setattr(engine, "save_checkpoint", full_disk)
    trainer = tiny_trainer(tmp_path, 2, view_batches(3))
    real_step = trainer.train_step

    def train_step(batch, step):
        if step == 4:
            raise UserError("the loss became nan at step 4")
        return real_step(batch, step)

    trainer.train_step = train_step
    with pytest.raises(UserError, match="^the loss became nan at step 4$"):
        trainer.fit()
    note = "note: the background write of the run's files failed as well: no space left"
    assert note in capsys.readouterr().err


class RecordedOutputs:
    """A script's write_outputs that records, when its write runs, (step, draw_plot, thread)
    and whether checkpoint.pth already held that step; each write takes `seconds`."""

    def __init__(self, checkpoint, seconds=0.0):
        self.checkpoint, self.seconds, self.writes = checkpoint, seconds, []

    def __call__(self, trainer, state, draw_plot):
        return functools.partial(self.write, state["step"], draw_plot)

    def write(self, step, draw_plot):
        time.sleep(self.seconds)
        self.writes.append((step, draw_plot, threading.current_thread().name,
                            load(self.checkpoint)["step"] == step))


@pytest.mark.parametrize("plot_seconds, drawn", [(engine.PLOT_SECONDS, [True, False, True]),
                                                  (0.0, [True, True, True])])
def test_loss_plot_at_most_every_plot_seconds_and_at_the_end(tmp_path, monkeypatch,
                                                              plot_seconds, drawn):
    """Epoch ends draw the loss plot when PLOT_SECONDS have passed since the last one (a run of
    3 quick epochs: the first and the last only; with 0 s: every epoch), the last save always;
    the outputs are written on the writer thread after the checkpoint of the same step."""
    monkeypatch.setattr(engine, "PLOT_SECONDS", plot_seconds)
    outputs = RecordedOutputs(tmp_path / "checkpoint.pth")
    assert tiny_trainer(tmp_path, 3, view_batches(2), outputs).fit() == "finished"
    assert outputs.writes == [(step, draw, "checkpoint-writer", True)
                              for step, draw in zip((2, 4, 6), drawn)]


def test_stop_draws_the_plot_and_fit_returns_once_the_save_is_on_disk(tmp_path):
    """Ctrl-C inside epoch 2: fit returns 'stopped' only after the stop's save (checkpoint,
    then outputs with the plot, each write taking 0.5 s) is written, at the step it stopped."""
    outputs = RecordedOutputs(tmp_path / "checkpoint.pth", seconds=0.5)
    trainer = tiny_trainer(tmp_path, 3, view_batches(3), outputs)
    real_step = trainer.train_step

    def train_step(batch, step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(batch, step)

    trainer.train_step = train_step
    assert trainer.fit() == "stopped"
    assert trainer.history.step == 5 and load(tmp_path / "checkpoint.pth")["step"] == 5
    assert outputs.writes == [(3, True, "checkpoint-writer", True),
                              (5, True, "checkpoint-writer", True)]
