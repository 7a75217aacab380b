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


def demo_runs():
    """The recorded runs of scripts/demo.sh (results/demo.json), the newest last."""
    return load("demo.json")["runs"]


def span(values, fmt, unit=""):
    """'x unit', or 'lo to hi unit' when the recorded runs differ."""
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return f"{lo}{unit}" if lo == hi else f"{lo} to {hi}{unit}"


def signed_points(a, b):
    """'+1.7 points' for accuracy fractions a and b."""
    return f"{100 * (a - b):+.1f} points"


def demo_table():
    runs = demo_runs()
    data, acc = runs[-1], runs[-1]["test_accuracy"]
    lines = ["| representation (linear probe, 5,000 train / 1,000 test) | test accuracy |",
             "|---|---|",
             f"| **SimCLR, {data['epochs']} epochs (this demo)** | "
             f"**{100 * acc['linear_eval']:.1f} %** |",
             f"| raw pixels | {100 * acc['reference_pixels']:.1f} % |",
             f"| the same ResNet-18, randomly initialised | "
             f"{100 * acc['reference_random']:.1f} % |", "",
             f"SimCLR against raw pixels: {signed_points(acc['linear_eval'], acc['reference_pixels'])}"
             f"; against the random encoder: "
             f"{signed_points(acc['linear_eval'], acc['reference_random'])}.",
             f"Loss per epoch {', '.join(f'{v:.2f}' for v in data['epoch_losses'])}; "
             f"positive-pair top-1 "
             f"{', '.join(f'{v:.3f}' for v in data['epoch_positive_pair_top1'])}; pretraining "
             f"{data['pretraining_s']:.0f} s at {data['images_per_s']:.1f} img/s, peak memory "
             f"{data['peak_memory_mb'] / 1024:.1f} GB."]
    if len(runs) > 1:
        probe = [100 * r["test_accuracy"]["linear_eval"] for r in runs]
        lines.append(f"Over the {len(runs)} recorded runs (machines below): SimCLR probe "
                     f"{span(probe, '{:.1f}', ' %')}, last loss "
                     f"{span([r['epoch_losses'][-1] for r in runs], '{:.2f}')}, pretraining "
                     f"{span([r['pretraining_s'] for r in runs], '{:.0f}', ' s')} at "
                     f"{span([r['images_per_s'] for r in runs], '{:.1f}', ' img/s')}.")
    lines += ["Losses and accuracy vary by about a point between machines, wall time and img/s "
              "with the CPU and its load.", ""]
    return lines + [provenance(r, "demo.json") for r in reversed(runs)]


def bench(name):
    data = load(name)
    return data, data["sections"]


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
    """docs/performance.md: the default CPU grid, one line per measured configuration."""
    data, sec = bench("bench_cpu.json")
    lines = ["| section | configuration | figure |", "|---|---|---|"]
    for r in sec["matmul"]:
        lines.append(f"| dense matmul | {r['dtype']}, n = {r['size']} | "
                     f"{r['tflops']:.3f} TFLOP/s |")
    for r in sec["compute"]:
        lines.append(f"| compute only | {compute_label(r)} | {r['images_per_s']:.1f} img/s, "
                     f"{r['gflop_per_step']:.0f} GFLOP/step, {r['tflops']:.3f} TFLOP/s = "
                     f"{pct(r['fraction_of_matmul'])} of the float32 matmul rate; first step "
                     f"{r['first_step_s']:.1f} s |")
    loader = [r for r in sec["loader"] if r["pipeline"] == "workers"]
    workers = " / ".join(str(r["workers"]) for r in loader)
    speeds = " / ".join(f"{r['images_per_s']:,.0f}" for r in loader)
    ratios = " / ".join(times(r["over_resnet18_compute"]) for r in loader)
    lines.append(f"| loader | {workers} workers | {speeds} img/s = {ratios} what the trainer "
                 f"consumes |")
    for n in sorted({r["n"] for r in sec["ntxent"]}):
        by = {r["method"]: r for r in sec["ntxent"] if r["n"] == n}
        nt, bound, broad = by["ntxent"], by["bound"], by["broadcast"]
        other = (f"broadcast {broad['ms']:,.0f} ms ({times(broad['over_bound'])}), "
                 f"{broad['peak_memory_mb']:,.0f} MB" if "ms" in broad
                 else f"broadcast skipped ({broad['skipped']})")
        lines.append(f"| NT-Xent, D = {nt['dim']} | N = {n} | {nt['ms']:,.1f} ms = "
                     f"{times(nt['over_bound'])} the matmul + cross_entropy bound "
                     f"({bound['ms']:,.1f} ms), {nt['peak_memory_mb']:,.0f} MB; {other} |")
    for r in sec["baseline"]:
        lines.append(f"| baseline loop | per-image PIL, {r['workers']} workers, two passes, "
                     f"broadcast NT-Xent | {r['images_per_s']:.1f} img/s |")
    for r in sec["end2end"]:
        lines.append(f"| end to end | the fastest compute configuration ({compute_label(r)}), "
                     f"{r['workers']} workers | {r['images_per_s']:.1f} img/s = "
                     f"{pct(r['fraction_of_compute'])} of compute only, "
                     f"{times(r['over_baseline'])} the baseline; ceiling "
                     f"{times(r['ceiling_over_baseline'])} |")
    return lines + ["", provenance(data, "bench_cpu.json")]


