"""Multi-process SimCLR on CPU with gloo, launched by torchrun as users launch it.

The reference for every distributed result is one process holding the whole global batch.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import FAST_PRETRAIN, REPO, run_script
from distributed_step import replace_batchnorm_by_groupnorm
from simclr import forward_backward
from utils.model import build_model
from utils.ntxent import NTXentLoss

STEP_SCRIPT = os.path.join(REPO, "tests", "distributed_step.py")


def torchrun_command(script, *args, nproc=2, nnodes=1, node_rank=0, endpoint=None):
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes == 1:
        launcher.append("--standalone")
    else:
        launcher += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--rdzv_backend=c10d",
                     f"--rdzv_endpoint={endpoint}", "--max_restarts=0"]
    return launcher + [script, *map(str, args)]


def torchrun_env():
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run_torchrun(script, *args, timeout=600, **kwargs):
    return subprocess.run(torchrun_command(script, *args, **kwargs), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=torchrun_env())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_step(tmp_path, name, *options, processes=2, launcher="torchrun"):
    """Loss, gradients and buffers after one step of tests/distributed_step.py, in one process
    or in `processes` started by torchrun or by the script's --multiple_gpus --nproc."""
    out = tmp_path / f"{name}.pt"
    if processes == 1 or launcher == "multiple_gpus":
        extra = [] if processes == 1 else ["--multiple_gpus", "--nproc", str(processes)]
        result = subprocess.run([sys.executable, STEP_SCRIPT, out, *options, *extra], cwd=REPO,
                                capture_output=True, text=True, timeout=300,
                                env=torchrun_env())
    else:
        result = run_torchrun(STEP_SCRIPT, out, *options, nproc=processes, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return torch.load(out)


def max_grad_difference(a, b):
    assert a["grads"].keys() == b["grads"].keys()
    return max((a["grads"][k] - b["grads"][k]).abs().max().item() for k in a["grads"])


def max_grad(a):
    return max(g.abs().max().item() for g in a["grads"].values())


@pytest.fixture(scope="module")
def reference_step(tmp_path_factory):
    """One process, the whole global batch of 8 images, float64."""
    return one_step(tmp_path_factory.mktemp("ref"), "reference", processes=1)


def test_two_processes_equal_one_process_on_the_global_batch(reference_step, tmp_path):
    two = one_step(tmp_path, "two")
    assert two["world_size"] == 2
    loss_diff = abs(two["loss"] - reference_step["loss"]).item()
    grad_diff = max_grad_difference(two, reference_step)
    buffer_diff = max((two["buffers"][k].double() - reference_step["buffers"][k].double())
                      .abs().max().item() for k in two["buffers"])
    print(f"2 processes vs 1: loss diff {loss_diff:.2e}, max abs gradient diff {grad_diff:.2e} "
          f"(max gradient {max_grad(reference_step):.2f}), BatchNorm buffers {buffer_diff:.2e}")
    assert loss_diff < 1e-10
    assert grad_diff < 1e-5
    assert buffer_diff < 1e-10  # running statistics of the global batch on every rank


@pytest.fixture(scope="module")
def supervised_reference(tmp_path_factory):
    """{task: one process's step on the whole global batch of 8, float64}."""
    folder = tmp_path_factory.mktemp("supervised")
    return {task: one_step(folder, task, "--task", task, processes=1)
            for task in ("finetune", "segment")}


@pytest.mark.parametrize("launcher", ["torchrun", "multiple_gpus"])
@pytest.mark.parametrize("task", ["finetune", "segment"])
def test_finetune_and_segment_steps_on_two_processes_equal_one(supervised_reference, tmp_path,
                                                               task, launcher):
    """The engine's step of finetune.py (MLP head: BatchNorm1d too) and segment.py (U-Net,
    ignored pixels unevenly spread over the ranks, so a per-rank mean would be wrong) on 2
    processes equals one process holding the global batch: loss, gradients, BatchNorm
    buffers."""
    reference = supervised_reference[task]
    two = one_step(tmp_path, "two", "--task", task, launcher=launcher)
    assert two["world_size"] == 2
    loss_diff = abs(two["loss"] - reference["loss"]).item()
    grad_diff = max_grad_difference(two, reference)
    buffer_diff = max((two["buffers"][k].double() - reference["buffers"][k].double())
                      .abs().max().item() for k in two["buffers"])
    print(f"{task}, 2 processes ({launcher}) vs 1: loss diff {loss_diff:.2e}, gradient diff "
          f"{grad_diff:.2e} (max gradient {max_grad(reference):.2f}), buffers {buffer_diff:.2e}")
    assert loss_diff < 1e-10
    assert grad_diff < 1e-8 * max(1.0, max_grad(reference))
    assert buffer_diff < 1e-10


def test_per_rank_mean_over_pixels_would_differ(supervised_reference, tmp_path):
    """The segmentation check sees the bug it guards against: with each process dividing by
    its own valid pixels (the mean of per-rank means), loss and gradients leave the one-process
    reference by far more than the tolerance."""
    reference = supervised_reference["segment"]
    buggy = one_step(tmp_path, "per_rank", "--task", "segment", "--pixel-mean", "per-rank")
    loss_diff = abs(buggy["loss"] - reference["loss"]).item()
    grad_diff = max_grad_difference(buggy, reference)
    print(f"per-rank pixel mean vs 1 process: loss diff {loss_diff:.2e}, gradient diff "
          f"{grad_diff:.2e}")
    assert loss_diff > 1e-4 and grad_diff > 1e-6 * max(1.0, max_grad(reference))


@pytest.mark.parametrize("bug, options", [
    ("per-rank negatives", ["--negatives", "local"]),
    ("gather without the gradient sum", ["--gather-grad", "local"]),
    ("per-rank BatchNorm statistics", ["--no-sync-bn"]),
])
def test_the_comparison_catches_known_bugs(reference_step, tmp_path, bug, options):
    wrong = one_step(tmp_path, "wrong", *options)
    grad_diff = max_grad_difference(wrong, reference_step)
    loss_diff = abs(wrong["loss"] - reference_step["loss"]).item()
    print(f"{bug}: loss diff {loss_diff:.3g}, max abs gradient diff {grad_diff:.3g}")
    assert grad_diff > 1e-3 * max_grad(reference_step), bug
    if bug == "gather without the gradient sum":
        assert loss_diff < 1e-10  # the loss is right: only the gradient shows the bug


@pytest.mark.parametrize("norm", ["group", "eval-batch"])
def test_chunked_step_equals_plain_step(norm):
    """Gradient caching in one process, chunks of 3 of a batch of 8 (the last chunk smaller)."""
    results = []
    for chunk_size in (None, 3):
        torch.manual_seed(0)
        model = build_model("resnet18", 1, "cifar", [32, 16])
        if norm == "group":
            model = replace_batchnorm_by_groupnorm(model)
        model = model.double().train()
        if norm == "eval-batch":
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                    m.eval()
        x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)).double()
        loss, _ = forward_backward(model, NTXentLoss(0.2), x, chunk_size)
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    (plain_loss, plain), (chunked_loss, chunked) = results
    grad_diff = max((plain[k] - chunked[k]).abs().max().item() for k in plain)
    print(f"chunks of 3 vs plain ({norm}): loss diff {abs(plain_loss - chunked_loss):.2e}, "
          f"gradient diff {grad_diff:.2e}")
    assert abs(plain_loss - chunked_loss).item() < 1e-12
    assert grad_diff < 1e-10


def test_chunked_step_on_two_processes_equals_one_plain_process(tmp_path):
    plain = one_step(tmp_path, "plain", "--norm", "group", processes=1)
    chunked = one_step(tmp_path, "chunked", "--norm", "group", "--chunk-size", "2")
    grad_diff = max_grad_difference(chunked, plain)
    print(f"2 processes, chunks of 2 vs 1 plain process: gradient diff {grad_diff:.2e}")
    assert abs(chunked["loss"] - plain["loss"]).item() < 1e-10
    assert grad_diff < 1e-10


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
    ckpt = torch.load(os.path.join(respath, "model", "checkpoint.pth"))
    assert ckpt["step"] == 12 and ckpt["epoch"] == 4
    assert not any(k.startswith("module.") for k in ckpt["model"])
    leftovers = [f for f in os.listdir(os.path.join(respath, "model")) if f.endswith(".tmp")]
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
    ckpt_path = os.path.join(resumed, "model", "checkpoint.pth")
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
    ckpt_path = os.path.join(respath, "model", "checkpoint.pth")
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
