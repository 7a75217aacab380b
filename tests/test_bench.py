"""bench.py, the user's question "how fast is this here": a --quick run through the command line,
on synthetic images and on a folder of the user's, measures every part with positive, finite
figures held against the matmul rate as documented; the FLOP count is checked against one
worked out by hand, and bad input is one line."""
import json
import math
import os
import types

import pytest
import torch
from torch import nn

from utils import speed
from conftest import run_in_process, run_script
from main import get_args_parser as main_args_parser
from simclr import SimCLRTask
from utils.checkpoint import RunPaths
from utils.engine import LoopSettings, RunSetup, Trainer
from utils.errors import UserError
from utils.model import SimCLRModel
from utils.ntxent import NTXentLoss
from utils.optim import build_optimizer
from utils.precision import FLOAT32


def quick(*args, tmp_path):
    """(JSON written by `bench.py --quick ARGS --json ...`, its stdout)."""
    out = tmp_path / "bench.json"
    result = run_script("bench.py", "--quick", "--device", "cpu", *args, "--json", out)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text()), result.stdout


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    return quick(tmp_path=tmp_path_factory.mktemp("bench"))


def numbers(row):
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def test_every_part_is_measured_and_held_against_the_matmul_rate(synthetic_run):
    """matmul (the step's precision and bf16), compute, loader (0 and 1 workers, then the
    device path: the synthetic JPEGs fit in memory, so gpu-aug) and end to end (workers, then
    gpu-aug); every figure finite and positive (worker counts >= 0); of_matmul is img/s over
    B x rate / FLOP per step, of_compute img/s over the compute row's."""
    report, stdout = synthetic_run
    sections = report["sections"]
    assert [r["dtype"] for r in sections["matmul"]] == ["float32", "bfloat16"]
    assert [(r["pipeline"], r["workers"]) for r in sections["loader"]] == [
        ("workers", 0), ("workers", 1), ("gpu-aug", 0)]
    assert [r["pipeline"] for r in sections["end2end"]] == ["workers", "gpu-aug"]
    for name, rows in sections.items():
        for row in rows:
            for key, value in numbers(row).items():
                assert math.isfinite(value) and (value >= 0 if key == "workers" else value > 0), (
                    name, key, row)
    compute = sections["compute"][0]
    assert compute["fraction_of_matmul"] == pytest.approx(compute["tflops"] /
                                                          compute["matmul_tflops"])
    assert compute["matmul_tflops"] == sections["matmul"][0]["tflops"]  # float32: amp off
    bf16 = sections["matmul"][1]["tflops"]
    assert compute["mfu"] == pytest.approx(compute["tflops"] / bf16)
    at_matmul_rate = compute["batch_size"] * compute["matmul_tflops"] * 1e3 / compute[
        "gflop_per_step"]
    for row in sections["compute"] + sections["loader"] + sections["end2end"]:
        assert row["of_matmul"] == pytest.approx(row["images_per_s"] / at_matmul_rate)
        assert row["of_compute"] == pytest.approx(row["images_per_s"] / compute["images_per_s"])
    assert compute["of_matmul"] == pytest.approx(compute["fraction_of_matmul"])
    lines = stdout.splitlines()
    assert [line.split()[0] for line in lines[1:]] == [
        "matmul", "matmul", "compute", "loader", "loader", "loader", "end2end", "end2end",
        "wrote"]
    assert "of matmul" in lines[3] and lines[-2].endswith("; gpu-aug")


def test_synthetic_images_and_the_record(synthetic_run):
    """Without DATAPATH: RGB JPEGs of --image-size (default 32 px); the JSON has the command,
    the device with versions and commit, and the flags."""
    report, _ = synthetic_run
    assert report["data"] == "synthetic: 256 RGB JPEGs of 32 px, 3 channel(s)"
    assert report["settings"]["image_size"] == 32
    assert report["command"].split()[1].endswith("bench.py")
    device = report["device"]
    assert device["torch"] == torch.__version__ and device["device_name"] and device["git_commit"]
    assert report["settings"]["batch_size"] == 8 and report["settings"]["amp"] == "off"


