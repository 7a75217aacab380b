"""How much do SimCLR features help with few labels? Fine-tuning, the linear probe, the same
network from scratch and the two references (raw pixels, the random encoder) over label budgets
and seeds, side by side in one table and one plot, as the SimCLR paper and j-freddy report them.

    python label_efficiency.py DATAPATH MODELPATH RESPATH                 # 1 %, 10 %, 100 %
    python label_efficiency.py DATAPATH MODELPATH RESPATH --budgets-per-class 5 20 100 \
        --fractions 0.1 --epochs 30 -bs 64 -c

Every run is the real script with its own output folder, RESPATH/<method>/<budget>/seed<s>/:
finetune = finetune.py (LP-FT: the probe's head, then the whole encoder at a lower rate),
linear = linear_evaluation.py (probe on the frozen h), baseline = finetune.py --baseline (same
architecture, random initialisation, trained from scratch), pixels and random =
linear_evaluation.py --reference pixels / random (the same probe on the normalised pixels and on
the randomly initialised encoder), frozen = finetune.py --freeze (head trained with
augmentation; not run by default). The seed chooses the labelled subset (the same images for
every method), the initialisation and the augmentation. Finished runs
are kept (their report.json), an interrupted one resumes, so running the command again
completes a sweep. RESPATH receives label_efficiency.csv (mean and standard deviation over the
seeds of accuracy, balanced accuracy, macro-F1 and AUROC, per method and budget),
label_efficiency.png (test accuracy against labelled images per class, one line per method,
error bars of one standard deviation) and prints a table with a column per method.
"""
import argparse
import csv
import io
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

from utils.errors import UserError
from utils.fileio import atomic_write_bytes
from utils.cli import (add_data_loading_args, add_data_source_args,
                       add_labelled_data_and_model_args, ensure_writable_dir, run_main)
from utils.plotfuncs import plot_label_efficiency
from utils.engine import GracefulStop

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("finetune", "linear", "baseline", "pixels", "random", "frozen")
DEFAULT_METHODS = ("finetune", "linear", "baseline", "pixels", "random")
# Test metrics, and the validation accuracy of the kept epoch (fine-tuning runs; NaN for the
# probe, which has no validation split: choose settings on it, never on the test split).
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc_ovr", "val_accuracy")
SOURCE_FLAGS = ("data_root", "size", "train_list", "val_list", "test_list")


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Label-efficiency study: linear probe, fine-tuning and the supervised "
                    "baseline over label budgets and seeds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_labelled_data_and_model_args(parser, "respath", "folder for every run, the CSV and plot")
    add_data_loading_args(parser, batch_size=64)
    add_data_source_args(parser)
    study = parser.add_argument_group("study")
    study.add_argument("--fractions", type=float, nargs="+", default=None,
                       help="label budgets as fractions of every class, as in the SimCLR paper "
                            "(default 0.01 0.1 1 when no --budgets-per-class is given)")
    study.add_argument("--budgets-per-class", "--spc", dest="budgets_per_class", type=int,
                       nargs="+", default=None,
                       help="label budgets as images per class (with --fractions: both)")
    study.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                       help="one run per seed and budget; mean and std over them")
    study.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS),
                       help="what to compare: finetune (LP-FT), linear (probe), baseline (from "
                            "scratch), pixels and random (the probe's references), frozen")
    study.add_argument("--epochs", type=int, default=30,
                       help="fine-tuning and baseline epochs")
    study.add_argument("--min-steps", type=int, default=100,
                       help="raise the epochs of small budgets so every fine-tuning run takes "
                            "at least this many optimizer steps")
    study.add_argument("--validations", type=int, default=10,
                       help="validate about this many times per fine-tuning run")
    study.add_argument("--finetune-args", default="",
                       help="extra flags for finetune.py, e.g. \"--lr 0.05 --head mlp\"")
    return parser


