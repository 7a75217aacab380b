"""Checkpoint I/O: the only module that knows file names under RESPATH, how they are written and
the checkpoint layout.

Every file is written atomically (utils/fileio.py). A checkpoint is one dict of tensors,
numbers, strings, lists and dicts, so it loads with `torch.load(weights_only=True)`. One layout
(format 2) for every training script (main, finetune, segment), written by utils/engine.py:
    kind, format_version, script      what wrote it
    model, optimizer, scaler          plain state dicts (no wrapper prefixes); scaler None
                                      without fp16 loss scaling
    step, epoch, steps_per_epoch      the position: step global steps done
    history                           {"series": {name: (step,) float64}, "evaluations":
                                      [{"epoch": e, metric: value, ...}]}
    best                              {"epoch": e, metric: value} of best.pth, or None
    model_meta                        what rebuilding the model needs (arch, stem, ...)
    args                              the command's arguments
    extra                             script-specific entries (data description, classes)
    rng                               python, numpy, torch CPU and the training GPU's states
best.pth holds the same entries without optimizer, scaler and rng. Checkpoints of format 1 (the
per-script layouts before the engine) are upgraded on load (`upgrade_format_1`).
"""
import json
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from utils.errors import UserError
from utils.fileio import atomic_torch_save
from utils.foreign_weights import WeightSettings, convert_torchvision_resnet, is_torchvision_resnet

FORMAT_VERSION = 2
KIND = "simclr-toolkit-checkpoint"
# What every script writes into RESPATH before its run is accepted: caches of the data's file
# listing and statistics (removed again when the run is refused: utils/cli.run_main).
DATA_INDEX, DATA_STATS = "data_index", "data_stats.json"
SETUP_CACHES = (DATA_INDEX, DATA_STATS)


CHECKPOINT, BEST, RUN_JSON = "checkpoint.pth", "best.pth", "run.json"


@dataclass(frozen=True)
class RunPaths:
    """Where a training run (every script) keeps its files under RESPATH `root`: checkpoint.pth
    (what a resume reads), best.pth (the validation-selected weights), run.json and
    data_stats.json at the top; pretraining's original files under model/ and plots/."""
    root: str

    @property
    def checkpoint(self):
        """RESPATH/checkpoint.pth; a pretraining run started before it moved there keeps
        model/checkpoint.pth (resumed and written there, so one run never holds two)."""
        top, earlier = os.path.join(self.root, CHECKPOINT), os.path.join(self.model_dir, CHECKPOINT)
        return earlier if os.path.exists(earlier) and not os.path.exists(top) else top

    @property
    def best(self):
        return os.path.join(self.root, BEST)

    @property
    def run_json(self):
        return os.path.join(self.root, RUN_JSON)

    @property
    def data_stats(self):
        return os.path.join(self.root, DATA_STATS)

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
    def loss_plot(self):
        return os.path.join(self.plots_dir, "training_losses.png")

    def snapshot(self, epoch):
        """--save-every's weights of `epoch`: model/epoch_NNNN.pth."""
        return os.path.join(self.model_dir, f"epoch_{epoch:04d}.pth")


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


def rng_state(device=None):
    """The python, numpy and torch RNG states as weights_only-loadable values, with the CUDA
    state of the training `device` only (a checkpoint then resumes on any GPU count)."""
    np_state = np.random.get_state()
    py_version, py_words, py_gauss = random.getstate()
    state = {"python": list(py_words) + [py_gauss or 0.0], "python_version": py_version,
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                       "cached_gaussian": float(np_state[4])},
             "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def training_device_cuda_state(saved):
    """The CUDA RNG state to restore on the training device from a checkpoint's "cuda" entry:
    the entry itself (one ByteTensor, format 2), or from the list of every GPU's state that
    format 1 saved (get_rng_state_all of the writer, whose training device was GPU 0) its
    first, whatever the number of GPUs here. None when there is none."""
    if saved is None:
        return None
    if isinstance(saved, (list, tuple)):
        return saved[0] if len(saved) else None
    return saved


