"""Every CUDA path of the toolkit within 8 minutes on one GPU machine: one pass/fail line per
check, a summary of what passed, failed and was skipped, and a JSON with the device, the
versions and each check's figures.

    python tools/gpu_check.py                          # on a GPU machine: the checks in order
    python tools/gpu_check.py --budget 300             # 5 minutes: the last checks skip
    python tools/gpu_check.py --only main kill ddp     # some checks (names, budgets: --list)
    python tools/gpu_check.py --device cpu --data DIR  # the CPU-runnable checks (CI runs some)

Without a visible CUDA device it stops at once (exit status 2) unless given --device cpu.

Checks, most valuable first (each runs the scripts through their real command lines):
    main        main.py -c, the default path (on CUDA the views made on the device, as
                main.py chooses), for 1 epoch and then resumed to 2: finite losses, plain
                checkpoint keys, the amp mode and the input path in run.json
    kill        main.py killed (SIGKILL) after its first epoch's checkpoint, resumed to the end
    ddp         the multi-process path: N processes, global BatchNorm, one writer. N > 1 GPUs:
                --multiple_gpus and torchrun --nproc_per_node=N, NCCL. 1 GPU: --multiple_gpus
                runs one process (no DDP, and the line says so), and torchrun
                --nproc_per_node=2 runs 2 processes sharing the GPU through gloo on CUDA
                tensors (SIMCLR_TOOLKIT_SHARE_GPUS=1, utils/distributed.py). CPU: torchrun, 2
                gloo processes
    sync        main.py --sync-debug with CPU workers, --gpu-aug and --gpu-decode, gray and RGB,
                and the other presets in workers: no host-GPU synchronisation inside a step
    speed       main.py --cpu-aug (views in CPU workers), --gpu-decode, --amp fp16 and
                --compile, each for 1 epoch and then resumed to 2 (on the CPU, where the
                workers are the default: --gpu-aug and --gpu-decode)
    scripts     linear_evaluation.py, finetune.py, segment.py and embed.py once each
    cuda_tests  pytest tests/test_cuda.py: -c headline commands, bf16/fp16 dtypes, fp16 resume
                with its scaler, --gpu-aug determinism on the device
    bench       bench.py --quick on the device
Time: every check has a budget in seconds (--list shows them, on one GPU and on the CPU).
--budget S (default 480) is the whole run's: a check starts only while at least its own
budget is left, else it is reported "skipped (budget)"; a command still running at the end of
its check's budget is stopped and the check fails, saying so. The runs of one check that do
not depend on each other go side by side where there are cores for them (one per 4 cores).
Data: at most 2,048 training images (48 with --device cpu) of the demo data or --data, fewer
where it has fewer, and a quarter as many test images, spread over its files; the same again
as tinted RGB JPEGs. Needs no network: demo_data/ is made by make_demo_data.py (Debian's
Fashion-MNIST, else scikit-learn's digits) when absent. Exit status 1 when a check fails, 2
for bad input (no CUDA without --device cpu, --data without train/).
"""
import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from utils.cli import environment_info, run_main  # noqa: E402
from utils.data import is_image_file  # noqa: E402
from utils.distributed import SHARE_GPUS_ENV  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.fileio import json_dump  # noqa: E402


@dataclass(frozen=True)
class Check:
    """One check: its name, its budget in seconds on one GPU and on the CPU (None: it needs
    CUDA and is skipped on the CPU), and what it runs."""
    name: str
    cuda_s: int
    cpu_s: int | None
    what: str

    def budget(self, device):
        """Seconds this check may take on `device` ('cuda' or 'cpu'); 0 where it does not
        run."""
        return self.cuda_s if device == "cuda" else (self.cpu_s or 0)


