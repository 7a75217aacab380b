"""Run a command that measures something and keep what it measured, with its provenance.

    python tools/record.py results/NAME.json [--collect FILE ...] [--file-sizes FILE ...] -- COMMAND ...

Runs COMMAND (its output goes to the terminal as usual), then adds one run to
results/NAME.json: the date, the commit (and whether tracked code had uncommitted changes),
the machine (CPU model and cores, GPUs), the library versions, the wall time, the load average
before and after, the size of every --file-sizes file and the contents of every --collect file
the command wrote (JSON parsed, CSV as a list of rows with numbers converted). Recording the
same command again adds a run, so a table generated from the file (tools/results_tables.py)
can give the range of the wall times of the recorded runs. A file records one command: another
one is an error unless --replace. A failed command records nothing and exits with its status.
"""
import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from utils.cli import cpu_model, git_commit  # noqa: E402  (light: no torch import)
from utils.errors import UserError  # noqa: E402
from utils.fileio import json_dump, open_runs  # noqa: E402


def uncommitted_changes():
    """Whether tracked code differs from the commit (the record then says so); the docs, the
    results files and Markdown pages do not count (measurements rewrite them)."""
    result = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                             ":!docs", ":!results", ":!*.md"], cwd=REPO,
                            capture_output=True, text=True)
    return result.returncode == 0 and bool(result.stdout.strip())


def gpu_names():
    """The GPUs nvidia-smi lists, without importing torch ([] without a driver)."""
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def versions(python):
    """Versions of the libraries the command's interpreter imports (its own, not ours)."""
    code = ("import json, platform, numpy, torch, torchvision; print(json.dumps({'python': "
            "platform.python_version(), 'torch': torch.__version__, 'torchvision': "
            "torchvision.__version__, 'numpy': numpy.__version__}))")
    result = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return json.loads(result.stdout) if result.returncode == 0 else {}


def number(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_output(path):
    """A collected file: JSON parsed, CSV as a list of {column: value} rows."""
    with open(path, newline="") as f:
        if path.endswith(".json"):
            return json.load(f)
        if path.endswith(".csv"):
            return [{k: number(v) for k, v in row.items()} for row in csv.DictReader(f)]
    raise ValueError(f"--collect {path}: only .json and .csv files can be collected")


def interpreter(command):
    """The Python the command runs (for its library versions): its first word when that is a
    Python, else this one."""
    first = os.path.basename(command[0])
    return command[0] if first.startswith("python") else sys.executable


def run_record(command, collect, sized=()):
    """Run `command` (a list of words) and return its run record, or its exit status."""
    load_before = os.getloadavg()
    commit, changes = git_commit(), uncommitted_changes()  # the code as the command starts
    tic = time.perf_counter()
    status = subprocess.call(command)
    wall = time.perf_counter() - tic
    if status != 0:
        return status
    missing = [path for path in (*collect, *sized) if not os.path.isfile(path)]
    if missing:
        raise SystemExit(f"record: the command did not write {', '.join(missing)}: check "
                         f"--collect and --file-sizes")
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_commit": commit,
            "uncommitted_changes": changes,
            "machine": {"hostname": platform.node(), "cpu": cpu_model(),
                        "cpu_count": os.cpu_count(), "gpus": gpu_names(),
                        "platform": platform.platform()},
            "versions": versions(interpreter(command)), "wall_s": round(wall, 2),
            "load_average": {"before": round(load_before[0], 2),
                             "after": round(os.getloadavg()[0], 2)},
            "outputs": {path: read_output(path) for path in collect},
            "file_sizes": {path: os.path.getsize(path) for path in sized}}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("record: put the command after --, e.g. python tools/record.py "
                         "results/x.json -- python main.py ...")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the results file (JSON) that receives the run")
    parser.add_argument("--collect", nargs="+", action="extend", default=[], metavar="FILE",
                        help="files the command writes whose contents are kept (.json, .csv)")
    parser.add_argument("--file-sizes", nargs="+", action="extend", default=[], metavar="FILE",
                        help="files the command writes whose sizes in bytes are kept")
    parser.add_argument("--replace", action="store_true",
                        help="drop the runs of another command recorded in OUT")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        raise SystemExit("record: no command after --")
    line = shlex.join(command)
    # a file of the same tool from before it moved here from scripts/ takes the run
    before = shlex.join("scripts/" + w[len("tools/"):] if w.startswith("tools/") else w
                        for w in command)
    try:
        kept = open_runs(args.out, line, args.replace, earlier=[before])
    except UserError as err:
        raise SystemExit(f"record: {err}") from None
    run = run_record(command, args.collect, args.file_sizes)
    if isinstance(run, int):
        print(f"record: the command exited with status {run}; nothing recorded", file=sys.stderr)
        return run
    kept["runs"].append(run)
    json_dump(kept, args.out)
    print(f"record: run {len(kept['runs'])} of {line!r} kept in {args.out} "
          f"({run['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
