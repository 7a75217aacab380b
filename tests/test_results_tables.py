"""The measured figures of the documentation: every generated table equals what
tools/results_tables.py makes of the results files, and every results file carries its
provenance (command, commit, machine, versions, date)."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
import results_tables  # noqa: E402


def test_generated_tables_match_their_results_files():
    result = subprocess.run([sys.executable, "tools/results_tables.py", "--check"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    used = set()
    for path in results_tables.documents():
        used |= {m.group("name") for m in results_tables.BLOCK.finditer(open(path).read())}
    assert used, "no document holds a generated table"


def test_a_retyped_figure_is_caught():
    """A table whose figure was edited by hand is stale, and rendering restores it."""
    table = "\n".join(results_tables.startup_table())
    text = f"x\n<!-- results-table: startup -->\n{table}\n<!-- /results-table -->\n"
    assert results_tables.render(text, "doc.md") == text
    edited = text.replace(table.splitlines()[2], table.splitlines()[2].replace("|", "| 9", 1))
    assert edited != text and results_tables.render(edited, "doc.md") == text
    with pytest.raises(ValueError, match="unknown results table 'nope'"):
        results_tables.render("<!-- results-table: nope -->\n<!-- /results-table -->", "doc.md")


# the results files the docs are generated from (results/demo/ and results/measure/ hold the
# measured runs' own outputs, collected into these)
RESULTS = sorted(glob.glob(os.path.join(REPO, "results", "*.json")) +
                 glob.glob(os.path.join(REPO, "results", "docs", "*.json")))


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: os.path.relpath(p, REPO))
def test_results_files_carry_their_provenance(path):
    """bench.py and demo_summary.py files hold one measurement, tools/record.py files a list
    of runs of one command: each with its date, commit, machine and library versions."""
    with open(path) as f:
        data = json.load(f)
    assert data.get("command"), "written without its command"
    for run in data.get("runs", [data]):
        assert run.get("date"), "no date"
        environment = run.get("device") or run.get("versions") or {}
        assert environment.get("torch"), "no library versions"
        assert (run.get("device") or {}).get("git_commit") or run.get("git_commit"), "no commit"
        assert run.get("machine"), "no machine"


def test_record_keeps_a_command_its_outputs_and_provenance(tmp_path):
    """tools/record.py runs the command, keeps the collected files and sizes with the
    provenance (a repeated --collect adds files, as measure_docs.sh passes them), adds a run when the same command is recorded again, refuses another command
    in the same file, and records nothing when the command fails."""
    out, kept = tmp_path / "out", tmp_path / "kept.json"
    write = (f"import json, os; os.makedirs({str(out)!r}, exist_ok=True); "
             f"json.dump({{'accuracy': 0.5}}, open({str(out / 'r.json')!r}, 'w')); "
             f"open({str(out / 't.csv')!r}, 'w').write('k,acc\\na,0.25\\nb,1\\n')")
    command = [sys.executable, "-c", write]
    record = [sys.executable, "tools/record.py", str(kept), "--collect", str(out / "r.json"),
              "--file-sizes", str(out / "t.csv"), "--collect", str(out / "t.csv"), "--"]
    for _ in range(2):
        result = subprocess.run(record + command, cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    data = json.loads(kept.read_text())
    assert len(data["runs"]) == 2 and data["command"].startswith(sys.executable)
    run = data["runs"][1]
    assert run["outputs"][str(out / "r.json")] == {"accuracy": 0.5}
    assert run["outputs"][str(out / "t.csv")] == [{"k": "a", "acc": 0.25}, {"k": "b", "acc": 1}]
    assert run["file_sizes"] == {str(out / "t.csv"): len("k,acc\na,0.25\nb,1\n")}
    assert run["versions"]["torch"] == torch.__version__ and run["machine"]["cpu_count"]
    assert run["git_commit"] and run["wall_s"] >= 0
    other = subprocess.run(record + [sys.executable, "-c", "pass"], cwd=REPO,
                           capture_output=True, text=True)
    assert other.returncode != 0 and "records another command" in other.stderr
    failed = subprocess.run([sys.executable, "tools/record.py", str(tmp_path / "f.json"), "--",
                             sys.executable, "-c", "raise SystemExit(3)"], cwd=REPO,
                            capture_output=True, text=True)
    assert failed.returncode == 3 and not (tmp_path / "f.json").exists()


def test_record_adds_to_a_file_of_the_tool_before_it_moved_to_tools(tmp_path):
    """A results file recorded when the tool was scripts/NAME.py (results/docs/recipe_*_val.json
    by scripts/val_eval.py) takes the run of tools/NAME.py and keeps its recorded command."""
    kept = tmp_path / "kept.json"
    legacy = f"{sys.executable} scripts/val_eval.py --help"
    kept.write_text(json.dumps({"command": legacy, "runs": [{"date": "earlier"}]}))
    result = subprocess.run([sys.executable, "tools/record.py", str(kept), "--", sys.executable,
                             "tools/val_eval.py", "--help"], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    data = json.loads(kept.read_text())
    assert data["command"] == legacy and len(data["runs"]) == 2


def test_demo_summary_prints_its_table_and_keeps_the_figures(tmp_path):
    """scripts/demo_summary.py (the end of demo.sh) on a finished demo's files: the table of
    the three probes, the loss per epoch, where the outputs are, what varies, and the JSON
    with provenance that the README's demo table is generated from."""
    out = tmp_path / "demo"
    run = {"environment": {"git_commit": "abc1234", "device": "cpu", "platform": "Linux",
                           "python": "3.11", "torch": "2.14.1", "torchvision": "0.29.1",
                           "numpy": "2"},
           "epochs_done": 3, "steps_per_epoch": 20, "args": {"batch_size": 250},
           "epoch_losses": [5.7012, 5.1534, 4.8711], "epoch_positive_pair_top1": [0.03, 0.04, 0.07],
           "wall_time_s": 700.0, "images_per_s": 21.4, "peak_memory_mb": 3072.0}
    (out / "model").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps(run))
    for folder, acc, knn in (("linear_eval", 0.823, 0.761), ("reference_random", 0.785, 0.772),
                             ("reference_pixels", 0.804, 0.795)):
        (out / folder).mkdir()
        (out / folder / "report.json").write_text(json.dumps({"accuracy": acc,
                                                              "knn_accuracy": knn}))
    kept = tmp_path / "demo.json"
    result = subprocess.run([sys.executable, "scripts/demo_summary.py", str(out), "--json",
                             str(kept)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for line in ("probe  82.30 %   kNN  76.10 %  SimCLR (this run)",
                 "probe  78.50 %   kNN  77.20 %  the same ResNet-18, randomly",
                 "probe  80.40 %   kNN  79.50 %  raw pixels", "loss per epoch 5.70, 5.15, 4.87",
                 str(out / "linear_eval" / "confusion_matrix.png"),
                 str(out / "plots" / "training_losses.png"), "vary by about a point"):
        assert line in result.stdout, result.stdout
    figures = json.loads(kept.read_text())
    assert figures["command"] == "bash scripts/demo.sh" and len(figures["runs"]) == 1
    first = figures["runs"][0]
    assert first["test_accuracy"] == {"linear_eval": 0.823, "reference_random": 0.785,
                                      "reference_pixels": 0.804}
    assert first["test_knn_accuracy"] == {"linear_eval": 0.761, "reference_random": 0.772,
                                          "reference_pixels": 0.795}
    assert first["git_commit"] == "abc1234"
    # a second demo.sh on the finished run only re-evaluates: the same pretraining, one run
    again = subprocess.run([sys.executable, "scripts/demo_summary.py", str(out), "--json",
                            str(kept)], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0 and len(json.loads(kept.read_text())["runs"]) == 1
    # a new pretraining (other wall time and losses) is a second run, kept beside the first
    run.update(wall_time_s=650.0, epoch_losses=[5.6, 5.1, 4.8])
    (out / "run.json").write_text(json.dumps(run))
    third = subprocess.run([sys.executable, "scripts/demo_summary.py", str(out), "--json",
                            str(kept)], cwd=REPO, capture_output=True, text=True)
    assert third.returncode == 0, third.stderr
    runs = json.loads(kept.read_text())["runs"]
    assert [r["pretraining_s"] for r in runs] == [700.0, 650.0]
    assert first["versions"]["torch"] == "2.14.1" and first["machine"]["cpu_count"]
    missing = subprocess.run([sys.executable, "scripts/demo_summary.py", str(tmp_path / "no")],
                             cwd=REPO, capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ")


@pytest.mark.parametrize("path", results_tables.documents(),
                         ids=lambda p: os.path.relpath(p, REPO))
def test_no_page_quotes_a_figure_outside_generated_tables(path):
    """Every measured-looking figure (a number with %, s, img/s, MB, ...) of README.md and the
    docs pages sits in a table generated from a results file, or in a code block; the check
    itself finds figures in prose and leaves generated tables and code alone."""
    assert results_tables.untraced_figures("took 724 s, 82.3 %\n```\n5 s\n```\n") == \
        ["724 s", "82.3 %"]
    with open(path) as f:
        assert results_tables.untraced_figures(f.read()) == []


def bench_run(cpu, images_per_s, baseline):
    """A bench.py run of the two sections the end-to-end row reads, on CPU `cpu`."""
    return {"device": {"device": "cpu", "cpu_model": cpu, "cpu_count": 2},
            "sections": {"end2end": [{"arch": "resnet18", "image_size": 32, "workers": 2,
                                      "channels_last": True, "compile": False,
                                      "images_per_s": images_per_s,
                                      "over_baseline": images_per_s / baseline}]}}


def test_ranges_are_per_machine_and_ratios_within_a_run():
    """Rows of two CPUs stay apart: a figure's range covers one CPU's runs only, and a ratio
    is taken within each run before it is ranged (10/5 and 30/10, never 30/5)."""
    runs = [bench_run("Intel(R) Xeon(R) Processor", 10.0, 5.0),
            bench_run("AMD EPYC", 50.0, 40.0),
            bench_run("Intel(R) Xeon(R) Processor", 30.0, 10.0)]
    rows = results_tables.across(runs, "end2end", "arch", "workers")
    assert list(rows) == [("resnet18", 2, "Intel Xeon"), ("resnet18", 2, "AMD EPYC")]
    intel, amd = rows["resnet18", 2, "Intel Xeon"], rows["resnet18", 2, "AMD EPYC"]
    assert results_tables.span_of(intel, "images_per_s", "{:.1f}", " img/s") == \
        "10.0 to 30.0 img/s"
    assert results_tables.span_of(amd, "images_per_s", "{:.1f}") == "50.0"
    assert results_tables.span_of(intel, "over_baseline", results_tables.times) == \
        "2.00× to 3.00×"
    assert results_tables.machines_cell("Intel Xeon", intel) == "Intel Xeon (2 runs)"
    assert results_tables.machines_cell("AMD EPYC", amd) == "AMD EPYC"