CHECKS = (
    Check("main", 75, 90, "main.py -c default path, 1 epoch, resumed to 2"),
    Check("kill", 90, 120, "main.py SIGKILLed after its first checkpoint, resumed"),
    Check("ddp", 120, 120, "--multiple_gpus and torchrun: processes, global BatchNorm"),
    Check("sync", 120, None, "--sync-debug: no host-GPU sync inside a step, 10 runs"),
    Check("speed", 180, 120, "--cpu-aug, --gpu-decode, fp16, --compile, each resumed"),
    Check("scripts", 90, 150, "linear_evaluation, finetune, segment, embed"),
    Check("cuda_tests", 120, None, "pytest tests/test_cuda.py"),
    Check("bench", 90, 90, "bench.py --quick on the device"),
)
CHECK_NAMES = tuple(c.name for c in CHECKS)
WANTED_IMAGES = {"cuda": 2048, "cpu": 48}  # training images at most; test: a quarter
KILL_EPOCHS = 12  # epochs of the kill check's run (killed after the first)
SPEED_PATHS = {  # main.py's paths other than its default, the longest first (it starts first)
    "cuda": {"compile": ["--compile"], "fp16": ["--amp", "fp16"], "cpu-aug": ["--cpu-aug"],
             "gpu-decode": ["--gpu-decode"]},
    "cpu": {"gpu-aug": ["--gpu-aug"], "gpu-decode": ["--gpu-decode"]}}  # no fp16 autocast on
# the CPU, and compiling there is bench.py's to time
SKIPPED_BUDGET = "skipped (budget)"


class CheckFailed(Exception):
    """A check's verdict: what was expected and what was seen."""


@dataclass
class Setup:
    """What every check needs: device ('cuda' or 'cpu'), the data folders (gray copies and
    RGB JPEGs), the scratch folder, main.py's sizing flags for this device, the GPU count,
    how many runs may go side by side, and the running check's budget and deadline
    (time.monotonic())."""
    device: str
    data: str
    rgb_data: str
    work: str
    sizing: list
    gpus: int
    width: int
    budget: int = 0
    deadline: float = float("inf")

    @property
    def device_flags(self):
        return ["-c"] if self.device == "cuda" else []

    def seconds_left(self):
        """Seconds left of the running check's budget; CheckFailed when none are."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise CheckFailed(f"ran past its budget of {self.budget} s")
        return left


def call(setup, command, env=None):
    """Run `command` from the repository root in its own process group, within the running
    check's budget: (exit status, stdout, stderr). At the end of the budget the whole group is
    stopped and CheckFailed says so."""
    timeout = setup.seconds_left()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        script = next((os.path.basename(c) for c in command if c.endswith(".py")), command[0])
        raise CheckFailed(f"ran past its budget of {setup.budget} s: {script} stopped") \
            from None
    except BaseException:
        stop(proc)
        raise
    return proc.returncode, out, err


def stop(proc):
    """End `proc` and its process group: SIGTERM first (torchrun then stops its workers, which
    run in sessions of their own), SIGKILL 5 s later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def run(setup, script, *args, launcher=None, env=None):
    """Run a repository script (or `launcher` + script) within the check's budget; returns its
    stdout, or raises CheckFailed with the end of its stderr when it fails."""
    command = [sys.executable, *(launcher or []), os.path.join(REPO, script), *map(str, args)]
    status, out, err = call(setup, command, env)
    if status != 0:
        tail = " | ".join(err.strip().splitlines()[-3:])
        raise CheckFailed(f"{script} {' '.join(map(str, args))} exited {status}: {tail}")
    return out


def side_by_side(setup, fn, jobs):
    """[fn(job) for job in jobs], setup.width of them at a time (each job runs processes of
    its own); the first CheckFailed stops the jobs not yet started."""
    pool = ThreadPoolExecutor(max_workers=setup.width)
    try:
        return list(pool.map(fn, jobs))
    finally:
        pool.shutdown(cancel_futures=True)


def read_run(respath):
    """(run.json, checkpoint) of the main.py run in `respath`."""
    with open(os.path.join(respath, "run.json")) as f:
        info = json.load(f)
    ckpt = torch.load(os.path.join(respath, "checkpoint.pth"), map_location="cpu",
                      weights_only=True)
    return info, ckpt


