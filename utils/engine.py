"""The training engine: the one loop that main.py (SimCLR), finetune.py and segment.py run on.

A script builds a `RunSetup` (its task, plain model, optimizer, schedule, data, precision,
settings, files) and calls `Trainer(setup).fit()`. The task supplies what differs between scripts:
    step(trainer, batch, step) -> (loss, extras)   forward and backward of one batch
    evaluate(model, epoch) -> dict or None          on rank 0, every `eval_every` epochs
                                                    (and at epoch 0 with `eval_at_start`)
and the engine owns, once, what they share:
  - the epoch/step loop, starting mid-epoch (`EpochBatchSampler.set_epoch(epoch, batch)`);
  - the learning rate as a pure function of the global step (`setup.schedule(step)`);
  - the sync-free logging window: per-step values stay on the device, and every `log_every`
    steps (and at an epoch's end) one all-reduce and one transfer bring the window to the host,
    giving every rank the same values and the same stop/save decisions;
  - one rule for non-finite losses (see `Trainer.log_window`);
  - Ctrl-C/SIGTERM (`GracefulStop`), checkpoints every `checkpoint_minutes` and at epoch ends,
    and the best evaluation (best.pth): rank 0 takes a host snapshot of the state and one
    background thread writes it (utils/writer.py, through utils/checkpoint.py) while training
    goes on; the end of the run, a stop and an exception wait for that write;
  - device placement: channels-last, DDP with global-batch BatchNorm under torchrun (and
    --multiple_gpus, which launches the same processes), torch.compile, cudnn.benchmark;
  - TensorBoard, the progress bar on a terminal and, without one (a log file), a progress
    line every `print_freq` steps;
  - the count of unreadable training images (`setup.unreadable`), summed over ranks at every
    logging point, which stops the run beyond its limit.
One step: lr = schedule(step); zero_grad; task.step (autocast inside, backward of the loss,
scaled under fp16); precision.step(optimizer).
"""
import functools
import importlib.util
import math
import os
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from utils.checkpoint import (RunPaths, load_checkpoint, rng_state, save_best, save_checkpoint,
                              set_rng_state)
from utils.distributed import (all_reduce_mean, decide_on_main, get_world_size,
                               is_main_process, print0, wrap_model)
from utils.errors import UserError
from utils.launch import launched_by_torchrun, launched_by_us
from utils.optim import group_learning_rate
from utils.runlock import acquire_run_lock
from utils.sync_audit import SyncAudit
from utils.writer import BackgroundWriter, host_copy

# fp16: a non-finite loss is a step GradScaler skips; this many in a row is an overflow that
# skipping does not cure (the forward pass itself overflows), so the run stops.
MAX_SKIPPED_STEPS_IN_A_ROW = 20
PLOT_SECONDS = 30.0  # epoch-end saves draw the loss plot at most this often (and at the end)


@dataclass
class LoopSettings:
    """How the engine runs a script's task (from the shared training flags, `from_args`)."""
    epochs: int
    steps_per_epoch: int
    log_every: int = 10
    checkpoint_minutes: float = 10.0
    eval_every: int = 0  # evaluate every E epochs and after the last; 0: never
    eval_at_start: bool = False  # also evaluate the starting point (epoch 0) of a new run
    channels_last: bool = True
    compile: str | None = None
    sync_bn: bool = True
    tensorboard_dir: str | None = None
    sync_debug: bool = False
    print_freq: int = 50  # progress line every N steps when stderr is not a terminal

    @classmethod
    def from_args(cls, args, steps_per_epoch, eval_every=0, tensorboard_dir=None,
                  eval_at_start=False):
        return cls(epochs=args.epochs, steps_per_epoch=steps_per_epoch,
                   log_every=args.log_every, checkpoint_minutes=args.checkpoint_minutes,
                   eval_every=eval_every, eval_at_start=eval_at_start,
                   channels_last=args.channels_last,
                   compile=args.compile, sync_bn=args.sync_bn,
                   tensorboard_dir=tensorboard_dir if args.tensorboard else None,
                   sync_debug=args.sync_debug, print_freq=args.print_freq)

    @property
    def total_steps(self):
        return self.epochs * self.steps_per_epoch


