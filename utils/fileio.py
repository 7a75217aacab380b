"""Atomic file writes: every output goes to a fsynced temporary file in the same folder and is
renamed over the target, so a kill at any moment leaves either the old or the new file."""
import errno
import io
import json
import os
import shutil

import numpy as np

from utils.errors import UserError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def atomic_write_bytes(path, data):
    """Write `data` to `path` through a fsynced temporary file and os.replace.

    The temporary name is fixed per target (one writer per RESPATH), so a temporary file left
    by a process killed mid-write is overwritten and consumed by the next save of that file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.errno not in NO_SPACE:
            raise
        remove_if_present(tmp)  # first, so that the free space reported counts its bytes
        raise UserError(no_space_message(path, len(data))) from None
    finally:
        remove_if_present(tmp)
    fsync_folder(folder)


def no_space_message(path, needed):
    """The one line for a full disk: the file, the space it needs and the space free."""
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    kept = "the previous version is intact" if os.path.exists(path) else "nothing was replaced"
    return (f"no space left on the device for {path}: it needs {needed / 2 ** 20:.1f} MB, "
            f"{free / 2 ** 20:.1f} MB are free ({kept}); free some space and run the same "
            f"command again to resume")


def remove_if_present(path):
    """os.remove that ignores a file already gone."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def fsync_folder(folder):
    """fsync `folder` itself, which makes a rename inside it durable (ignored where the file
    system does not allow it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_torch_save(obj, path):
    """torch.save `obj` to `path` atomically."""
    import torch  # here, so that the JSON and bytes writers stay light for the scripts/ tools

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_savez(path, **arrays):
    """np.savez `arrays` to `path` atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def json_dump(obj, path):
    """Write `obj` as indented JSON atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def open_runs(path, command, replace=False, earlier=()):
    """The results file at `path` as {"command": command, "runs": [run, ...]}, ready for one
    more run of `command` (json_dump it after appending). Absent: no runs yet. A file of one
    run without "runs" (the earlier layout) is its own first run. A file of runs recorded under
    one of the `earlier` commands (the same command before its script moved) keeps that command
    and takes the run. A file that records another command raises UserError, unless `replace`:
    its runs are then dropped."""
    if not os.path.exists(path):
        return {"command": command, "runs": []}
    try:
        with open(path) as f:
            kept = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable results file ({err}): move it away or "
                        f"pick another file") from None
    if kept.get("command") in earlier and "runs" in kept and not replace:
        return {"command": kept["command"], "runs": kept["runs"]}
    if kept.get("command") != command:
        if not replace:
            raise UserError(f"{path} records another command ({kept.get('command')!r}): pick "
                            f"another file or pass --replace to drop its runs")
        return {"command": command, "runs": []}
    return {"command": command, "runs": kept.get("runs", [kept])}
