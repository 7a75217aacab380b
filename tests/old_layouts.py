"""The checkpoint layouts the three training scripts wrote before the engine (format 1, commit
d78b43a), rebuilt from a format-2 checkpoint so that tests can resume "a checkpoint written by
the code before this change" without keeping that code. Written from the old save functions
(simclr.checkpoint_state, finetune.run_state_dict, segment's save), not from
utils.checkpoint.upgrade_format_1, which is what the tests check."""
import torch

# Flags the old parsers did not have: an old checkpoint's args lack them.
NEW_FLAGS = {
    "main": ("nproc", "save_every"),
    "finetune": ("amp", "channels_last", "checkpoint_minutes", "compile", "log_every", "mean",
                 "nproc", "std", "sync_bn", "tensorboard", "test_fraction"),
    "segment": ("amp", "checkpoint_minutes", "compile", "log_every", "mean", "nproc", "std",
                "sync_bn", "tensorboard"),
}


def _f64(values):
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


def to_format_1(ckpt):
    """The format-1 dict the old code would have written at the same point of the same run."""
    script = ckpt["script"]
    series, evaluations = ckpt["history"]["series"], ckpt["history"]["evaluations"]
    args = {k: v for k, v in ckpt["args"].items() if k not in NEW_FLAGS[script]}
    if script == "main" and args.get("aug") == "simclr":
        args["aug"] = "natural"  # the old name of the SimCLR paper's pipeline
    old = {"kind": ckpt["kind"], "format_version": 1, "model": ckpt["model"],
           "optimizer": ckpt["optimizer"], "epoch": ckpt["epoch"], "step": ckpt["step"],
           "args": args, "model_meta": ckpt["model_meta"], "rng": ckpt["rng"]}
    if script == "main":
        old.update(scheduler={}, scaler=ckpt["scaler"], data=ckpt["extra"]["data"],
                   losses={"step_losses": _f64(series["loss"]),
                           "step_top1": _f64(series["positive_pair_top1"]),
                           "knn": torch.tensor(
                               [[e["epoch"], e["knn_accuracy"]] for e in evaluations
                                if "knn_accuracy" in e],  # the old code had no online probe
                               dtype=torch.float64).reshape(-1, 2)})
    elif script == "finetune":
        by_epoch = {e["epoch"]: e["val_accuracy"] for e in evaluations}
        best = ckpt["best"] or {"epoch": 0, "val_accuracy": -1.0}
        old.update(script="finetune", scheduler={}, scaler=None,
                   classes=ckpt["extra"]["classes"], best=dict(best),
                   losses={"step_losses": _f64(series["loss"]),
                           "val_accuracy": _f64(by_epoch.get(e, float("nan"))
                                                for e in range(1, ckpt["epoch"] + 1))})
    elif script == "segment":
        best = ckpt["best"] or {"epoch": 0, "miou": -1.0}
        old.update(script="segment", best_val_miou=best.get("miou", -1.0),
                   best_epoch=best["epoch"],
                   **{k: ckpt["extra"][k]
                      for k in ("classes", "num_classes", "n_train", "decoder")},
                   history={"step_losses": _f64(series["loss"]),
                            "val": torch.tensor([[e["epoch"], e["miou"], e["pixel_accuracy"]]
                                                 for e in evaluations],
                                                dtype=torch.float64).reshape(-1, 3)})
    return old
