"""Data without a test split (dmolony3 evaluated UTKFace on a 20 % hold-out): --test-fraction F
holds out F of each class of train, chosen by --seed, for linear_evaluation.py and finetune.py;
without it the missing split stays a one-line error."""
import csv
import json
import os
import shutil

import pytest

from conftest import assert_one_line_error, run_script


@pytest.fixture(scope="module")
def train_only(tiny_folder, tmp_path_factory):
    data = tmp_path_factory.mktemp("train_only") / "data"
    shutil.copytree(os.path.join(tiny_folder, "train"), data / "train")
    return data


def test_linear_evaluation_holds_out_a_seeded_stratified_test_split(train_only, pretrained,
                                                                    tmp_path):
    model = os.path.join(pretrained[0], "model", "model.pth")
    probe = ["-bs", "12", "-nw", "0", "--epochs", "50"]
    missing = run_script("linear_evaluation.py", train_only, model, tmp_path / "x", *probe)
    assert_one_line_error(missing, "test")
    runs = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        out = tmp_path / name
        result = run_script("linear_evaluation.py", train_only, model, out, *probe,
                            "--test-fraction", "0.2", "--seed", seed)
        assert result.returncode == 0, result.stderr
        assert "test: 6 training images held out (--test-fraction 0.2 of each class" \
            in result.stdout
        report = json.load(open(out / "report.json"))
        assert (report["n_train"], report["n_test"]) == (30, 6)
        assert report["train_per_class"] == [10, 10, 10]
        with open(out / "predictions.csv") as f:
            runs[name] = sorted(row["image"] for row in csv.DictReader(f))
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]  # a function of the seed


def test_finetune_uses_the_same_hold_out(train_only, pretrained, tmp_path):
    model = os.path.join(pretrained[0], "model", "model.pth")
    out = tmp_path / "ft"
    result = run_script("finetune.py", train_only, model, out, "--freeze", "--epochs", "1",
                        "-bs", "8", "-nw", "0", "--test-fraction", "0.2")
    assert result.returncode == 0, result.stderr
    report = json.load(open(out / "report.json"))
    assert sum(report[name]["support"] for name in report
               if isinstance(report[name], dict) and "support" in report[name]
               and name not in ("macro avg", "weighted avg")) == 6
