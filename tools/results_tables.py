"""The tables of measured figures in the documentation, generated from the results files.

    python tools/results_tables.py           # rewrite every generated table in README.md, docs/
    python tools/results_tables.py --check   # exit 1, naming them, if any table is stale
    python tools/results_tables.py --untraced  # count measured-looking figures outside them

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
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"(<!-- results-table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)"
                   r"(<!-- /results-table -->)", re.S)
# A measured-looking figure: a number with a unit of accuracy, time, speed or memory.
FIGURE = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?\s?(?:%|img/s|images/s|ms\b|s\b|min\b|MB\b|GB\b|"
                    r"TFLOP/s)")
POWERS = {10 ** 4: "10^4", 10 ** 5: "10^5", 10 ** 6: "10^6"}


READ = set()  # the results files the tables read, for untracked_results()


def load(name):
    path = os.path.join("results", name)
    READ.add(os.path.normpath(path))
    with open(os.path.join(REPO, path)) as f:
        return json.load(f)


def untracked_results():
    """The results files the tables read that git does not track (results/ is ignored: each
    must be added with git add -f, or a clean checkout renders other tables); [] outside a
    git checkout."""
    try:
        listed = subprocess.run(["git", "ls-files", "results"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return []
    return sorted(READ - {os.path.normpath(p) for p in listed})


def entries(n):
    return POWERS.get(n, f"{n:,}")


def demo_source(runs):
    """The source line of the demo table: results/demo.json and the demo runs it shows."""
    return source_line(["results/demo.json"], "`bash scripts/demo.sh` (the maintainers' runs "
                       "kept by `bash tools/measure_docs.sh demo`)", runs,
                       "the figures are the newest run's" if len(runs) > 1 else "")


def rows_by(rows, *keys):
    return {tuple(r[k] for k in keys): r for r in rows}


def bench_runs(name):
    """The runs of a results file of tools/bench_grid.py (bench.py's grids before), oldest
    first."""
    return load(name)["runs"]


def short_cpu(model):
    """'Intel(R) Xeon(R) Processor' -> 'Intel Xeon': the CPU as the tables name it."""
    for noise in ("(R)", "(TM)", " Processor", " CPU"):
        model = model.replace(noise, "")
    return " ".join(model.split())


def machine_of(run):
    """The machine a run measured, as a table names it: CPU model, GPU name on CUDA."""
    device = run.get("device")
    if isinstance(device, dict):  # tools/bench_grid.py
        return device["device_name"] if device["device"] == "cuda" else short_cpu(
            device["cpu_model"])
    machine = run["machine"]  # tools/record.py, demo_summary.py
    return ", ".join([short_cpu(machine["cpu"] or "?"), *machine.get("gpus", [])])


def by_machine(runs):
    """{machine: [its runs]} in the order the machines first ran."""
    found = {}
    for run in runs:
        found.setdefault(machine_of(run), []).append(run)
    return found


def across(runs, section, *keys):
    """{(values of keys..., machine): [that row of each of the machine's runs]} over the
    `section` rows of `runs`, ordered by configuration (first run's order), then machine: one
    configuration's figures over the runs of one machine. Ranges span runs, never CPUs."""
    found = {}
    for run in runs:
        for row in run["sections"].get(section, []):
            found.setdefault(tuple(row[k] for k in keys), {}).setdefault(
                machine_of(run), []).append(row)
    return {key + (machine,): rows for key, machines in found.items()
            for machine, rows in machines.items()}


def machines_cell(machine, rows):
    return machine if len(rows) == 1 else f"{machine} ({len(rows)} runs)"


def run_facts(run):
    """(commit, CPU, cores, date, load averages) of a run of any results file."""
    device = run.get("device")
    if isinstance(device, dict):  # tools/bench_grid.py
        return (device["git_commit"][:7], machine_of(run), device["cpu_count"],
                run["date"][:10], [])
    commit = run["git_commit"][:7] + ("+changes" if run.get("uncommitted_changes") else "")
    return (commit, machine_of(run), run["machine"]["cpu_count"], run["date"][:10],
            list(run.get("load_average", {}).values()))


def files_cell(paths):
    """The results files (relative to the checkout), quoted; files of one folder and first
    word as one pattern (`results/docs/segment_*.json`, 12 files) where it matches just them."""
    groups = {}
    for path in paths:
        groups.setdefault((os.path.dirname(path), os.path.basename(path).split("_")[0]),
                          []).append(path)
    cells = []
    for members in groups.values():
        prefix = os.path.commonprefix(members)
        suffix = os.path.commonprefix([m[::-1] for m in members])[::-1]
        pattern = prefix + "*" + suffix[max(0, len(prefix) + len(suffix) - min(map(len, members))):]
        found = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, pattern)))
        if len(members) > 3 and found == sorted(members):
            cells.append(f"`{pattern}` ({len(members)} files)")
        else:
            cells += [f"`{m}`" for m in members]
    return and_list(cells)


def and_list(items):
    """'a', 'a and b', 'a, b and c'."""
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def source_line(paths, written_by, runs, note=""):
    """The one source line under a generated table: its results files, what wrote them, and the
    runs its figures come from (how many, commits, machines, dates, load), then `note`."""
    facts = [run_facts(run) for run in runs]
    commits = list(dict.fromkeys(f[0] for f in facts))
    cores = {}  # {cores: {CPU: None}}, in the order first seen
    for _, cpu, count, _, _ in facts:
        cores.setdefault(count, {})[cpu] = None
    machines = and_list(f"{and_list(cpus)} ({count} cores)" for count, cpus in cores.items())
    dates = sorted({f[3] for f in facts})
    loads = [v for f in facts for v in f[4]]
    line = (f"- source: {files_cell(paths)}, written by {written_by}: "
            f"{'one run' if len(runs) == 1 else f'{len(runs)} runs'}, commit"
            f"{'s' if len(commits) > 1 else ''} {and_list(commits)} on {machines}, "
            f"{' to '.join(dict.fromkeys([dates[0], dates[-1]]))}")
    if loads:
        line += f", load average {min(loads):.1f} to {max(loads):.1f}"
    return line + (f"; {note}" if note else "")


def bench_source(names, note=None):
    """The source line of a table of tools/bench_grid.py files (bench.py's grids before):
    their commands as recorded and every run; a figure 'a to b' spans one machine's runs."""
    files = [load(name) for name in names]
    runs = [run for data in files for run in data["runs"]]
    commands = " and ".join(f"`{data['command']}`" for data in files)
    note = note or ("a figure 'a to b' spans one machine's runs" if len(runs) > len(names)
                    else "figures of time and speed vary from run to run")
    return source_line([f"results/{name}" for name in names], commands, runs, note)


def startup_table():
    new_runs, old_runs = (bench_runs("bench_startup_cpu.json"),
                          bench_runs("bench_startup_cpu_before.json"))
    new = across(new_runs, "startup", "entries", "start")
    old = across(old_runs, "startup", "entries", "start")
    first, kept = "first", "index kept (resume)"

    def pair(table, n, machine, field):
        if (n, first, machine) not in table:
            return "not measured"
        return (f"{span_of(table[n, first, machine], field, '{:.2f}')} / "
                f"{span_of(table[n, kept, machine], field, '{:.2f}')} s")
    lines = ["| entries | CPU | before: one-step run, first / second start | after: to the first "
             "step, first start / index kept | after: one-step run, first start / index kept |",
             "|---|---|---|---|---|"]
    for n, start, machine in new:
        if start != first:
            continue
        lines.append(f"| {entries(n)} | {machines_cell(machine, new[n, first, machine])} | "
                     f"{pair(old, n, machine, 'one_step_run_s')} | "
                     f"{pair(new, n, machine, 'to_first_step_s')} | "
                     f"{pair(new, n, machine, 'one_step_run_s')} |")
    imports = [r["import_s"] for run in new_runs + old_runs for r in run["sections"]["startup"]]
    commits = {r["commit"] for run in old_runs for r in run["sections"]["startup"]}
    lines += ["", f"Seconds after main.py's imports ({min(imports):.1f} to {max(imports):.1f} s, "
              f"not counted).", "",
              bench_source(["bench_startup_cpu.json", "bench_startup_cpu_before.json"],
                           f"a figure 'a to b' spans one machine's runs; `--startup-repo` at "
                           f"commit {', '.join(sorted(commits))}")]
    return lines


def startup_scan_table():
    runs = bench_runs("bench_startup_cpu.json")
    lines = ["| entries | method | CPU | seconds | files/s |", "|---|---|---|---|---|"]
    for (n, method, machine), rows in across(runs, "startup_scan", "entries", "method").items():
        lines.append(f"| {entries(n)} | {method} | {machines_cell(machine, rows)} | "
                     f"{span_of(rows, 'seconds', '{:.2f}')} | "
                     f"{span_of(rows, 'files_per_s', '{:,}')} |")
    return lines + ["", bench_source(["bench_startup_cpu.json"])]


def startup_memory_table():
    runs = bench_runs("bench_startup_cpu.json")
    lines = ["| entries | layout | CPU | index | main RSS | worker RSS | worker PSS | "
             "worker private |", "|---|---|---|---|---|---|---|---|"]
    for (n, layout, machine), rows in across(runs, "startup_memory", "entries",
                                             "layout").items():
        lines.append(f"| {entries(n)} | {layout} | {machines_cell(machine, rows)} | "
                     f"{span_of(rows, 'index_mb', '{:.1f}', ' MB')} | "
                     f"{span_of(rows, 'main_rss_mb', '{:.0f}', ' MB')} | "
                     f"{span_of(rows, 'worker_rss_mb', '{:.0f}', ' MB')} | "
                     f"{span_of(rows, 'worker_pss_mb', '{:.0f}', ' MB')} | "
                     f"{span_of(rows, 'worker_private_mb', '{:.1f}', ' MB')} |")
    return lines + ["", bench_source(["bench_startup_cpu.json"])]


def demo_runs():
    """The recorded runs of scripts/demo.sh (results/demo.json), the newest last."""
    return load("demo.json")["runs"]


def current_demo_runs():
    """The recorded demo runs of the newest run's recipe and probe (runs of an earlier demo
    recipe, which did not record one, and runs whose probe had a fixed penalty, which did not
    record it, are kept for the measurements that used their model)."""
    runs = demo_runs()
    return [r for r in runs if r.get("recipe") == runs[-1].get("recipe")
            and ("probe_weight_decay" in r) == ("probe_weight_decay" in runs[-1])]


def demo_before(date):
    """The newest demo run recorded before `date` (ISO, as the results files write it): the
    demo model a measurement of results/docs/ used, and the recipe it compared against."""
    runs = [r for r in demo_runs() if r["date"] <= date]
    return runs[-1] if runs else demo_runs()[-1]


def span(values, fmt, unit=""):
    """'x unit', or 'lo to hi unit' when the recorded runs differ; fmt: a format string or a
    function of one value."""
    show = fmt if callable(fmt) else fmt.format
    lo, hi = show(min(values)), show(max(values))
    return f"{lo}{unit}" if lo == hi else f"{lo} to {hi}{unit}"


def span_of(rows, field, fmt, unit=""):
    """span() of `field` over rows (one configuration's rows of the recorded runs)."""
    return span([r[field] for r in rows], fmt, unit)


def signed_points(a, b):
    """'+1.7 points' for accuracy fractions a and b."""
    return f"{100 * (a - b):+.1f} points"


def demo_table():
    runs = current_demo_runs()
    data, acc = runs[-1], runs[-1]["test_accuracy"]
    knn = data.get("test_knn_accuracy") or {}

    def cells(folder, bold=""):
        k = knn.get(folder)
        return (f"{bold}{100 * acc[folder]:.1f} %{bold} | " +
                ("–" if k is None else f"{bold}{100 * k:.1f} %{bold}"))
    lines = ["| representation (5,000 train / 1,000 test) | linear probe | kNN (k 20, cosine) |",
             "|---|---|---|",
             f"| **SimCLR, {data['epochs']} epochs (this demo)** | {cells('linear_eval', '**')} |",
             f"| raw pixels | {cells('reference_pixels')} |",
             f"| the same ResNet-18, randomly initialised | {cells('reference_random')} |", "",
             f"SimCLR against raw pixels: {signed_points(acc['linear_eval'], acc['reference_pixels'])}"
             f"; against the random encoder: "
             f"{signed_points(acc['linear_eval'], acc['reference_random'])} (linear probe)" +
             ("." if not knn else
              f"; kNN against raw pixels: "
              f"{signed_points(knn['linear_eval'], knn['reference_pixels'])}, against the random "
              f"encoder: {signed_points(knn['linear_eval'], knn['reference_random'])}."),
             f"Loss per epoch {', '.join(f'{v:.2f}' for v in data['epoch_losses'])}; "
             f"positive-pair top-1 "
             f"{', '.join(f'{v:.3f}' for v in data['epoch_positive_pair_top1'])}; pretraining "
             f"{data['pretraining_s']:.0f} s at {data['images_per_s']:.1f} img/s, peak memory "
             f"{data['peak_memory_mb'] / 1024:.1f} GB."]
    penalty = data.get("probe_weight_decay") or {}
    if penalty.get("linear_eval") is not None:
        lines.append(f"The probe's L2 penalty, chosen for each representation on held-out "
                     f"training images: SimCLR {penalty['linear_eval']:g}, raw pixels "
                     f"{penalty['reference_pixels']:g}, random encoder "
                     f"{penalty['reference_random']:g}.")
    if len(runs) > 1:
        probe = [100 * r["test_accuracy"]["linear_eval"] for r in runs]
        lines.append(f"Over the {len(runs)} recorded runs (machines below): SimCLR probe "
                     f"{span(probe, '{:.1f}', ' %')}, last loss "
                     f"{span([r['epoch_losses'][-1] for r in runs], '{:.2f}')}; pretraining " +
                     "; ".join(f"{span([r['pretraining_s'] for r in group], '{:.0f}', ' s')} at "
                               f"{span([r['images_per_s'] for r in group], '{:.1f}', ' img/s')} "
                               f"on {machines_cell(machine, group)}"
                               for machine, group in by_machine(runs).items()) + ".")
    lines += ["Losses and accuracy vary by about a point between machines, wall time and img/s "
              "with the CPU and its load.", ""]
    return lines + [demo_source(runs)]


def compute_label(row):
    return (("channels-last" if row["channels_last"] else "contiguous") +
            (", compiled" if row["compile"] else ""))


def pct(fraction):
    return f"{100 * fraction:.0f} %"


def workers(n):
    return f"{n} worker{'' if n == 1 else 's'}"


def times(x):
    """A ratio: 0.97×, 2.55×, 485×, or 1/130 (130 times slower)."""
    if x < 0.1:
        return f"1/{1 / x:,.0f}"
    return f"{x:.2f}×" if x < 10 else f"{x:,.0f}×"


def bench_cpu_table():
    """docs/performance.md: the default CPU grid, one line per configuration and machine."""
    runs = bench_runs("bench_cpu.json")
    lines = ["| section | configuration | CPU | figure |", "|---|---|---|---|"]

    def add(section, config, machine, rows, figure):
        lines.append(f"| {section} | {config} | {machines_cell(machine, rows)} | {figure} |")
    for (dtype, size, machine), rows in across(runs, "matmul", "dtype", "size").items():
        add("dense matmul", f"{dtype}, n = {size}", machine, rows,
            f"{span_of(rows, 'tflops', '{:.3f}')} TFLOP/s")
    for key, rows in across(runs, "compute", "arch", "image_size", "amp", "channels_last",
                            "compile").items():
        add("compute only", compute_label(rows[0]), key[-1], rows,
            f"{span_of(rows, 'images_per_s', '{:.1f}')} img/s, "
            f"{rows[0]['gflop_per_step']:.0f} GFLOP/step, {span_of(rows, 'tflops', '{:.3f}')} "
            f"TFLOP/s = {span_of(rows, 'fraction_of_matmul', pct)} of the float32 matmul "
            f"rate; first step {span_of(rows, 'first_step_s', '{:.1f}')} s")
    for (pipeline, n, machine), rows in across(runs, "loader", "pipeline", "workers").items():
        if pipeline == "workers":
            add("loader", workers(n), machine, rows,
                f"{span_of(rows, 'images_per_s', '{:,.0f}')} img/s = "
                f"{span_of(rows, 'over_resnet18_compute', times)} what the trainer consumes")
    ntxent = across(runs, "ntxent", "n", "method")
    for n, method, machine in ntxent:
        if method != "ntxent":
            continue
        nt, bound, broad = (ntxent[n, m, machine] for m in ("ntxent", "bound", "broadcast"))
        measured = [r for r in broad if "ms" in r]
        other = (f"broadcast {span_of(measured, 'ms', '{:,.0f}')} ms "
                 f"({span_of(measured, 'over_bound', times)}), "
                 f"{span_of(measured, 'peak_memory_mb', '{:,.0f}')} MB" if measured
                 else f"broadcast skipped ({broad[0]['skipped']})")
        add(f"NT-Xent, D = {nt[0]['dim']}", f"N = {n}", machine, nt,
            f"{span_of(nt, 'ms', '{:,.1f}')} ms = {span_of(nt, 'over_bound', times)} the matmul + "
            f"cross_entropy bound ({span_of(bound, 'ms', '{:,.1f}')} ms), "
            f"{span_of(nt, 'peak_memory_mb', '{:,.0f}')} MB; {other}")
    for key, rows in across(runs, "baseline", "arch", "image_size", "workers").items():
        add("baseline loop", f"per-image PIL, {rows[0]['workers']} workers, two passes, "
            f"broadcast NT-Xent", key[-1], rows, f"{span_of(rows, 'images_per_s', '{:.1f}')} img/s")
    for key, rows in across(runs, "end2end", "arch", "image_size", "workers").items():
        configs = " or ".join(dict.fromkeys(compute_label(r) for r in rows))
        add("end to end", f"the fastest compute configuration ({configs}), "
            f"{rows[0]['workers']} workers", key[-1], rows,
            f"{span_of(rows, 'images_per_s', '{:.1f}')} img/s = "
            f"{span_of(rows, 'fraction_of_compute', pct)} of compute only, "
            f"{span_of(rows, 'over_baseline', times)} the baseline; ceiling "
            f"{span_of(rows, 'ceiling_over_baseline', times)}")
    return lines + ["", bench_source(["bench_cpu.json"])]


def bench_targets_table():
    """docs/performance.md: the CPU targets, as the grids evaluated them in their runs."""
    lines = ["| target | configuration | CPU | measured | |", "|---|---|---|---|---|"]
    names = ("bench_cpu.json", "bench_cpu_gpuaug.json")
    for name in names:
        runs = bench_runs(name)
        found = {}  # a command evaluates the same targets in the same order in every run
        for run in runs:
            for i, t in enumerate(run["targets"]):
                found.setdefault(i, {}).setdefault(machine_of(run), []).append(t)
        for machines in found.values():
            for machine, rows in machines.items():
                ceilings = [t["ceiling"] for t in rows if t.get("ceiling")]
                ceiling = f", ceiling {span(ceilings, times)}" if ceilings else ""
                met = sum(t["met"] for t in rows)
                verdict = ("met" if met == len(rows) else "**not met**" if not met else
                           f"met in {met} of {len(rows)} runs")
                configs = " or ".join(dict.fromkeys(t["config"] for t in rows))
                lines.append(f"| {rows[0]['name']} | {configs} | {machines_cell(machine, rows)} | "
                             f"{span([t['measured'] for t in rows], times)}{ceiling} | "
                             f"{verdict} |")
    return lines + ["", bench_source(names)]


def bench_gpuaug_table():
    """docs/performance.md: CPU workers against --gpu-aug (batched augmentation on the device)."""
    runs = bench_runs("bench_cpu_gpuaug.json")
    lines = ["| section | input | CPU | img/s | |", "|---|---|---|---|---|"]
    for (pipeline, n, machine), rows in across(runs, "loader", "pipeline", "workers").items():
        what = (f"`--gpu-aug` (decoded once in {span_of(rows, 'decode_s', '{:.1f}')} s)"
                if pipeline == "gpu-aug" else workers(n))
        lines.append(f"| loader | {what} | {machines_cell(machine, rows)} | "
                     f"{span_of(rows, 'images_per_s', '{:,.0f}')} | "
                     f"{span_of(rows, 'over_resnet18_compute', times)} what the trainer consumes |")
    for key, rows in across(runs, "end2end", "gpu_aug", "workers", "channels_last",
                            "compile").items():
        r = rows[0]
        what = "`--gpu-aug`" if r["gpu_aug"] else workers(r["workers"])
        lines.append(f"| end to end ({compute_label(r)}) | {what} | "
                     f"{machines_cell(key[-1], rows)} | "
                     f"{span_of(rows, 'images_per_s', '{:.1f}')} | "
                     f"{span_of(rows, 'fraction_of_compute', pct)} of compute only |")
    return lines + ["", bench_source(["bench_cpu_gpuaug.json"])]


def bench_grid_table():
    """docs/performance.md: compute only over archs and sizes, channels-last and contiguous."""
    runs = bench_runs("bench_cpu_grid_fp32.json")
    lines = ["| arch | px | CPU | GFLOP/step | channels-last | contiguous | float32 matmul | "
             "peak MB (channels-last) |", "|---|---|---|---|---|---|---|---|"]
    rows = across(runs, "compute", "arch", "image_size", "channels_last")
    matmul = across(runs, "matmul", "dtype")
    order = list(by_machine(runs))
    for arch, size, machine in sorted({(a, s, m) for a, s, _, m in rows},
                                      key=lambda k: (k[0], k[1], order.index(k[2]))):
        last, cont = rows[arch, size, True, machine], rows[arch, size, False, machine]
        lines.append(f"| {arch} | {size} | {machines_cell(machine, last)} | "
                     f"{last[0]['gflop_per_step']:,.0f} | "
                     f"{span_of(last, 'images_per_s', '{:.1f}')} img/s, "
                     f"{span_of(last, 'fraction_of_matmul', pct)} of matmul | "
                     f"{span_of(cont, 'images_per_s', '{:.1f}')} img/s, "
                     f"{span_of(cont, 'fraction_of_matmul', pct)} | "
                     f"{span_of(matmul['float32', machine], 'tflops', '{:.3f}')} TFLOP/s | "
                     f"{span_of(last, 'peak_memory_mb', '{:,.0f}')} |")
    return lines + ["", f"Batch {runs[0]['settings']['batch_size']}; the matmul rate is the "
                    f"same runs' own.", "", bench_source(["bench_cpu_grid_fp32.json"])]


def per_run_ratios(runs, section, keys, field, base):
    """{key + (machine,): [row[field] / the base row's field of the same run]}: a ratio within
    each run (the same machine and moment), then its range over the machine's runs."""
    found = {}
    for run in runs:
        rows = run["sections"][section]
        reference = next(r[field] for r in rows if all(r[k] == v for k, v in base.items()))
        for r in rows:
            found.setdefault(tuple(r[k] for k in keys) + (machine_of(run),), []).append(
                r[field] / reference)
    return found


def bench_amp_table():
    """docs/performance.md: --amp precisions on the CPU, a training step and a matmul."""
    step_runs = bench_runs("bench_cpu_amp.json")
    mm_runs = bench_runs("bench_cpu_matmul_amp.json")
    names = {"off": "float32", "bf16": "bfloat16", "fp16": "float16"}
    step = across(step_runs, "compute", "amp")
    step_ratio = per_run_ratios(step_runs, "compute", ("amp",), "images_per_s", {"amp": "off"})
    matmul = across(mm_runs, "matmul", "dtype")
    mm_ratio = per_run_ratios(mm_runs, "matmul", ("dtype",), "tflops", {"dtype": "float32"})
    lines = [f"| precision | CPU | step, ResNet-18 at 32 px, batch "
             f"{step_runs[0]['settings']['batch_size']} | against float32 | matmul, n = "
             f"{mm_runs[0]['settings']['matmul_size']} | against float32 |",
             "|---|---|---|---|---|---|"]
    for (amp, machine), rows in step.items():
        key = (names[amp], machine)
        mm_cells = (f"{span_of(matmul[key], 'tflops', '{:.4f}')} TFLOP/s | "
                    f"{span(mm_ratio[key], times)}" if key in matmul else "| ")
        lines.append(f"| {names[amp]} | {machines_cell(machine, rows)} | "
                     f"{span_of(rows, 'images_per_s', '{:.1f}')} img/s | "
                     f"{span(step_ratio[amp, machine], times)} | {mm_cells} |")
    return lines + ["", bench_source(["bench_cpu_amp.json", "bench_cpu_matmul_amp.json"])]


def bench_constants():
    """tools/bench_grid.py's module-level constants (literal assignments), read without
    importing it (and torch): an object with one attribute per name."""
    import ast
    import types
    with open(os.path.join(REPO, "tools", "bench_grid.py")) as f:
        tree = ast.parse(f.read())
    found = {}
    for node in tree.body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target = node.targets[0]
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            continue
        if isinstance(target, ast.Name):
            found[target.id] = value
        elif isinstance(target, ast.Tuple):
            found.update(zip((t.id for t in target.elts), value))
    return types.SimpleNamespace(**found)


def target_settings_table():
    """docs/performance.md: the targets tools/bench_grid.py evaluates, from its constants (so the
    page cannot drift from the code)."""
    bench = bench_constants()
    gpu = "; ".join(f"{arch}, {size} px, batch {batch}: ≥ {wanted:,} img/s"
                    for (arch, size, batch), wanted in bench.GPU_CLASS_TARGETS.items())
    return ["| where | target |", "|---|---|",
            f"| CPU, ResNet-18, 32 px, batch 128 | end to end ≥ {bench.E2E_OVER_BASELINE}× the "
            f"baseline loop measured in the same run |",
            f"| CPU, same | loader (best worker count) ≥ {bench.LOADER_OVER_TRAINER:g}× the "
            f"compute-only img/s, i.e. what the trainer consumes |",
            f"| any device | NT-Xent forward + backward at N = {bench.NTXENT_TARGET_N} ≤ "
            f"{bench.NTXENT_OVER_BOUND}× the matmul + cross_entropy bound |",
            f"| CUDA, the fastest input of each arch and size, and main.py's default input "
            f"(`--gpu-aug` where the decoded images fit `--max-memory-gb`, else `--gpu-decode`) "
            f"where slower | end to end ≥ "
            f"{pct(bench.E2E_OVER_COMPUTE)} of the compute-only img/s of the same configuration "
            f"and ≥ {bench.CUDA_E2E_OVER_BASELINE:g}× the baseline loop |",
            f"| CUDA, on an {' or '.join(bench.TARGET_GPU_NAMES)} | {gpu} |",
            "", "(From tools/bench_grid.py's constants.)"]


AUGMENT_METHODS = (("batched", "own torch ops, batched (`--gpu-aug`)"),
                   ("v2-per-view", "torchvision.transforms.v2, per view"),
                   ("pil", "per-image PIL pipeline (one worker)"), ("kornia", "kornia, batched"))


def bench_augment_table():
    """docs/performance.md: ways of producing the views of the simclr preset."""
    runs = bench_runs("bench_cpu_augment.json")
    lines = ["| simclr preset, RGB | CPU | " +
             " | ".join(label for _, label in AUGMENT_METHODS) + " |",
             "|---|---|" + "---|" * len(AUGMENT_METHODS)]
    by = across(runs, "augment", "views", "image_size", "blur", "method")
    for views, size, blur, machine in dict.fromkeys(key[:3] + key[4:] for key in by):
        cells = []
        for method, _ in AUGMENT_METHODS:
            rows = by.get((views, size, blur, method, machine), [])
            timed = [r for r in rows if "ms" in r]
            cells.append(span_of(timed, "ms", "{:,.0f}", " ms") if timed else
                         rows[0]["skipped"] if rows else "not measured")
        runs_of = by[views, size, blur, "batched", machine]
        lines.append(f"| {views} views, {size} px{', blur' if blur else ''} | "
                     f"{machines_cell(machine, runs_of)} | " + " | ".join(cells) + " |")
    kornia = sorted({r["version"] for rows in by.values() for r in rows
                     if r["method"] == "kornia" and r.get("version")})
    return lines + ["", "Each figure is the least of 8 timed calls after an untimed one (the "
                    "results file also has their medians)" +
                    (f"; kornia {', '.join(kornia)}, installed for these measurements only."
                     if kornia else "."), "",
                    bench_source(["bench_cpu_augment.json"])]


def recorded(name):
    """A tools/record.py file of results/docs/: (its data, its newest run)."""
    data = load(os.path.join("docs", f"{name}.json"))
    return data, data["runs"][-1]


def output(run, suffix):
    """The collected file of `run` whose path ends with `suffix`."""
    return next(v for k, v in run["outputs"].items() if k.endswith(suffix))


def wall_range(data):
    """The whole command's wall time per machine: '35 s on Intel Xeon', a range over a
    machine's runs when it has several."""
    parts = []
    for machine, runs in by_machine(data["runs"]).items():
        walls = [r["wall_s"] for r in runs]
        parts.append(f"{span(walls, '{:,.0f}', ' s')} on {machines_cell(machine, runs)}")
    return "; ".join(parts)


def recorded_source(names, section, newest_only=True, demo=None):
    """The source line of a table of tools/record.py files (results/docs/NAME.json), written by
    `bash tools/measure_docs.sh SECTION`; newest_only: the figures but the wall times come from
    each file's newest run; `demo`: a demo run (results/demo.json) the table also shows."""
    runs = [run for name in names for run in recorded(name)[0]["runs"]]
    paths = [f"results/docs/{name}.json" for name in names]
    by = f"`bash tools/measure_docs.sh {section}` (each file keeps its command)"
    note = "" if len(runs) == len(names) else "a figure 'a to b' spans one machine's runs"
    if newest_only and len(runs) > len(names):
        newest = recorded(names[0])[1]
        note = (f"the figures are the newest run's (commit {newest['git_commit'][:7]} on "
                f"{machine_of(newest)}), the wall times per CPU over all its runs")
    if demo is not None:
        paths, runs = paths + ["results/demo.json"], runs + [demo]
        by += ", and `bash scripts/demo.sh` for the demo's row"
    return source_line(paths, by, runs, note)


def short_command(command):
    return (command.replace(".venv/bin/python ", "python ")
            .replace("results/demo/model/model.pth", "MODEL"))


DATA_SOURCES = ("data_folder", "data_npz", "data_list", "data_k10", "data_k10_random")


def data_sources_table():
    """docs/data.md: the demo model evaluated through every data source."""
    lines = ["| command (MODEL = `results/demo/model/model.pth`) | test accuracy |", "|---|---|"]
    for name in DATA_SOURCES:
        data, run = recorded(name)
        acc = output(run, "report.json")["accuracy"]
        lines.append(f"| `{short_command(data['command'])}` | {100 * acc:.1f} % |")
    report = {name: output(recorded(name)[1], "report.json") for name in DATA_SOURCES}
    sources = [report[name]["accuracy"] for name in DATA_SOURCES[:3]]
    n_test = report["data_folder"]["n_test"]
    spread = round((max(sources) - min(sources)) * n_test)
    k10, k10_random = report["data_k10"]["accuracy"], report["data_k10_random"]["accuracy"]
    lines += ["", f"The three sources give the same features in another row order, which changes "
              f"the probe's L-BFGS path: their accuracies differ by {spread} of the {n_test:,} "
              f"test images. With 10 labels per class, SimCLR against the random encoder: "
              f"{compare(k10, k10_random)}" +
              (": the demo's short CPU pretraining learns features that a probe with "
               "thousands of labels can use, not yet ones that 10 labels suffice for."
               if k10 < k10_random else ".")]
    return lines + ["", recorded_source(DATA_SOURCES, "data")]


def feature_analysis_table():
    """docs/evaluation.md: kNN accuracy and PCA of h and z on the demo model."""
    data, run = recorded("feature_analysis")
    a = output(run, "analysis.json")
    probe = demo_before(run["date"])["test_accuracy"]["linear_eval"]
    pca = a["pca_explained_variance"]
    lines = ["| representation | kNN accuracy (k = 20, cosine) | PCA: variance of the first two "
             "axes |", "|---|---|---|"]
    for rep in ("h", "z"):
        ratios = pca[rep]
        lines.append(f"| {rep} ({a['feature_dims'][rep]}-d) | {100 * a['knn'][rep]:.1f} % | "
                     f"{100 * ratios[0]:.1f} % and {100 * ratios[1]:.1f} % |")
    return lines + ["", f"The linear probe on h of the same model: {100 * probe:.1f} % "
                    f"(`results/demo.json`). On {a['n_train']:,} train and {a['n_test']:,} test "
                    f"images the whole command took {wall_range(data)}.", ""] + \
        [recorded_source(["feature_analysis"], "features")]


def megabytes(n):
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def embed_export_table():
    """docs/features.md: the files embed.py and export.py write for the demo model."""
    lines = ["| command | wrote | whole command |", "|---|---|---|"]
    for name in ("features_embed", "features_export"):
        data, run = recorded(name)
        files = ", ".join(f"`{os.path.basename(path)}` ({megabytes(size)})"
                          for path, size in run["file_sizes"].items())
        lines.append(f"| `{short_command(data['command'])}` | {files} | {wall_range(data)} |")
    return lines + ["", recorded_source(["features_embed", "features_export"], "features")]


CHUNKS = ("none", "64", "32", "16")


def chunk_table():
    """docs/distributed.md: --chunk-size against the unchunked step, one epoch of main.py."""
    lines = ["| `--chunk-size` | CPU | img/s | peak memory (process) | loss of the epoch |",
             "|---|---|---|---|---|"]
    for chunk in CHUNKS:
        for machine, runs in by_machine(recorded(f"chunk_{chunk}")[0]["runs"]).items():
            rows = [output(run, "run.json") for run in runs]
            lines.append(f"| {'none (one pass)' if chunk == 'none' else chunk} | "
                         f"{machines_cell(machine, rows)} | "
                         f"{span_of(rows, 'images_per_s', '{:.1f}')} | "
                         f"{span_of(rows, 'peak_memory_mb', '{:,.0f}', ' MB')} | "
                         f"{span([r['epoch_losses'][-1] for r in rows], '{:.4f}')} |")
    return lines + ["", recorded_source([f"chunk_{c}" for c in CHUNKS], "chunk",
                                        newest_only=False)]


SEGMENT_RUNS = (
    ("fcn_e10", "**SimCLR encoder fine-tuned (the defaults)**"),
    ("fcn_e10_baseline", "same network from random weights (`--baseline`)"),
    ("fcn_e10_lr3e-4", "SimCLR encoder fine-tuned, `--lr 3e-4`"),
    ("fcn_e10_lpft", "SimCLR encoder, decoder first (`--decoder-epochs 1 --encoder-lr-ratio 0.1 "
                     "--encoder-bn frozen`)"),
    ("fcn_e5", "SimCLR encoder fine-tuned"),
    ("fcn_e5_baseline", "same network from random weights (`--baseline`)"),
    ("fcn_e5_freeze", "SimCLR encoder frozen (`--freeze`)"),
    ("fcn_e5_baseline_freeze", "random encoder frozen (`--baseline --freeze`)"),
    ("fcn_e5_os8", "SimCLR encoder fine-tuned, `--output-stride 8`"),
    ("fcn_e5_native", "SimCLR encoder fine-tuned, `--output-stride native` (undilated)"),
    ("fcn_e5_native_baseline", "from random weights, `--output-stride native`"),
    ("unet_e5", "`--decoder unet`, SimCLR encoder fine-tuned"),
    ("unet_e5_baseline", "`--decoder unet`, from random weights"),
    ("unet_e5_freeze", "`--decoder unet`, SimCLR encoder frozen"),
    ("unet_e5_lpft", "`--decoder unet`, SimCLR encoder, decoder first (as above)"),
    ("unet_e5_os4", "`--decoder unet`, SimCLR encoder fine-tuned, `--output-stride 4`"))


def segment_metrics(name):
    return output(recorded(f"segment_{name}")[1], "metrics.json")


def compare(a, b):
    """'a vs b %, x points ahead/behind' for two mIoU or accuracy fractions."""
    diff = 100 * (a - b)
    side = "ahead" if diff > 0 else "behind" if diff < 0 else "level"
    return f"{100 * a:.1f} vs {100 * b:.1f} %, {abs(diff):.1f} points {side}"


def segmentation_reading():
    """The comparisons the segmentation table supports, as generated sentences."""
    miou = {name: segment_metrics(name)["test"]["miou"] for name, _ in SEGMENT_RUNS}
    return [
        f"- **Frozen features.** The frozen SimCLR encoder against a frozen random one "
        f"(5 epochs, FCN): {compare(miou['fcn_e5_freeze'], miou['fcn_e5_baseline_freeze'])}.",
        f"- **Fine-tuned against random weights.** After 5 epochs "
        f"{compare(miou['fcn_e5'], miou['fcn_e5_baseline'])}; after 10 "
        f"{compare(miou['fcn_e10'], miou['fcn_e10_baseline'])}. One seed and 200 test "
        f"images: differences of a few points are within noise (val and test differ too).",
        f"- **Output stride (FCN, 5 epochs, fine-tuned).** Stride 4 (the default here) "
        f"against 8: {compare(miou['fcn_e5'], miou['fcn_e5_os8'])}; against the undilated "
        f"encoder: {compare(miou['fcn_e5'], miou['fcn_e5_native'])}. Undilated, fine-tuned "
        f"against random weights: "
        f"{compare(miou['fcn_e5_native'], miou['fcn_e5_native_baseline'])}.",
        f"- **Decoder.** FCN against U-Net, fine-tuned for 5 epochs: "
        f"{compare(miou['fcn_e5'], miou['unet_e5'])}; U-Net at output stride 4 against its "
        f"own strides: {compare(miou['unet_e5_os4'], miou['unet_e5'])}.",
        f"- **Epochs and learning rate.** 10 epochs against 5: "
        f"{compare(miou['fcn_e10'], miou['fcn_e5'])}; lr 1e-3 against 3e-4 (10 epochs): "
        f"{compare(miou['fcn_e10'], miou['fcn_e10_lr3e-4'])}."]


def segmentation_table():
    """docs/evaluation.md: segment.py on the demo segmentation data, one run per row."""
    lines = ["| run | epochs | test mIoU | test pixel accuracy | val mIoU (best epoch) | "
             "whole command |", "|---|---|---|---|---|---|"]
    for name, label in SEGMENT_RUNS:
        data, _ = recorded(f"segment_{name}")
        m = segment_metrics(name)
        best = m["best_epoch"]
        val = next(e for e in m["val_per_epoch"] if e["epoch"] == best)
        bold = "**" if label.startswith("**") else ""
        lines.append(f"| {label} | {m['epochs']} | {bold}{100 * m['test']['miou']:.1f} %{bold} | "
                     f"{100 * m['test']['pixel_accuracy']:.1f} % | {100 * val['miou']:.1f} % "
                     f"({best}) | {wall_range(data)} |")
    first = segment_metrics(SEGMENT_RUNS[0][0])
    ref = first["test"]["majority_class_reference"]
    lines.append(f"| predicting the most frequent training class (background) everywhere | | "
                 f"{100 * ref['miou']:.1f} % | {100 * ref['pixel_accuracy']:.1f} % | | |")
    lines += ["", *segmentation_reading()]
    test = first["test"]
    background = sum(test["confusion_matrix"][0]) / test["pixels"]
    ignored = 1 - test["pixels"] / (test["images"] * first["resolution"] ** 2)
    return lines + ["", f"Background is {100 * background:.1f} % of the scored test pixels, and "
                    f"{100 * ignored:.1f} % of the test pixels are ignored (255). The wall "
                    f"time is the whole command's (data check, training, validation after "
                    f"every epoch, final evaluation).", ""] + \
        [recorded_source([f"segment_{n}" for n, _ in SEGMENT_RUNS], "segmentation")]


def online_probe_table():
    """docs/evaluation.md: the demo run's online probe beside what a probe on the same encoder
    reaches (tools/probe_ceiling.py)."""
    data, run = recorded("online_probe")
    c = output(run, "probe_ceiling.json")
    split, last = c["split"], c["split"]["epochs"]
    curves = {"run": [a for _, a in c["run"]], **c["replay"]}
    tail = {name: statistics.mean(curve[-5:]) for name, curve in curves.items()}
    rows = [("online probe of the demo run (the encoder moving under it)", "run"),
            ("online probe replayed on the final encoder, h standardised (main.py's)",
             "standardised"),
            ("the same on raw h (the probe before the standardisation)", "raw")]
    lines = [f"| probe of h, demo model | validation accuracy after {last} epochs | mean over "
             f"the last 5 epochs |", "|---|---|---|"]
    lines += [f"| {label} | {curves[name][-1]:.1f} % | {tail[name]:.1f} % |"
              for label, name in rows]
    lines += [f"| offline probe (linear_evaluation.py's) fitted on augmented h, one epoch of "
              f"views | {c['offline']['augmented']:.1f} % | |",
              f"| offline probe fitted on clean h (no augmentation) | "
              f"{c['offline']['clean']:.1f} % | |"]
    augmentation = c["offline"]["clean"] - c["offline"]["augmented"]
    gain = tail["standardised"] - tail["raw"]
    moving = tail["standardised"] - tail["run"]
    lines += ["", f"Validation: {split['val']:,} training images ({split['val_fraction']:g} of "
              f"each class, seed {split['seed']}, main.py's); batches of {split['batch_size']}. "
              f"Fitted on augmented views, as the online probe is, the offline probe loses "
              f"{augmentation:.1f} points against clean h: most of the online probe's gap. Over "
              f"the last five epochs the standardisation changes the replay by {gain:+.1f} "
              f"points, and the encoder moving under the probe during the run costs "
              f"{moving:.1f} more.", ""]
    return lines + [recorded_source(["online_probe"], "online-probe")]


FINETUNE_RUNS = (("defaults", "**the defaults: LP-FT, encoder lr × 0.1, statistics of "
                               "pretraining kept**"),
                  ("ratio_1", "`--encoder-lr-ratio 1` (the encoder at the head's rate)"),
                  ("lr_0.01", "`--lr 0.01` (the head's rate per 256 images)"),
                  ("bn_train", "`--encoder-bn train` (statistics trained)"),
                  ("head_random", "`--head-init random` (a fresh head, no probe first)"))


def finetune_defaults_table():
    """docs/defaults.md: finetune.py's defaults against one change each, through
    label_efficiency.py at 20 labels per class (validation accuracy of the kept epoch)."""
    lines = ["| finetune.py, demo model, 20 labels per class | val accuracy of the kept epoch | "
             "test accuracy | whole sweep |", "|---|---|---|---|"]
    seeds = None
    for name, label in FINETUNE_RUNS:
        data, run = recorded(f"finetune_{name}")
        row = next(r for r in output(run, "label_efficiency.csv") if r["method"] == "finetune")
        seeds = row["seeds"]
        lines.append(f"| {label} | {100 * row['val_accuracy_mean']:.1f} ± "
                     f"{100 * row['val_accuracy_std']:.1f} % | {100 * row['accuracy_mean']:.1f} ± "
                     f"{100 * row['accuracy_std']:.1f} % | {wall_range(data)} |")
    return lines + ["", f"Mean ± std over {seeds} seeds. Validation: the val split of "
                    f"`demo_data/fashion_mnist.npz` (further Fashion-MNIST training images), "
                    f"where finetune.py keeps its best epoch (epoch 0: the probe itself); the "
                    f"defaults are chosen on that column, the test column is for reading "
                    f"only.", "",
                    recorded_source([f"finetune_{n}" for n, _ in FINETUNE_RUNS],
                                    "finetune-defaults")]


SEED_RUNS = ((10, ""), (10, "_baseline"), (5, ""), (5, "_baseline"))
SEEDS = (0, 1, 2)


def seeds_names():
    return [f"seeds_segment_fcn_e{e}{b}_seed{s}" for e, b in SEED_RUNS for s in SEEDS]


def segmentation_seeds_table():
    """docs/evaluation.md: the FCN defaults fine-tuned against the same network from random
    weights, mean ± sample std over seeds."""
    lines = [f"| FCN (defaults), mean ± std over {len(SEEDS)} seeds | epochs | test mIoU | "
             f"best val mIoU |", "|---|---|---|---|"]
    means = {}
    for epochs, baseline in SEED_RUNS:
        metrics = [output(recorded(f"seeds_segment_fcn_e{epochs}{baseline}_seed{s}")[1],
                          "metrics.json") for s in SEEDS]
        test = [100 * m["test"]["miou"] for m in metrics]
        val = [100 * max(e["miou"] for e in m["val_per_epoch"]) for m in metrics]
        means[epochs, baseline] = statistics.mean(test) / 100
        label = "same network from random weights" if baseline else "SimCLR encoder fine-tuned"
        lines.append(f"| {label} | {epochs} | {statistics.mean(test):.1f} ± "
                     f"{statistics.stdev(test):.1f} % | {statistics.mean(val):.1f} ± "
                     f"{statistics.stdev(val):.1f} % |")
    lines += ["", "Fine-tuned against random weights (means): after 5 epochs "
              f"{compare(means[5, ''], means[5, '_baseline'])}; after 10 "
              f"{compare(means[10, ''], means[10, '_baseline'])}.", ""]
    return lines + [recorded_source(seeds_names(), "segmentation-seeds", newest_only=False)]


METHOD_NAMES = {"linear": "SimCLR, linear probe on h", "finetune": "SimCLR, fine-tuned",
                "frozen": "SimCLR, frozen encoder, trained head",
                "baseline": "supervised from scratch, same network and recipe",
                "pixels": "raw pixels, linear probe",
                "random": "the same network randomly initialised, linear probe"}


def label_efficiency_table():
    """docs/evaluation.md: label_efficiency.py's summary, accuracy mean ± std per budget."""
    data, run = recorded("label_efficiency")
    rows = output(run, "label_efficiency.csv")
    budgets = sorted({r["budget_value"] for r in rows})
    seeds = rows[0]["seeds"]
    lines = [f"| test accuracy, mean ± std over {seeds} seeds | " +
             " | ".join(f"{b:g} labels per class" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    by = rows_by(rows, "method", "budget_value")
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = [f"{100 * by[method, b]['accuracy_mean']:.1f} ± "
                 f"{100 * by[method, b]['accuracy_std']:.1f} %" for b in budgets]
        lines.append(f"| {METHOD_NAMES.get(method, method)} | " + " | ".join(cells) + " |")
    auroc = "; ".join(
        f"{b:g} per class: " + " / ".join(f"{by[m, b]['auroc_ovr_mean']:.2f}"
                                         for m in dict.fromkeys(r["method"] for r in rows))
        for b in budgets)
    methods = " / ".join(dict.fromkeys(r["method"] for r in rows))
    reading = []
    for b in budgets:
        best = max(dict.fromkeys(r["method"] for r in rows),
                   key=lambda m: by[m, b]["accuracy_mean"])
        pairs = [("fine-tuned against the linear probe", "finetune", "linear"),
                 ("fine-tuned against scratch", "finetune", "baseline"),
                 ("linear probe against raw pixels", "linear", "pixels"),
                 ("linear probe against the random encoder", "linear", "random")]
        said = [f"{what} {compare(by[m, b]['accuracy_mean'], by[r, b]['accuracy_mean'])}"
                for what, m, r in pairs if (m, b) in by and (r, b) in by]
        reading.append(f"- **{b:g} labels per class:** best {METHOD_NAMES.get(best, best)}; "
                       + "; ".join(said) + ".")
    lines += ["", *reading]
    return lines + ["", f"AUROC (one-vs-rest, mean over the seeds) for {methods}: {auroc}. "
                    f"The whole sweep took {wall_range(data)}.", ""] + \
        [recorded_source(["label_efficiency"], "label-efficiency")]


DEFAULT_RUNS = (("imagenet_e15", "ResNet-18, `imagenet` stem, 15 epochs"),
                ("cifar_e1", "ResNet-18, `cifar` stem, 1 epoch"),
                (None, "**ResNet-18, `cifar` stem, 3 epochs (the demo)**"),
                ("min_scale_0.2", "same, `--min-scale 0.2`"),
                ("temperature_0.5", "same, `--temperature 0.5`"),
                ("adamw", "same, `--optimizer adamw --lr 1e-3 --weight-decay 1e-2`"))


def defaults_reading(demo):
    """The comparisons of the defaults table, each against the demo's run, as sentences."""
    def run(name):
        pretrain = output(recorded(f"defaults_{name}_pretrain")[1], "run.json")
        probe = output(recorded(f"defaults_{name}_probe")[1], "report.json")["accuracy"]
        return pretrain, probe
    probe = demo["test_accuracy"]["linear_eval"]
    per_epoch = demo["pretraining_s"] / demo["epochs"]
    imagenet, imagenet_probe = run("imagenet_e15")
    imagenet_epoch = imagenet["wall_time_s"] / imagenet["epochs_done"]
    lines = [f"- Stem: `cifar` 3 epochs against `imagenet` 15 epochs: {compare(probe, imagenet_probe)}, "
             f"at {per_epoch:,.0f} against {imagenet_epoch:,.0f} s per epoch "
             f"({per_epoch / imagenet_epoch:.1f}× the time)."]
    lines.append(f"- Epochs: 3 against 1: {compare(probe, run('cifar_e1')[1])}.")
    for name, what in (("temperature_0.5", "τ = 0.2 (default) against 0.5"),
                       ("min_scale_0.2", "`--min-scale` 0.08 (default) against 0.2")):
        lines.append(f"- {what}: {compare(probe, run(name)[1])}.")
    adamw, adamw_probe = run("adamw")
    lines.append(f"- SGD (default) against AdamW: probe {compare(probe, adamw_probe)}; last loss "
                 f"{demo['epoch_losses'][-1]:.2f} against {adamw['epoch_losses'][-1]:.2f}.")
    return lines


def defaults_table():
    """docs/defaults.md: one flag changed from the demo's recipe per row, probed on h."""
    demo = demo_before(recorded("defaults_cifar_e1_pretrain")[1]["date"])
    lines = ["| run | pretraining | last epoch's loss | linear probe on h |", "|---|---|---|---|"]
    names = []
    for name, label in DEFAULT_RUNS:
        if name is None:
            lines.append(f"| {label} | {demo['pretraining_s']:,.0f} s | "
                         f"{demo['epoch_losses'][-1]:.2f} | "
                         f"**{100 * demo['test_accuracy']['linear_eval']:.1f} %** |")
            continue
        names += [f"defaults_{name}_pretrain", f"defaults_{name}_probe"]
        run = output(recorded(f"defaults_{name}_pretrain")[1], "run.json")
        probe = output(recorded(f"defaults_{name}_probe")[1], "report.json")["accuracy"]
        lines.append(f"| {label} | {run['wall_time_s']:,.0f} s | {run['epoch_losses'][-1]:.2f} | "
                     f"{100 * probe:.1f} % |")
    random = output(recorded("defaults_imagenet_e15_random")[1], "report.json")["accuracy"]
    acc = demo["test_accuracy"]
    lines += ["", *defaults_reading(demo)]
    return lines + ["", f"References with the same probe: the `imagenet`-stem network randomly "
                    f"initialised {100 * random:.1f} %, the `cifar`-stem one "
                    f"{100 * acc['reference_random']:.1f} %, raw pixels "
                    f"{100 * acc['reference_pixels']:.1f} % (`results/demo.json`).", ""] + \
        [recorded_source(names + ["defaults_imagenet_e15_random"], "defaults", demo=demo)]


RECIPE_RUNS = (("cifar_bs250_e3", "`cifar` stem, 3 epochs, batch 250 (the earlier demo)"),
               ("half_bs250_e8", "`half` stem, 8 epochs, batch 250"),
               ("half_bs128_e8", "`half` stem, 8 epochs, batch 128"),
               ("half_bs250_e14", "`half` stem, 14 epochs, batch 250"),
               ("half_bs250_t01_e14", "`half` stem, 14 epochs, batch 250, τ = 0.1"),
               ("half_lr1_e14", "`half` stem, 14 epochs, batch 250, `--lr 1.0`, batched views"),
               ("half_ms02_e14", "`half` stem, 14 epochs, batch 250, `--min-scale 0.2`, "
                                 "batched views"),
               ("half_e16", "`half` stem, 16 epochs, batch 250, batched views"),
               ("half_t05_e14", "`half` stem, 14 epochs, batch 250, τ = 0.5"),
               ("half_e40", "`half` stem, 40 epochs, batch 250 (beyond the demo's budget)"))


def probe_cells(scores):
    """'84.0 % | 83.9 % (3e-04)': the probe at 1e-4 and with its chosen penalty ('—' when the
    record predates the choice)."""
    chosen = (f"{scores['probe_chosen']:.1f} % ({scores['weight_decay']:.0e})"
              if "probe_chosen" in scores else "—")
    return f"{scores['probe']:.1f} % | {chosen}"


def recipes_table():
    """docs/defaults.md: the demo-recipe candidates judged on validation images (probe and kNN
    of h, beside the random encoder and the raw pixels), with their pretraining time."""
    names = [name for name, _ in RECIPE_RUNS
             if os.path.exists(os.path.join(REPO, "results", "docs", f"recipe_{name}_val.json"))]
    lines = ["| recipe (ResNet-18, SGD, demo data) | pretraining | linear probe, L2 1e-4 (val) | "
             "linear probe, L2 chosen (val) | kNN, k 20 (val) |", "|---|---|---|---|---|"]
    references = {}  # stem -> the val_eval.json of a run with that stem
    for name, label in RECIPE_RUNS:
        if name not in names:
            continue
        run = recorded(f"recipe_{name}_val")[1]
        if not any(key.endswith("run.json") for key in run["outputs"]):  # measure_docs.sh's
            run = {"outputs": {**run["outputs"],  # pretraining time: its own record
                               **recorded(f"recipe_{name}_pretrain")[1]["outputs"]}}
        val, pretrain = output(run, "val_eval.json"), output(run, "run.json")
        stem = pretrain["args"]["stem"]
        if "random" in val and "probe_chosen" not in references.get(stem, {}).get("random", {}):
            references[stem] = val  # the first run of a stem judged with both probes
        lines.append(f"| {label} | {pretrain['wall_time_s']:,.0f} s | "
                     f"{probe_cells(val['simclr'])} | {val['simclr']['knn']:.1f} % |")
    for stem, val in references.items():
        if "random" in val:
            lines.append(f"| the same ResNet-18 (`{stem}` stem), randomly initialised | | "
                         f"{probe_cells(val['random'])} | {val['random']['knn']:.1f} % |")
    if references and "pixels" in next(iter(references.values())):
        pixels = next(iter(references.values()))["pixels"]
        lines.append(f"| raw pixels | | {probe_cells(pixels)} | {pixels['knn']:.1f} % |")
    split = next(iter(references.values()))["split"] if references else {}
    missing = ("; '—': judged before the choice existed, the model no longer kept"
               if any("—" in line for line in lines) else "")
    return lines + ["", f"Validation: {split.get('val', '?')} training images "
                    f"({split.get('val_fraction', '?')} of each class, seed "
                    f"{split.get('seed', '?')}); the probe and the kNN memory use the other "
                    f"{split.get('train', '?')}. The probe's L2 penalty: 1e-4 for every feature "
                    f"set (linear_evaluation.py's earlier default), or chosen per feature set "
                    f"from 1e-5 to 1 on held-out images of those {split.get('train', '?')} (its "
                    f"default now; the value in brackets)" + missing + ". Pretraining: "
                    f"`main.py demo_data OUT -nw 2` with the row's flags (`measure_docs.sh "
                    f"recipes` lists them; `--knn-every 2` on the first 14-epoch runs; \"batched "
                    f"views\": `--gpu-aug -nw 0`, the same augmentation distributions made on the "
                    f"CPU a batch at a time); its time is its own run.json's; some `half`-stem "
                    f"runs shared the 2 cores with other work (so their times are not "
                    f"comparable: the records keep their load averages), the `cifar` one had "
                    f"them to itself. The validation figures were recorded by "
                    f"`tools/val_eval.py` through `tools/record.py`.", ""] + \
        [recorded_source([f"recipe_{n}_val" for n in names], "recipes recipes-val")]


TABLES = {"startup": startup_table, "startup-scan": startup_scan_table,
          "startup-memory": startup_memory_table, "demo": demo_table,
          "bench-cpu": bench_cpu_table, "bench-targets": bench_targets_table,
          "bench-gpuaug": bench_gpuaug_table, "bench-grid": bench_grid_table,
          "bench-amp": bench_amp_table, "bench-augment": bench_augment_table,
          "targets": target_settings_table, "data-sources": data_sources_table,
          "feature-analysis": feature_analysis_table, "embed-export": embed_export_table,
          "chunk": chunk_table, "segmentation": segmentation_table,
          "segmentation-seeds": segmentation_seeds_table, "online-probe": online_probe_table,
          "finetune-defaults": finetune_defaults_table,
          "label-efficiency": label_efficiency_table, "defaults": defaults_table,
          "recipes": recipes_table}


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
        try:
            lines = TABLES[name]()
        except FileNotFoundError as missing:
            lines = [f"*Not measured at this commit: `{os.path.relpath(missing.filename, REPO)}` "
                     f"is missing (the command above writes it).*"]
        return match.group(1) + "\n".join(lines) + "\n" + match.group(4)
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
        print(f"stale results tables in {', '.join(stale)}: run python tools/results_tables.py",
              file=sys.stderr)
        return 1
    untracked = untracked_results()
    if untracked:
        print(f"{', '.join(untracked)}: read by the tables but not tracked by git (results/ is "
              f"ignored); git add -f them, or a clean checkout renders other tables",
              file=sys.stderr)
        if args.check:
            return 1
    print(f"{count} results tables {'checked' if args.check else 'written'}"
          f"{'' if args.check else f' ({len(stale)} file(s) changed)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