def pretrain(setup, respath, *flags, epochs=1, data=None):
    """main.py on the check data for `epochs`; returns (stdout, run.json, checkpoint)."""
    out = run(setup, "main.py", data or setup.data, respath, "--epochs", epochs, *setup.sizing,
              *setup.device_flags, *flags)
    return (out, *read_run(respath))


def check_run_outputs(info, ckpt, epochs, what):
    """Finite losses for every step of `epochs`, plain keys: CheckFailed otherwise."""
    losses = np.asarray(ckpt["history"]["series"]["loss"], dtype=np.float64)
    expected = epochs * info["steps_per_epoch"]
    if ckpt["step"] != expected or len(losses) != expected:
        raise CheckFailed(f"{what}: step {ckpt['step']}, {len(losses)} losses; expected "
                          f"{expected}")
    if not np.isfinite(losses).all():
        raise CheckFailed(f"{what}: {int((~np.isfinite(losses)).sum())} non-finite losses")
    wrapped = [k for k in ckpt["model"] if k.startswith(("module.", "_orig_mod."))]
    if wrapped:
        raise CheckFailed(f"{what}: wrapped keys in the checkpoint, e.g. {wrapped[0]}")
    return float(losses[-info["steps_per_epoch"]:].mean())


def epoch_and_resume(setup, name, flags):
    """main.py with `flags` for 1 epoch, then resumed to 2: every step's loss finite, plain
    keys, the amp mode and loss scaler the flags ask for. Returns its figures."""
    respath = os.path.join(setup.work, "main", name)
    data = setup.rgb_data if "--gpu-decode" in flags else setup.data
    pretrain(setup, respath, *flags, data=data)
    out, info, ckpt = pretrain(setup, respath, *flags, epochs=2, data=data)
    if "resuming" not in out:
        raise CheckFailed(f"{name}: the second run did not resume")
    loss = check_run_outputs(info, ckpt, 2, name)
    amp = info["speed"]["amp"]
    if "fp16" in flags and amp != "fp16":
        raise CheckFailed(f"{name}: run.json says amp {amp}")
    if "scaler" in ckpt and (ckpt["scaler"] is not None) != (amp == "fp16"):
        raise CheckFailed(f"{name}: loss scaler state {ckpt['scaler'] is not None} with amp "
                          f"{amp}")
    views = info["augmentation"].get("path", info["augmentation"]["on"]).split(" (")[0]
    return (f"{name} (amp {amp}, views made {views}) loss {loss:.3f} "
            f"{info.get('images_per_s')} img/s")


def check_main(setup):
    """main.py's default path (what `python main.py DATA OUT -c` runs), resumed."""
    return epoch_and_resume(setup, "default", [])


def check_speed(setup):
    """The other speed paths of main.py, each resumed, side by side."""
    paths = SPEED_PATHS[setup.device]
    figures = side_by_side(setup, lambda n: epoch_and_resume(setup, n, paths[n]), list(paths))
    together = f" ({setup.width} at a time: img/s shared)" if setup.width > 1 else ""
    return "; ".join(figures) + together


def check_kill(setup):
    """SIGKILL of main.py and its workers after the first epoch's checkpoint, then resume."""
    respath = os.path.join(setup.work, "kill")
    checkpoint = os.path.join(respath, "checkpoint.pth")
    command = [sys.executable, os.path.join(REPO, "main.py"), setup.data, respath, "--epochs",
               str(KILL_EPOCHS), *setup.sizing, *setup.device_flags]
    log = os.path.join(setup.work, "kill_stderr.txt")
    with open(log, "w") as stderr:
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True)
        try:
            wait_for_checkpoint(setup, proc, checkpoint, log)
            time.sleep(0.3)  # into the second epoch
            if proc.poll() is not None:
                raise CheckFailed("main.py finished before it could be killed")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    killed_at = torch.load(checkpoint, map_location="cpu", weights_only=True)["step"]
    out, info, ckpt = pretrain(setup, respath, epochs=KILL_EPOCHS)
    if "resuming" not in out:
        raise CheckFailed("the run after SIGKILL did not resume")
    check_run_outputs(info, ckpt, KILL_EPOCHS, "resumed after SIGKILL")
    return f"killed with the checkpoint at step {killed_at}, resumed to step {ckpt['step']}"


