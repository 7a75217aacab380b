"""The end of scripts/demo.sh: print what the demo measured and keep it with its provenance.

    python scripts/demo_summary.py results/demo [--json results/demo/demo.json]

Reads the run (OUT/run.json) and the three linear-probe reports (OUT/linear_eval,
OUT/reference_random, OUT/reference_pixels), prints the table of test accuracies, the loss per
epoch and where the report, the loss plot and the confusion matrix are, and writes the figures
with the command, commit, machine, versions and date to --json (the file the documentation's
demo table is generated from, tools/results_tables.py).
"""
import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.errors import UserError  # noqa: E402
from utils.fileio import json_dump, open_runs  # noqa: E402

ROWS = (("SimCLR (this run), linear probe on h", "linear_eval"),
        ("the same ResNet-18, randomly initialised", "reference_random"),
        ("raw pixels", "reference_pixels"))
VARIES = ("Losses and accuracies vary by about a point between machines and runs: the data, its "
          "order and every augmentation are the same (all seeded), but the CPU's floating-point "
          "kernels (oneDNN picks them by instruction set and thread count) round differently, "
          "and every SGD step amplifies those differences; wall time and img/s depend on the "
          "CPU and on what else runs.")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def summary(out, script_seconds=None):
    """The demo's figures and provenance as a dict (see the module docstring); script_seconds:
    the whole script's wall time, when the caller measured it."""
    run = read_json(os.path.join(out, "run.json"))
    reports = {folder: read_json(os.path.join(out, folder, "report.json")) for _, folder in ROWS}
    env = run["environment"]
    return {"command": "bash scripts/demo.sh", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git_commit": env.get("git_commit"),
            "machine": {"hostname": platform.node(), "cpu": env.get("cpu_model"),
                        "cpu_count": env.get("cpu_count", os.cpu_count()),
                        "device": env.get("device"),
                        "platform": env.get("platform")},
            "versions": {k: env.get(k) for k in ("python", "torch", "torchvision", "numpy")},
            "epochs": run["epochs_done"], "steps_per_epoch": run["steps_per_epoch"],
            "batch_size": run["args"]["batch_size"],
            "epoch_losses": [round(v, 4) for v in run["epoch_losses"]],
            "epoch_positive_pair_top1": [round(v, 4) for v in run["epoch_positive_pair_top1"]],
            "pretraining_s": run["wall_time_s"], "images_per_s": run["images_per_s"],
            "peak_memory_mb": run["peak_memory_mb"], "script_s": script_seconds,
            "recipe": {k: run["args"].get(k) for k in ("stem", "temperature", "lr", "min_scale")},
            "test_accuracy": {f: round(r["accuracy"], 4) for f, r in reports.items()},
            "test_knn_accuracy": {f: r.get("knn_accuracy") and round(r["knn_accuracy"], 4)
                                  for f, r in reports.items()},
            "probe_weight_decay": {f: r.get("weight_decay") for f, r in reports.items()}}


def add_run(runs, s):
    """`runs` (the demo's recorded summaries, oldest first) with summary `s` added; a summary of
    the same pretraining (a re-run that only re-evaluated: same commit, losses and wall time)
    replaces the last run instead."""
    same = ("git_commit", "epoch_losses", "pretraining_s")
    if runs and all(runs[-1].get(k) == s.get(k) for k in same):
        runs = runs[:-1]
    return runs + [s]


def print_summary(s, out):
    print(f"\nThe demo measured (pretraining {s['epochs']} epochs, {s['pretraining_s']:.0f} s, "
          f"{s['images_per_s']} img/s):")
    print(f"  loss per epoch {', '.join(f'{v:.2f}' for v in s['epoch_losses'])}; positive-pair "
          f"top-1 {', '.join(f'{v:.3f}' for v in s['epoch_positive_pair_top1'])}")
    print("  test accuracy (5,000 train / 1,000 test images) of a linear probe and of kNN "
          "(k 20, cosine, majority vote):")
    for name, folder in ROWS:
        knn = s["test_knn_accuracy"][folder]
        print(f"    probe {100 * s['test_accuracy'][folder]:6.2f} %   kNN "
              f"{'  -   ' if knn is None else f'{100 * knn:6.2f}'} %  {name}")
    report = os.path.join(out, "linear_eval", "report.csv")
    print(f"  per-class report:  {report} (and report.json)")
    print(f"  confusion matrix:  {os.path.join(out, 'linear_eval', 'confusion_matrix.png')}")
    print(f"  loss plot:         {os.path.join(out, 'plots', 'training_losses.png')}")
    print(f"  model:             {os.path.join(out, 'model', 'model.pth')}")
    print(VARIES)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the demo's output folder (results/demo)")
    parser.add_argument("--json", default=None,
                        help="where to keep the figures with their provenance (default: "
                             "OUT/demo.json; the maintainers' record is results/demo.json)")
    parser.add_argument("--replace", action="store_true",
                        help="drop the runs of another command recorded in the --json file")
    parser.add_argument("--script-seconds", type=float, default=None,
                        help="the whole demo's wall time so far (demo.sh passes bash's $SECONDS)")
    args = parser.parse_args(argv)
    args.json = args.json or os.path.join(args.out, "demo.json")
    try:
        s = summary(args.out, args.script_seconds)
    except (OSError, KeyError, ValueError) as err:
        print(f"error: {args.out} does not hold a finished demo ({err}); run bash scripts/demo.sh",
              file=sys.stderr)
        return 2
    try:
        kept = open_runs(args.json, s["command"], args.replace)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(s, args.out)
    kept["runs"] = add_run(kept["runs"], s)
    json_dump(kept, args.json)
    print(f"figures kept in {args.json} (run {len(kept['runs'])} of the demo recorded there)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
