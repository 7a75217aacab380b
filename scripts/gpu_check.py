"""Every CUDA path of the toolkit in a few minutes on one GPU machine: one pass/fail line per
check and a JSON with the device, the versions and each check's figures.

    python scripts/gpu_check.py                          # on a GPU machine: every check
    python scripts/gpu_check.py --only main kill ddp     # some checks (names: --list)
    python scripts/gpu_check.py --device cpu --data DIR  # the CPU-runnable checks (CI runs some)

Checks (each runs the scripts through their real command lines, on the demo data or --data):
    cuda_tests    pytest tests/test_cuda.py: -c headline commands, bf16/fp16 dtypes, fp16 resume
                  with its scaler, --gpu-aug determinism on the device
    sync          main.py --sync-debug with CPU workers, --gpu-aug and --gpu-decode, gray and RGB,
                  and the other presets in workers: no host-GPU synchronisation inside a step
    main          main.py for 1 epoch with the default precision, --gpu-aug, --gpu-decode,
                  --amp fp16 and --compile, each then resumed to 2 epochs: finite losses, plain
                  checkpoint keys, the amp mode in run.json
    kill          main.py killed (SIGKILL) inside its second epoch, then resumed to the end
    ddp           --multiple_gpus and torchrun --nproc_per_node=N on all visible GPUs (N = 1
                  still runs DDP, NCCL on CUDA): N processes, SyncBatchNorm for N > 1, one writer
    scripts       linear_evaluation.py, finetune.py, segment.py and embed.py once each
    bench         bench.py --quick on the device
Needs no network: demo_data/ is made by make_demo_data.py (Debian's Fashion-MNIST, else
scikit-learn's digits) when absent. Exit status 1 when a check fails.
"""
import argparse
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
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from utils.cli import environment_info  # noqa: E402
from utils.fileio import json_dump  # noqa: E402

CHECKS = ("cuda_tests", "sync", "main", "kill", "ddp", "scripts", "bench")


class CheckFailed(Exception):
    """A check's verdict: what was expected and what was seen."""


@dataclass
class Setup:
    """What every check needs: device ('cuda' or 'cpu'), the data folders, the scratch folder
    and main.py's sizing flags for this device."""
    device: str
    data: str
    rgb_data: str
    work: str
    sizing: list
    gpus: int

    @property
    def device_flags(self):
        return ["-c"] if self.device == "cuda" else []