def test_a_folder_of_the_users_images(tiny_folder, tmp_path):
    """DATAPATH as main.py takes it: the tiny folder's gray 28 px PNGs at their native size;
    --workers 1, then the device path (they fit in memory decoded: gpu-aug; not JPEGs, so
    gpu-decode would not be it)."""
    report, _ = quick(tiny_folder, "-bs", "12", "--workers", "1", tmp_path=tmp_path)
    assert report["data"] == f"{tiny_folder}, 1 channel(s)"
    assert report["settings"]["image_size"] == 28
    assert [(r["pipeline"], r["workers"]) for r in report["sections"]["loader"]] == [
        ("workers", 1), ("gpu-aug", 0)]
    assert {r["image_size"] for r in report["sections"]["loader"]} == {28}


def test_bad_input_is_one_line(tiny_folder, monkeypatch):
    """More images per batch than the data holds, a batch of one, and CUDA where there is none:
    one line, exit status 2."""
    for args, message in ((["-bs", "64"], "fewer than one batch; use -bs 36 or less"),
                          (["-bs", "1"], "SimCLR needs 2 images or more")):
        result = run_in_process("bench.py", tiny_folder, "--quick", "--device", "cpu", *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device cpu"):
        speed.select_bench_device("cuda")
    assert speed.select_bench_device("auto").type == "cpu"


def test_the_device_input_is_main_pys_default():
    """main.py's CUDA default, as bench judges it: --gpu-aug while N x C x S x S bytes fit
    main.py's --max-memory-gb (4 GB), else --gpu-decode."""
    assert speed.MAX_MEMORY_GB == main_args_parser().get_default("max_memory_gb")
    assert speed.device_input(4096, 3, 32) == "gpu-aug"
    assert speed.device_input(2048, 3, 224) == "gpu-aug"
    assert speed.device_input(1_281_167, 3, 224) == "gpu-decode"


def tiny_conv_model():
    """conv(1->4, 3x3) -> ReLU -> conv(4->8, 3x3) -> global average -> h (8); head Linear 8->6."""
    encoder = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(),
                            nn.Conv2d(4, 8, 3, padding=1, bias=False),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return SimCLRModel(encoder, nn.Linear(8, 6))


def test_step_flops_match_an_analytic_count():
    """The FLOPs bench counts for a training step of a tiny conv net equal the count worked out
    by hand: 2*Cin*Cout*K*K*H*W per image for a convolution's forward, the same again for its
    weight gradient and for its input gradient (none for the first layer, whose input needs no
    gradient); 2*in*out per row for a Linear and likewise; for NT-Xent's u u^T (2B x D times
    D x 2B) 2*(2B)^2*D forward and twice that backward (u is both operands)."""
    views, side, dim = 8, 10, 6  # 2B views of 10 x 10 px
    model = tiny_conv_model()
    x = torch.randn(views, 1, side, side)
    trainer = Trainer(RunSetup(
        task=SimCLRTask(NTXentLoss(0.2), lambda views, step: views), model=model,
        optimizer=build_optimizer(model, "sgd", 0.1, 0.0), schedule=lambda step: 0.1,
        sampler=types.SimpleNamespace(global_batch_size=views // 2), loader=[x],
        precision=FLOAT32, settings=LoopSettings(epochs=1, steps_per_epoch=1,
                                                 channels_last=False),
        paths=RunPaths(os.devnull), device=torch.device("cpu")))
    counted = speed.count_flops(lambda: trainer.train_step(x, 0))

    conv1 = 2 * 1 * 4 * 9 * side * side * views
    conv2 = 2 * 4 * 8 * 9 * side * side * views
    linear = 2 * 8 * dim * views
    similarity = 2 * views * views * dim
    expected = 2 * conv1 + 3 * conv2 + 3 * linear + 3 * similarity
    assert counted == pytest.approx(expected, rel=0.01)


def test_compiled_configurations_start_from_a_reset_dynamo(monkeypatch):
    """Each compiled configuration resets dynamo first (else later ones hit the recompile
    limit and silently run eager); eager ones leave it alone."""
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    x = torch.zeros(2, 1, 8, 8)
    pipeline = ([x], types.SimpleNamespace(global_batch_size=1), lambda v, s: v)
    for compiled in (True, False, True):
        config = {"arch": "resnet18", "amp": "off", "channels_last": False, "compile": compiled}
        speed.build_trainer("resnet18", 1, 8, config, pipeline, torch.device("cpu"))
    assert len(resets) == 2