def wait_for_checkpoint(setup, proc, checkpoint, log):
    """Return once `checkpoint` exists; CheckFailed if `proc` exits first or the budget ends."""
    while not os.path.exists(checkpoint):
        if proc.poll() is not None:
            with open(log) as f:
                tail = " | ".join(f.read().strip().splitlines()[-3:])
            raise CheckFailed(f"main.py exited {proc.returncode} before its first "
                              f"checkpoint: {tail}")
        setup.seconds_left()
        time.sleep(0.2)


def check_ddp(setup):
    """The multi-process path of main.py with as many processes as the machine allows."""
    if setup.device == "cpu":
        launches = [("torchrun", 2, "gloo on the CPU")]
    elif setup.gpus == 1:
        launches = [("--multiple_gpus", 1, "one GPU"),
                    ("torchrun", 2, "2 processes sharing 1 GPU, gloo on CUDA tensors")]
    else:
        launches = [(name, setup.gpus, "NCCL") for name in ("--multiple_gpus", "torchrun")]
    return "; ".join(side_by_side(setup, lambda launch: ddp_run(setup, *launch), launches))


def ddp_run(setup, name, n, how):
    """main.py for 1 epoch launched by `name` ('torchrun' or '--multiple_gpus') as `n`
    processes: their count, global BatchNorm for n > 1, the device, one 'done:' line."""
    respath = os.path.join(setup.work, "ddp", name.strip("-"))
    launcher = (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
                if name == "torchrun" else None)
    flags = ["--multiple_gpus"] if launcher is None else []
    shared = setup.device == "cuda" and n > setup.gpus
    out = run(setup, "main.py", setup.data, respath, "--epochs", 1, *setup.sizing,
              *setup.device_flags, *flags, launcher=launcher,
              env={SHARE_GPUS_ENV: "1"} if shared else None)
    info, ckpt = read_run(respath)
    check_run_outputs(info, ckpt, 1, name)
    if info["processes"] != n:
        raise CheckFailed(f"{name}: {info['processes']} processes, expected {n}")
    if n > 1 and not info["sync_bn"]:
        raise CheckFailed(f"{name}: no global BatchNorm with {n} processes")
    if not info["environment"]["device"].startswith(setup.device):
        raise CheckFailed(f"{name}: ran on {info['environment']['device']}")
    done = [line for line in out.splitlines() if line.startswith("done:")]
    if len(done) != 1:
        raise CheckFailed(f"{name}: {len(done)} 'done:' lines (one writer expected)")
    if n == 1:
        return f"1 GPU: {name} runs one process; DDP not exercised by NCCL"
    return (f"{name}: {n} process(es) ({how}), DDP, global BatchNorm {info['sync_bn']}, "
            f"{info.get('images_per_s')} img/s")


def check_sync(setup):
    """--sync-debug over the real loop: zero synchronisations inside the audited steps."""
    runs = [(data, name, flags) for data in ("gray", "rgb")
            for name, flags in (("workers", ["--cpu-aug"]), ("gpu-aug", ["--gpu-aug"]),
                                ("gpu-decode", ["--gpu-decode"]))]
    runs += [("gray", f"workers --aug {aug}", ["--aug", aug])
             for aug in ("natural", "novel", "simple", "greyscale")]
    found = [f for f in side_by_side(setup, lambda r: sync_audit(setup, *r), runs) if f]
    if found:
        raise CheckFailed("synchronisations inside steps: " + " | ".join(found))
    return f"0 synchronisations in {len(runs)} runs"


