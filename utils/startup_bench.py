"""bench.py --sections startup: start-up time and memory against the number of images.

    startup   main.py on a path list of N entries (repeats of a few thousand real files): the
              seconds from its first output line (printed after the imports) to the first
              training step (its first --print-freq 1 line, where the checkout prints one)
              and to the end of a one-step run (--samples 64 -bs 64 --epochs 1 -nw 0), on
              the first start (no index) and on a start with the index kept (the same
              RESPATH, --epochs 2: a resume); --startup-repo DIR runs another checkout's
              main.py (e.g. an older commit, for before/after tables)
    scan      the first scan of a folder of N files (hard links in 100 class folders): the
              bare listing (os.scandir, no stat) against utils/file_index.scan_folder, files/s
    memory    the resident and private memory of the main process and of each of 2
              DataLoader workers after one pass over N entries that reads every path and
              label, with the index held as numpy arrays (PathTable, as the datasets hold it)
              and as Python lists of str and int (the layout before it)
"""
import os
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

from utils.data import ImageList, PathTable, make_loader

REAL_FILES = 2560


def one_step_args(epochs):
    """main.py flags of a run of one step per epoch on 64 of the images."""
    return ["--samples", "64", "-bs", "64", "--epochs", str(epochs), "-nw", "0",
            "--image-size", "16", "--proj-dims", "32", "16"]


