"""kNN evaluation: utils/knn.py against scikit-learn, and main.py --knn-every end to end."""
import json
import os

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from conftest import FAST_PRETRAIN, assert_knn_accuracy_matches_sklearn, run_in_process, run_script
from utils.checkpoint import load_pretrained
from utils.data import ImageDataset, make_loader
from utils.file_index import find_split
from utils.knn import cosine_neighbours, knn_accuracy, knn_predict
from utils.linear_probe import extract_features
from utils.model import build_model, load_state_strict
from utils.transforms import EvalTransform


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_predictions_equal_scikit_learn(real_images, k):
    """Raw pixels of real Fashion-MNIST images as features; the same predictions as
    KNeighborsClassifier(metric='cosine'), in chunks smaller than the test set."""
    (data, _names) = real_images
    train_x = torch.tensor(data["train"][0][:600].reshape(600, -1), dtype=torch.float32)
    train_y = torch.tensor(data["train"][1][:600].astype(np.int64))
    test_x = torch.tensor(data["test"][0][:300].reshape(300, -1), dtype=torch.float32)
    test_y = torch.tensor(data["test"][1][:300].astype(np.int64))
    ours = knn_predict(train_x, train_y, test_x, 10, k)
    reference = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(
        train_x.numpy(), train_y.numpy()).predict(test_x.numpy())
    np.testing.assert_array_equal(ours.numpy(), reference)
    accuracy = knn_accuracy(train_x, train_y, test_x, test_y, 10, k)
    assert accuracy == pytest.approx((reference == test_y.numpy()).mean())


def test_cosine_neighbours_in_chunks_and_without_self():
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    sim = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(x, dim=1).T
    idx, values = cosine_neighbours(x, x, 4, chunk=16, exclude_self=True)
    sim.fill_diagonal_(-2)
    expected = np.argsort(-sim.numpy(), axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(idx.numpy(), expected)
    assert torch.all(values[:, :-1] >= values[:, 1:])


def test_knn_every_records_the_accuracy_of_the_saved_model(tiny_folder, tmp_path):
    respath = tmp_path / "run"
    result = run_script("main.py", tiny_folder, respath, "--epochs", "2", *FAST_PRETRAIN,
                        "--knn-every", "1", "--knn-k", "5", "--knn-on-test")
    assert result.returncode == 0, result.stderr
    assert "epoch 2: kNN accuracy of h on the test split" in result.stdout
    run = json.load(open(respath / "run.json"))
    assert [epoch for epoch, _ in run["knn_accuracy"]] == [1, 2]
    saved = np.load(respath / "model" / "lossesfile.npz")["knn"]
    np.testing.assert_allclose(saved, run["knn_accuracy"])
    ckpt = torch.load(respath / "checkpoint.pth")
    knn = [(e["epoch"], e["knn_accuracy"]) for e in ckpt["history"]["evaluations"]]
    np.testing.assert_allclose(knn, saved)
    # the last value is the final model's: recompute it with scikit-learn
    state, meta = load_pretrained(str(respath / "model" / "model.pth"))
    model = build_model(meta["arch"], meta["in_channels"], meta["stem"], meta["proj_dims"])
    load_state_strict(model, state, "model.pth")
    transform = EvalTransform(meta["image_size"], meta["mean"], meta["std"])
    feats = [extract_features(model.encoder, make_loader(ImageDataset(
        find_split(tiny_folder, split, True), 1, transform), batch_size=12), "cpu")
        for split in ("train", "test")]
    (train_h, train_y), (test_h, test_y) = feats
    assert_knn_accuracy_matches_sklearn(run["knn_accuracy"][-1][1], train_h.numpy(),
                                        train_y.numpy(), test_h.numpy(), test_y.numpy(), 5)
    assert os.path.getsize(respath / "plots" / "training_losses.png") > 0


def test_knn_every_holds_out_validation_images_and_never_reads_test(tiny_folder, tmp_path):
    """Without a val/ split and without --knn-on-test, the kNN queries are --val-fraction of
    each class of train (6 of 36 here at 1/6), left out of the memory; the value equals
    scikit-learn's kNN on exactly those two sets; the test folder may even be gone."""
    from utils.sources import split_off_validation
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    shutil.rmtree(data / "test")
    respath = tmp_path / "run"
    result = run_script("main.py", data, respath, "--epochs", "1", *FAST_PRETRAIN,
                        "--knn-every", "1", "--knn-k", "5", "--val-fraction", "0.17")
    assert result.returncode == 0, result.stderr
    assert "kNN accuracy of h on the validation images (0.17 of each class of train, seed 0)" \
        in result.stdout
    accuracy = json.load(open(respath / "run.json"))["knn_accuracy"][-1][1]
    state, meta = load_pretrained(str(respath / "model" / "model.pth"))
    model = build_model(meta["arch"], meta["in_channels"], meta["stem"], meta["proj_dims"])
    load_state_strict(model, state, "model.pth")
    memory, queries = split_off_validation(find_split(str(data), "train", True), 0.17, 0)
    assert len(queries) == 6 and not set(queries.paths) & set(memory.paths)
    transform = EvalTransform(meta["image_size"], meta["mean"], meta["std"])
    (train_h, train_y), (val_h, val_y) = [extract_features(model.encoder, make_loader(
        ImageDataset(split, 1, transform), batch_size=12), "cpu") for split in (memory, queries)]
    assert_knn_accuracy_matches_sklearn(accuracy, train_h.numpy(), train_y.numpy(),
                                        val_h.numpy(), val_y.numpy(), 5)


def test_knn_every_on_unlabelled_data_is_one_line_error(tiny_folder, tmp_path):
    from conftest import assert_one_line_error
    result = run_in_process("main.py", os.path.join(tiny_folder, "train", os.listdir(
        os.path.join(tiny_folder, "train"))[0]), tmp_path / "r", *FAST_PRETRAIN, "-bs", "6",
        "--knn-every", "1")
    assert_one_line_error(result, "--knn-every needs labelled")
