"""Multi-process SimCLR on CPU with gloo, launched by torchrun as users launch it: one step of
tests/distributed_step.py (SimCLR, finetune.py's and segment.py's tasks) on 2 processes against
one process, and the known bugs that comparison catches. main.py itself under torchrun is in
tests/test_distributed_main.py, which uses the launch helpers here.

The reference for every distributed result is one process holding the whole global batch.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import REPO
import distributed_step
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


def one_step(tmp_path, name, *options):
    """Loss, gradients and buffers after one step of tests/distributed_step.py in one process
    (this one: the script's main, as its command line runs it)."""
    out = tmp_path / f"{name}.pt"
    distributed_step.main([out, *options])
    return torch.load(out)


def two_process_steps(folder, named_options, launcher="torchrun", processes=2):
    """{name: loss, gradients and buffers} after the steps of tests/distributed_step.py named
    here, all in one launch of `processes` processes by torchrun or by the script's
    --multiple_gpus --nproc (the steps joined by --then, each from its own seeded model)."""
    folder.mkdir(parents=True, exist_ok=True)
    argv, outs = [], {}
    for i, (name, options) in enumerate(named_options.items()):
        outs[name] = folder / f"step{i}.pt"
        argv += (["--then"] if i else []) + [outs[name], *options]
        if i == 0 and launcher == "multiple_gpus":
            argv += ["--multiple_gpus", "--nproc", str(processes)]
    if launcher == "multiple_gpus":
        result = subprocess.run([sys.executable, STEP_SCRIPT, *map(str, argv)], cwd=REPO,
                                capture_output=True, text=True, timeout=300,
                                env=torchrun_env())
    else:
        result = run_torchrun(STEP_SCRIPT, *argv, nproc=processes, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return {name: torch.load(out) for name, out in outs.items()}


# The 2-process steps of the tests below, one launch per launcher and kind of step.
STEPS = {
    "simclr": {"two": [],
               "per-rank negatives": ["--negatives", "local"],
               "gather without the gradient sum": ["--gather-grad", "local"],
               "per-rank BatchNorm statistics": ["--no-sync-bn"],
               "chunked": ["--norm", "group", "--chunk-size", "2"]},
    "supervised": {"finetune": ["--task", "finetune"], "segment": ["--task", "segment"],
                   "per-rank pixel mean": ["--task", "segment", "--pixel-mean", "per-rank"]},
}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """get(launcher, kind) -> {name: result} of STEPS[kind] on 2 processes, launched on first
    use and kept for the module."""
    folder, done = tmp_path_factory.mktemp("two"), {}

    def get(launcher, kind):
        if (launcher, kind) not in done:
            done[launcher, kind] = two_process_steps(folder / f"{launcher}-{kind}",
                                                     STEPS[kind], launcher)
        return done[launcher, kind]
    return get


def max_grad_difference(a, b):
    assert a["grads"].keys() == b["grads"].keys()
    return max((a["grads"][k] - b["grads"][k]).abs().max().item() for k in a["grads"])


def max_grad(a):
    return max(g.abs().max().item() for g in a["grads"].values())


@pytest.fixture(scope="module")
def reference_step(tmp_path_factory):
    """One process, the whole global batch of 8 images, float64."""
    return one_step(tmp_path_factory.mktemp("ref"), "reference")


def test_two_processes_equal_one_process_on_the_global_batch(reference_step, two_processes):
    two = two_processes("torchrun", "simclr")["two"]
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
    return {task: one_step(folder, task, "--task", task)
            for task in ("finetune", "segment")}


@pytest.mark.parametrize("launcher", ["torchrun", "multiple_gpus"])
@pytest.mark.parametrize("task", ["finetune", "segment"])
def test_finetune_and_segment_steps_on_two_processes_equal_one(supervised_reference,
                                                               two_processes, task, launcher):
    """The engine's step of finetune.py (MLP head: BatchNorm1d too) and segment.py (U-Net,
    ignored pixels unevenly spread over the ranks, so a per-rank mean would be wrong) on 2
    processes equals one process holding the global batch: loss, gradients, BatchNorm
    buffers."""
    reference = supervised_reference[task]
    two = two_processes(launcher, "supervised")[task]
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


def test_per_rank_mean_over_pixels_would_differ(supervised_reference, two_processes):
    """The segmentation check sees the bug it guards against: with each process dividing by
    its own valid pixels (the mean of per-rank means), loss and gradients leave the one-process
    reference by far more than the tolerance."""
    reference = supervised_reference["segment"]
    buggy = two_processes("torchrun", "supervised")["per-rank pixel mean"]
    loss_diff = abs(buggy["loss"] - reference["loss"]).item()
    grad_diff = max_grad_difference(buggy, reference)
    print(f"per-rank pixel mean vs 1 process: loss diff {loss_diff:.2e}, gradient diff "
          f"{grad_diff:.2e}")
    assert loss_diff > 1e-4 and grad_diff > 1e-6 * max(1.0, max_grad(reference))


@pytest.mark.parametrize("bug", ["per-rank negatives", "gather without the gradient sum",
                                 "per-rank BatchNorm statistics"])
def test_the_comparison_catches_known_bugs(reference_step, two_processes, bug):
    """2 processes with the bug (STEPS["simclr"][bug]: --negatives local, --gather-grad local,
    --no-sync-bn) leave the one-process gradients by far more than the tolerance."""
    wrong = two_processes("torchrun", "simclr")[bug]
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


def test_chunked_step_on_two_processes_equals_one_plain_process(tmp_path, two_processes):
    plain = one_step(tmp_path, "plain", "--norm", "group")
    chunked = two_processes("torchrun", "simclr")["chunked"]
    grad_diff = max_grad_difference(chunked, plain)
    print(f"2 processes, chunks of 2 vs 1 plain process: gradient diff {grad_diff:.2e}")
    assert abs(chunked["loss"] - plain["loss"]).item() < 1e-10
    assert grad_diff < 1e-10


def test_more_processes_than_gpus_share_them_through_gloo_only_when_asked(monkeypatch):
    """setup(cuda=True) under torchrun with 2 processes on a (pretended) 1-GPU machine: the
    rank without a GPU of its own stops with a one-line error naming SIMCLR_TOOLKIT_SHARE_GPUS;
    with it set to 1 both ranks take cuda:0 and join through gloo (NCCL takes one process per
    GPU); with a GPU per process the variable changes nothing (NCCL). The real run on a GPU is
    tools/gpu_check.py's ddp check."""
    from utils import distributed
    from utils.errors import UserError
    joined = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **kwargs: joined.append(backend))
    for name, value in (("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(distributed.SHARE_GPUS_ENV, raising=False)
    with pytest.raises(UserError, match=f"local rank 1 has no GPU.*{distributed.SHARE_GPUS_ENV}=1"):
        distributed.setup(cuda=True)
    monkeypatch.setenv(distributed.SHARE_GPUS_ENV, "1")
    assert distributed.setup(cuda=True) == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.setup(cuda=True) == torch.device("cuda", 0)
    assert joined == ["gloo", "gloo"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.setup(cuda=True) == torch.device("cuda", 1) and joined[-1] == "nccl"
