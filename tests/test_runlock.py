"""One run per RESPATH (utils/runlock.py) and a full disk while saving (utils/fileio.py): a
second run on a busy RESPATH refuses in one line, a killed run's lock is taken over, and a save
that finds no space says so in one line and leaves the previous file intact."""
import errno
import json
import os
import signal
import socket

import pytest
import torch

from conftest import FAST_PRETRAIN, assert_one_line_error, run_script, start_script, wait_for_step
from utils import fileio
from utils.errors import UserError
from utils.runlock import acquire_run_lock, process_start_time, release_run_lock


def test_second_run_on_a_busy_respath_refuses_and_a_killed_runs_lock_is_taken_over(
        tiny_folder, tmp_path):
    respath = tmp_path / "run"
    args = ["--epochs", "30", *FAST_PRETRAIN, "--checkpoint-minutes", "0.0001", "--log-every", "1"]
    first = start_script("main.py", tiny_folder, respath, *args)
    wait_for_step(respath / "checkpoint.pth", 1, first)
    owner = json.loads((respath / ".lock").read_text())
    assert owner["pid"] == first.pid and owner["script"] == "main"
    second = run_script("main.py", tiny_folder, respath, *args)
    assert_one_line_error(second, str(respath), "in use by another run", f"pid {first.pid}",
                          "another RESPATH")
    assert first.poll() is None  # the first run goes on
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (respath / ".lock").exists()  # a kill leaves it behind
    again = run_script("main.py", tiny_folder, respath, "--epochs", "1", *FAST_PRETRAIN,
                       "--fresh")
    assert again.returncode == 0, again.stderr
    assert "no longer running" in again.stderr and "taking it over" in again.stderr
    assert not (respath / ".lock").exists()  # removed at exit


def test_lock_of_a_recycled_pid_or_another_host(tmp_path):
    """A lock naming a live pid whose start time differs (the pid was reused) is stale; one
    from another host is respected (we cannot see its processes); our own lock is re-entrant."""
    lock = tmp_path / ".lock"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "script": "main", "started": "x"}
    lock.write_text(json.dumps({**me, "pid": os.getppid(), "start_time": -1}))
    assert acquire_run_lock(str(tmp_path), "finetune") == str(lock)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert acquire_run_lock(str(tmp_path), "finetune") == str(lock)
    release_run_lock(str(lock))
    assert not lock.exists()
    lock.write_text(json.dumps({**me, "pid": 1, "host": "elsewhere", "start_time": 5}))
    with pytest.raises(UserError, match="elsewhere"):
        acquire_run_lock(str(tmp_path), "main")
    lock.write_text(json.dumps({**me, "pid": os.getppid(),
                                "start_time": process_start_time(os.getppid())}))
    with pytest.raises(UserError, match=f"pid {os.getppid()}"):
        acquire_run_lock(str(tmp_path), "main")


def test_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    """The write of the new version fails with ENOSPC: UserError naming the file, the space it
    needs and the space free; the old file is untouched and no temporary file is left."""
    target = tmp_path / "checkpoint.pth"
    fileio.atomic_write_bytes(target, b"previous checkpoint")
    real_open = open

    class FullDisk:
        def __init__(self, path, mode):
            self.file = real_open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            self.file.write(data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "open", FullDisk, raising=False)
    with pytest.raises(UserError) as err:
        fileio.atomic_write_bytes(target, b"x" * 3 * 2 ** 20)
    message = str(err.value)
    assert str(target) in message and "needs 3.0 MB" in message and "MB are free" in message
    assert "previous version is intact" in message and "\n" not in message
    assert target.read_bytes() == b"previous checkpoint"
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


FULL_DISK = '''
import builtins, errno, os
_open = builtins.open

class _Full:
    def __init__(self, f):
        self.f = f
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()
    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    def __getattr__(self, name):
        return getattr(self.f, name)

def _open_on_a_full_disk(file, mode="r", *args, **kwargs):
    f = _open(file, mode, *args, **kwargs)
    if isinstance(file, str) and os.path.basename(file) == ".optimizer.pth.tmp" and "w" in mode:
        return _Full(f)
    return f

builtins.open = _open_on_a_full_disk
'''


def test_full_disk_through_the_command_line_then_resume(tiny_folder, tmp_path):
    """main.py whose disk fills up while writing optimizer.pth (an open() that fails with
    ENOSPC, put in place by a sitecustomize for that run only): one line, exit 2, the
    checkpoint written just before intact; the same command then resumes from it."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FULL_DISK)
    respath = tmp_path / "run"
    args = ["--epochs", "2", *FAST_PRETRAIN]
    full = run_script("main.py", tiny_folder, respath, *args,
                      env={"PYTHONPATH": str(inject)})
    error = assert_one_line_error(full, "no space left", "optimizer.pth", "MB are free",
                                  "run the same command again")
    assert full.returncode == 2 and "nothing was replaced" in error
    assert torch.load(respath / "checkpoint.pth", weights_only=True)["step"] == 3
    assert not (respath / ".lock").exists()
    again = run_script("main.py", tiny_folder, respath, *args)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stdout and "step 3 of 6" in again.stdout