def sync_audit(setup, data, name, flags):
    """One main.py --sync-debug run: '' without synchronisations, else where they were."""
    folder = setup.data if data == "gray" else setup.rgb_data
    respath = os.path.join(setup.work, "sync", f"{data}-{name}".replace(" ", "_"))
    out, _, _ = pretrain(setup, respath, "--sync-debug", *flags, data=folder)
    summary = [line for line in out.splitlines() if line.startswith("sync-debug:")]
    if not summary:
        raise CheckFailed(f"{data} {name}: no sync-debug summary printed")
    count = int(summary[0].split()[1])
    if not count:
        return ""
    places = [line.strip() for line in out.splitlines() if line.startswith("  ")][:3]
    return f"{data} {name}: {count} ({'; '.join(places)})"


def check_scripts(setup):
    """The evaluation and feature scripts once each on a 1-epoch model, side by side."""
    respath = os.path.join(setup.work, "scripts", "pretrain")
    pretrain(setup, respath)
    model = os.path.join(respath, "model", "model.pth")
    bs = setup.sizing[setup.sizing.index("-bs") + 1]
    small = ["-bs", bs, "-nw", "0", *setup.device_flags]
    out = os.path.join(setup.work, "scripts")
    jobs = {"linear_evaluation.py": [setup.data, model, os.path.join(out, "le"), *small],
            "finetune.py": [setup.data, model, os.path.join(out, "ft"), "--epochs", 1, *small],
            "embed.py": [setup.data, model, os.path.join(out, "emb", "feats"), *small],
            "segment.py": [os.path.join(setup.work, "seg_data", "segmentation", "train.txt"),
                           model, os.path.join(out, "seg"), "--epochs", 1, *small]}
    side_by_side(setup, lambda script: script_run(setup, script, jobs[script]), list(jobs))
    with open(os.path.join(out, "le", "report.json")) as f:
        accuracy = json.load(f)["accuracy"]
    features = np.load(os.path.join(out, "emb", "feats.npy"))
    return f"linear probe accuracy {100 * accuracy:.1f} %, embeddings {features.shape}"


def script_run(setup, script, args):
    """One evaluation script run; segment.py after writing its small data set."""
    if script == "segment.py":
        run(setup, "make_demo_data.py", os.path.join(setup.work, "seg_data"), "--segmentation",
            "--seg-per-class", 4, 2, 3)
    return run(setup, script, *args)


def check_cuda_tests(setup):
    """tests/test_cuda.py, none of it skipped."""
    status, out, _ = call(setup, [sys.executable, "-m", "pytest", "-q", "-rs", "-p",
                                  "no:cacheprovider", "tests/test_cuda.py"])
    summary = (out.strip().splitlines() or ["no output"])[-1]
    if status != 0 or "skipped" in summary:
        raise CheckFailed(f"tests/test_cuda.py: {summary}")
    return summary


def check_bench(setup):
    """bench.py --quick on the device: it runs every part and writes its figures."""
    path = os.path.join(setup.work, "bench_quick.json")
    run(setup, "bench.py", "--quick", "--device", setup.device, "--json", path)
    with open(path) as f:
        end2end = json.load(f)["sections"]["end2end"]
    return (", ".join(f"{r['pipeline']} {r['images_per_s']:.0f} img/s" for r in end2end) +
            f" end to end, {path}")


def image_names(root):
    """The image files under `root`, relative to it, sorted (none when it is absent)."""
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root)
                  for f in files if is_image_file(f))


