"""tools/bench_grid.py, the maintainers' grids: a --quick run through the command line writes
every section with positive, finite figures and the device fields; the figures it derives are
checked against computations done another way (a known allocation, the loss of utils/ntxent.py),
and the targets, the start-up and augmentation studies and the results file piece by piece."""
import json
import math
import os

import pytest
import torch

from conftest import REPO, run_in_process, run_script
from tools import bench_grid
from utils.errors import UserError
from utils.fileio import json_dump, open_runs
from utils.ntxent import NTXentLoss

# Figures that may be 0 (memory the allocator reuses is not new resident memory).
MAY_BE_ZERO = {"peak_memory_mb", "workers"}


@pytest.fixture(scope="module")
def quick_run(tiny_folder, tmp_path_factory):
    """(JSON written by `tools/bench_grid.py --quick` on the tiny folder, its stdout)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    result = run_script("tools/bench_grid.py", "--quick", "--device", "cpu", "--data",
                        tiny_folder, "--json", out)
    assert result.returncode == 0, result.stderr
    kept = json.loads(out.read_text())
    assert "tools/bench_grid.py --quick" in kept["command"] and len(kept["runs"]) == 1
    return kept["runs"][0], result.stdout


def test_quick_run_writes_every_section_with_positive_finite_figures(quick_run):
    """Every section has rows; every number of a measured row is finite and positive (memory
    and worker counts: >= 0); only the broadcast NT-Xent above the memory limit is skipped."""
    report, stdout = quick_run
    assert set(report["sections"]) == set(bench_grid.SECTIONS)
    for name, rows in report["sections"].items():
        assert rows, name
        for row in rows:
            if "skipped" in row:
                assert (name, row["method"], row["n"]) == ("ntxent", "broadcast", 1024), row
                continue
            numbers = {k: v for k, v in row.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            assert numbers, row
            for key, value in numbers.items():
                assert math.isfinite(value) and (value >= 0 if key in MAY_BE_ZERO else value > 0), (
                    name, key, row)
    compute = report["sections"]["compute"]
    assert {row["channels_last"] for row in compute} == {True, False}
    assert all(row["fraction_of_matmul"] == pytest.approx(row["tflops"] / row["matmul_tflops"])
               for row in compute)
    bf16 = next(r["tflops"] for r in report["sections"]["matmul"] if r["dtype"] == "bfloat16")
    assert all(row["mfu"] == pytest.approx(row["tflops"] / bf16) for row in compute)
    methods = {(r["n"], r["method"]) for r in report["sections"]["ntxent"]}
    assert methods == {(n, m) for n in (64, 1024) for m in ("bound", "ntxent", "broadcast")}
    end2end = report["sections"]["end2end"][0]
    baseline = report["sections"]["baseline"][0]
    assert end2end["over_baseline"] == pytest.approx(
        end2end["images_per_s"] / baseline["images_per_s"])
    # ceiling: the same FLOPs per image at the matmul rate, against the baseline's img/s
    fed = next(r for r in compute if all(r[k] == end2end[k]
                                         for k in ("amp", "channels_last", "compile")))
    seconds_at_matmul_rate = fed["gflop_per_step"] * 1e9 / (fed["matmul_tflops"] * 1e12)
    assert end2end["ceiling_over_baseline"] == pytest.approx(
        fed["batch_size"] / seconds_at_matmul_rate / baseline["images_per_s"])
    e2e_target = next(t for t in report["targets"] if "baseline" in t["name"])
    assert e2e_target["ceiling"] == pytest.approx(end2end["ceiling_over_baseline"])
    # targets: one line each on stdout, and in the JSON
    names = [t["name"] for t in report["targets"]]
    assert any("baseline" in n for n in names) and any("loader" in n for n in names)
    assert any("NT-Xent" in n for n in names)
    lines = [line for line in stdout.splitlines() if line.startswith("target ")]
    assert len(lines) == len(names)
    assert all(line.endswith(("(met)", "(not met)")) for line in lines), lines


def test_quick_run_records_device_and_versions(quick_run):
    report, _ = quick_run
    device = report["device"]
    for field in ("device_name", "cpu_model", "torch", "torchvision", "python", "cpu_threads",
                  "platform"):
        assert device[field], field
    assert device["torch"] == torch.__version__
    assert report["settings"]["quick"] is True and report["settings"]["batch_size"] == 8
    assert "resident" in report["memory_method"]
    assert report["data"].startswith(report["settings"]["data"])


def test_cpu_peak_memory_sees_a_known_allocation():
    """PeakMemory on the CPU reports about the size of a 256 MB tensor touched inside it."""
    with bench_grid.PeakMemory(torch.device("cpu")) as memory:
        block = torch.ones(64 * 2 ** 20)  # 64 Mi float32 = 256 MB
        del block
    assert 240 <= memory.mb <= 400


def test_reference_ntxent_is_the_same_loss():
    """The baseline's broadcast NT-Xent and utils/ntxent.py give the same loss and gradient
    (float64), so the timing comparison is between two ways of computing one thing."""
    gen = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(12, 5, generator=gen, dtype=torch.float64, requires_grad=True)
              for _ in range(2))
    ours = NTXentLoss(0.2)(z1, z2)
    grads = torch.autograd.grad(ours, (z1, z2))
    reference = bench_grid.broadcast_ntxent(z1, z2, 0.2)
    assert reference.item() == pytest.approx(ours.item(), rel=1e-10)
    for a, b in zip(torch.autograd.grad(reference, (z1, z2)), grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_without_demo_data_synthetic_images_are_used(tmp_path, monkeypatch):
    """Where demo_data/ is absent, the data sections read synthetic gray 28 px PNGs written to
    the work folder, at least 8 batches of them, and say so."""
    monkeypatch.setattr(bench_grid, "REPO", str(tmp_path / "checkout_without_demo_data"))
    args = bench_grid.get_args_parser().parse_args(["-bs", "4"])
    args.quick = False
    images, stats, source = bench_grid.load_bench_images(args, str(tmp_path))
    assert source.startswith("synthetic") and len(images) == 256
    assert stats["channels"] == 1
    img = images.load(0, 1)
    assert img.size == (28, 28) and img.mode == "L"


def test_gpu_targets_configurations():
    """--gpu-targets: ResNet-18 at 32 px with batch 512 and ResNet-50 at 224 px with batch 256
    from JPEG files, bf16, channels-last, every input pipeline; no other arch/size pair."""
    args = bench_grid.get_args_parser().parse_args(["--gpu-targets", "--device", "cpu"])
    bench_grid.resolve_settings(args)
    at_32, at_224 = bench_grid.sized_args(args, 32), bench_grid.sized_args(args, 224)
    assert (at_32.archs, at_32.batch_size) == (["resnet18"], 512)
    assert (at_224.archs, at_224.batch_size) == (["resnet50"], 256)
    assert args.amp == ["bf16"] and args.channels_last == ["on"]
    assert "on" in args.gpu_aug and "on" in args.gpu_decode and args.jpeg_above == 64
    assert [c["arch"] for c in bench_grid.compute_configs(at_224)] == ["resnet50"]
    explicit = bench_grid.get_args_parser().parse_args(["--gpu-targets", "--device", "cpu",
                                                   "-bs", "64"])
    bench_grid.resolve_settings(explicit)
    assert bench_grid.sized_args(explicit, 224).batch_size == 64


def test_gpu_targets_read_3_channel_32_px_images_at_32_px(tmp_path):
    """--gpu-targets: the 32 px target reads RGB images of 32 px (RGB augmentation costs about
    twice gray's), not the 1-channel 28 px demo data; 224 px reads JPEGs of 256 px; without
    --gpu-targets 32 px reads the demo data as before."""
    args = bench_grid.get_args_parser().parse_args(["--gpu-targets", "--device", "cpu", "-bs", "8"])
    bench_grid.resolve_settings(args)
    at_32 = bench_grid.sized_args(args, 32)
    images, stats, source = bench_grid.BenchData(str(tmp_path)).for_size(at_32, 32)
    assert stats["channels"] == 3 and "RGB JPEGs of 32 px" in source
    img = images.load(0, 3)
    assert img.size == (32, 32) and img.mode == "RGB"
    assert bench_grid.jpeg_side(bench_grid.sized_args(args, 224), 224) == 256
    plain = bench_grid.get_args_parser().parse_args(["--device", "cpu", "-bs", "8"])
    bench_grid.resolve_settings(plain)
    assert bench_grid.jpeg_side(bench_grid.sized_args(plain, 32), 32) is None


def e2e_row(arch, size, batch, pipeline, images_per_s, compute, baseline, main_default=False):
    return {"arch": arch, "image_size": size, "batch_size": batch, "amp": "bf16",
            "channels_last": True, "compile": False, "pipeline": pipeline, "workers": 8,
            "images_per_s": images_per_s, "fraction_of_compute": images_per_s / compute,
            "over_baseline": images_per_s / baseline, "main_default": main_default}


def test_cuda_targets_hold_the_fastest_input_and_the_default_path_to_each_threshold():
    """Per (arch, size) the fastest pipeline is judged, and the one main.py takes by default
    as well where that is another: >= 90 % of compute, >= 3x the baseline, and on an
    H100/H200 the img/s of the targets (not on other GPUs)."""
    rows = [e2e_row("resnet18", 32, 512, "workers", 9_000, 20_000, 4_000),
            e2e_row("resnet18", 32, 512, "gpu-aug", 14_000, 20_000, 4_000, main_default=True),
            e2e_row("resnet18", 32, 512, "gpu-decode", 18_500, 20_000, 4_000),
            e2e_row("resnet50", 224, 256, "workers", 1_200, 3_000, 1_000),
            e2e_row("resnet50", 224, 256, "gpu-decode", 2_400, 3_000, 700, main_default=True)]
    targets = bench_grid.cuda_end2end_targets(rows, "NVIDIA H200")
    fastest = [t for t in targets if "(fastest input)" in t["config"]]
    default = [t for t in targets if "(main.py's default path)" in t["config"]]
    assert len(targets) == 9 and len(fastest) == 6 and len(default) == 3
    by_name = {(t["config"].split(",")[0], t["name"].split(">=")[1].strip()): t for t in fastest}
    r18 = {k[1]: t for k, t in by_name.items() if k[0] == "resnet18"}
    r50 = {k[1]: t for k, t in by_name.items() if k[0] == "resnet50"}
    assert "gpu-decode" in r18["90% of compute-only img/s"]["config"]
    assert r18["90% of compute-only img/s"]["measured"] == pytest.approx(0.925)
    assert r18["90% of compute-only img/s"]["met"] and r18["3.0x the baseline loop"]["met"]
    assert r18["15000 img/s on an H100/H200"]["met"]
    assert not r50["90% of compute-only img/s"]["met"]  # 0.8
    assert not r50["2500 img/s on an H100/H200"]["met"] and r50["3.0x the baseline loop"]["met"]
    assert all(t["config"].startswith("resnet18") and "gpu-aug" in t["config"] for t in default)
    assert [t["measured"] for t in default] == pytest.approx([0.7, 3.5, 14_000])
    assert [t["met"] for t in default] == [False, True, False]
    assert len(bench_grid.cuda_end2end_targets(rows, "NVIDIA A100-SXM4-80GB")) == 6


def test_startup_section_pieces(tmp_path):
    """tools/bench_grid.py --sections startup, piece by piece at small sizes: the folder scan
    lists every hard link with both methods; a kept index (numpy arrays) is held in the workers
    without a private copy, and memory_row reads the index bench_memory writes."""
    from utils.file_index import scan_folder
    from tools.startup_bench import bench_memory, bench_scan, write_real_files

    write_real_files(str(tmp_path / "files"), n=7)
    rows = bench_scan([350], str(tmp_path))
    assert [r["method"] for r in rows] == ["os.scandir (listing only)",
                                           "scan_folder (listing + stat)"]
    assert all(r["entries"] == 350 and r["files_per_s"] > 0 for r in rows)
    listing = scan_folder(str(tmp_path / "folder_350"))
    assert len(listing.images) == 350 and len(listing.images.classes) == 100
    assert listing.fingerprint["total_bytes"] == sum(
        os.path.getsize(p) for p in listing.images.paths)
    numpy_row, lists_row = bench_memory([20000], str(tmp_path))
    assert numpy_row["layout"].startswith("numpy") and lists_row["layout"].startswith("Python")
    assert numpy_row["index_mb"] < lists_row["index_mb"]
    for row in (numpy_row, lists_row):
        assert 0 < row["worker_private_mb"] <= row["worker_pss_mb"] <= row["worker_rss_mb"]


def test_augment_section_times_every_installed_method():
    """tools/bench_grid.py --sections augment at a tiny size: every method makes (views, 3, S,
    S) views (checked inside) and gets a positive time; kornia is timed or skipped as not
    installed."""
    import importlib.util

    from tools.augment_bench import bench_augment
    rows = bench_augment(repeats=1, quick=True)
    assert [r["method"] for r in rows] == ["batched", "v2-per-view", "pil", "kornia"]
    for row in rows[:3]:
        assert 0 < row["ms"] <= row["median_ms"]
    has_kornia = importlib.util.find_spec("kornia") is not None
    assert ("ms" in rows[3]) == has_kornia
    assert has_kornia or rows[3]["skipped"] == "kornia is not installed"


def test_json_of_another_command_fails_before_measuring(tmp_path):
    """--json FILE keeps runs of one command: a file of another command is refused in one line,
    before any measurement, and left as it was."""
    kept = tmp_path / "kept.json"
    kept.write_text(json.dumps({"command": "python tools/bench_grid.py --sections matmul",
                                "runs": []}))
    before = kept.read_text()
    result = run_in_process("tools/bench_grid.py", "--quick", "--device", "cpu", "--sections",
                            "ntxent", "--json", kept)
    assert result.returncode == 2 and "records another command" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "device:" not in result.stdout
    assert kept.read_text() == before


def test_a_file_of_bench_py_grids_takes_the_runs_of_the_same_arguments(tmp_path):
    """A results file first written by `python bench.py ARGS` (where the grids were before they
    moved to tools/) takes the run of `python tools/bench_grid.py ARGS` and keeps its recorded
    command; `python bench.py` with other arguments is still another command."""
    kept = tmp_path / "kept.json"
    args = ["--quick", "--device", "cpu", "--sections", "ntxent", "--json", str(kept)]
    legacy = " ".join(["python", os.path.join(REPO, "bench.py"), *args])
    kept.write_text(json.dumps({"command": legacy, "runs": [{"date": "earlier"}]}))
    result = run_in_process("tools/bench_grid.py", *args)
    assert result.returncode == 0, result.stderr
    data = json.loads(kept.read_text())
    assert data["command"] == legacy and len(data["runs"]) == 2
    assert [r["n"] for r in data["runs"][1]["sections"]["ntxent"]][:1] == [64]
    kept.write_text(json.dumps({"command": legacy.replace("ntxent", "matmul"), "runs": []}))
    refused = run_in_process("tools/bench_grid.py", *args)
    assert refused.returncode == 2 and "records another command" in refused.stderr


def test_open_runs_appends_to_one_command(tmp_path):
    """utils.fileio.open_runs: a new file has no runs; the same command keeps its runs; the
    earlier one-run layout is its first run; another command is refused unless replace, or
    unless it is one of the command's earlier names (then the file keeps it)."""
    path = str(tmp_path / "r.json")
    kept = open_runs(path, "cmd a")
    assert kept == {"command": "cmd a", "runs": []}
    kept["runs"].append({"x": 1})
    json_dump(kept, path)
    assert open_runs(path, "cmd a")["runs"] == [{"x": 1}]
    with pytest.raises(UserError, match="records another command"):
        open_runs(path, "cmd b")
    assert open_runs(path, "cmd b", replace=True) == {"command": "cmd b", "runs": []}
    json_dump({"command": "cmd c", "date": "d"}, path)
    assert open_runs(path, "cmd c")["runs"] == [{"command": "cmd c", "date": "d"}]
    json_dump({"command": "old cmd", "runs": [{"x": 2}]}, path)
    assert open_runs(path, "cmd", earlier=["old cmd"]) == {"command": "old cmd",
                                                           "runs": [{"x": 2}]}
    assert open_runs(path, "cmd", replace=True, earlier=["old cmd"]) == {"command": "cmd",
                                                                         "runs": []}
