"""Checkpoint I/O: the only module that knows file names under RESPATH and how they are written.

Every file is written to a temporary file in the same folder, fsynced and renamed over the
target, so a kill at any moment leaves either the old or the new file, never half of one.
A checkpoint is one dict of tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(weights_only=True)`.
"""
import io
import json
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from utils.cli import UserError

FORMAT_VERSION = 1
KIND = "simclr-toolkit-checkpoint"


@dataclass(frozen=True)
class RunPaths:
    """Where a pretraining run under RESPATH keeps its files."""
    root: str

    @property
    def model_dir(self):
        return os.path.join(self.root, "model")

    @property
    def plots_dir(self):
        return os.path.join(self.root, "plots")

    @property
    def model(self):
        return os.path.join(self.model_dir, "model.pth")

    @property
    def optimizer(self):
        return os.path.join(self.model_dir, "optimizer.pth")

    @property
    def losses(self):
        return os.path.join(self.model_dir, "lossesfile.npz")

    @property
    def checkpoint(self):
        return os.path.join(self.model_dir, "checkpoint.pth")

    @property
    def loss_plot(self):
        return os.path.join(self.plots_dir, "training_losses.png")

    @property
    def run_json(self):
        return os.path.join(self.root, "run.json")

    @property
    def data_stats(self):
        return os.path.join(self.root, "data_stats.json")


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


def unwrap_model(model):
    """The plain module inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def strip_prefixes(state_dict):
    """Remove `module.` / `_orig_mod.` prefixes left by wrappers in checkpoints of other tools."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def rng_state():
    """The python, numpy and torch RNG states as weights_only-loadable values."""
    np_state = np.random.get_state()
    py_version, py_words, py_gauss = random.getstate()
    state = {"python": list(py_words) + [py_gauss or 0.0], "python_version": py_version,
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                       "cached_gaussian": float(np_state[4])},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what `rng_state` returned."""
    py = state["python"]
    random.setstate((state["python_version"], tuple(int(v) for v in py[:-1]),
                     py[-1] if py[-1] else None))
    np_s = state["numpy"]
    np.random.set_state(("MT19937", np_s["keys"].numpy().astype(np.uint32), np_s["pos"],
                         np_s["has_gauss"], np_s["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state, path):
    """Write the run-state dict (see simclr.py) with the format tag, atomically."""
    atomic_torch_save({"kind": KIND, "format_version": FORMAT_VERSION, **state}, path)


def _torch_load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder; give the model.pth or checkpoint.pth file "
                        f"inside it (usually RESPATH/model/)") from None
    except Exception as err:  # pickle errors, zip errors, random bytes
        raise UserError(f"{path} is not a checkpoint this toolkit can read "
                        f"({type(err).__name__}); give the model.pth or checkpoint.pth that "
                        f"main.py wrote") from None


def load_checkpoint(path, script="main"):
    """Load a full checkpoint.pth that `save_checkpoint` wrote for `script` (main, finetune,
    segment: the "script" entry, absent in pretraining checkpoints); UserError for anything
    else, including another script's checkpoint."""
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != KIND:
        raise UserError(f"{path} is not a checkpoint of this toolkit; give the checkpoint.pth "
                        f"or model.pth that {script}.py wrote")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer version of this toolkit "
                        f"(format {ckpt['format_version']}); update the code")
    written_by = ckpt.get("script", "main")
    if written_by != script:
        raise UserError(f"{path} is a checkpoint of {written_by}.py, not of {script}.py; give "
                        f"the file {script}.py wrote (or another output folder)")
    return ckpt


def model_metadata(ckpt):
    """What rebuilding the model needs, as stored in a checkpoint or run.json."""
    keys = ("arch", "stem", "proj_dims", "in_channels", "image_size", "mean", "std")
    return {k: ckpt["model_meta"][k] for k in keys}


def load_pretrained(path):
    """Load a pretrained model for evaluation: returns (state_dict, meta).

    `path` may be a checkpoint.pth (the metadata is inside) or a bare model.pth state dict, in
    which case the metadata comes from the sibling checkpoint.pth or the run's run.json.
    Keys with `module.` prefixes (DataParallel/DDP) are accepted and stripped.
    """
    obj = _torch_load(path)
    if isinstance(obj, dict) and obj.get("kind") == KIND:
        if obj.get("script", "main") != "main":
            raise UserError(f"{path} is a checkpoint of {obj['script']}.py; give the model.pth "
                            f"or checkpoint.pth of a main.py (pretraining) run")
        return strip_prefixes(obj["model"]), model_metadata(obj)
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise UserError(f"{path} is not a model of this toolkit; give the model.pth or "
                        f"checkpoint.pth that main.py wrote")
    state_dict = strip_prefixes(obj)
    folder = os.path.dirname(os.path.abspath(path))
    sibling = os.path.join(folder, "checkpoint.pth")
    run_json = os.path.join(os.path.dirname(folder), "run.json")
    if os.path.exists(sibling):
        return state_dict, model_metadata(load_checkpoint(sibling))
    if os.path.exists(run_json):
        with open(run_json) as f:
            return state_dict, model_metadata(json.load(f))
    raise UserError(f"{path} holds weights but no description of the model; keep it beside its "
                    f"checkpoint.pth (or its run's run.json one folder up), or pass the "
                    f"checkpoint.pth instead")
