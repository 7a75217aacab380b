"""main.py --tensorboard: the event files hold the named tags (read back with tensorboard's own
event reader) whose values equal the run's lossesfile.npz; the projector files list the test
images; without the flag tensorboard is never imported."""
import os

import numpy as np
import pytest

from conftest import FAST_PRETRAIN, assert_one_line_error, run_script

SCALARS = ("train/loss", "train/lr", "train/positive_pair_top1", "collapse/z_std_mean",
           "eval/knn_accuracy", "eval/online_probe_accuracy")


@pytest.fixture(scope="module")
def logged_run(tiny_folder, tmp_path_factory):
    respath = str(tmp_path_factory.mktemp("tb"))
    result = run_script("main.py", tiny_folder, respath, "--epochs", "2", "--tensorboard",
                        "--knn-every", "1", *FAST_PRETRAIN)
    assert result.returncode == 0, result.stderr[-3000:]
    return respath


def test_event_files_hold_every_tag_with_the_run_values(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(logged_run, "tensorboard"),
                              size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert set(SCALARS) <= set(tags["scalars"]), tags["scalars"]
    assert "views/pairs" in tags["images"] and "collapse/z_std" in tags["histograms"]
    losses = np.load(os.path.join(logged_run, "model", "lossesfile.npz"))
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == list(range(len(losses["step_losses"])))
    np.testing.assert_allclose([e.value for e in logged], losses["step_losses"], rtol=1e-6)
    np.testing.assert_allclose([e.value for e in events.Scalars("train/positive_pair_top1")],
                               losses["step_top1"], rtol=1e-6)
    knn = [e.value for e in events.Scalars("eval/knn_accuracy")]
    np.testing.assert_allclose(knn, losses["knn"][:, 1], rtol=1e-6)
    probe = [e.value for e in events.Scalars("eval/online_probe_accuracy")]
    np.testing.assert_allclose(probe, losses["online_probe"][:, 1], rtol=1e-6)
    spread = [e.value for e in events.Scalars("collapse/z_std_mean")]
    # per-dimension std of unit vectors in D = 16 dimensions: 0 (collapse) .. 1/sqrt(16)
    assert all(0 < v <= 0.25 + 1e-6 for v in spread), spread
    image = events.Images("views/pairs")[0]
    assert image.width > image.height  # two rows of views side by side


def test_projector_lists_every_test_image(logged_run, tiny_folder):
    folder = os.path.join(logged_run, "tensorboard")
    config = open(os.path.join(folder, "projector_config.pbtxt")).read()
    assert "metadata.tsv" in config and "sprite.png" in config
    tensor_path = config.split('tensor_path: "')[1].split('"')[0]  # STEP/h/tensors.tsv
    embedding_dir = os.path.join(folder, os.path.dirname(tensor_path))
    metadata = open(os.path.join(embedding_dir, "metadata.tsv")).read().splitlines()
    classes = sorted(os.listdir(os.path.join(tiny_folder, "test")))
    expected = sorted(c for c in classes for _ in os.listdir(os.path.join(tiny_folder, "test", c)))
    assert sorted(metadata) == expected
    rows = open(os.path.join(embedding_dir, "tensors.tsv")).read().splitlines()
    assert len(rows) == len(expected) and len(rows[0].split("\t")) == 512  # h of ResNet-18


def test_tensorboard_is_optional(tiny_folder, tmp_path):
    blocker = tmp_path / "block" / "tensorboard"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('tensorboard blocked by the test')\n")
    env = {"PYTHONPATH": str(tmp_path / "block")}
    plain = run_script("main.py", tiny_folder, tmp_path / "plain", "--epochs", "1",
                       *FAST_PRETRAIN, env=env)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert not os.path.exists(tmp_path / "plain" / "tensorboard")
    wanted = run_script("main.py", tiny_folder, tmp_path / "wanted", "--epochs", "1",
                        "--tensorboard", *FAST_PRETRAIN, env=env)
    assert_one_line_error(wanted, "pip install tensorboard")