def bench_targets_table():
    """docs/performance.md: the CPU targets, as bench.py evaluated them in its runs."""
    lines = ["| target | configuration | measured | |", "|---|---|---|---|"]
    sources = []
    for name in ("bench_cpu.json", "bench_cpu_gpuaug.json"):
        data = load(name)
        sources.append(provenance(data, name))
        for t in data["targets"]:
            ceiling = f", ceiling {times(t['ceiling'])}" if t.get("ceiling") else ""
            lines.append(f"| {t['name']} | {t['config']} | {times(t['measured'])}{ceiling} | "
                         f"{'met' if t['met'] else '**not met**'} |")
    return lines + [""] + sources


def bench_gpuaug_table():
    """docs/performance.md: CPU workers against --gpu-aug (batched augmentation on the device)."""
    data, sec = bench("bench_cpu_gpuaug.json")
    lines = ["| section | input | img/s | |", "|---|---|---|---|"]
    for r in sec["loader"]:
        what = (f"`--gpu-aug` (decoded once in {r['decode_s']:.1f} s)"
                if r["pipeline"] == "gpu-aug" else workers(r["workers"]))
        lines.append(f"| loader | {what} | {r['images_per_s']:,.0f} | "
                     f"{times(r['over_resnet18_compute'])} what the trainer consumes |")
    for r in sec["end2end"]:
        what = "`--gpu-aug`" if r["gpu_aug"] else workers(r["workers"])
        lines.append(f"| end to end ({compute_label(r)}) | {what} | {r['images_per_s']:.1f} | "
                     f"{pct(r['fraction_of_compute'])} of compute only |")
    return lines + ["", provenance(data, "bench_cpu_gpuaug.json")]


def bench_grid_table():
    """docs/performance.md: compute only over archs and sizes, channels-last and contiguous."""
    data, sec = bench("bench_cpu_grid_fp32.json")
    lines = ["| arch | px | GFLOP/step | channels-last | contiguous | peak MB (channels-last) |",
             "|---|---|---|---|---|---|"]
    rows = rows_by(sec["compute"], "arch", "image_size", "channels_last")
    for arch, size in sorted({(a, s) for a, s, _ in rows}):
        last, cont = rows[arch, size, True], rows[arch, size, False]
        lines.append(f"| {arch} | {size} | {last['gflop_per_step']:,.0f} | "
                     f"{last['images_per_s']:.1f} img/s, {pct(last['fraction_of_matmul'])} of "
                     f"matmul | {cont['images_per_s']:.1f} img/s, "
                     f"{pct(cont['fraction_of_matmul'])} | {last['peak_memory_mb']:,.0f} |")
    matmul = sec["matmul"][0]
    return lines + ["", f"Batch {data['settings']['batch_size']}, matmul rate "
                    f"{matmul['tflops']:.3f} TFLOP/s in this run.", "",
                    provenance(data, "bench_cpu_grid_fp32.json")]


def bench_amp_table():
    """docs/performance.md: --amp precisions on the CPU, a training step and a matmul."""
    step_data, step = bench("bench_cpu_amp.json")
    mm_data, mm = bench("bench_cpu_matmul_amp.json")
    names = {"off": "float32", "bf16": "bfloat16", "fp16": "float16"}
    base_step = next(r for r in step["compute"] if r["amp"] == "off")["images_per_s"]
    matmul = {r["dtype"]: r for r in mm["matmul"]}
    base_mm = matmul["float32"]["tflops"]
    lines = [f"| precision | step, ResNet-18 at 32 px, batch {step_data['settings']['batch_size']} "
             f"| against float32 | matmul, n = {mm['matmul'][0]['size']} | against float32 |",
             "|---|---|---|---|---|"]
    for r in step["compute"]:
        name = names[r["amp"]]
        m = matmul.get(name)
        mm_cells = (f"{m['tflops']:.4f} TFLOP/s | {times(m['tflops'] / base_mm)}" if m
                    else "| ")
        lines.append(f"| {name} | {r['images_per_s']:.1f} img/s | "
                     f"{times(r['images_per_s'] / base_step)} | {mm_cells} |")
    return lines + ["", provenance(step_data, "bench_cpu_amp.json"),
                    provenance(mm_data, "bench_cpu_matmul_amp.json")]


