"""Weights of other projects as MODELPATH (utils/foreign_weights.py): thunderInfy/simclr's
model.pth (torchvision resnet18, fc = fc1/ReLU/fc2/ReLU/fc3, `module.` keys), a torchvision
ImageNet-layout state dict (its 1000-class fc dropped) and bare backbones. The converted model's
h and z equal the original torchvision module's outputs on the same input; the scripts take the
files through their real command lines. Every file is built here (no download)."""
import csv
import json
import os
import shutil
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from conftest import FAST_PRETRAIN, assert_one_line_error, run_in_process, run_script
from utils.errors import UserError
from utils.foreign_weights import WeightSettings
from utils.model import load_trained_model


def thunderinfy_resnet18():
    """The network of thunderInfy/simclr's main.py: resnet18 with its Sequential fc head."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    net.fc = nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(512, 100)), ("added_relu1", nn.ReLU(inplace=True)),
        ("fc2", nn.Linear(100, 100)), ("added_relu2", nn.ReLU(inplace=True)),
        ("fc3", nn.Linear(100, 100))]))
    return net


@pytest.fixture(scope="module")
def thunderinfy_file(tmp_path_factory):
    """thunderInfy's model.pth as its DataParallel training saved it (`module.` keys)."""
    path = tmp_path_factory.mktemp("thunder") / "model.pth"
    net = thunderinfy_resnet18()
    torch.save(nn.DataParallel(net).state_dict(), path)
    return str(path), net.eval()


def outputs_match(model, reference, x, remove_head):
    """max |h - reference_h|, max |z - reference(x)| with the reference's fc as the head."""
    with torch.no_grad():
        h, z = model(x)
        full = reference(x)
        head, reference.fc = reference.fc, nn.Identity()
        backbone = reference(x)
        reference.fc = head
    return (h - backbone).abs().max().item(), (z - (backbone if remove_head else full)).abs().max().item()


def test_thunderinfy_model_gives_the_original_networks_h_and_z(thunderinfy_file):
    path, net = thunderinfy_file
    model, meta = load_trained_model(path, settings=WeightSettings(image_size=32))
    assert {k: meta[k] for k in ("arch", "stem", "in_channels", "proj_dims", "image_size")} == {
        "arch": "resnet18", "stem": "imagenet", "in_channels": 3, "proj_dims": [100, 100, 100],
        "image_size": 32}
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["head_norm"] is False
    h_diff, z_diff = outputs_match(model, net, torch.randn(4, 3, 32, 32), remove_head=False)
    assert h_diff < 1e-5 and z_diff < 1e-5


@pytest.mark.parametrize("arch, stem, channels", [("resnet50", "imagenet", 3),
                                                  ("resnet34", "cifar", 1)])
@pytest.mark.parametrize("fc", ["classifier", "removed", "identity"])
def test_torchvision_layout_and_bare_backbones(tmp_path, arch, stem, channels, fc):
    """A torchvision ImageNet-layout file (fc of 1000 classes), one with fc deleted and one
    with fc = Identity: the architecture, stem and channels are inferred, the classifier is
    dropped, h equals the torchvision backbone's output and z = h."""
    torch.manual_seed(1)
    net = torchvision.models.__dict__[arch](weights=None)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    state = net.state_dict()
    if fc != "classifier":
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        net.fc = nn.Identity()
    path = tmp_path / f"{arch}.pth"
    torch.save(state, path)
    model, meta = load_trained_model(str(path), settings=WeightSettings(image_size=32))
    assert (meta["arch"], meta["stem"], meta["in_channels"], meta["proj_dims"]) == (
        arch, stem, channels, [])
    assert len(meta["mean"]) == channels
    h_diff, z_diff = outputs_match(model, net.eval(), torch.randn(2, channels, 32, 32),
                                   remove_head=True)
    assert h_diff < 1e-4 and z_diff < 1e-4


def test_state_dicts_that_are_not_supported_are_one_line_errors(tmp_path):
    net = torchvision.models.resnet101(weights=None)
    torch.save(net.state_dict(), tmp_path / "r101.pth")
    with pytest.raises(UserError, match=r"\[3, 4, 23, 3\] blocks"):
        load_trained_model(str(tmp_path / "r101.pth"))
    net = torchvision.models.resnet18(weights=None)
    net.fc = nn.Sequential(nn.Linear(512, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 8))
    torch.save(net.state_dict(), tmp_path / "bn_head.pth")
    with pytest.raises(UserError, match="fc.1 is not a Linear layer"):
        load_trained_model(str(tmp_path / "bn_head.pth"))
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "rgb.pth")
    with pytest.raises(UserError, match="--mean/--std give 1/1 value"):
        load_trained_model(str(tmp_path / "rgb.pth"), settings=WeightSettings(mean=[0.5],
                                                                              std=[0.5]))


