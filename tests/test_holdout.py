"""Data without a test split (dmolony3 evaluated UTKFace on a 20 % hold-out): --test-fraction F
holds out F of each class of train, chosen by --seed, for linear_evaluation.py and finetune.py;
without it the missing split stays a one-line error."""
import csv
import json
import os
import shutil

import pytest

from conftest import assert_one_line_error, run_in_process, run_script


@pytest.fixture(scope="module")
def train_only(tiny_folder, tmp_path_factory):
    data = tmp_path_factory.mktemp("train_only") / "data"
    shutil.copytree(os.path.join(tiny_folder, "train"), data / "train")
    return data


def test_linear_evaluation_holds_out_a_seeded_stratified_test_split(train_only, pretrained,
                                                                    tmp_path):
    """Without a test split, linear_evaluation.py stops with one line; with --test-fraction 0.2
    it holds out 2 of each class's 12 images and evaluates on them. The held-out images are
    those labelled_train_test picks for the same arguments (the command line's split, again the
    same for seed 0, other images for seed 1): a function of the seed."""
    import linear_evaluation
    from utils.sources import labelled_train_test
    model = os.path.join(pretrained[0], "model", "model.pth")
    probe = ["-bs", "12", "-nw", "0", "--epochs", "50"]
    missing = run_in_process("linear_evaluation.py", train_only, model, tmp_path / "x", *probe)
    assert_one_line_error(missing, "test")
    out = tmp_path / "a"
    result = run_script("linear_evaluation.py", train_only, model, out, *probe,
                        "--test-fraction", "0.2", "--seed", "0")
    assert result.returncode == 0, result.stderr
    assert "test: 6 training images held out (--test-fraction 0.2 of each class" \
        in result.stdout
    report = json.load(open(out / "report.json"))
    assert (report["n_train"], report["n_test"]) == (30, 6)
    assert report["train_per_class"] == [10, 10, 10]
    with open(out / "predictions.csv") as f:
        command_line = sorted(row["image"] for row in csv.DictReader(f))
    held_out = {}
    for name, seed in (("b", "0"), ("c", "1")):
        args = linear_evaluation.get_args_parser().parse_args(
            [str(train_only), model, str(tmp_path / name), *probe, "--test-fraction", "0.2",
             "--seed", seed])
        train, test = labelled_train_test(args)
        assert (len(train), len(test)) == (30, 6)
        assert sorted(test.labels.tolist()) == [0, 0, 1, 1, 2, 2]  # stratified
        assert not set(train.paths) & set(test.paths)
        held_out[name] = sorted(test.paths)
    assert command_line == held_out["b"] and command_line != held_out["c"]


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