class Task:
    """What a training script supplies. `series` names the per-step values (loss first) and
    the label the epoch line gives each; `best_metric` the evaluation value whose maximum is
    kept in best.pth (None: no best.pth)."""
    script = "main"
    series = {"loss": "loss"}
    best_metric = None

    def train_mode(self, model):
        """Put `model` in training mode before an epoch (a frozen part may stay in eval)."""
        model.train()

    def step(self, trainer, batch, step):
        """Forward and backward of one loader batch on trainer.model under trainer.precision:
        returns (loss, tuple of the other `series` values), detached scalars on the device."""
        raise NotImplementedError

    def evaluate(self, model, epoch):
        """A dict of metrics after `epoch` epochs, on rank 0 with the plain `model`; None when
        there is nothing to evaluate."""
        return None

    def extra_state(self):
        """The task's own entries of the checkpoint's "extra" dict (merged with the script's
        record["extra"]), e.g. the state of a part trained beside the model."""
        return {}

    def load_extra_state(self, extra):
        """Restore what extra_state saved from the resumed checkpoint's "extra" dict (an empty
        dict for a checkpoint without one); a missing entry means a fresh start of that part."""

    def start_tensorboard(self, logger, trainer):
        """Add the script's own views to TensorBoard at the start (rank 0)."""

    def finish_tensorboard(self, logger, trainer):
        """Log the script's final TensorBoard views after a finished run (rank 0)."""


@dataclass
class RunSetup:
    """Everything one training run needs: the inputs a script builds once and passes whole to
    Trainer (the files under RESPATH that the run reads and writes are `paths`, a RunPaths)."""
    task: Task
    model: torch.nn.Module  # plain, on `device`
    optimizer: torch.optim.Optimizer
    schedule: Callable[[int], float]  # global step -> learning rate (utils.optim.WarmupCosine)
    sampler: Any  # utils.data.EpochBatchSampler of the loader
    loader: Any  # batches of `sampler`'s current epoch
    precision: Any  # utils.precision.MixedPrecision
    settings: LoopSettings
    paths: RunPaths  # RESPATH's files: the checkpoint it resumes and writes, best.pth
    device: torch.device
    record: dict = field(default_factory=dict)  # args, model_meta: stored in the checkpoint
    resume: dict | None = None  # the checkpoint to continue (load_checkpoint), or None
    # (trainer, state, draw_plot) on rank 0 at each save, on the training thread: returns the
    # function (no arguments) that writes the script's outputs from `state`, the checkpoint's
    # host snapshot, and what it captured; the background writer runs it after checkpoint.pth
    write_outputs: Callable | None = None
    unreadable: Any = None  # utils.data.UnreadableFiles of the training data, or None


class History:
    """Named per-step series (`loss` first), the evaluations [{"epoch": e, metric: value}] and
    the best of them ({"epoch": e, metric: value} or None)."""

    def __init__(self, steps_per_epoch, names, series=None, evaluations=(), best=None):
        self.steps_per_epoch = steps_per_epoch
        self.series = {name: list((series or {}).get(name, ())) for name in names}
        self.evaluations = [dict(e) for e in evaluations]
        self.best = None if best is None else dict(best)

    @property
    def step(self):
        return len(self.series["loss"])

    def epoch_means(self, name="loss"):
        return epoch_means(self.series[name], self.steps_per_epoch)

    def state(self):
        return {"series": {name: torch.tensor(values, dtype=torch.float64)
                           for name, values in self.series.items()},
                "evaluations": [dict(e) for e in self.evaluations]}

    @classmethod
    def from_checkpoint(cls, ckpt, steps_per_epoch, names):
        series = {name: values.tolist() for name, values in ckpt["history"]["series"].items()}
        missing = [name for name in names if name not in series]
        if missing:
            series.update({name: [math.nan] * len(series["loss"]) for name in missing})
        return cls(steps_per_epoch, names, series, ckpt["history"]["evaluations"], ckpt["best"])


def epoch_means(values, steps_per_epoch):
    """(E,) mean of each of the E complete epochs of per-step `values`; NaN entries (fp16
    steps the GradScaler skipped) are left out of the mean."""
    n = len(values) // steps_per_epoch
    values = np.asarray(values[:n * steps_per_epoch], dtype=np.float64).reshape(n, steps_per_epoch)
    counted = ~np.isnan(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counted, values, 0.0).sum(1) / counted.sum(1)