def test_linear_evaluation_sweeps_the_thunderinfy_head(thunderinfy_file, tiny_folder, tmp_path):
    """linear_evaluation.py on thunderInfy's file: it says what it found, the default evaluates
    h (all 3 Linear layers removed) and --sweep gives every cut point's feature size."""
    path, _ = thunderinfy_file
    out = tmp_path / "le"
    result = run_script("linear_evaluation.py", tiny_folder, path, out, "-bs", "12", "-nw", "0",
                        "--image-size", "32", "--sweep", "--epochs", "100")
    assert result.returncode == 0, result.stderr
    assert "torchvision-layout resnet18 (imagenet stem, 3 channel(s)), head of 3 Linear" \
        in result.stdout
    with open(out / "acc_vs_layer.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["remove_top_layers"], r["feature_dim"]) for r in rows] == [
        ("0", "100"), ("1", "100"), ("2", "100"), ("3", "512")]
    assert json.load(open(out / "report.json"))["remove_top_layers"] == 3


def test_further_pretraining_and_finetuning_from_thunderinfy_weights(thunderinfy_file,
                                                                     tiny_folder, tmp_path):
    """main.py --fin and finetune.py --freeze start from the file: the frozen encoder stays
    the file's backbone, and the pretrained run (head without BatchNorm, as in the file) loads
    into linear evaluation."""
    path, net = thunderinfy_file
    tuned = tmp_path / "ft"
    result = run_script("finetune.py", tiny_folder, path, tuned, "--freeze", "--epochs", "1",
                        "-bs", "8", "-nw", "0", "--image-size", "32")
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(tuned / "checkpoint.pth", weights_only=True)
    for key, value in net.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(ckpt["model"][f"encoder.{key}"], value), key
    further = tmp_path / "further"
    result = run_script("main.py", tiny_folder, further, "--epochs", "1", "--image-size", "16",
                        "-bs", "12", "-nw", "0", "--fin", path)
    assert result.returncode == 0, result.stderr
    run = json.load(open(further / "run.json"))
    assert run["model_meta"]["proj_dims"] == [100, 100, 100]
    assert run["model_meta"]["head_norm"] is False and run["model_meta"]["in_channels"] == 1
    evaluation = run_script("linear_evaluation.py", tiny_folder, further / "model" / "model.pth",
                            tmp_path / "le", "-bs", "12", "-nw", "0", "--epochs", "50")
    assert evaluation.returncode == 0, evaluation.stderr


def test_a_foreign_dict_is_still_a_one_line_error(tiny_folder, tmp_path):
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "half.pth")
    result = run_in_process("linear_evaluation.py", tiny_folder, tmp_path / "half.pth",
                            tmp_path / "o")
    assert_one_line_error(result, "half.pth", "not a model of this toolkit")


def tree_state(root):
    """{relative path: bytes} of every file under `root`, and the folders."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), root) + "/"] = None
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                found[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return found


def test_thunderinfy_respath_is_refused_unchanged_and_fin_continues(thunderinfy_file,
                                                                    tiny_folder, tmp_path):
    """A RESPATH holding thunderInfy's three files is not a run of ours to resume: one line
    that names --fin, and RESPATH exactly as it was (no data index, no data_stats.json, no
    lock). The command it suggests then pretrains from those weights into a new RESPATH."""
    respath = tmp_path / "thunder_run"
    (respath / "model").mkdir(parents=True)
    shutil.copy(thunderinfy_file[0], respath / "model" / "model.pth")
    torch.save({"state": {}, "param_groups": []}, respath / "model" / "optimizer.pth")
    np.savez(respath / "model" / "lossesfile.npz", np.linspace(5, 4, 30))
    before = tree_state(respath)
    result = run_in_process("main.py", tiny_folder, respath, "--epochs", "1", *FAST_PRETRAIN)
    error = assert_one_line_error(result, "another project's model", "--fin")
    assert tree_state(respath) == before
    fin = error.split("--fin ", 1)[1].strip()
    assert fin == str(respath / "model" / "model.pth")
    result = run_in_process("main.py", tiny_folder, tmp_path / "continued", "--epochs", "1",
                            "--fin", fin, *FAST_PRETRAIN)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "continued" / "model" / "model.pth").exists()
    assert tree_state(respath) == before
