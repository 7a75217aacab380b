"""main.py on a RESPATH whose checkpoint.pth is gone (users delete it, or copy only the
original project's three files): it resumes from model/model.pth, optimizer.pth and
lossesfile.npz, says what it restored, and never overwrites a model.pth it cannot use."""
import hashlib
import os
import shutil

import numpy as np
import torch

from conftest import FAST_PRETRAIN, assert_one_line_error, run_in_process, run_script


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def without_checkpoint(pretrained, tmp_path, keep=("model.pth", "optimizer.pth",
                                                   "lossesfile.npz")):
    """A copy of the 2-epoch run without checkpoint.pth, holding only `keep` of its model/
    files (and run.json)."""
    copy = tmp_path / "copy"
    shutil.copytree(pretrained[0], copy)
    os.remove(copy / "checkpoint.pth")
    for name in os.listdir(copy / "model"):
        if name not in keep:
            os.remove(copy / "model" / name)
    return copy


def test_resume_from_model_optimizer_and_losses(pretrained, tiny_folder, tmp_path):
    """Position step 6 of the lossesfile, the weights and the optimizer state; the same
    --epochs is a finished run that leaves model.pth as it is; a larger one continues, with a
    fresh online probe and the probe accuracies of the lossesfile kept."""
    copy = without_checkpoint(pretrained, tmp_path)
    before = np.load(copy / "model" / "lossesfile.npz")["step_losses"]
    probe_before = np.load(copy / "model" / "lossesfile.npz")["online_probe"]
    model_digest = digest(copy / "model" / "model.pth")
    same = run_script("main.py", tiny_folder, copy, "--epochs", "2", *FAST_PRETRAIN)
    assert same.returncode == 0, same.stderr
    assert "already holds a finished run" in same.stdout
    assert digest(copy / "model" / "model.pth") == model_digest
    more = run_script("main.py", tiny_folder, copy, "--epochs", "3", *FAST_PRETRAIN)
    assert more.returncode == 0, more.stderr
    line = next(line for line in more.stdout.splitlines() if "without checkpoint.pth" in line)
    assert "the optimizer state of optimizer.pth" in line and "step 6 (epoch 2)" in line
    assert "not bit-exact" in line and "epoch 3/3" in more.stdout and "epoch 1/3" not in more.stdout
    assert "online probe: none in the run resumed, a fresh probe starts" in more.stdout
    after = np.load(copy / "model" / "lossesfile.npz")["step_losses"]
    np.testing.assert_array_equal(after[:6], before)
    probe_after = np.load(copy / "model" / "lossesfile.npz")["online_probe"]
    assert probe_after[:, 0].tolist() == [1, 2, 3]
    np.testing.assert_array_equal(probe_after[:2], probe_before)
    assert len(after) == 9 and np.all(np.isfinite(after))
    assert torch.load(copy / "checkpoint.pth", weights_only=True)["step"] == 9


def test_original_projects_files_resume(pretrained, tiny_folder, tmp_path):
    """model.pth with `module.` keys, a lossesfile.npz of one unnamed array of per-batch losses
    (np.savez(path, losses)) and no run.json: the model is described by the flags, the
    position is the array's length, and an optimizer of another kind is left out, with a note."""
    copy = without_checkpoint(pretrained, tmp_path, keep=("model.pth", "optimizer.pth"))
    os.remove(copy / "run.json")
    state = torch.load(copy / "model" / "model.pth", weights_only=True)
    torch.save({f"module.{k}": v for k, v in state.items()}, copy / "model" / "model.pth")
    np.savez(copy / "model" / "lossesfile.npz", np.full(3, 2.5))
    result = run_script("main.py", tiny_folder, copy, "--epochs", "2", *FAST_PRETRAIN,
                        "--optimizer", "lars")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if "without checkpoint.pth" in line)
    assert "step 3 (epoch 1)" in line and "not optimizer.pth" in line
    losses = np.load(copy / "model" / "lossesfile.npz")["step_losses"]
    assert len(losses) == 6 and np.all(losses[:3] == 2.5)


def test_model_of_other_flags_is_one_line_error_and_left_alone(pretrained, tiny_folder,
                                                               tmp_path):
    copy = without_checkpoint(pretrained, tmp_path)
    os.remove(copy / "run.json")  # nothing describes the model but the flags
    model_digest = digest(copy / "model" / "model.pth")
    result = run_in_process("main.py", tiny_folder, copy, "--epochs", "3", *FAST_PRETRAIN,
                            "--arch", "resnet34")
    assert_one_line_error(result, "model.pth", "resnet34", "--fresh", "another RESPATH")
    (copy / "model" / "lossesfile.npz").write_bytes(b"not an npz")
    result = run_in_process("main.py", tiny_folder, copy, "--epochs", "3", *FAST_PRETRAIN)
    assert_one_line_error(result, "lossesfile.npz", "--fresh")
    assert digest(copy / "model" / "model.pth") == model_digest
