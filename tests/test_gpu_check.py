"""scripts/gpu_check.py on the CPU, through its command line: the checks that need CUDA say
they were skipped, the torchrun (2 gloo processes) check passes, and the JSON holds one row
per check with the environment. (Its main/kill/scripts/bench checks repeat what other tests
cover on the CPU, SIGKILL and resume included; on a GPU machine it runs them all.)"""
import json
import subprocess
import sys

from conftest import REPO


def test_gpu_check_on_cpu(tiny_folder, tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--data", tiny_folder,
         "--only", "sync", "ddp", "--json", str(out), "--workdir", str(tmp_path / "w")],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("skip sync") and "needs CUDA" in line for line in lines)
    assert any(line.startswith("pass ddp") and "2 process(es)" in line for line in lines)
    report = json.loads(out.read_text())
    assert [row["check"] for row in report["checks"]] == ["sync", "ddp"]
    assert [row["status"] for row in report["checks"]] == ["skip", "pass"]
    assert report["failed"] == 0 and report["environment"]["torch"]
