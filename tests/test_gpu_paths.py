"""The decisions the CUDA paths make, checked on the CPU: fused optimizer kernels only for CUDA
parameters (and the same update as the default kernels), --compile's compiler check for CUDA,
global-batch BatchNorm on every device, and where the views are made by default."""
import json
import types

import pytest
import torch
from torch import nn

from conftest import FAST_PRETRAIN, assert_one_line_error, run_in_process
from main import choose_input_path, get_args_parser
from utils.distributed import GlobalBatchNorm, convert_batchnorm
from utils.engine import check_compile_backend
from utils.errors import UserError
from utils.optim import build_optimizer, uses_fused_kernels


def fake_params(*on_cuda):
    return [types.SimpleNamespace(is_cuda=flag) for flag in on_cuda]


def test_fused_kernels_only_for_sgd_and_adamw_with_every_parameter_on_cuda():
    assert uses_fused_kernels("sgd", fake_params(True, True))
    assert uses_fused_kernels("adamw", fake_params(True))
    assert not uses_fused_kernels("lars", fake_params(True, True))  # LARS: its own _foreach
    assert not uses_fused_kernels("sgd", fake_params(True, False))
    assert not uses_fused_kernels("sgd", [])
    model = nn.Linear(3, 2)
    for name in ("sgd", "adamw"):  # on the CPU: the default kernels
        assert not build_optimizer(model, name, 0.1, 1e-3).defaults.get("fused")


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_update_equals_the_default_update(name):
    """Three steps of torch's fused kernel (runnable on the CPU) and of the default one, with
    the same parameter groups (weight decay on matrices only): the same weights to 1e-6."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)) for _ in "ab"]
    models[1].load_state_dict(models[0].state_dict())
    groups = build_optimizer(models[0], name, 0.05, 1e-2).param_groups
    kwargs = {"lr": 0.05, **({"momentum": 0.9} if name == "sgd" else {})}
    default = type(build_optimizer(models[0], name, 0.05, 1e-2))(groups, **kwargs)
    fused_groups = [{**g, "params": [dict(models[1].named_parameters())[n]
                                     for n, p in models[0].named_parameters()
                                     if any(p is q for q in g["params"])]} for g in groups]
    fused = type(default)(fused_groups, fused=True, **kwargs)
    x = torch.randn(8, 5)
    for _ in range(3):
        for model, opt in zip(models, (default, fused)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_compile_on_cuda_without_a_c_compiler_is_one_line(monkeypatch):
    """Triton builds its launchers with a C compiler: without one (nothing on PATH), --compile
    on CUDA stops before the first step with a message naming the fix."""
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(UserError, match=r"--compile on CUDA needs a C compiler .*gcc"):
        check_compile_backend("inductor", torch.device("cuda"))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(UserError, match=r"--compile on CPU needs a C\+\+ compiler"):
        check_compile_backend("inductor", torch.device("cpu"))
    check_compile_backend("eager", torch.device("cuda"))  # no compiler needed


def test_compile_on_cuda_without_triton_is_one_line(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.raises(UserError, match="needs the triton package"):
        check_compile_backend("inductor", torch.device("cuda"))


def test_global_batchnorm_on_every_device_keeps_the_parameters():
    """convert_batchnorm never returns torch's SyncBatchNorm (it synchronises with the GPU in
    every layer): GlobalBatchNorm holding the very same parameter and buffer tensors."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm1d(4))
    before = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}
    for device in (torch.device("cpu"), torch.device("meta")):
        converted = convert_batchnorm(model, device)
        norms = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert len(norms) == 2 and all(type(m) is GlobalBatchNorm for m in norms)
        after = dict([*converted.named_parameters(), *converted.named_buffers()])
        assert after.keys() == before.keys()
        assert all(after[name] is before[name] for name in before)


def path_args(argv):
    """main.py's arguments for `argv` after DATAPATH RESPATH, with its defaults filled in."""
    args = get_args_parser().parse_args(["DATA", "OUT", *argv])
    return args


META = {"in_channels": 3, "image_size": 32}  # 3,072 bytes per decoded image


@pytest.mark.parametrize("argv, n_images, device, expected, reason", [
    ([], 50_000, "cuda", (True, False), "the CUDA default: 0.14 GB decoded fit --max-memory-gb 4"),
    ([], 2_000_000, "cuda", (False, True), "5.7 GB decoded exceed --max-memory-gb 4"),
    (["--max-memory-gb", "0.1"], 50_000, "cuda", (False, True), "exceed --max-memory-gb 0.1"),
    (["--aug", "natural"], 50_000, "cuda", (False, False), "--aug natural runs there only"),
    (["--cpu-aug"], 50_000, "cuda", (False, False), "(--cpu-aug)"),
    (["--gpu-decode"], 50_000, "cuda", (False, True), "(--gpu-decode)"),
    ([], 50_000, "cpu", (False, False), "in CPU workers (a CPU run)"),
    (["--gpu-aug"], 50_000, "cpu", (True, False), "(--gpu-aug)"),
])
def test_default_input_path(argv, n_images, device, expected, reason):
    """On CUDA (a device object is all the choice reads) the views are made on the device when
    the preset allows: decoded once when the data fit --max-memory-gb, else decoded per batch;
    on the CPU in the workers; a flag always wins. The reason is part of the speed line."""
    args = path_args(argv)
    line = choose_input_path(args, n_images, META, torch.device(device))
    assert (args.gpu_aug, args.gpu_decode) == expected
    assert reason in line


def test_cpu_aug_with_a_device_path_is_one_line_error(tiny_folder, tmp_path):
    result = run_in_process("main.py", tiny_folder, tmp_path / "run", "--cpu-aug", "--gpu-aug")
    assert_one_line_error(result, "--cpu-aug", "--gpu-aug", "give one of them")
    assert not (tmp_path / "run").exists()


def test_cpu_run_says_where_its_views_are_made(tiny_folder, tmp_path):
    result = run_in_process("main.py", tiny_folder, tmp_path / "run", "--epochs", "1",
                            *FAST_PRETRAIN)
    assert result.returncode == 0, result.stderr
    assert "views made in CPU workers (a CPU run)" in result.stdout
    with open(tmp_path / "run" / "run.json") as f:
        assert json.load(f)["augmentation"]["path"] == "in CPU workers (a CPU run)"
