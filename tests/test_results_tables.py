"""The measured figures of the documentation: every generated table equals what
scripts/results_tables.py makes of the results files, and every results file carries its
provenance (command, commit, machine, versions, date)."""
import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import results_tables  # noqa: E402


def test_generated_tables_match_their_results_files():
    result = subprocess.run([sys.executable, "scripts/results_tables.py", "--check"], cwd=REPO,
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


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "results", "*.json"))),
                         ids=os.path.basename)
def test_results_files_carry_their_provenance(path):
    with open(path) as f:
        data = json.load(f)
    assert data.get("command") and data.get("date"), "written without its command and date"
    environment = data.get("device") or data.get("versions") or {}
    assert environment.get("torch"), "no library versions"
    assert (data.get("device") or {}).get("git_commit") or data.get("git_commit"), "no commit"
    assert data.get("machine"), "no machine"


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
    for folder, acc in (("linear_eval", 0.823), ("reference_random", 0.785),
                        ("reference_pixels", 0.804)):
        (out / folder).mkdir()
        (out / folder / "report.json").write_text(json.dumps({"accuracy": acc}))
    kept = tmp_path / "demo.json"
    result = subprocess.run([sys.executable, "scripts/demo_summary.py", str(out), "--json",
                             str(kept)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for line in ("82.30 %  SimCLR (this run)", "78.50 %  the same ResNet-18, randomly",
                 "80.40 %  raw pixels", "loss per epoch 5.70, 5.15, 4.87",
                 str(out / "linear_eval" / "confusion_matrix.png"),
                 str(out / "plots" / "training_losses.png"), "vary by about a point"):
        assert line in result.stdout, result.stdout
    figures = json.loads(kept.read_text())
    assert figures["test_accuracy"] == {"linear_eval": 0.823, "reference_random": 0.785,
                                        "reference_pixels": 0.804}
    assert figures["command"] == "bash scripts/demo.sh" and figures["git_commit"] == "abc1234"
    assert figures["versions"]["torch"] == "2.14.1" and figures["machine"]["cpu_count"]
    missing = subprocess.run([sys.executable, "scripts/demo_summary.py", str(tmp_path / "no")],
                             cwd=REPO, capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ")


def test_the_front_page_quotes_no_figure_outside_generated_tables():
    """README.md's measured figures all come from results files (the docs pages are being moved
    over: `scripts/results_tables.py --untraced` counts what is left)."""
    assert results_tables.untraced_figures("took 724 s, 82.3 %\n```\n5 s\n```\n") == \
        ["724 s", "82.3 %"]
    with open(os.path.join(REPO, "README.md")) as f:
        assert results_tables.untraced_figures(f.read()) == []
