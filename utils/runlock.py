"""One run per RESPATH: RESPATH/.lock names the process that writes there (pid, host, the pid's
start time, script). A second run on the same RESPATH refuses with a one-line error; the lock of
a run that was killed (its process is gone, or the pid now belongs to another process) is taken
over with a note. The lock is removed when the process exits."""
import atexit
import json
import os
import socket
import time

from utils.errors import UserError, warn
from utils.fileio import remove_if_present

LOCK_NAME = ".lock"


def process_start_time(pid):
    """The start time of process `pid` in clock ticks since boot (/proc/PID/stat field 22), or
    None where /proc is not there; tells a live run from a recycled pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def owner_alive(owner):
    """Whether the process a lock names still runs (on this host; another host's is assumed to)."""
    if owner.get("host") != socket.gethostname():
        return True
    pid = owner.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    started = process_start_time(pid)
    return started is None or owner.get("start_time") in (None, started)


def read_owner(path):
    """The lock's content ({} for a half-written or foreign file)."""
    try:
        with open(path) as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def acquire_run_lock(respath, script):
    """Create RESPATH/.lock for this process, removed at exit; UserError when a live run holds
    it. Returns the lock's path."""
    path = os.path.join(respath, LOCK_NAME)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "start_time": process_start_time(os.getpid()), "script": script,
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = read_owner(path)
            if owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
                return path  # this process holds it already
            if owner and owner_alive(owner):
                raise UserError(
                    f"{respath} is in use by another run ({owner.get('script', '?')}.py, pid "
                    f"{owner.get('pid')} on {owner.get('host')}, since {owner.get('started')}); "
                    f"wait for it to end or use another RESPATH (if that run is gone, delete "
                    f"{path})") from None
            if not owner and time.time() - _mtime(path) < 5:
                time.sleep(0.5)  # another run is writing its lock right now
                continue
            warn(f"{path} was left by a run that is no longer running (pid "
                 f"{owner.get('pid', '?')}); taking it over")
            remove_if_present(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(release_run_lock, path)
        return path
    raise UserError(f"could not take {path}; if no other run uses {respath}, delete it")


def release_run_lock(path):
    """Remove the lock if this process holds it."""
    if read_owner(path).get("pid") == os.getpid():
        remove_if_present(path)


def _mtime(path):
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0
