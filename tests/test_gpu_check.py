"""tools/gpu_check.py on the CPU, through its command line: without CUDA it stops at once
unless given --device cpu; with it the checks that need CUDA say they were skipped, the
torchrun (2 gloo processes) check passes, checks run in the order --list gives, those the
--budget leaves no time for are reported "skipped (budget)", the data is sized from what the
folder holds, and the JSON holds one row per check with the environment. (Its
kill/speed/scripts/bench checks repeat what other tests cover on the CPU, SIGKILL and resume
included; on a GPU machine it runs them all.)"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO


def gpu_check(*args, env=None, timeout=600):
    """`python tools/gpu_check.py ARGS...` from the repository root: a CompletedProcess."""
    return subprocess.run([sys.executable, "tools/gpu_check.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


@pytest.fixture(scope="module")
def listed():
    """{check: (GPU budget s, CPU budget s or None)} in the order of --list."""
    result = gpu_check("--list", timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [line.split()[:3] for line in result.stdout.splitlines()[1:]]
    return {name: (int(gpu), None if cpu == "-" else int(cpu)) for name, gpu, cpu in rows}


def test_gpu_check_on_cpu(tiny_folder, tmp_path):
    out = tmp_path / "gpu_check.json"
    result = gpu_check("--device", "cpu", "--data", tiny_folder, "--only", "sync", "ddp",
                       "--json", out, "--workdir", tmp_path / "w")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("skip sync") and "needs CUDA" in line for line in lines)
    assert any(line.startswith("pass ddp") and "2 process(es)" in line for line in lines)
    report = json.loads(out.read_text())
    assert [row["check"] for row in report["checks"]] == ["sync", "ddp"]
    assert [row["status"] for row in report["checks"]] == ["skip", "pass"]
    assert report["failed"] == 0 and report["environment"]["torch"]


def test_without_cuda_it_stops_at_once_with_one_line(tmp_path):
    """No visible CUDA device and no --device cpu (auto, or cuda): one line, exit status 2,
    within seconds, nothing written."""
    out = tmp_path / "gpu_check.json"
    for device in ("auto", "cuda"):
        tic = time.monotonic()
        result = gpu_check("--device", device, "--json", out, "--workdir", tmp_path / "w",
                           env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
        seconds = time.monotonic() - tic
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.strip().splitlines() == [
            "error: gpu_check: no CUDA device visible; pass --device cpu to run the "
            "CPU-runnable checks"]
        assert result.stdout == "" and not out.exists() and not (tmp_path / "w").exists()
        assert seconds < 20, f"{seconds:.1f} s"


def test_a_tiny_budget_skips_every_check_and_says_so(listed, tiny_folder, tmp_path):
    """--budget 1 on the CPU: the checks that need CUDA say so, every other one is skipped for
    lack of time, in the order of --list; the summary line and the JSON name them; exit
    status 0 (nothing failed)."""
    out = tmp_path / "gpu_check.json"
    result = gpu_check("--device", "cpu", "--data", tiny_folder, "--budget", 1, "--json", out,
                       "--workdir", tmp_path / "w", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    needs_cuda = [name for name, (_, cpu) in listed.items() if cpu is None]
    timed_out = [name for name in listed if name not in needs_cuda]
    assert needs_cuda and timed_out
    lines = result.stdout.splitlines()
    for name in timed_out:
        assert any(line.startswith(f"skip {name} ") and "skipped (budget): needs "
                   f"{listed[name][1]} s" in line for line in lines), name
    assert (f"passed: none; failed: none; skipped (needs CUDA): {', '.join(needs_cuda)}; "
            f"skipped (budget): {', '.join(timed_out)}") in lines
    report = json.loads(out.read_text())
    assert [row["check"] for row in report["checks"]] == list(listed)
    assert {row["check"]: row["status"] for row in report["checks"]} == {
        **{name: "skip" for name in needs_cuda},
        **{name: "skipped (budget)" for name in timed_out}}
    assert report["summary"]["skipped (budget)"] == timed_out and report["failed"] == 0


def test_data_sized_from_what_the_folder_holds_and_the_budget_left(listed, tiny_folder,
                                                                   tmp_path):
    """The tiny folder holds 36 training images, fewer than the 48 the CPU checks want: main
    trains on all 36 and passes; with --budget just over main's own, the speed check that
    follows is skipped for lack of time, and the run still exits 0."""
    main_s, speed_s = listed["main"][1], listed["speed"][1]
    budget = main_s + 10
    assert speed_s >= budget, "the premise: speed cannot start after main"
    out = tmp_path / "gpu_check.json"
    result = gpu_check("--device", "cpu", "--data", tiny_folder, "--only", "main", "speed",
                       "--budget", budget, "--json", out, "--workdir", tmp_path / "w")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"data: 36 training images of the 36 in {tiny_folder}" in result.stdout
    report = json.loads(out.read_text())
    assert [row["status"] for row in report["checks"]] == ["pass", "skipped (budget)"]
    ckpt = torch.load(tmp_path / "w" / "main" / "default" / "checkpoint.pth",
                      map_location="cpu", weights_only=True)
    assert ckpt["extra"]["data"]["n_images"] == 36