def write_real_files(folder, n=REAL_FILES, size=28):
    """`n` small grayscale PNGs (noise, seeded) in `folder`; their names, relative."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        name = f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(
            os.path.join(folder, name))
        names.append(name)
    return names


def write_path_list(path, files, n):
    """A path list of `n` entries cycling through `files` (relative to the list's folder)."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(f"files/{files[i % len(files)]}\n")
    return path


def timed_main(repo, args):
    """Seconds from launch to (the first line, the first progress line or None, the end) of
    `python REPO/main.py ARGS`, stdout read line by line as it comes. main.py's first line
    (the arguments) follows its imports, so the times after it exclude the import time."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tic = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.join(repo, "main.py"), *args], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first_line = first_step = None
    for line in proc.stdout:
        now = time.perf_counter() - tic
        first_line = now if first_line is None else first_line
        if first_step is None and " step 1/" in line:
            first_step = now
    proc.wait()
    end = time.perf_counter() - tic
    if proc.returncode:
        raise RuntimeError(f"main.py failed: {proc.stderr.read()[-500:]}")
    return first_line, first_step, end


def checkout_commit(repo):
    try:
        return subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def supports_print_freq(repo):
    with open(os.path.join(repo, "utils", "cli.py")) as f:
        return "--print-freq" in f.read()


def bench_startup_times(sizes, workdir, repo):
    """Rows {entries, start, commit, import_s, to_first_step_s, one_step_run_s} for path lists
    of each size: the first start (no index) and a resume with the index kept."""
    files = write_real_files(os.path.join(workdir, "files"))
    extra = ["--print-freq", "1"] if supports_print_freq(repo) else []
    rows, commit = [], checkout_commit(repo)
    for n in sizes:
        listing = write_path_list(os.path.join(workdir, f"list_{n}.txt"), files, n)
        old = time.time() - 3600  # older than the index's stamp margin
        os.utime(listing, (old, old))
        respath = os.path.join(workdir, f"run_{n}_{commit}")
        for start, epochs in (("first", 1), ("index kept (resume)", 2)):
            first_line, first_step, end = timed_main(
                repo, [listing, respath, *one_step_args(epochs), *extra])
            rows.append({"entries": n, "start": start, "commit": commit,
                         "import_s": round(first_line, 2),
                         "to_first_step_s": (None if first_step is None else
                                             round(first_step - first_line, 2)),
                         "one_step_run_s": round(end - first_line, 2)})
            print(f"  startup {n} entries, {start}: {end - first_line:.1f} s after the imports",
                  flush=True)
    return rows


def write_link_folder(folder, source, n, classes=100):
    """`n` hard links to the file `source` in `classes` class folders of `folder`."""
    for c in range(classes):
        os.makedirs(os.path.join(folder, f"c{c:03d}"), exist_ok=True)
    for i in range(n):
        os.link(source, os.path.join(folder, f"c{i % classes:03d}", f"{i:07d}.png"))


def bare_listing(folder):
    """Entries below `folder` counted with os.scandir alone (the file system's listing)."""
    count = 0
    with os.scandir(folder) as it:
        for entry in it:
            if entry.is_dir():
                count += bare_listing(entry.path)
            else:
                count += 1
    return count


def bench_scan(sizes, workdir):
    """Rows {entries, method, seconds, files_per_s} for folders of hard links."""
    from utils.file_index import scan_folder
    source = os.path.join(workdir, "one.png")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(source)
    rows = []
    for n in sizes:
        folder = os.path.join(workdir, f"folder_{n}")
        write_link_folder(folder, source, n)
        for method, fn in (("os.scandir (listing only)", bare_listing),
                           ("scan_folder (listing + stat)", scan_folder)):
            tic = time.perf_counter()
            fn(folder)
            seconds = time.perf_counter() - tic
            rows.append({"entries": n, "method": method, "seconds": round(seconds, 3),
                         "files_per_s": round(n / seconds)})
    return rows


class ListImages:
    """The layout before the index: paths and labels as Python lists."""

    def __init__(self, paths, labels):
        self.paths, self.labels = paths, labels


class TouchEveryEntry(torch.utils.data.Dataset):
    """Key -> this worker's pid, after reading the entry's path and label (what a dataset's
    __getitem__ does before it opens the file)."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images.paths)

    def __getitem__(self, index):
        path, label = self.images.paths[index], self.images.labels[index]
        return os.getpid() + 0 * (len(path) + int(label))


def memory_mb(pid):
    """(resident MB, private MB) of process `pid` from /proc/PID/smaps_rollup (Linux)."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0].rstrip(":")] = int(parts[1])
    private = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return fields.get("Rss", 0) / 1024, private / 1024


def first_of_batch(pids):
    return pids[0]


def worker_memory(images, workers=2, batch=4096):
    """{main_rss_mb, worker_rss_mb, worker_private_mb}: after one pass over every entry of
    `images` by `workers` persistent DataLoader workers (max over workers)."""
    n = len(images.paths)
    batches = [list(range(s, min(s + batch, n))) for s in range(0, n, batch)]
    loader = make_loader(TouchEveryEntry(images), batch_sampler=batches, num_workers=workers,
                         collate_fn=first_of_batch)
    pids = set()
    iterator = iter(loader)
    for pid in iterator:
        pids.add(pid)
    stats = [memory_mb(pid) for pid in sorted(pids)]
    del iterator, loader
    return {"main_rss_mb": round(memory_mb(os.getpid())[0], 1),
            "worker_rss_mb": round(max(s[0] for s in stats), 1),
            "worker_private_mb": round(max(s[1] for s in stats), 1)}


def bench_memory(sizes, workdir):
    """Rows {entries, layout, index_mb, main_rss_mb, worker_rss_mb, worker_private_mb}, each
    measured in a fresh process (python -c) so one layout's memory does not stay in the other's."""
    rows = []
    for n in sizes:
        for layout in ("numpy", "lists"):
            code = (f"import json, sys; sys.path.insert(0, {os.getcwd()!r}); "
                    f"from utils.startup_bench import memory_row; "
                    f"print(json.dumps(memory_row({n}, {layout!r})))")
            out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                 text=True).stdout.strip().splitlines()[-1]
            import json
            rows.append(json.loads(out))
    return rows


def memory_row(n, layout):
    """One memory row (bench_memory), in this process: an index of `n` paths like
    'class_017/0001234.png' under a long root, labels of 100 classes."""
    names = [f"class_{i % 100:03d}/{i:07d}.png" for i in range(n)]
    labels = np.arange(n) % 100
    if layout == "numpy":
        images = ImageList(PathTable.from_strings(names, "/data/archive/pathology"), labels,
                           [str(c) for c in range(100)])
        index_mb = (images.paths.nbytes + images.labels.nbytes) / 2 ** 20
    else:
        images = ListImages([os.path.join("/data/archive/pathology", p) for p in names],
                            labels.tolist())
        index_mb = (sum(sys.getsizeof(p) for p in images.paths) + sys.getsizeof(images.paths)
                    + sys.getsizeof(images.labels)) / 2 ** 20
    del names, labels
    import gc
    gc.collect()
    return {"entries": n, "layout": "numpy arrays (PathTable)" if layout == "numpy" else
            "Python lists (before)", "index_mb": round(index_mb, 1), **worker_memory(images)}


def bench_startup(sizes, workdir, repo):
    """{"startup": rows, "scan": rows, "memory": rows} for `sizes` (numbers of entries)."""
    return {"startup": bench_startup_times(sizes, workdir, repo),
            "scan": bench_scan(sizes, workdir),
            "memory": bench_memory(sizes, workdir)}