class Trainer:
    """Runs a `RunSetup` to its last epoch (see the module docstring). `model` is the wrapped
    model the step uses (DDP, compiled), `plain` the module underneath that is saved and
    evaluated."""

    def __init__(self, setup):
        self.setup, self.task, self.settings = setup, setup.task, setup.settings
        self.device, self.precision, self.optimizer = setup.device, setup.precision, setup.optimizer
        self.history = History(self.settings.steps_per_epoch, tuple(self.task.series))
        self.plain = setup.model
        if self.settings.channels_last:
            self.plain.to(memory_format=torch.channels_last)  # the same Parameter objects
        if setup.resume is not None:
            self.restore(setup.resume)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
        self.model = wrap_model(self.plain, self.device, self.settings.sync_bn)
        if self.settings.compile:
            check_compile_backend(self.settings.compile, self.device)
            self.model = torch.compile(self.model, backend=self.settings.compile)
        self.sync_audit = SyncAudit(self.settings.sync_debug, self.device)
        self.progress = ProgressLines(self.settings, setup.sampler.global_batch_size,
                                      enabled=is_main_process() and not sys.stderr.isatty())
        self.logger = None
        self.started, self.first_step = time.perf_counter(), self.history.step
        self._last_save = time.monotonic()
        self.writer = BackgroundWriter()
        self.save_waits = {}  # epoch -> seconds the training thread spent in its saves (rank 0)
        self._last_plot, self._plotted_step = -math.inf, None

    def restore(self, ckpt):
        """Continue the checkpoint `ckpt`: weights, optimizer, loss scale, history, RNG, and
        the task's own state (Task.load_extra_state)."""
        self.plain.load_state_dict(ckpt["model"])
        if ckpt["optimizer"] is not None:  # None: resumed from weights alone
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.precision.load_state_dict(ckpt.get("scaler"))
        self.history = History.from_checkpoint(ckpt, self.settings.steps_per_epoch,
                                               tuple(self.task.series))
        if ckpt["rng"] is not None:
            set_rng_state(ckpt["rng"], self.device)
        print0(f"resuming {ckpt.get('resumed_from', self.setup.paths.checkpoint)}: epoch "
               f"{ckpt['epoch']}, step {ckpt['step']} of {self.settings.total_steps}", flush=True)
        self.task.load_extra_state(ckpt.get("extra") or {})

    @property
    def finished(self):
        return self.history.step >= self.settings.total_steps

    def fit(self):
        """Train until the last epoch; returns 'finished' or 'stopped' (a signal: the
        checkpoint was written at the step where every process agreed to stop). Returns, or
        raises, only once the last save is on disk; a failed background write raises here."""
        s = self.settings
        if is_main_process() and s.tensorboard_dir and not self.finished:
            self.start_tensorboard()
        try:
            with GracefulStop() as stop:
                self.stop = stop
                outcome = self.train_epochs()
                self.writer.wait()  # the last save is on disk (a failed write raises)
            if outcome == "finished" and self.logger is not None:
                self.task.finish_tensorboard(self.logger, self)
            return outcome
        finally:
            self.close_writer()
            if self.logger is not None:
                self.logger.close()
            if self.sync_audit.enabled:
                print0(self.sync_audit.summary(), flush=True)

    def train_epochs(self):
        """The epochs of `fit` (inside its GracefulStop `self.stop`): 'finished' or 'stopped'."""
        s, stop = self.settings, self.stop
        if s.eval_every and s.eval_at_start and self.history.step == 0 \
                and not self.history.evaluations:
            self.save(draw_plot=False, best=self.evaluate(0))
        while not self.finished:
            epoch, start_batch = divmod(self.history.step, s.steps_per_epoch)
            self.setup.sampler.set_epoch(epoch, start_batch)
            tic = time.perf_counter()
            if not self.train_one_epoch(epoch):
                return "stopped"
            self.end_epoch(epoch, (s.steps_per_epoch - start_batch),
                           time.perf_counter() - tic)
            # a signal that arrived after the last all-reduce reached some ranks only
            flag = torch.tensor([float(stop.requested)], device=self.device)
            if all_reduce_mean(flag).item() > 0 and not self.finished:
                if self.setup.write_outputs is not None and is_main_process() \
                        and self._plotted_step != self.history.step:
                    self.save(draw_plot=True)  # the plot a stop always draws
                return "stopped"
        return "finished"

    def close_writer(self):
        """Wait for the background write in flight and end its thread; on an exception path
        (the write's own error was not raised yet) its error is printed, not lost."""
        error = self.writer.close()
        if error is not None:
            print(f"note: the background write of the run's files failed as well: "
                  f"{error if isinstance(error, UserError) else repr(error)}",
                  file=sys.stderr, flush=True)

    def train_one_epoch(self, epoch):
        """Train over the loader (which may start mid-epoch); False if stopped by a signal."""
        self.task.train_mode(self.model)
        bar = tqdm(self.setup.loader, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True,
                   mininterval=1.0, disable=None if is_main_process() else True)
        window, tic = [], time.perf_counter()  # device values and lr of the steps since a log
        for batch in bar:
            step = self.history.step + len(window)
            with self.sync_audit.step():
                window.append(self.train_step(batch, step))
            if not self.is_logging_point(step):
                continue
            stop_now, save_now = self.log_window(window)
            toc = time.perf_counter()
            images = len(window) * self.setup.sampler.global_batch_size
            loss = finite_mean(self.history.series['loss'][-len(window):])
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{window[-1][-1]:.3g}",
                            img_s=f"{images / (toc - tic):.0f}")
            self.progress.at(step, loss, window[-1][-1])
            window, tic = [], toc
            if stop_now:
                self.save(draw_plot=True)
                return False
            if save_now:
                self.save(draw_plot=False)
        return True

    def train_step(self, batch, step):
        """One optimisation step: lr of `step` (each parameter group's own, group_learning_rate:
        e.g. a pretrained encoder's smaller rate in fine-tuning), zero_grad, the task's forward
        and backward, the optimizer (through the loss scaler). Returns (loss, *extras, lr), on
        the device."""
        lr = self.setup.schedule(step)
        for group in self.optimizer.param_groups:
            group["lr"] = group_learning_rate(group, lr, step)
        self.optimizer.zero_grad(set_to_none=True)
        loss, extras = self.task.step(self, batch, step)
        self.precision.step(self.optimizer)
        return (loss, *extras, lr)

    def images_and_targets(self, batch):
        """A supervised batch (images (B, C, H, W), targets) on the training device, the images
        channels-last when the run uses that layout."""
        x, y = batch
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.settings.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def is_logging_point(self, step):
        """Whether global step `step` (just done) ends a logging window: every log_every steps,
        at the end of an epoch, and in a single process as soon as a stop is requested (with
        several processes the ranks only agree on a stop at the regular points)."""
        s = self.settings
        return ((step + 1) % s.log_every == 0 or (step + 1) % s.steps_per_epoch == 0
                or self.progress.due(step) or (self.stop.requested and get_world_size() == 1))

    def checkpoint_due(self):
        minutes = self.settings.checkpoint_minutes
        return minutes > 0 and time.monotonic() - self._last_save > 60 * minutes

    def log_window(self, window):
        """Bring the window's values (device scalars) to the host with one all-reduce (the
        mean over ranks) together with the stop/save flags; check them and append them to the
        history (and TensorBoard). Returns (stop_now, save_now), the same on every rank.

        A non-finite loss is the UserError of a diverged run (the last checkpoint, written after
        a finite window, is intact), except with fp16 loss scaling: there it makes the
        gradients non-finite, so GradScaler skipped that step (weights untouched) and it is
        recorded as NaN; MAX_SKIPPED_STEPS_IN_A_ROW such steps in a row stop the run (an
        overflow in the forward pass, which a smaller scale does not cure).
        """
        n, names = len(window), list(self.task.series)
        first_step = self.history.step
        columns = [torch.stack([row[k] for row in window]).to(torch.float64).reshape(n)
                   for k in range(len(names))]
        unreadable = self.setup.unreadable.count() if self.setup.unreadable is not None else 0
        flags = torch.tensor([self.stop.requested, self.checkpoint_due(), unreadable],
                             dtype=torch.float64, device=columns[0].device)
        values = all_reduce_mean(torch.cat([*columns, flags])).tolist()
        series = {name: values[k * n:(k + 1) * n] for k, name in enumerate(names)}
        stop_now, save_now = values[-3:-1]
        if self.setup.unreadable is not None:
            self.setup.unreadable.check(round(values[-1] * get_world_size()))
        for k, value in enumerate(series["loss"]):
            if math.isfinite(value):
                continue
            if self.precision.scaler is None:
                raise UserError(f"the loss became {value} at step {first_step + k} (the last "
                                f"checkpoint is intact); start again with a lower --lr and "
                                f"--fresh", all_ranks=True)
            for name in names:  # a step GradScaler skipped
                series[name][k] = math.nan
        for name in names:
            self.history.series[name].extend(series[name])
        skipped = trailing_nans(self.history.series["loss"])
        if skipped >= MAX_SKIPPED_STEPS_IN_A_ROW:
            raise UserError(f"--amp fp16 overflows: the loss was not finite in the last "
                            f"{skipped} steps (all skipped); resume from the last checkpoint "
                            f"with --amp bf16 or --amp off", all_ranks=True)
        if self.logger is not None:
            self.logger.log_steps(first_step, series, [row[-1] for row in window])
        return bool(stop_now), bool(save_now)

    def end_epoch(self, epoch, steps, seconds):
        """The epoch line, the evaluation when due (best.pth when it is the best), the
        checkpoint."""
        s, done = self.settings, epoch + 1
        means = "  ".join(f"{label} {self.history.epoch_means(name)[-1]:.4f}"
                          for name, label in self.task.series.items())
        lr = self.setup.schedule(self.history.step - 1)
        print0(f"epoch {done}/{s.epochs}  {means}  lr {lr:.4g}"
               f"  {steps * self.setup.sampler.global_batch_size / seconds:.0f} img/s  "
               f"{seconds:.0f} s", flush=True)
        improved = False
        if s.eval_every and (done % s.eval_every == 0 or done == s.epochs):
            improved = self.evaluate(done)
        self.save(draw_plot=self.plot_due(), best=improved)

    def plot_due(self):
        """Whether an epoch-end save draws the loss plot: at the end of the run, on a stop,
        else when PLOT_SECONDS have passed since the last one (the first epoch's always)."""
        return (self.finished or self.stop.requested
                or time.monotonic() - self._last_plot >= PLOT_SECONDS)

    def evaluate(self, epoch):
        """The task's evaluation on rank 0 (the others wait for its result); records it and
        returns whether it is the best so far (always, for a task that has none to offer)."""
        result = decide_on_main(lambda: self.task.evaluate(self.plain, epoch))
        self.task.train_mode(self.model)
        metric = self.task.best_metric
        if result is None:
            if metric is not None:
                self.history.best = {"epoch": epoch}
            return metric is not None
        entry = {"epoch": epoch, **{k: float(v) for k, v in result.items()}}
        self.history.evaluations.append(entry)
        if self.logger is not None:
            self.logger.log_evaluation(self.history.step, result)
        if metric is None:
            return False
        best = self.history.best
        if best is None or metric not in best or entry[metric] > best[metric]:
            self.history.best = {"epoch": epoch, metric: entry[metric]}
            print0(f"epoch {epoch}: best {metric.replace('_', ' ')} so far "
                   f"({entry[metric]:.4f}), kept in {self.setup.paths.best}", flush=True)
            return True
        return False

    def checkpoint_state(self):
        """The one checkpoint dict (layout: utils/checkpoint.py)."""
        step = self.history.step
        return {"script": self.task.script, "model": self.plain.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.precision.state_dict(),
                "step": step, "epoch": step // self.settings.steps_per_epoch,
                "steps_per_epoch": self.settings.steps_per_epoch,
                "history": self.history.state(), "best": self.history.best,
                **self.setup.record,
                "extra": {**self.setup.record.get("extra", {}), **self.task.extra_state()},
                "rng": rng_state(self.device)}

    def save(self, draw_plot, best=False):
        """Rank 0 hands this save to the background writer: checkpoint.pth first (the file
        resume reads), best.pth when `best`, then the script's outputs (`draw_plot`: with the
        loss plot). The training thread only waits for the previous write to finish (raising
        its error) and copies the state to host memory; the other ranks do not wait."""
        if is_main_process():
            tic = time.perf_counter()
            self.writer.wait()
            state = host_copy(self.checkpoint_state(), self.device)
            self.record_save_wait(time.perf_counter() - tic)
            outputs = None
            if self.setup.write_outputs is not None:
                outputs = self.setup.write_outputs(self, state, draw_plot)
            self.writer.submit(functools.partial(write_checkpoint_files, state,
                                                 self.setup.paths.checkpoint,
                                                 self.setup.paths.best if best else None, outputs))
            if draw_plot:
                self._last_plot, self._plotted_step = time.monotonic(), self.history.step
        self._last_save = time.monotonic()

    def record_save_wait(self, seconds):
        """Add `seconds` the training thread spent saving to the epoch of the current step."""
        epoch = -(-self.history.step // self.settings.steps_per_epoch)  # a save ends or is in it
        self.save_waits[epoch] = self.save_waits.get(epoch, 0.0) + seconds

    def save_wait_summary(self):
        """{"total": s, "per_epoch": [[epoch, s], ...]}: the seconds the training thread of
        this process spent inside its saves (for run.json)."""
        return {"total": round(sum(self.save_waits.values()), 4),
                "per_epoch": [[epoch, round(seconds, 4)]
                              for epoch, seconds in sorted(self.save_waits.items())]}

    def start_tensorboard(self):
        from utils.tensorboard import TensorBoardLogger
        self.logger = TensorBoardLogger(self.settings.tensorboard_dir,
                                        first_step=self.history.step)
        self.task.start_tensorboard(self.logger, self)

    def images_per_second(self):
        """Training images per second of this process's run so far (None before a step)."""
        steps = self.history.step - self.first_step
        seconds = time.perf_counter() - self.started
        return round(steps * self.setup.sampler.global_batch_size / seconds, 1) if steps else None


def write_checkpoint_files(state, checkpoint, best, outputs):
    """One save's writes, on the background writer, in order: the checkpoint (what resume
    reads) from the host snapshot `state`, best.pth at `best` (None: not this time), then
    `outputs()` (the script's files, or None)."""
    save_checkpoint(state, checkpoint)
    if best:
        save_best(state, best)
    if outputs is not None:
        outputs()


class ProgressLines:
    """The progress of a run without a terminal (tqdm shows nothing there): one line every
    `print_freq` steps, e.g.

        epoch 2/10  step 340/1000  loss 5.1234  lr 0.3  812 img/s  ETA 0:12:33

    with images/s and the ETA from the steps since the previous line."""

    def __init__(self, settings, global_batch_size, enabled):
        self.settings, self.batch, self.enabled = settings, global_batch_size, enabled
        self._tic, self._last_step = time.perf_counter(), None

    def due(self, step):
        """Whether global step `step` (just done) is a progress point. The same on every rank
        whether or not this one prints (a logging point is a collective), so it does not
        depend on the terminal."""
        return (step + 1) % self.settings.print_freq == 0

    def at(self, step, loss, lr):
        if not (self.enabled and self.due(step)):
            return
        s, toc = self.settings, time.perf_counter()
        steps = step + 1 - self._last_step if self._last_step is not None else None
        self._last_step, seconds, self._tic = step + 1, toc - self._tic, toc
        if steps:  # the first line after a (re)start also timed the start-up: no rate
            rate = steps / max(seconds, 1e-9)
            eta = format_seconds((s.total_steps - step - 1) / rate)
            speed = f"{rate * self.batch:.0f} img/s  ETA {eta}"
        else:
            speed = "measuring speed"
        epoch, in_epoch = divmod(step, s.steps_per_epoch)
        print(f"epoch {epoch + 1}/{s.epochs}  step {in_epoch + 1}/{s.steps_per_epoch}  "
              f"loss {loss:.4f}  lr {lr:.4g}  {speed}", flush=True)


def format_seconds(seconds):
    """H:MM:SS of a duration in seconds."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def check_compile_backend(backend, device):
    """UserError for a --compile backend torch does not know, or inductor without what it
    compiles with: a C++ compiler on the CPU; Triton and the C compiler it builds its kernel
    launchers with on CUDA (else the run would stop at its first step with a traceback)."""
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise UserError(f"--compile {backend}: torch.compile has no such backend; use inductor "
                        f"(the default) or one of {', '.join(sorted(known))}", all_ranks=True)
    if backend != "inductor":
        return
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise UserError("--compile on CUDA needs the triton package (pip install triton, the "
                        "version torch was built with); install it, or drop --compile",
                        all_ranks=True)
    variable, compilers = (("CC", ("cc", "gcc", "clang")) if device.type == "cuda"
                           else ("CXX", ("g++", "clang++")))
    chosen = os.environ.get(variable)
    if not any(shutil.which(c) for c in ((chosen,) if chosen else compilers)):
        language = "C" if device.type == "cuda" else "C++"
        raise UserError(f"--compile on {device.type.upper()} needs a {language} compiler "
                        f"({chosen or ' or '.join(compilers)}; e.g. apt-get install "
                        f"{'gcc' if language == 'C' else 'g++'}); install one, or drop --compile",
                        all_ranks=True)


def peak_memory_mb(device):
    """Peak memory of this process: allocated on the GPU, resident on the CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def launcher_name():
    """How this process was started, for run.json: 'multiple_gpus', 'torchrun' or None."""
    if launched_by_us():
        return "multiple_gpus"
    return "torchrun" if launched_by_torchrun() else None


def finite_mean(values):
    """Mean of the values that are not NaN (NaN if there are none)."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def trailing_nans(values):
    """How many of the last values in a row are NaN."""
    count = 0
    for value in reversed(values):
        if not math.isnan(value):
            break
        count += 1
    return count


def report_outcome(outcome, trainer):
    """Exit status of a training script after `fit`: 130 and the resume hint when stopped."""
    if outcome == "stopped":
        if is_main_process():
            print(f"interrupted at step {trainer.history.step}: checkpoint saved in "
                  f"{trainer.setup.paths.checkpoint}; run the same command to resume",
                  file=sys.stderr, flush=True)
        return 130
    return 0


def load_resumable(path, script, args, run_defining, legacy=None):
    """The checkpoint at `path` to resume (None without one, or with --fresh), checked against
    this command's run-defining flags. Takes RESPATH's lock first (utils/runlock.py): one run
    per RESPATH."""
    acquire_run_lock(args.respath, script)
    if args.fresh or not os.path.exists(path):
        return None
    ckpt = load_checkpoint(path, script)
    check_resume_compatible(ckpt, args, path, run_defining, legacy)
    return ckpt


class GracefulStop:
    """Context manager: SIGINT/SIGTERM set `requested` instead of killing the process, so the
    loop can finish its step and write a checkpoint. A second Ctrl-C stops at once, except in
    a distributed job, whose launcher forwards the Ctrl-C it received itself (it kills the
    workers if they have not finished after its grace period)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT and not launched_by_torchrun():
            raise KeyboardInterrupt
        if self.requested:
            return
        self.requested = True
        print0("\nstopping: saving a checkpoint at the next step boundary where all "
               "processes agree (Ctrl-C again to abort without saving)", flush=True)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def check_resume_compatible(ckpt, args, checkpoint_path, run_defining, legacy=None):
    """UserError naming the first run-defining flag whose value differs from the stored run.

    `ckpt["args"]` holds the stored run's arguments; `legacy` gives the value a checkpoint
    written before a flag existed meant by it. `run_defining` names the arguments by their
    dest, a positional one in upper case as its usage line shows it (e.g. "MODELPATH").
    """
    stored = {**(legacy or {}), **ckpt["args"]}
    for label in run_defining:
        name = label.lower()
        if stored.get(name) != getattr(args, name):
            flag = label if label.isupper() else "--" + name.replace("_", "-")
            raise UserError(
                f"{checkpoint_path} is a run with {flag} {stored.get(name)}, this command asks for "
                f"{getattr(args, name)}; pass the same value to resume it, --fresh to start over "
                f"(replacing it), or another RESPATH")
