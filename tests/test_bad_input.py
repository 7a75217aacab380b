"""Every bad input gets one clear 'error:' line, a non-zero exit code and no traceback, through
the real command line; a corrupt image is skipped with a warning naming it. Most checks run the
command line in this process (conftest.run_in_process: the same parser, main() and error
handling, without seconds of interpreter start each); the first test shows both give the same
result, and main.py and linear_evaluation.py keep errors through real processes."""
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image

from conftest import (FAST_PRETRAIN, assert_one_line_error, run_in_process, run_script,
                      without_cuda)
from utils.model import build_model


def test_missing_datapath(tmp_path):
    """Through a real process and in this one: the same exit status and error line."""
    result = run_script("main.py", tmp_path / "nope", tmp_path / "out")
    line = assert_one_line_error(result, "nope", "does not exist")
    inside = run_in_process("main.py", tmp_path / "nope", tmp_path / "out")
    assert inside.returncode == result.returncode == 2
    assert assert_one_line_error(inside, "nope") == line


def test_datapath_without_train_folder(tmp_path):
    (tmp_path / "data" / "something").mkdir(parents=True)
    result = run_in_process("main.py", tmp_path / "data", tmp_path / "out")
    assert_one_line_error(result, "no train/ folder")


def test_empty_class_folder(tiny_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    (data / "train" / "Empty_class").mkdir()
    result = run_in_process("main.py", data, tmp_path / "out", *FAST_PRETRAIN)
    assert_one_line_error(result, "Empty_class", "has no images")


def test_batch_larger_than_data(tiny_folder, tmp_path):
    result = run_in_process("main.py", tiny_folder, tmp_path / "out", *FAST_PRETRAIN, "-bs", "500")
    assert_one_line_error(result, "batch size 500", "36 training images", "-bs 36")


@without_cuda
def test_cuda_requested_without_cuda(tiny_folder, tmp_path):
    result = run_in_process("main.py", tiny_folder, tmp_path / "out", "-c")
    assert_one_line_error(result, "-c", "no CUDA device")
    result = run_in_process("linear_evaluation.py", tiny_folder, "x.pth", tmp_path / "le", "-c")
    assert_one_line_error(result, "no CUDA device")
    result = run_in_process("main.py", tiny_folder, tmp_path / "out", "--multiple_gpus")
    assert_one_line_error(result, "--multiple_gpus needs -c")


def test_respath_not_writable(tiny_folder, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_in_process("main.py", tiny_folder, blocker / "out")
    assert_one_line_error(result, "not writable")


def test_corrupt_images_are_skipped_with_their_names(tiny_folder, tmp_path):
    """A non-image file with .png and a truncated PNG are replaced when they fail to decode
    (2 of 39 images: within --max-unreadable 0.1); both are named, and the run completes.
    With the default limit (1 %, at least one file) the same data stops with one line. (-bs
    13: three batches load all 39 images in the epoch.)"""
    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    (data / "train" / "Trouser" / "garbage.png").write_bytes(os.urandom(300))
    raw = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), np.uint8))
    raw.save(data / "train" / "Pullover" / "full.png")
    blob = (data / "train" / "Pullover" / "full.png").read_bytes()
    (data / "train" / "Pullover" / "truncated.png").write_bytes(blob[: len(blob) // 2])
    result = run_script("main.py", data, tmp_path / "out", "--epochs", "1", *FAST_PRETRAIN,
                        "-bs", "13", "--max-unreadable", "0.1")
    assert result.returncode == 0, result.stderr
    assert "garbage.png" in result.stderr and "truncated.png" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_script("main.py", data, tmp_path / "out2", "--epochs", "1", *FAST_PRETRAIN,
                        "-bs", "13")
    assert_one_line_error(result, "2 of the 39 images could not be decoded",
                          "--max-unreadable 0.01")


def test_resume_with_different_arch(pretrained, tmp_path):
    respath, _ = pretrained
    copy = tmp_path / "copy"
    shutil.copytree(respath, copy)
    ckpt = torch.load(copy / "checkpoint.pth", weights_only=True)
    datapath = ckpt["extra"]["data"]["datapath"]
    result = run_in_process("main.py", datapath, copy, "--epochs", "3", *FAST_PRETRAIN,
                            "--arch", "resnet34")
    assert_one_line_error(result, "--arch", "resnet18", "resnet34", "--fresh")


def test_modelpath_missing(tiny_folder, tmp_path):
    result = run_script("linear_evaluation.py", tiny_folder, tmp_path / "none.pth", tmp_path / "o")
    assert_one_line_error(result, "none.pth", "does not exist")


def test_modelpath_not_a_checkpoint(tiny_folder, tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    result = run_in_process("linear_evaluation.py", tiny_folder, text, tmp_path / "o")
    assert_one_line_error(result, "notes.pth", "not a checkpoint")
    other = tmp_path / "other.pth"
    torch.save({"epoch": 3, "weights": [1, 2]}, other)
    result = run_in_process("linear_evaluation.py", tiny_folder, other, tmp_path / "o")
    assert_one_line_error(result, "other.pth", "not a model of this toolkit")


def test_modelpath_of_another_architecture(pretrained, tiny_folder, tmp_path):
    """A ResNet-34 model.pth beside a checkpoint that describes a ResNet-18 run."""
    respath, _ = pretrained
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(os.path.join(respath, "checkpoint.pth"), folder / "checkpoint.pth")
    torch.save(build_model("resnet34", 1, "cifar", [32, 16]).state_dict(), folder / "model.pth")
    result = run_in_process("linear_evaluation.py", tiny_folder, folder / "model.pth",
                            tmp_path / "o")
    assert_one_line_error(result, "model.pth", "does not match")


def test_bare_weights_without_description(pretrained, tiny_folder, tmp_path):
    respath, _ = pretrained
    shutil.copy(os.path.join(respath, "model", "model.pth"), tmp_path / "model.pth")
    result = run_in_process("linear_evaluation.py", tiny_folder, tmp_path / "model.pth",
                            tmp_path / "o")
    assert_one_line_error(result, "no description of the model")


def test_evaluation_needs_labelled_test_split(pretrained, tmp_path, tiny_folder):
    respath, _ = pretrained
    data = tmp_path / "data"
    shutil.copytree(os.path.join(tiny_folder, "train"), data / "train")
    model = os.path.join(respath, "model", "model.pth")
    result = run_in_process("linear_evaluation.py", data, model, tmp_path / "o")
    assert_one_line_error(result, "no test/ folder")
    result = run_in_process("linear_evaluation.py", tiny_folder, model, tmp_path / "o",
                            "--remove_top_layers", "5")
    assert_one_line_error(result, "--remove_top_layers", "between 0 and 2")


def test_refused_new_run_leaves_no_respath(tiny_folder, tmp_path):
    """A refusal after the data were listed and measured (a --fin file that does not exist)
    removes the data index, data_stats.json and the lock it wrote, and the RESPATH it made,
    also as --fout's folder; a refusal in a RESPATH holding other files keeps them all."""
    for flags, created in (([], tmp_path / "new"), (["--fout", "sub"], tmp_path / "new2")):
        result = run_in_process("main.py", tiny_folder, created, "--fin", tmp_path / "nope.pth",
                                *flags, *FAST_PRETRAIN)
        assert_one_line_error(result, "nope.pth", "does not exist")
        assert not created.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    result = run_in_process("main.py", tiny_folder, kept, "--fin", tmp_path / "nope.pth",
                            *FAST_PRETRAIN)
    assert_one_line_error(result, "does not exist")
    assert sorted(os.listdir(kept)) == ["notes.txt"]


def test_corrupt_image_in_the_statistics_pass_is_named(tiny_folder, tmp_path):
    """17 images, one of them corrupt, -bs 4: whether or not the epoch's batches meet it (the
    17th image of an epoch is dropped), the statistics pass names it, and data_stats.json
    keeps it out of the count of images used."""
    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    files = sorted((data / "train").rglob("*.png"))
    for path in files[16:]:
        path.unlink()
    (data / "train" / "Trouser" / "broken.png").write_bytes(os.urandom(200))
    result = run_in_process("main.py", data, tmp_path / "out", "--epochs", "1", *FAST_PRETRAIN,
                            "-bs", "4")
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if "left out of the mean/std" in line]
    assert len(warning) == 1 and "broken.png" in warning[0]
    with open(tmp_path / "out" / "data_stats.json") as f:
        stats = json.load(f)["stats"]
    assert stats["n_images_used"] == 16 and stats["unreadable"][0].endswith("broken.png")
