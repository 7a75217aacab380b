"""tools/bench_grid.py --sections startup: start-up time and memory against the number of images.

    startup   main.py on a path list of N entries (repeats of a few thousand real files): the
              seconds from its first output line (printed after the imports) to the first
              training step (its first --print-freq 1 line, where the checkout prints one)
              and to the end of a one-step run (--samples 64 -bs 64 --epochs 1 -nw 0), on
              the first start (no index) and on a start with the index kept (the same
              RESPATH, --epochs 2: a resume); --startup-repo DIR runs another checkout's
              main.py (e.g. an older commit, for before/after tables)
    scan      the first scan of a folder of N files (hard links in 100 class folders): the
              bare listing (os.scandir, no stat) against utils/file_index.scan_folder, files/s
    memory    the resident memory of the main process and the resident, proportional and
              private memory of each of 2 DataLoader workers after one pass over N entries
              that reads every path and label, with the index held as numpy arrays (a
              PathTable loaded as a kept index is) and as Python lists of str and int (the
              layout before it)
"""
import os
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

from utils.data import ImageList, PathTable, make_loader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def write_link_folder(folder, sources, n, classes=100):
    """`n` hard links to the files `sources` (in turn, so none nears the file system's limit
    of links per file) in `classes` class folders of `folder`."""
    for c in range(classes):
        os.makedirs(os.path.join(folder, f"c{c:03d}"), exist_ok=True)
    for i in range(n):
        os.link(sources[i % len(sources)],
                os.path.join(folder, f"c{i % classes:03d}", f"{i:07d}.png"))


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
    """Rows {entries, method, seconds, files_per_s} for folders of hard links to the files of
    bench_startup_times (WORKDIR/files)."""
    from utils.file_index import scan_folder
    files = os.path.join(workdir, "files")
    sources = [os.path.join(files, name) for name in sorted(os.listdir(files))]
    rows = []
    for n in sizes:
        folder = os.path.join(workdir, f"folder_{n}")
        write_link_folder(folder, sources, n)
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
    """{rss, pss, private} MB of process `pid` from /proc/PID/smaps_rollup (Linux): resident,
    proportional (shared pages divided among the processes sharing them) and private."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0].rstrip(":")] = int(parts[1])
    private = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return {"rss": fields.get("Rss", 0) / 1024, "pss": fields.get("Pss", 0) / 1024,
            "private": private / 1024}


def first_of_batch(pids):
    return pids[0]


class Batches:
    """Batches of consecutive indices 0..n-1, made as they are asked for (a list of every
    index would itself be n Python ints in the main process)."""

    def __init__(self, n, batch):
        self.n, self.batch = n, batch

    def __len__(self):
        return -(-self.n // self.batch)

    def __iter__(self):
        for start in range(0, self.n, self.batch):
            yield list(range(start, min(start + self.batch, self.n)))


def worker_memory(images, workers=2, batch=4096):
    """{main_rss_mb, worker_rss_mb, worker_pss_mb, worker_private_mb}: after one pass over
    every entry of `images` by `workers` persistent DataLoader workers (max over workers)."""
    loader = make_loader(TouchEveryEntry(images), batch_sampler=Batches(len(images.paths), batch),
                         num_workers=workers, collate_fn=first_of_batch)
    pids = set()
    iterator = iter(loader)
    for pid in iterator:
        pids.add(pid)
    stats = [memory_mb(pid) for pid in sorted(pids)]
    del iterator, loader
    return {"main_rss_mb": round(memory_mb(os.getpid())["rss"], 1),
            **{f"worker_{k}_mb": round(max(s[k] for s in stats), 1)
               for k in ("rss", "pss", "private")}}


def index_names(n):
    """`n` paths like 'class_017/0001234.png' (100 classes)."""
    return [f"class_{i % 100:03d}/{i:07d}.png" for i in range(n)]


ROOT = "/data/archive/pathology"


def bench_memory(sizes, workdir):
    """Rows {entries, layout, index_mb, main_rss_mb, worker_*_mb}, each measured in a fresh
    process (python -c), where the index is loaded as main.py loads a kept index (np.load of
    the arrays, no str object per entry), or built as Python lists as before the index."""
    import json
    rows = []
    for n in sizes:
        table = PathTable.from_strings(index_names(n), ROOT)
        index_file = os.path.join(workdir, f"memory_{n}.npz")
        np.savez(index_file, blob=table.blob, starts=table.starts, ends=table.ends,
                 labels=np.arange(n) % 100)
        del table
        for layout in ("numpy", "lists"):
            code = (f"import json, sys; sys.path.insert(0, {REPO!r}); "
                    f"from tools.startup_bench import memory_row; "
                    f"print(json.dumps(memory_row({n}, {layout!r}, {index_file!r})))")
            out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                 text=True).stdout.strip().splitlines()[-1]
            rows.append(json.loads(out))
    return rows


def memory_row(n, layout, index_file):
    """One memory row (bench_memory), in this process."""
    if layout == "numpy":
        with np.load(index_file) as data:
            images = ImageList(PathTable(data["blob"], data["starts"], data["ends"], ROOT),
                               data["labels"], [str(c) for c in range(100)])
        index_mb = (images.paths.nbytes + images.labels.nbytes) / 2 ** 20
    else:
        images = ListImages([os.path.join(ROOT, p) for p in index_names(n)],
                            (np.arange(n) % 100).tolist())
        index_mb = (sum(sys.getsizeof(p) for p in images.paths) + sys.getsizeof(images.paths)
                    + sys.getsizeof(images.labels)) / 2 ** 20
    return {"entries": n, "layout": "numpy arrays (PathTable)" if layout == "numpy" else
            "Python lists (before)", "index_mb": round(index_mb, 1), **worker_memory(images)}


def bench_startup(sizes, workdir, repo):
    """{"startup": rows, "scan": rows, "memory": rows} for `sizes` (numbers of entries)."""
    return {"startup": bench_startup_times(sizes, workdir, repo),
            "scan": bench_scan(sizes, workdir),
            "memory": bench_memory(sizes, workdir)}
