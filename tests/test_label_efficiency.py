"""label_efficiency.py through its real command line on the tiny folder: one run per method,
budget and seed, a CSV whose means and standard deviations equal numpy's over the runs' own
reports, references equal to linear_evaluation.py's on the same subset, the side-by-side
table; running it again keeps the finished runs."""
import csv
import json
import os

import numpy as np
import pytest

from conftest import assert_one_line_error, run_in_process, run_script

METHODS = ["linear", "baseline", "pixels", "random"]
ARGS = ["--budgets-per-class", "2", "--seeds", "0", "1", "--methods", *METHODS,
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
    assert [(r["method"], r["budget_value"]) for r in rows] == [(m, "2") for m in METHODS]
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
    assert result.stdout.count("labels per class") == 8
    header = next(line for line in result.stdout.splitlines() if "labels/class" in line)
    row = next(line for line in result.stdout.splitlines() if line.strip().startswith("2_per"))
    assert header.split()[2:] == METHODS and row.count("±") == len(METHODS)


@pytest.mark.parametrize("reference", ["pixels", "random"])
def test_references_equal_linear_evaluation_on_the_same_subset(study, tiny_folder, tmp_path,
                                                               reference):
    respath, model, _ = study
    direct = run_in_process("linear_evaluation.py", tiny_folder, model, tmp_path / "direct",
                            "--reference", reference, "--samples-per-class", "2", "--seed", "1",
                            "-nw", "0")
    assert direct.returncode == 0, direct.stderr[-2000:]
    ours = json.load(open(os.path.join(respath, reference, "2_per_class", "seed1",
                                       "report.json")))
    theirs = json.load(open(tmp_path / "direct" / "report.json"))
    assert ours["reference"] == theirs["reference"] == reference
    assert ours["accuracy"] == theirs["accuracy"] and ours["macro_f1"] == theirs["macro_f1"]
    assert ours["train_per_class"] == theirs["train_per_class"] == [2, 2, 2]


def test_budgets_per_class_and_fractions_together():
    import label_efficiency
    parse = label_efficiency.get_args_parser().parse_args
    both = label_efficiency.budget_list(parse(["D", "M", "R", "--spc", "5", "--fractions", "0.1"]))
    assert both == [("--samples-per-class", 5, "5_per_class"),
                    ("--label-fraction", 0.1, "fraction_0.1")]
    assert [b[1] for b in label_efficiency.budget_list(parse(["D", "M", "R"]))] == [0.01, 0.1, 1]


def test_second_run_keeps_finished_runs(study, tiny_folder):
    respath, model, _ = study
    again = run_script("label_efficiency.py", tiny_folder, model, respath, *ARGS)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("kept)") == 8


def test_failed_run_names_its_log(study, tiny_folder, tmp_path):
    _, model, _ = study
    result = run_in_process("label_efficiency.py", tiny_folder, model, tmp_path / "out",
                            "--budgets-per-class", "50", "--seeds", "0", "--methods", "linear",
                            "-nw", "0")
    assert_one_line_error(result, "class", "50")
