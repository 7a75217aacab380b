"""label_efficiency.py through its real command line on the tiny folder: one run per method,
budget and seed, and a CSV whose means and standard deviations equal numpy's over the runs'
own reports; running it again keeps the finished runs."""
import csv
import json
import os

import numpy as np
import pytest

from conftest import assert_one_line_error, run_in_process, run_script

ARGS = ["--budgets-per-class", "2", "--seeds", "0", "1", "--methods", "linear", "baseline",
        "--epochs", "1", "--min-steps", "0", "-bs", "8", "-nw", "0"]


@pytest.fixture(scope="module")
def study(tiny_folder, pretrained, tmp_path_factory):
    respath = str(tmp_path_factory.mktemp("label_efficiency"))
    model = os.path.join(pretrained[0], "model", "model.pth")
    result = run_script("label_efficiency.py", tiny_folder, model, respath, *ARGS)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return respath, model, result


def test_summary_equals_numpy_over_the_runs(study):
    respath, _, result = study
    with open(os.path.join(respath, "label_efficiency.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["budget_value"]) for r in rows] == [("linear", "2"), ("baseline", "2")]
    for row in rows:
        reports = [json.load(open(os.path.join(respath, row["method"], row["budget"],
                                               f"seed{s}", "report.json"))) for s in (0, 1)]
        assert [r["train_per_class"] for r in reports] == [[int(row["budget_value"])] * 3] * 2
        assert float(row["labels_per_class"]) == int(row["budget_value"])
        for key in ("accuracy", "balanced_accuracy", "macro_f1"):
            values = [r[key] for r in reports]
            assert float(row[f"{key}_mean"]) == pytest.approx(np.mean(values), abs=1e-4)
            assert float(row[f"{key}_std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-4)
    assert os.path.getsize(os.path.join(respath, "label_efficiency.png")) > 0
    assert result.stdout.count("labels per class") == 4


def test_second_run_keeps_finished_runs(study, tiny_folder):
    respath, model, _ = study
    again = run_script("label_efficiency.py", tiny_folder, model, respath, *ARGS)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("kept)") == 4


def test_failed_run_names_its_log(study, tiny_folder, tmp_path):
    _, model, _ = study
    result = run_in_process("label_efficiency.py", tiny_folder, model, tmp_path / "out",
                            "--budgets-per-class", "50", "--seeds", "0", "--methods", "linear",
                            "-nw", "0")
    assert_one_line_error(result, "class", "50")