def spread(names, n):
    """At most `n` of `names`, evenly spaced over the list (so over its class folders)."""
    if len(names) <= n:
        return names
    return [names[i * len(names) // n] for i in range(n)]


def copy_subset(source, target, limit, rgb):
    """Up to `limit` train and limit // 4 test images of the ImageFolder `source` under
    `target`, spread over its files: linked (else copied) as they are, or with `rgb` written
    as tinted RGB JPEGs (channels differ). Returns the number of train images."""
    counts = {}
    for split, n in (("train", limit), ("test", max(limit // 4, 1))):
        names = spread(image_names(os.path.join(source, split)), n)
        for name in names:
            copy_image(os.path.join(source, split, name), os.path.join(target, split, name),
                       rgb)
        counts[split] = len(names)
    return counts["train"]


def copy_image(source, target, rgb):
    """One image of copy_subset."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if not rgb:
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
        return
    gray = np.asarray(Image.open(source).convert("L"))
    rgb_pixels = np.stack([gray, 255 - gray, gray // 2], axis=-1)
    Image.fromarray(rgb_pixels).save(os.path.splitext(target)[0] + ".jpg", quality=90)


def pick_device(choice):
    """'cuda' or 'cpu' for --device; UserError when CUDA is wanted (auto or cuda) and absent."""
    if choice == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise UserError("gpu_check: no CUDA device visible; pass --device cpu to run the "
                        "CPU-runnable checks")
    return "cuda"


def source_data(folder):
    """--data, checked, or demo_data/ (made when absent)."""
    if folder is not None:
        if not os.path.isdir(os.path.join(folder, "train")):
            raise UserError(f"--data {folder} has no train/ folder; give an ImageFolder with "
                            f"train/ (and test/), or leave --data out to use demo_data")
        return folder
    folder = os.path.join(REPO, "demo_data")
    if not os.path.isdir(os.path.join(folder, "train")):
        made = subprocess.run([sys.executable, os.path.join(REPO, "make_demo_data.py"), folder],
                              cwd=REPO, capture_output=True, text=True)
        if made.returncode != 0:
            last = (made.stderr.strip().splitlines() or ["no message"])[-1]
            raise UserError(f"make_demo_data.py could not make {folder} ({last}); give --data")
    return folder


def main_sizing(device, images):
    """main.py's flags for `images` training images on `device`: a quarter of them per batch
    (even, for 2 processes), at most 256."""
    bs = str(max(2, min(256, images // 4) // 2 * 2))
    if device == "cuda":
        return ["-bs", bs, "-nw", "4", "--log-every", "2"]
    return ["--image-size", "16", "--proj-dims", "32", "16", "-bs", bs, "-nw", "0", "--lr", "1.0"]


def build_setup(args, device):
    """The Setup of this run, and a line describing its data."""
    source = source_data(args.data)
    work = args.workdir or tempfile.mkdtemp(prefix="gpu_check_")
    wanted = WANTED_IMAGES[device]
    present = len(image_names(os.path.join(source, "train")))
    images = copy_subset(source, os.path.join(work, "gray_data"), wanted, rgb=False)
    copy_subset(source, os.path.join(work, "rgb_data"), wanted, rgb=True)
    if images < 8:
        raise UserError(f"{source}/train holds {images} images; the checks need at least 8")
    width = max(1, min(4, (os.cpu_count() or 1) // 4))
    setup = Setup(device, os.path.join(work, "gray_data"), os.path.join(work, "rgb_data"), work,
                  main_sizing(device, images), torch.cuda.device_count(), width)
    return setup, (f"data: {images} training images of the {present} in {source} (at most "
                   f"{wanted} on {device}), also as RGB JPEGs; {width} run(s) side by side")


def run_check(setup, check):
    """Run one check within its budget: (status, detail)."""
    if check.budget(setup.device) == 0:
        return "skip", "skipped: needs CUDA"
    setup.budget = check.budget(setup.device)
    setup.deadline = time.monotonic() + setup.budget
    try:
        return "pass", globals()[f"check_{check.name}"](setup)
    except CheckFailed as err:
        return "FAIL", str(err)
    except Exception as err:  # a crash of the check itself is a failure, with its place
        return "FAIL", f"{type(err).__name__}: {err} ({traceback.format_exc().splitlines()[-3]})"


def run_checks(setup, checks, budget, started):
    """Every check in turn, or "skipped (budget)" where less than its budget is left of
    `budget` seconds since `started`; prints one line per check, returns the rows."""
    rows = []
    for check in checks:
        left = budget - (time.monotonic() - started)
        tic = time.monotonic()
        if check.budget(setup.device) and left < check.budget(setup.device):
            status, detail = SKIPPED_BUDGET, (f"needs {check.budget(setup.device)} s, "
                                              f"{max(left, 0):.0f} s left of --budget {budget:g}")
        else:
            status, detail = run_check(setup, check)
        seconds = time.monotonic() - tic
        shown = "skip" if status == SKIPPED_BUDGET else status
        print(f"{shown:4s} {check.name:10s} {seconds:6.1f} s  "
              f"{SKIPPED_BUDGET + ': ' if status == SKIPPED_BUDGET else ''}{detail}", flush=True)
        rows.append({"check": check.name, "status": status, "seconds": round(seconds, 2),
                     "budget_s": check.budget(setup.device), "detail": detail})
    return rows


def summarise(rows):
    """{'passed': [...], 'failed': [...], 'skipped (needs CUDA)': [...], 'skipped (budget)':
    [...]}: the check names by outcome."""
    kinds = {"pass": "passed", "FAIL": "failed", "skip": "skipped (needs CUDA)",
             SKIPPED_BUDGET: "skipped (budget)"}
    return {kind: [r["check"] for r in rows if r["status"] == status]
            for status, kind in kinds.items()}


def list_checks():
    """The --list table: the checks in the order they run, with their budgets."""
    print(f"{'check':10s}  {'GPU s':>5s}  {'CPU s':>5s}  runs (in this order; --budget: the "
          f"whole run)")
    for c in CHECKS:
        cpu = "-" if c.cpu_s is None else str(c.cpu_s)
        print(f"{c.name:10s}  {c.cuda_s:5d}  {cpu:>5s}  {c.what}")
    return 0


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto and cuda need a visible CUDA device (else exit status 2); "
                             "cpu runs the CPU-runnable checks")
    parser.add_argument("--only", nargs="+", choices=CHECK_NAMES, default=None,
                        help="run these checks only, in the order given")
    parser.add_argument("--budget", type=float, default=480, metavar="SECONDS",
                        help="time for the whole run: a check starts only while at least its "
                             "own budget (--list) is left")
    parser.add_argument("--list", action="store_true",
                        help="print the checks in order with their budgets and stop")
    parser.add_argument("--data", default=None,
                        help="ImageFolder with train/ and test/ (default: demo_data, made if "
                             "absent)")
    parser.add_argument("--workdir", default=None,
                        help="scratch folder (default: a new temporary folder, removed at the "
                             "end)")
    parser.add_argument("--json", default=os.path.join(REPO, "results", "gpu_check.json"),
                        help="where to write the results")
    return parser


def main(args):
    started = time.monotonic()
    if args.list:
        return list_checks()
    if args.budget <= 0:
        raise UserError(f"--budget {args.budget:g} must be a positive number of seconds, e.g. "
                        f"480")
    device = pick_device(args.device)
    setup, data_line = build_setup(args, device)
    env = environment_info(torch.device(device))
    print(f"gpu_check on {device}: {env.get('gpus', env['platform'])}, torch {env['torch']}, "
          f"commit {env['git_commit']}; --budget {args.budget:g} s\n{data_line}", flush=True)
    checks = [next(c for c in CHECKS if c.name == n) for n in args.only] if args.only else CHECKS
    rows = run_checks(setup, checks, args.budget, started)
    outcome = summarise(rows)
    report = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "environment": env, "budget_s": args.budget, "checks": rows,
              "summary": outcome, "failed": len(outcome["failed"])}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    json_dump(report, args.json)
    print("; ".join(f"{kind}: {', '.join(names) or 'none'}" for kind, names in outcome.items()),
          flush=True)
    print(f"{report['failed']} of {len(rows)} checks failed; results in {args.json}", flush=True)
    if args.workdir is None:
        shutil.rmtree(setup.work, ignore_errors=True)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    run_main(main, get_args_parser())