def budget_list(args):
    """[(flag, value, folder name)] of the label budgets: images per class, then fractions."""
    per_class = args.budgets_per_class or []
    if per_class and min(per_class) < 1:
        raise UserError("--budgets-per-class values must be at least 1")
    fractions = args.fractions or ([] if per_class else [0.01, 0.1, 1.0])
    for f in fractions:
        if not 0 < f <= 1:
            raise UserError(f"--fractions {f} must be in (0, 1], e.g. 0.1")
    return ([("--samples-per-class", k, f"{k}_per_class") for k in per_class] +
            [("--label-fraction", f, f"fraction_{f:g}") for f in fractions])


def common_flags(args):
    """The data and device flags every run gets."""
    flags = ["-bs", args.batch_size, "-nw", args.num_workers]
    flags += ["-c"] if args.cuda else []
    flags += ["--multiple_gpus"] if args.multiple_gpus else []
    flags += ["--download"] if args.download else []
    for name in SOURCE_FLAGS:
        value = getattr(args, name)
        if value is not None:
            flags += ["--" + name.replace("_", "-"), value]
    return flags


def finetune_epochs(args, n_train_estimate):
    """--epochs, raised so that the run has at least --min-steps optimizer steps."""
    steps_per_epoch = max(1, n_train_estimate // min(args.batch_size, max(2, n_train_estimate)))
    return max(args.epochs, math.ceil(args.min_steps / steps_per_epoch))


def run_command(method, args, budget_flag, budget_value, seed, outdir, n_train_estimate):
    """The command line of one run."""
    common = common_flags(args) + [budget_flag, budget_value, "--seed", seed]
    if method in ("linear", "pixels", "random"):
        reference = [] if method == "linear" else ["--reference", method]
        return ["linear_evaluation.py", args.datapath, args.modelpath, outdir] + common + \
            reference
    extra = {"finetune": [], "frozen": ["--freeze"], "baseline": ["--baseline"]}[method]
    epochs = finetune_epochs(args, n_train_estimate)
    return (["finetune.py", args.datapath, args.modelpath, outdir] + common + extra +
            ["--epochs", epochs, "--val-every", max(1, epochs // args.validations)] +
            args.finetune_args.split())


def training_set_size(args, budget_flag, budget_value):
    """The number of labelled training images a budget gives (for the step count)."""
    from utils.sources import load_split, select_subset
    images = load_split(args.datapath, "train", True, args)
    kwargs = ({"samples_per_class": budget_value} if budget_flag == "--samples-per-class"
              else {"label_fraction": budget_value})
    return len(select_subset(images, seed=0, **kwargs))


def run_one(command, outdir, log_path):
    """Run a script (resuming its own run in `outdir`), its output appended to `log_path`.
    Returns False when it was interrupted (Ctrl-C reaches the script, which saves its run);
    UserError with the script's error line if it failed."""
    os.makedirs(outdir, exist_ok=True)
    script, rest = command[0], [str(v) for v in command[1:]]
    with open(log_path, "a") as log:
        log.write("$ " + " ".join([script] + rest) + "\n")
        log.flush()
        with GracefulStop() as stop:  # the script handles the Ctrl-C; we wait for it
            status = subprocess.call([sys.executable, os.path.join(HERE, script)] + rest,
                                     stdout=log, stderr=subprocess.STDOUT, cwd=HERE)
    if status == 130 or stop.requested:
        return False
    if status != 0:
        with open(log_path) as f:
            errors = [line.strip() for line in f if line.startswith("error:")]
        reason = errors[-1] if errors else f"exit status {status}"
        raise UserError(f"{script} failed in {outdir} ({reason}); see {log_path}")
    return True


def read_report(outdir):
    """(metrics dict, labelled images per class) of a finished run."""
    with open(os.path.join(outdir, "report.json")) as f:
        report = json.load(f)
    metrics = {k: (math.nan if report.get(k) is None else float(report[k])) for k in METRICS}
    return metrics, float(np.mean(report["train_per_class"]))


def summarise(results):
    """Rows of (method, budget, labels per class, n, then mean and std of every metric).

    `results` maps (method, budget name, budget value) -> list of (metrics, per class).
    std is the sample standard deviation (ddof 1), 0 for a single seed."""
    rows = []
    for (method, name, value), runs in results.items():
        row = {"method": method, "budget": name, "budget_value": value,
               "labels_per_class": np.mean([per_class for _, per_class in runs]),
               "seeds": len(runs)}
        for key in METRICS:
            values = np.array([metrics[key] for metrics, _ in runs], dtype=float)
            row[f"{key}_mean"] = float(np.mean(values))
            row[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def side_by_side(rows, methods):
    """Lines of a text table: one row per budget (labels per class), one column per method,
    each cell the test accuracy's mean ± std in %."""
    cells = {(r["budget"], r["method"]): f"{100 * r['accuracy_mean']:.1f} ± "
                                         f"{100 * r['accuracy_std']:.1f}" for r in rows}
    budgets = dict.fromkeys((r["budget"], r["labels_per_class"]) for r in rows)
    width = max(13, *(len(c) for c in cells.values()))
    lines = [f"{'budget':>16s} {'labels/class':>12s}  " +
             "  ".join(f"{m:>{width}s}" for m in methods)]
    for budget, per_class in budgets:
        lines.append(f"{budget:>16s} {per_class:12g}  " + "  ".join(
            f"{cells.get((budget, m), '-'):>{width}s}" for m in methods))
    return lines


def write_csv(rows, path):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_bytes(path, buffer.getvalue().encode())


def main(args):
    if args.seeds and min(args.seeds) < 0:
        raise UserError("--seeds must be 0 or more")
    if not os.path.isfile(args.modelpath):
        raise UserError(f"MODELPATH {args.modelpath} does not exist; give the model.pth of a "
                        f"main.py run")
    ensure_writable_dir(args.respath)
    args.respath = os.path.abspath(args.respath)  # the runs start in this script's folder
    args.datapath = os.path.abspath(args.datapath) if os.path.exists(args.datapath) \
        else args.datapath
    args.modelpath = os.path.abspath(args.modelpath)
    budgets = budget_list(args)
    sizes = {value: training_set_size(args, flag, value) for flag, value, _ in budgets}
    total = len(budgets) * len(args.seeds) * len(args.methods)
    print(f"{total} runs: methods {', '.join(args.methods)}; budgets "
          f"{', '.join(f'{name} ({sizes[value]} images)' for _, value, name in budgets)}; "
          f"seeds {' '.join(map(str, args.seeds))}", flush=True)
    results, done = {}, 0
    started = time.perf_counter()
    for flag, value, name in budgets:
        for method in args.methods:
            for seed in args.seeds:
                outdir = os.path.join(args.respath, method, name, f"seed{seed}")
                done += 1
                if not os.path.exists(os.path.join(outdir, "report.json")):
                    tic = time.perf_counter()
                    if not run_one(run_command(method, args, flag, value, seed, outdir,
                                               sizes[value]), outdir,
                                   os.path.join(outdir, "log.txt")):
                        print(f"interrupted in {outdir}; run the same command to continue",
                              file=sys.stderr)
                        return 130
                    took = f"{time.perf_counter() - tic:.0f} s"
                else:
                    took = "kept"
                metrics, per_class = read_report(outdir)
                results.setdefault((method, name, value), []).append((metrics, per_class))
                print(f"[{done}/{total}] {method:8s} {name:>16s} seed {seed}: accuracy "
                      f"{100 * metrics['accuracy']:.2f} % ({per_class:g} labels per class, "
                      f"{took})", flush=True)
    rows = summarise(results)
    csv_path = os.path.join(args.respath, "label_efficiency.csv")
    write_csv(rows, csv_path)
    plot_label_efficiency(rows, os.path.join(args.respath, "label_efficiency.png"))
    print("\ntest accuracy (%), mean ± std over seeds " + " ".join(map(str, args.seeds)))
    print("\n".join(side_by_side(rows, args.methods)))
    print(f"{total} runs in {time.perf_counter() - started:.0f} s; {csv_path} and "
          f"label_efficiency.png written")
    return 0


if __name__ == "__main__":
    run_main(main, get_args_parser())