def bench_constants():
    """bench.py's module-level constants (literal assignments), read without importing it (and
    torch): an object with one attribute per name."""
    import ast
    import types
    with open(os.path.join(REPO, "bench.py")) as f:
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
    """docs/performance.md: the targets bench.py evaluates, from its own constants (so the
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
            f"| CUDA, the fastest input of each arch and size | end to end ≥ "
            f"{pct(bench.E2E_OVER_COMPUTE)} of the compute-only img/s of the same configuration "
            f"and ≥ {bench.CUDA_E2E_OVER_BASELINE:g}× the baseline loop |",
            f"| CUDA, on an {' or '.join(bench.TARGET_GPU_NAMES)} | {gpu} |",
            "", "(From bench.py's constants.)"]


AUGMENT_METHODS = (("batched", "own torch ops, batched (`--gpu-aug`)"),
                   ("v2-per-view", "torchvision.transforms.v2, per view"),
                   ("pil", "per-image PIL pipeline (one worker)"), ("kornia", "kornia, batched"))


def bench_augment_table():
    """docs/performance.md: ways of producing the views of the simclr preset."""
    data, sec = bench("bench_cpu_augment.json")
    lines = ["| simclr preset, RGB | " + " | ".join(label for _, label in AUGMENT_METHODS) + " |",
             "|---|" + "---|" * len(AUGMENT_METHODS)]
    by = rows_by(sec["augment"], "views", "image_size", "blur", "method")
    for views, size, blur in dict.fromkeys((r["views"], r["image_size"], r["blur"])
                                           for r in sec["augment"]):
        cells = []
        for method, _ in AUGMENT_METHODS:
            r = by[views, size, blur, method]
            cells.append(f"{r['ms']:,.0f} ms" if "ms" in r else r["skipped"])
        lines.append(f"| {views} views, {size} px{', blur' if blur else ''} | " +
                     " | ".join(cells) + " |")
    kornia = next((r["version"] for r in sec["augment"] if r["method"] == "kornia"
                   and r.get("version")), None)
    return lines + ["", "Each figure is the least of 8 timed calls after an untimed one (the "
                    "results file also has their medians)" +
                    (f"; kornia {kornia}, installed for this measurement only." if kornia
                     else "."), "",
                    provenance(data, "bench_cpu_augment.json")]


def recorded(name):
    """A scripts/record.py file of results/docs/: (its data, its newest run)."""
    data = load(os.path.join("docs", f"{name}.json"))
    return data, data["runs"][-1]


def output(run, suffix):
    """The collected file of `run` whose path ends with `suffix`."""
    return next(v for k, v in run["outputs"].items() if k.endswith(suffix))


def wall_range(data):
    """The whole command's wall time: one run's seconds, or the range over the recorded runs."""
    walls = sorted(r["wall_s"] for r in data["runs"])
    if len(walls) == 1:
        return f"{walls[0]:,.0f} s"
    return f"{walls[0]:,.0f} to {walls[-1]:,.0f} s ({len(walls)} runs)"


def recorded_provenance(names):
    """Source lines of scripts/record.py files, one per (commit, machine, date) they share."""
    groups = {}
    for name in names:
        data, run = recorded(name)
        machine = run["machine"]
        load_avg = run["load_average"]
        key = (run["git_commit"][:7] + ("+changes" if run["uncommitted_changes"] else ""),
               f"{machine['cpu']}, {machine['cpu_count']} cores"
               + (f", {', '.join(machine['gpus'])}" if machine["gpus"] else ""),
               run["date"][:10])
        groups.setdefault(key, []).append((name, load_avg))
    lines = []
    for (commit, machine, date), members in groups.items():
        loads = [v for _, load_avg in members for v in load_avg.values()]
        files = ", ".join(f"`results/docs/{name}.json`" for name, _ in members)
        lines.append(f"- source: {files}, written by `scripts/record.py` "
                     f"(`bash scripts/measure_docs.sh`) at commit {commit} on {machine} "
                     f"({date}; load average {min(loads):.1f} to {max(loads):.1f})")
    return lines


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
              (": three CPU epochs learn features that a probe with thousands of labels can "
               "use, not yet ones that 10 labels suffice for." if k10 < k10_random else ".")]
    return lines + [""] + recorded_provenance(DATA_SOURCES)


def feature_analysis_table():
    """docs/evaluation.md: kNN accuracy and PCA of h and z on the demo model."""
    data, run = recorded("feature_analysis")
    a = output(run, "analysis.json")
    probe = demo_runs()[-1]["test_accuracy"]["linear_eval"]
    pca = a["pca_explained_variance"]
    lines = ["| representation | kNN accuracy (k = 20, cosine) | PCA: variance of the first two "
             "axes |", "|---|---|---|"]
    for rep in ("h", "z"):
        ratios = pca[rep]
        lines.append(f"| {rep} ({a['feature_dims'][rep]}-d) | {100 * a['knn'][rep]:.1f} % | "
                     f"{100 * ratios[0]:.1f} % and {100 * ratios[1]:.1f} % |")
    return lines + ["", f"The linear probe on h of the same model: {100 * probe:.1f} % "
                    f"(`results/demo.json`). The whole command took {wall_range(data)} on "
                    f"{a['n_train']:,} train and {a['n_test']:,} test images.", ""] + \
        recorded_provenance(["feature_analysis"])


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
    return lines + [""] + recorded_provenance(["features_embed", "features_export"])


CHUNKS = ("none", "64", "32", "16")


def chunk_table():
    """docs/distributed.md: --chunk-size against the unchunked step, one epoch of main.py."""
    lines = ["| `--chunk-size` | img/s | peak memory (process) | loss of the epoch |",
             "|---|---|---|---|"]
    for chunk in CHUNKS:
        data, run = recorded(f"chunk_{chunk}")
        r = output(run, "run.json")
        lines.append(f"| {'none (one pass)' if chunk == 'none' else chunk} | "
                     f"{r['images_per_s']:.1f} | {r['peak_memory_mb']:,.0f} MB | "
                     f"{r['epoch_losses'][-1]:.4f} |")
    return lines + [""] + recorded_provenance([f"chunk_{c}" for c in CHUNKS])


SEGMENT_RUNS = (
    ("fcn_e10", "**SimCLR encoder fine-tuned (the defaults)**"),
    ("fcn_e10_baseline", "same network from random weights (`--baseline`)"),
    ("fcn_e10_lr3e-4", "SimCLR encoder fine-tuned, `--lr 3e-4`"),
    ("fcn_e5", "SimCLR encoder fine-tuned"),
    ("fcn_e5_baseline", "same network from random weights (`--baseline`)"),
    ("fcn_e5_freeze", "SimCLR encoder frozen (`--freeze`)"),
    ("fcn_e5_baseline_freeze", "random encoder frozen (`--baseline --freeze`)"),
    ("unet_e5", "`--decoder unet`, SimCLR encoder fine-tuned"),
    ("unet_e5_baseline", "`--decoder unet`, from random weights"),
    ("unet_e5_freeze", "`--decoder unet`, SimCLR encoder frozen"))


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
        f"- **Decoder.** FCN against U-Net, fine-tuned for 5 epochs: "
        f"{compare(miou['fcn_e5'], miou['unet_e5'])}.",
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
        recorded_provenance([f"segment_{n}" for n, _ in SEGMENT_RUNS])


METHOD_NAMES = {"linear": "SimCLR, linear probe on h", "finetune": "SimCLR, fine-tuned",
                "frozen": "SimCLR, frozen encoder, trained head",
                "baseline": "supervised from scratch, same network and recipe"}


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
        reading.append(f"- **{b:g} labels per class:** best {METHOD_NAMES.get(best, best)}; "
                       f"linear probe against scratch "
                       f"{compare(by['linear', b]['accuracy_mean'], by['baseline', b]['accuracy_mean'])}"
                       f", fine-tuned against scratch "
                       f"{compare(by['finetune', b]['accuracy_mean'], by['baseline', b]['accuracy_mean'])}.")
    lines += ["", *reading]
    return lines + ["", f"AUROC (one-vs-rest, mean over the seeds) for {methods}: {auroc}. "
                    f"The whole sweep took {wall_range(data)}.", ""] + \
        recorded_provenance(["label_efficiency"])


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
    demo = demo_runs()[-1]
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
        recorded_provenance(names + ["defaults_imagenet_e15_random"]) + \
        [provenance(demo, "demo.json")]


TABLES = {"startup": startup_table, "startup-scan": startup_scan_table,
          "startup-memory": startup_memory_table, "demo": demo_table,
          "bench-cpu": bench_cpu_table, "bench-targets": bench_targets_table,
          "bench-gpuaug": bench_gpuaug_table, "bench-grid": bench_grid_table,
          "bench-amp": bench_amp_table, "bench-augment": bench_augment_table,
          "targets": target_settings_table, "data-sources": data_sources_table,
          "feature-analysis": feature_analysis_table, "embed-export": embed_export_table,
          "chunk": chunk_table, "segmentation": segmentation_table,
          "label-efficiency": label_efficiency_table, "defaults": defaults_table}


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
        print(f"stale results tables in {', '.join(stale)}: run python scripts/results_tables.py",
              file=sys.stderr)
        return 1
    print(f"{count} results tables {'checked' if args.check else 'written'}"
          f"{'' if args.check else f' ({len(stale)} file(s) changed)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