def set_rng_state(state, device=None):
    """Restore what `rng_state` returned; the CUDA state goes to the training `device`."""
    py = state["python"]
    random.setstate((state["python_version"], tuple(int(v) for v in py[:-1]),
                     py[-1] if py[-1] else None))
    np_s = state["numpy"]
    np.random.set_state(("MT19937", np_s["keys"].numpy().astype(np.uint32), np_s["pos"],
                         np_s["has_gauss"], np_s["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda_state = training_device_cuda_state(state.get("cuda"))
    if cuda_state is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_state, device)


def save_checkpoint(state, path):
    """Write a checkpoint dict (utils/engine.py Trainer.checkpoint_state) with the format tag,
    atomically."""
    atomic_torch_save({"kind": KIND, "format_version": FORMAT_VERSION, **state}, path)


RUN_STATE_ONLY = ("optimizer", "scaler", "rng")


def save_best(state, path):
    """best.pth: the checkpoint `state` without what only resuming needs (optimizer, loss
    scale, RNG), atomically."""
    save_checkpoint({k: v for k, v in state.items() if k not in RUN_STATE_ONLY}, path)


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
    ckpt = upgrade_format_1(ckpt) if ckpt.get("format_version", 1) == 1 else ckpt
    if script == "main":
        rename_earlier_presets(ckpt)
    return ckpt


# main.py checkpoints record extra["aug_presets"] = 2 since --aug natural/novel/simple/greyscale
# became j-freddy's published sequences and the SimCLR paper's pipeline was named simclr.
AUG_PRESETS_VERSION = 2


def rename_earlier_presets(ckpt):
    """A pretraining checkpoint written before that change: its "natural" is today's simclr
    (resumed as that pipeline); its novel/simple/greyscale were this toolkit's own variants,
    which no preset reproduces, so the resume check names them and asks for --fresh."""
    args = ckpt.get("args") or {}
    if (ckpt.get("extra") or {}).get("aug_presets") == AUG_PRESETS_VERSION or "aug" not in args:
        return
    if args["aug"] != "simclr":
        earlier = args["aug"]
        args["aug"] = "simclr" if earlier == "natural" else f"{earlier} (the earlier variant)"


def load_best(path, script):
    """The best.pth of a finetune/segment run (format 2, or as the code before the engine
    wrote it): a dict with "model", "model_meta" and "best" ({"epoch": e, metric: value})."""
    obj = _torch_load(path)
    if isinstance(obj, dict) and obj.get("kind") != KIND and obj.get("script") == "finetune":
        return {"model": obj["model"], "model_meta": obj["model_meta"],  # finetune, format 1
                "best": {"epoch": obj["epoch"], "val_accuracy": obj["val_accuracy"]}}
    return load_checkpoint(path, script)


def _float_series(values):
    return torch.as_tensor(values, dtype=torch.float64).reshape(-1)


def upgrade_format_1(ckpt):
    """A checkpoint (or best.pth) in the layout each script wrote before the engine, in the
    format-2 layout (module docstring): every entry the resume needs keeps its value."""
    script = ckpt.get("script", "main")
    new = {k: ckpt[k] for k in ("kind", "model", "model_meta", "args", "optimizer", "scaler",
                                "rng", "epoch", "step") if k in ckpt}
    new.update(format_version=FORMAT_VERSION, script=script, best=None, extra={})
    series, evaluations = {}, []
    if script == "main":
        losses = ckpt["losses"]
        series = {"loss": _float_series(losses["step_losses"]),
                  "positive_pair_top1": _float_series(losses["step_top1"])}
        evaluations = [{"epoch": int(e), "knn_accuracy": float(a)}
                       for e, a in losses.get("knn", torch.zeros(0, 2)).tolist()]
        new["extra"] = {"data": ckpt["data"]}
    elif script == "finetune":
        series = {"loss": _float_series(ckpt["losses"]["step_losses"])}
        evaluations = [{"epoch": e + 1, "val_accuracy": float(v)} for e, v in
                       enumerate(ckpt["losses"]["val_accuracy"].tolist()) if v == v]
        new["best"] = {"epoch": ckpt["best"]["epoch"],
                       "val_accuracy": ckpt["best"]["val_accuracy"]}
        new["extra"] = {"classes": ckpt["classes"]}
    elif script == "segment":
        history = ckpt.get("history", {"step_losses": [], "val": torch.zeros(0, 3)})
        series = {"loss": _float_series(history["step_losses"])}
        evaluations = [{"epoch": int(e), "miou": m, "pixel_accuracy": a}
                       for e, m, a in history["val"].tolist()]
        best = {"epoch": ckpt["best_epoch"]}
        if ckpt["best_val_miou"] == ckpt["best_val_miou"] and ckpt["best_val_miou"] >= 0:
            best["miou"] = ckpt["best_val_miou"]
        new["best"] = best if ckpt["best_epoch"] else None
        new["extra"] = {k: ckpt[k] for k in ("classes", "num_classes", "n_train", "decoder")}
    new["history"] = {"series": series, "evaluations": evaluations}
    new.setdefault("step", len(series.get("loss", ())))
    return new


def read_losses_file(path):
    """The per-step history in a lossesfile.npz: {"loss": (S,), "positive_pair_top1": (S,) or
    absent, "knn": [(epoch, accuracy)], "online_probe": [(epoch, accuracy)] (empty in files
    written before the online probe)}. Reads ours (named arrays) or the original project's
    single unnamed array of per-batch losses; UserError for anything else."""
    try:
        with np.load(path) as f:
            arrays = {key: f[key] for key in f.files}
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable .npz file ({type(err).__name__}); move it "
                        f"away, or use --fresh or another RESPATH") from None
    if "step_losses" in arrays:
        out = {"loss": arrays["step_losses"].astype(np.float64).ravel(),
               **{name: [tuple(r) for r in arrays.get(name, np.zeros((0, 2))).tolist()]
                  for name in ("knn", "online_probe")}}
        if "step_top1" in arrays and len(arrays["step_top1"]) == len(out["loss"]):
            out["positive_pair_top1"] = arrays["step_top1"].astype(np.float64).ravel()
        return out
    if len(arrays) == 1:
        (losses,) = arrays.values()
        if np.issubdtype(losses.dtype, np.number):
            return {"loss": losses.astype(np.float64).ravel(), "knn": [], "online_probe": []}
    raise UserError(f"{path} holds {sorted(arrays)}, not per-step losses (step_losses, or one "
                    f"array of per-batch losses); move it away, or use --fresh or another "
                    f"RESPATH")


def model_metadata(ckpt):
    """What rebuilding the model needs, as stored in a checkpoint or run.json."""
    keys = ("arch", "stem", "proj_dims", "in_channels", "image_size", "mean", "std")
    meta = {k: ckpt["model_meta"][k] for k in keys}
    if ckpt["model_meta"].get("head_norm", True) is False:  # a head from foreign weights
        meta["head_norm"] = False
    if ckpt["model_meta"].get("intensity_range") is not None:  # high-depth data's scaling
        meta["intensity_range"] = list(ckpt["model_meta"]["intensity_range"])
    return meta


def load_pretrained(path, settings=None):
    """Load a pretrained model for evaluation: returns (state_dict, meta).

    `path` may be a checkpoint.pth (the metadata is inside) or a bare model.pth state dict, in
    which case the metadata comes from the sibling checkpoint.pth or the run's run.json, or a
    state dict in torchvision's ResNet layout (another project's weights, ImageNet weights, a
    bare backbone: utils/foreign_weights.py, image size and mean/std from `settings`).
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
                        f"checkpoint.pth that main.py wrote, or a ResNet state dict in "
                        f"torchvision's layout")
    state_dict = strip_prefixes(obj)
    if is_torchvision_resnet(state_dict):
        return convert_torchvision_resnet(state_dict, path, settings or WeightSettings())
    if not any(k.startswith("encoder.") for k in state_dict):
        raise UserError(f"{path} is not a model of this toolkit nor a ResNet state dict in "
                        f"torchvision's layout (conv1, bn1, layer1..layer4, optionally fc); "
                        f"its first keys are {list(state_dict)[:3]}")
    folder = os.path.dirname(os.path.abspath(path))
    run = os.path.dirname(folder)  # model.pth is RESPATH/model/model.pth
    for checkpoint in (os.path.join(folder, CHECKPOINT), os.path.join(run, CHECKPOINT)):
        if os.path.exists(checkpoint):
            return state_dict, model_metadata(load_checkpoint(checkpoint))
    if os.path.exists(os.path.join(run, RUN_JSON)):
        with open(os.path.join(run, RUN_JSON)) as f:
            return state_dict, model_metadata(json.load(f))
    raise UserError(f"{path} holds weights but no description of the model; keep it in its "
                    f"run's folder (beside checkpoint.pth or run.json, one folder up), or "
                    f"pass the checkpoint.pth instead")
