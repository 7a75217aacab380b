"""The tables of measured figures in the documentation, generated from the results files.

    python scripts/results_tables.py           # rewrite every generated table in README.md, docs/
    python scripts/results_tables.py --check   # exit 1, naming them, if any table is stale
    python scripts/results_tables.py --untraced  # count measured-looking figures outside them

A generated table sits between two comment lines in a Markdown file:

    <!-- results-table: NAME -->
    ... (written by this script)
    <!-- /results-table -->

and NAME is one of TABLES below: a function of the JSON files under results/, each written by
the command that measured it with its provenance (command, commit, machine, versions, date).
The test suite runs --check, so a figure in these tables is the one in its results file.
"""
import argparse
import glob
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"(<!-- results-table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)"
                   r"(<!-- /results-table -->)", re.S)
# A measured-looking figure: a number with a unit of accuracy, time, speed or memory.
FIGURE = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?\s?(?:%|img/s|images/s|ms\b|s\b|min\b|MB\b|GB\b|"
                    r"TFLOP/s)")
POWERS = {10 ** 4: "10^4", 10 ** 5: "10^5", 10 ** 6: "10^6"}


def load(name):
    with open(os.path.join(REPO, "results", name)) as f:
        return json.load(f)


def entries(n):
    return POWERS.get(n, f"{n:,}")


def provenance(data, name):
    """One line naming the results file, its command, commit, machine and date."""
    device = data.get("device", {})
    commit = (device.get("git_commit") or data.get("git_commit") or "?")[:7]
    machine = data.get("machine")
    if isinstance(machine, dict):
        machine = f"{machine.get('cpu')}, {machine.get('cpu_count')} cores"
    elif device.get("cpu_model"):
        machine = f"{device['cpu_model']}, {device['cpu_count']} cores"
    return (f"- source: `results/{name}`, written by `{data.get('command')}` at commit {commit} "
            f"on {machine} ({data.get('date', '?')[:10]})")


def rows_by(rows, *keys):
    return {tuple(r[k] for k in keys): r for r in rows}


def startup_table():
    after, before = load("bench_startup_cpu.json"), load("bench_startup_cpu_before.json")
    new = rows_by(after["sections"]["startup"], "entries", "start")
    old = rows_by(before["sections"]["startup"], "entries", "start")
    first, kept = "first", "index kept (resume)"
    lines = ["| entries | before: one-step run, first / second start | after: to the first step, "
             "first start / index kept | after: one-step run, first start / index kept |",
             "|---|---|---|---|"]
    for n in sorted({n for n, _ in new}):
        lines.append(f"| {entries(n)} | {old[n, first]['one_step_run_s']:.2f} / "
                     f"{old[n, kept]['one_step_run_s']:.2f} s | "
                     f"{new[n, first]['to_first_step_s']:.2f} / "
                     f"{new[n, kept]['to_first_step_s']:.2f} s | "
                     f"{new[n, first]['one_step_run_s']:.2f} / "
                     f"{new[n, kept]['one_step_run_s']:.2f} s |")
    imports = [r["import_s"] for r in after["sections"]["startup"] + before["sections"]["startup"]]
    lines += ["", f"Seconds after main.py's imports ({min(imports):.1f} to {max(imports):.1f} s, "
              f"not counted). Single runs: they vary from run to run.", "",
              provenance(after, "bench_startup_cpu.json"),
              provenance(before, "bench_startup_cpu_before.json") +
              f" (`--startup-repo` at commit {before['sections']['startup'][0]['commit']})"]
    return lines


def startup_scan_table():
    data = load("bench_startup_cpu.json")
    lines = ["| entries | method | seconds | files/s |", "|---|---|---|---|"]
    for r in data["sections"]["startup_scan"]:
        lines.append(f"| {entries(r['entries'])} | {r['method']} | {r['seconds']:.2f} | "
                     f"{r['files_per_s']:,} |")
    return lines + ["", provenance(data, "bench_startup_cpu.json")]


def startup_memory_table():
    data = load("bench_startup_cpu.json")
    lines = ["| entries | layout | index | main RSS | worker RSS | worker PSS | worker private |",
             "|---|---|---|---|---|---|---|"]
    for r in data["sections"]["startup_memory"]:
        lines.append(f"| {entries(r['entries'])} | {r['layout']} | {r['index_mb']:.1f} MB | "
                     f"{r['main_rss_mb']:.0f} MB | {r['worker_rss_mb']:.0f} MB | "
                     f"{r['worker_pss_mb']:.0f} MB | {r['worker_private_mb']:.1f} MB |")
    return lines + ["", provenance(data, "bench_startup_cpu.json")]


def demo_table():
    data = load("demo.json")
    acc = data["test_accuracy"]
    lines = ["| representation (linear probe, 5,000 train / 1,000 test) | test accuracy |",
             "|---|---|",
             f"| **SimCLR, {data['epochs']} epochs (this demo)** | "
             f"**{100 * acc['linear_eval']:.1f} %** |",
             f"| raw pixels | {100 * acc['reference_pixels']:.1f} % |",
             f"| the same ResNet-18, randomly initialised | "
             f"{100 * acc['reference_random']:.1f} % |", "",
             f"Loss per epoch {', '.join(f'{v:.2f}' for v in data['epoch_losses'])}; "
             f"positive-pair top-1 "
             f"{', '.join(f'{v:.3f}' for v in data['epoch_positive_pair_top1'])}; pretraining "
             f"{data['pretraining_s']:.0f} s at {data['images_per_s']:.1f} img/s, peak memory "
             f"{data['peak_memory_mb'] / 1024:.1f} GB. Losses and accuracy vary by about a "
             f"point between machines, wall time and img/s with the CPU and its load.", "",
             provenance(data, "demo.json")]
    return lines


TABLES = {"startup": startup_table, "startup-scan": startup_scan_table,
          "startup-memory": startup_memory_table, "demo": demo_table}


def documents():
    return [os.path.join(REPO, "README.md")] + sorted(
        glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True))


def render(text, path):
    """`text` with every generated table rewritten; ValueError for an unknown table name."""
    def body(match):
        name = match.group("name")
        if name not in TABLES:
            raise ValueError(f"{path}: unknown results table {name!r} (known: "
                             f"{', '.join(TABLES)})")
        return match.group(1) + "\n".join(TABLES[name]()) + "\n" + match.group(4)
    return BLOCK.sub(body, text)


def untraced_figures(text):
    """The measured-looking figures (FIGURE) of a Markdown text outside its generated tables
    and code blocks: what still has to move into results files."""
    text = BLOCK.sub("", text)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return FIGURE.findall(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a generated table differs from its "
                             "results files")
    parser.add_argument("--untraced", action="store_true",
                        help="change nothing; count the figures outside generated tables, per file")
    args = parser.parse_args(argv)
    if args.untraced:
        for path in documents():
            with open(path) as f:
                found = untraced_figures(f.read())
            print(f"{len(found):5d}  {os.path.relpath(path, REPO)}")
        return 0
    stale, count = [], 0
    for path in documents():
        with open(path) as f:
            text = f.read()
        count += len(BLOCK.findall(text))
        new = render(text, path)
        if new != text:
            stale.append(os.path.relpath(path, REPO))
            if not args.check:
                with open(path, "w") as f:
                    f.write(new)
    if args.check and stale:
        print(f"stale results tables in {', '.join(stale)}: run python scripts/results_tables.py",
              file=sys.stderr)
        return 1
    print(f"{count} results tables {'checked' if args.check else 'written'}"
          f"{'' if args.check else f' ({len(stale)} file(s) changed)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
