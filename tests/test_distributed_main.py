"""main.py on CPU with gloo under torchrun (as users launch it), under --multiple_gpus --nproc
and on two localhost nodes: one plain checkpoint, interruption and resume, a killed rank, and
the one-line errors. The reference for the losses is one 4-epoch torchrun run; the launchers and
the one-step equivalence checks are in tests/test_distributed.py (a file of its own, so that
pytest-xdist's --dist loadfile can run the two halves on two workers)."""
import json
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from conftest import FAST_PRETRAIN, REPO, run_script
from test_distributed import free_port, run_torchrun, torchrun_command, torchrun_env


def losses(respath):
    return np.load(os.path.join(respath, "model", "lossesfile.npz"))["step_losses"]


@pytest.fixture(scope="module")
def torchrun_run(tiny_folder, tmp_path_factory):
    """A 4-epoch pretraining run under torchrun with 2 processes."""
    respath = str(tmp_path_factory.mktemp("ddp"))
    result = run_torchrun(os.path.join(REPO, "main.py"), tiny_folder, respath, "--epochs", "4",
                          *FAST_PRETRAIN)
    assert result.returncode == 0, result.stdout + result.stderr
    return respath, result


def test_torchrun_writes_one_plain_checkpoint_that_evaluation_loads(torchrun_run, tiny_folder,
                                                                    tmp_path):
    respath, result = torchrun_run
    assert result.stdout.count("epoch 4/4") == 1  # rank 0 alone reports
    assert "global batch 12 = 2 process(es) x 6" in result.stdout
    assert result.stdout.count("data index: scanned") == 1  # rank 0 lists, rank 1 receives
    assert os.path.exists(os.path.join(respath, "data_index", "train.npz"))
    ckpt = torch.load(os.path.join(respath, "checkpoint.pth"))
    assert ckpt["step"] == 12 and ckpt["epoch"] == 4
    assert not any(k.startswith("module.") for k in ckpt["model"])
    leftovers = [f for f in os.listdir(respath) + os.listdir(os.path.join(respath, "model"))
                 if f.endswith(".tmp")]
    assert leftovers == []
    run = json.load(open(os.path.join(respath, "run.json")))
    assert run["processes"] == 2 and run["global_batch_size"] == 12
    assert run["batch_per_process"] == 6 and run["sync_bn"] is True
    assert run["peak_lr"] == pytest.approx(1.0 * 12 / 256)
    evaluation = run_script("linear_evaluation.py", tiny_folder,
                            os.path.join(respath, "model", "model.pth"), tmp_path / "eval",
                            "-bs", "12", "-nw", "0")
    assert evaluation.returncode == 0, evaluation.stderr
    assert json.load(open(tmp_path / "eval" / "report.json"))["accuracy"] > 0


