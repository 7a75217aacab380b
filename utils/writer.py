"""Saving without stalling training: a host snapshot of the state on the training thread
(`host_copy`), the file writes on one background thread (`BackgroundWriter`).

utils/engine.py's Trainer.save copies the checkpoint state to host memory, which is all the
training thread pays, and hands the writes (checkpoint.pth first, then the script's outputs) to
the writer; training goes on while they run. The files stay as safe as before: every write is
atomic (utils/fileio.py), so a kill during a background write leaves the previous version of
each file intact, and the end of a run, a stop and any exception wait for the write in flight.
"""
import copy
import queue
import threading
from collections import OrderedDict

import torch


class BackgroundWriter:
    """Runs write jobs (functions of no arguments) in order, one at a time, on one thread of
    its own, started at the first job.

    At most one job is in flight: `submit` first waits for the previous one to finish. A job's
    error is kept and raised on the calling thread by the next `submit` or `wait`, so that a
    failed write (e.g. a full disk's one-line UserError) stops the run as it did when the
    write ran on the training thread. A job must read only what it was given (a host
    snapshot), never live training objects, which the training thread goes on changing.
    """

    def __init__(self, name="checkpoint-writer"):
        self.name = name
        self._jobs = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._error = None
        self._thread = None

    def submit(self, job):
        """Wait for the job in flight (raising its error), then start `job` in the background."""
        self.wait()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
        self._idle.clear()
        self._jobs.put(job)

    def wait(self):
        """Wait until no job is in flight; raise the error the last job ended with, if any."""
        self._idle.wait()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self):
        """Wait for the job in flight and end the thread. Returns the error that job ended with
        (None if it succeeded or was already raised), for a caller already handling another
        exception; `wait` is the call that raises it."""
        self._idle.wait()
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        return error

    def _loop(self):
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except BaseException as err:  # kept for the training thread, which raises it
                self._error = err
            finally:
                job = None  # drop the snapshot before going idle
                self._idle.set()


def host_copy(state, device):
    """A copy of `state` (nested dicts, lists and tuples of tensors and plain values, e.g. a
    checkpoint dict) that shares no memory with it: tensors on the host (same dtype, shape and
    strides), containers and plain values copied. Training changes parameters and optimizer
    buffers in place, so on the CPU the tensors are cloned; from a CUDA `device` they are
    copied into pinned memory without blocking, with one synchronize at the end."""
    pinned = device.type == "cuda"
    copied = _copy(state, pinned)
    if pinned:
        torch.cuda.synchronize(device)
    return copied


def _copy(obj, pinned):
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach()
        if tensor.device.type == "cpu":
            return tensor.clone()
        out = torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype,
                                  device="cpu", pin_memory=pinned)
        return out.copy_(tensor, non_blocking=pinned)
    if isinstance(obj, dict):
        out = (OrderedDict if isinstance(obj, OrderedDict) else dict)(
            (key, _copy(value, pinned)) for key, value in obj.items())
        if hasattr(obj, "_metadata"):  # a state dict's module versions (load_state_dict)
            out._metadata = copy.deepcopy(obj._metadata)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy(value, pinned) for value in obj)
    return copy.deepcopy(obj)