def run(setup, script, *args, launcher=None, timeout=600):
    """Run a repository script (or `launcher` + script); CheckFailed with the end of its
    stderr when it fails. Returns its stdout."""
    command = [sys.executable, *(launcher or []), os.path.join(REPO, script), *map(str, args)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        tail = " | ".join(result.stderr.strip().splitlines()[-3:])
        raise CheckFailed(f"{script} {' '.join(map(str, args))} exited {result.returncode}: "
                          f"{tail}")
    return result.stdout


def pretrain(setup, respath, *flags, epochs=1, data=None):
    """main.py on the check data for `epochs`; returns (stdout, run.json, checkpoint)."""
    out = run(setup, "main.py", data or setup.data, respath, "--epochs", epochs, *setup.sizing,
              *setup.device_flags, *flags)
    with open(os.path.join(respath, "run.json")) as f:
        info = json.load(f)
    ckpt = torch.load(os.path.join(respath, "model", "checkpoint.pth"), map_location="cpu",
                      weights_only=True)
    return out, info, ckpt


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


def check_cuda_tests(setup):
    if setup.device != "cuda":
        return "skipped: needs CUDA"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_cuda.py"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    summary = (result.stdout.strip().splitlines() or ["no output"])[-1]
    if result.returncode != 0 or "skipped" in summary:
        raise CheckFailed(f"tests/test_cuda.py: {summary}")
    return summary


def check_sync(setup):
    """--sync-debug over the real loop: zero synchronisations inside the audited steps."""
    if setup.device != "cuda":
        return "skipped: needs CUDA"
    runs = [(data, name, flags) for data in ("gray", "rgb")
            for name, flags in (("workers", []), ("gpu-aug", ["--gpu-aug"]),
                                ("gpu-decode", ["--gpu-decode"]))]
    runs += [("gray", f"workers --aug {aug}", ["--aug", aug])
             for aug in ("natural", "novel", "simple", "greyscale")]
    found = []
    for data, name, flags in runs:
        folder = setup.data if data == "gray" else setup.rgb_data
        respath = os.path.join(setup.work, "sync", f"{data}-{name}".replace(" ", "_"))
        out, _, _ = pretrain(setup, respath, "--sync-debug", *flags, data=folder)
        summary = [line for line in out.splitlines() if line.startswith("sync-debug:")]
        if not summary:
            raise CheckFailed(f"{data} {name}: no sync-debug summary printed")
        count = int(summary[0].split()[1])
        if count:
            places = [line.strip() for line in out.splitlines() if line.startswith("  ")][:3]
            found.append(f"{data} {name}: {count} ({'; '.join(places)})")
    if found:
        raise CheckFailed("synchronisations inside steps: " + " | ".join(found))
    return f"0 synchronisations in {len(runs)} runs"


def check_main(setup):
    """1 epoch then a resume to 2, per speed configuration."""
    configs = {"default": [], "gpu-aug": ["--gpu-aug"], "gpu-decode": ["--gpu-decode"],
               "fp16": ["--amp", "fp16"], "compile": ["--compile"]}
    if setup.device == "cpu":  # no fp16 autocast on the CPU; compile is bench.py's to time
        configs = {k: v for k, v in configs.items() if k in ("default", "gpu-aug",
                                                             "gpu-decode")}
    expected_amp = {"fp16": "fp16"}
    figures = []
    for name, flags in configs.items():
        respath = os.path.join(setup.work, "main", name)
        data = setup.rgb_data if name == "gpu-decode" else setup.data
        _, info, _ = pretrain(setup, respath, *flags, data=data)
        out, info, ckpt = pretrain(setup, respath, *flags, epochs=2, data=data)
        if "resuming" not in out:
            raise CheckFailed(f"{name}: the second run did not resume")
        loss = check_run_outputs(info, ckpt, 2, name)
        amp = info["speed"]["amp"]
        if name in expected_amp and amp != expected_amp[name]:
            raise CheckFailed(f"{name}: run.json says amp {amp}")
        if "scaler" in ckpt and (ckpt["scaler"] is not None) != (amp == "fp16"):
            raise CheckFailed(f"{name}: loss scaler state {ckpt['scaler'] is not None} with amp "
                              f"{amp}")
        figures.append(f"{name} (amp {amp}) loss {loss:.3f} {info.get('images_per_s')} img/s")
    return "; ".join(figures)


def check_kill(setup):
    """SIGKILL inside the second epoch (after the first epoch's checkpoint), then resume."""
    respath = os.path.join(setup.work, "kill")
    checkpoint = os.path.join(respath, "model", "checkpoint.pth")
    command = [sys.executable, os.path.join(REPO, "main.py"), setup.data, respath, "--epochs",
               "4", *setup.sizing, *setup.device_flags]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    try:
        while not os.path.exists(checkpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise CheckFailed(f"no checkpoint before exit {proc.returncode}: "
                                  f"{proc.stderr.read()[-300:]}")
            time.sleep(0.2)
        time.sleep(0.3)  # into the second epoch
        if proc.poll() is not None:
            raise CheckFailed("main.py finished before it could be killed: use more --samples")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = torch.load(checkpoint, map_location="cpu", weights_only=True)["step"]
    out, info, ckpt = pretrain(setup, respath, epochs=4)
    check_run_outputs(info, ckpt, 4, "resumed after SIGKILL")
    return f"killed with the checkpoint at step {killed_at}, resumed to step {ckpt['step']}"


def check_ddp(setup):
    """--multiple_gpus (CUDA) and torchrun on every GPU (2 gloo processes on the CPU)."""
    n = setup.gpus if setup.device == "cuda" else 2
    launches = {"torchrun": ["-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={n}"]}
    if setup.device == "cuda":
        launches["--multiple_gpus"] = None
    figures = []
    for name, launcher in launches.items():
        respath = os.path.join(setup.work, "ddp", name.strip("-"))
        flags = ["--multiple_gpus"] if launcher is None else []
        out = run(setup, "main.py", setup.data, respath, "--epochs", 1, *setup.sizing,
                  *setup.device_flags, *flags, launcher=launcher)
        with open(os.path.join(respath, "run.json")) as f:
            info = json.load(f)
        ckpt = torch.load(os.path.join(respath, "model", "checkpoint.pth"), map_location="cpu",
                          weights_only=True)
        check_run_outputs(info, ckpt, 1, name)
        if info["processes"] != n:
            raise CheckFailed(f"{name}: {info['processes']} processes, expected {n}")
        if n > 1 and not info["sync_bn"]:
            raise CheckFailed(f"{name}: no SyncBatchNorm with {n} processes")
        done = [line for line in out.splitlines() if line.startswith("done:")]
        if len(done) != 1:
            raise CheckFailed(f"{name}: {len(done)} 'done:' lines (one writer expected)")
        figures.append(f"{name}: {n} process(es), {info['launcher']}, sync_bn "
                       f"{info['sync_bn']}, {info.get('images_per_s')} img/s")
    return "; ".join(figures)


def check_scripts(setup):
    """The evaluation and feature scripts once each on a 1-epoch model."""
    respath = os.path.join(setup.work, "scripts", "pretrain")
    pretrain(setup, respath)
    model = os.path.join(respath, "model", "model.pth")
    bs = setup.sizing[setup.sizing.index("-bs") + 1]
    small = ["-bs", bs, "-nw", "0", *setup.device_flags]
    out = os.path.join(setup.work, "scripts")
    run(setup, "linear_evaluation.py", setup.data, model, os.path.join(out, "le"), *small)
    with open(os.path.join(out, "le", "report.json")) as f:
        accuracy = json.load(f)["accuracy"]
    run(setup, "finetune.py", setup.data, model, os.path.join(out, "ft"), "--epochs", 1,
        *small)
    run(setup, "embed.py", setup.data, model, os.path.join(out, "emb", "feats"), *small)
    features = np.load(os.path.join(out, "emb", "feats.npy"))
    seg = os.path.join(setup.work, "seg_data")
    run(setup, "make_demo_data.py", seg, "--segmentation", "--seg-per-class", 4, 2, 3)
    run(setup, "segment.py", os.path.join(seg, "segmentation", "train.txt"), model,
        os.path.join(out, "seg"), "--epochs", 1, *small)
    return f"linear probe accuracy {100 * accuracy:.1f} %, embeddings {features.shape}"


def check_bench(setup):
    path = os.path.join(setup.work, "bench_quick.json")
    run(setup, "bench.py", "--quick", "--device", setup.device, "--json", path)
    with open(path) as f:
        return f"{len(json.load(f)['runs'][-1].get('targets', []))} target rows, {path}"


def write_rgb_jpegs(source, target, limit):
    """Up to `limit` train and limit // 4 test images of the ImageFolder `source` as tinted RGB
    JPEGs (channels differ) under `target`: the colour data of the checks."""
    for split, n in (("train", limit), ("test", max(limit // 4, 1))):
        root = os.path.join(source, split)
        names = sorted((os.path.relpath(os.path.join(d, f), root) for d, _, files in
                        os.walk(root) for f in files))[:n]
        for name in names:
            gray = np.asarray(Image.open(os.path.join(root, name)).convert("L"))
            rgb = np.stack([gray, 255 - gray, gray // 2], axis=-1)
            path = os.path.join(target, split, os.path.splitext(name)[0] + ".jpg")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(rgb).save(path, quality=90)
    return target


def build_setup(args):
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and
                                                 torch.cuda.is_available()) else "cpu"
    work = args.workdir or tempfile.mkdtemp(prefix="gpu_check_")
    data = args.data
    if data is None:
        data = os.path.join(REPO, "demo_data")
        if not os.path.isdir(os.path.join(data, "train")):
            subprocess.run([sys.executable, os.path.join(REPO, "make_demo_data.py"), data],
                           check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    if device == "cuda":
        sizing = ["-bs", "256", "-nw", "4", "--samples", "2048", "--log-every", "2"]
        images = 2048
    else:
        sizing = ["--image-size", "16", "--proj-dims", "32", "16", "-bs", "12", "-nw", "0",
                  "--lr", "1.0"]
        images = 36
    rgb = write_rgb_jpegs(data, os.path.join(work, "rgb_data"), images)
    return Setup(device, data, rgb, work, sizing, torch.cuda.device_count())


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: cuda when visible")
    parser.add_argument("--only", nargs="+", choices=CHECKS, default=None,
                        help="run these checks only")
    parser.add_argument("--list", action="store_true", help="print the check names and stop")
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
    if args.list:
        print("\n".join(CHECKS))
        return 0
    setup = build_setup(args)
    env = environment_info(torch.device(setup.device))
    print(f"gpu_check on {setup.device}: {env.get('gpus', env['platform'])}, torch "
          f"{env['torch']}, commit {env['git_commit']}", flush=True)
    rows, failed = [], 0
    for name in args.only or CHECKS:
        tic = time.perf_counter()
        try:
            detail, ok = globals()[f"check_{name}"](setup), True
        except CheckFailed as err:
            detail, ok = str(err), False
        except Exception as err:  # a crash of the check itself is a failure, with its place
            detail = f"{type(err).__name__}: {err} ({traceback.format_exc().splitlines()[-3]})"
            ok = False
        seconds = time.perf_counter() - tic
        status = "skip" if ok and detail.startswith("skipped") else ("pass" if ok else "FAIL")
        failed += not ok
        print(f"{status:4s} {name:10s} {seconds:6.1f} s  {detail}", flush=True)
        rows.append({"check": name, "status": status, "seconds": round(seconds, 2),
                     "detail": detail})
    report = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "environment": env, "checks": rows, "failed": failed}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    json_dump(report, args.json)
    print(f"{failed} of {len(rows)} checks failed; results in {args.json}", flush=True)
    if args.workdir is None:
        shutil.rmtree(setup.work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
