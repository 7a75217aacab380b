"""Atomic file writes: every output goes to a fsynced temporary file in the same folder and is
renamed over the target, so a kill at any moment leaves either the old or the new file."""
import io
import json
import os

import numpy as np
import torch


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
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_folder(folder)


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