def test_torchrun_interrupted_and_resumed_equals_uninterrupted(torchrun_run, tiny_folder,
                                                               tmp_path):
    """SIGTERM (what torchrun sends its workers on Ctrl-C) mid-run, then the same command."""
    respath, _ = torchrun_run
    resumed = str(tmp_path / "interrupted")
    command = torchrun_command(os.path.join(REPO, "main.py"), tiny_folder, resumed,
                               "--epochs", "4", *FAST_PRETRAIN, "--checkpoint-minutes", "0")
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=torchrun_env(), start_new_session=True)
    ckpt_path = os.path.join(resumed, "checkpoint.pth")
    deadline = time.monotonic() + 300
    while not os.path.exists(ckpt_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert os.path.exists(ckpt_path), "no checkpoint after the first epoch"
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole group
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    step = torch.load(ckpt_path)["step"]
    assert 3 <= step < 12, (step, out, err)
    assert "interrupted at step" in err
    again = run_torchrun(os.path.join(REPO, "main.py"), tiny_folder, resumed, "--epochs", "4",
                         *FAST_PRETRAIN)
    assert again.returncode == 0, again.stderr
    np.testing.assert_allclose(losses(resumed), losses(respath), atol=1e-6)


def output_files(respath):
    return sorted(os.path.relpath(os.path.join(folder, name), respath)
                  for folder, _, names in os.walk(respath) for name in names)


def test_multiple_gpus_with_nproc_equals_torchrun(torchrun_run, pretrained, tiny_folder,
                                                  tmp_path):
    """The headline command `main.py DATAPATH RESPATH -bs B --multiple_gpus`, here with
    --nproc 2 (CPU processes, gloo): the same per-step losses as the torchrun run, the same
    files as a single-process run, and one report."""
    respath, _ = torchrun_run
    launched = str(tmp_path / "multiple_gpus")
    result = run_script("main.py", tiny_folder, launched, "--epochs", "4", *FAST_PRETRAIN,
                        "--multiple_gpus", "--nproc", "2", "--print-freq", "2",
                        env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("epoch 4/4  loss") == 1
    # progress points are collectives on every rank; rank 0 alone prints: steps 2, 4, ..., 12
    assert len(re.findall(r"^epoch \d/4  step \d/3  loss", result.stdout, re.M)) == 6
    assert "global batch 12 = 2 process(es) x 6" in result.stdout
    np.testing.assert_allclose(losses(launched), losses(respath), rtol=0, atol=1e-6)
    assert output_files(launched) == output_files(pretrained[0])
    run = json.load(open(os.path.join(launched, "run.json")))
    assert run["processes"] == 2 and run["launcher"] == "multiple_gpus"
    assert json.load(open(os.path.join(respath, "run.json")))["launcher"] == "torchrun"


def test_two_nodes_on_localhost_equal_two_processes_on_one(torchrun_run, tiny_folder, tmp_path):
    respath, _ = torchrun_run
    nodes = str(tmp_path / "nodes")
    endpoint = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen(
        torchrun_command(os.path.join(REPO, "main.py"), tiny_folder, nodes, "--epochs", "4",
                         *FAST_PRETRAIN, nproc=1, nnodes=2, node_rank=rank, endpoint=endpoint),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=torchrun_env())
        for rank in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, out + err
    assert "epoch 4/4" in outputs[0][0] and "epoch 4/4" not in outputs[1][0]
    run = json.load(open(os.path.join(nodes, "run.json")))
    assert run["processes"] == 2
    np.testing.assert_allclose(losses(nodes), losses(respath), atol=1e-6)


def worker_pids(parent_pid):
    """PIDs of torchrun's workers (its children running main.py), from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if int(fields[1]) == parent_pid and "main.py" in cmdline:
                children.append(int(entry))
    return children


def test_a_killed_rank_stops_the_job_and_leaves_the_last_checkpoint(tiny_folder, tmp_path):
    respath = str(tmp_path / "killed")
    command = torchrun_command(os.path.join(REPO, "main.py"), tiny_folder, respath,
                               "--epochs", "50", *FAST_PRETRAIN)
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=torchrun_env())
    ckpt_path = os.path.join(respath, "checkpoint.pth")
    deadline = time.monotonic() + 300
    while not os.path.exists(ckpt_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = worker_pids(proc.pid)
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGKILL)  # e.g. the out-of-memory killer
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    ckpt = torch.load(ckpt_path)  # intact and loadable
    assert ckpt["step"] % 3 == 0 and ckpt["step"] >= 3
    resumed = run_torchrun(os.path.join(REPO, "main.py"), tiny_folder, respath, "--epochs",
                           str(ckpt["epoch"] + 1), *FAST_PRETRAIN)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout


def assert_one_line_error_under_torchrun(result, *fragments):
    """One 'error:' line from the workers (rank 0 only, as every rank found the same problem)
    and no traceback through our code; torchrun then adds its own ChildFailedError summary."""
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    our_frames = [line for line in result.stderr.splitlines()
                  if f'File "{REPO}' in line and ".venv" not in line]
    assert our_frames == [], result.stderr
    assert "ChildFailedError" in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_batch_that_does_not_split_over_processes_is_one_line_error(tiny_folder, tmp_path):
    flags = [f for f in FAST_PRETRAIN]
    flags[flags.index("-bs") + 1] = "11"
    result = run_torchrun(os.path.join(REPO, "main.py"), tiny_folder, tmp_path / "r", *flags)
    assert_one_line_error_under_torchrun(result, "-bs 11", "2 processes", "-bs 10")


def test_multiple_gpus_under_torchrun_is_one_line_error(tiny_folder, tmp_path):
    result = run_torchrun(os.path.join(REPO, "main.py"), tiny_folder, tmp_path / "r",
                          "--multiple_gpus", *FAST_PRETRAIN)
    assert_one_line_error_under_torchrun(result, "--multiple_gpus")


def test_resume_with_other_settings_under_torchrun_is_one_line_error(torchrun_run, tiny_folder):
    respath, _ = torchrun_run
    result = run_torchrun(os.path.join(REPO, "main.py"), tiny_folder, respath, "--epochs", "4",
                          *FAST_PRETRAIN, "--temperature", "0.5")
    assert_one_line_error_under_torchrun(result, "--temperature")
