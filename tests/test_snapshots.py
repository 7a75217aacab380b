"""Accuracy over pretraining epochs (dmolony3's table): main.py --save-every E keeps
model/epoch_NNNN.pth, every script loads one, and linear_evaluation.py --snapshots evaluates each
(h and z) into acc_vs_epoch.csv, whose figures equal a plain linear_evaluation.py of that file."""
import csv
import json
import os

import pytest
import torch

from conftest import FAST_PRETRAIN, assert_one_line_error, run_in_process, run_script


@pytest.fixture(scope="module")
def snapshot_run(tiny_folder, tmp_path_factory):
    respath = tmp_path_factory.mktemp("snap")
    result = run_script("main.py", tiny_folder, respath, "--epochs", "4", "--save-every", "2",
                        *FAST_PRETRAIN)
    assert result.returncode == 0, result.stderr
    return respath


def test_save_every_keeps_the_weights_of_those_epochs(snapshot_run):
    model_dir = snapshot_run / "model"
    assert sorted(f for f in os.listdir(model_dir) if f.startswith("epoch_")) == [
        "epoch_0002.pth", "epoch_0004.pth"]
    last = torch.load(model_dir / "epoch_0004.pth", weights_only=True)
    final = torch.load(model_dir / "model.pth", weights_only=True)
    assert last["epoch"] == 4 and last["step"] == 12 and last["model_meta"]["arch"] == "resnet18"
    assert all(torch.equal(last["model"][k], v) for k, v in final.items())
    early = torch.load(model_dir / "epoch_0002.pth", weights_only=True)
    assert not all(torch.equal(early["model"][k], v) for k, v in final.items())


def test_snapshots_evaluates_every_epoch_as_a_plain_run_would(snapshot_run, tiny_folder,
                                                              tmp_path):
    out = tmp_path / "curve"
    probe = ["-bs", "12", "-nw", "0", "--epochs", "100"]
    result = run_script("linear_evaluation.py", tiny_folder, snapshot_run / "model", out,
                        "--snapshots", *probe)
    assert result.returncode == 0, result.stderr
    with open(out / "acc_vs_epoch.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["2", "4"]
    assert (out / "acc_vs_epoch.png").stat().st_size > 5000
    single = tmp_path / "single"
    plain = run_script("linear_evaluation.py", tiny_folder,
                       snapshot_run / "model" / "epoch_0002.pth", single, *probe)
    assert plain.returncode == 0, plain.stderr
    accuracy = json.load(open(single / "report.json"))["accuracy"]
    assert float(rows[0]["accuracy_h"]) == pytest.approx(accuracy, abs=1e-4)


def test_snapshots_without_any_is_one_line_error(pretrained, tiny_folder, tmp_path):
    result = run_in_process("linear_evaluation.py", tiny_folder,
                            os.path.join(pretrained[0], "model"), tmp_path / "o", "--snapshots")
    assert_one_line_error(result, "no epoch_NNNN.pth", "--save-every")
