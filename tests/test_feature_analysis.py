"""feature_analysis.py through its real command line on the tiny folder and the 2-epoch model,
checked against references computed here: features extracted independently from the
checkpoint, scikit-learn's kNN classifier and PCA, and a brute-force numpy cosine search."""
import csv
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.decomposition import PCA

from conftest import (assert_knn_accuracy_matches_sklearn, assert_one_line_error, run_in_process,
                      run_script)
from utils.errors import UserError
from utils.checkpoint import load_pretrained
from utils.data import ImageDataset, make_loader
from utils.file_index import find_split
from utils.knn import knn_accuracy
from utils.linear_probe import extract_features
from utils.model import build_model, load_state_strict
from utils.transforms import EvalTransform

K, QUERIES, TOPK, MAX_POINTS = 5, 4, 3, 15
PERPLEXITIES = ("3", "50")  # 50 is clipped to MAX_POINTS - 1
FLOAT32_RESOLUTION = 1e-6  # cosines closer than this may order differently in float32
PNGS = ("pca_h.png", "pca_z.png", "tsne_h.png", "tsne_z.png", "tsne_sweep_h.png",
        "tsne_sweep_z.png", "retrieval.png")


def model_path(pretrained):
    return os.path.join(pretrained[0], "model", "model.pth")


@pytest.fixture(scope="module")
def analysis(tiny_folder, pretrained, tmp_path_factory):
    """One run with every output (--tsne included): (OUTDIR, CompletedProcess, analysis.json)."""
    out = str(tmp_path_factory.mktemp("analysis"))
    result = run_script("feature_analysis.py", tiny_folder, model_path(pretrained), out,
                        "-bs", "12", "-nw", "0", "--k", K, "--queries", QUERIES, "--topk", TOPK,
                        "--perplexity", "5", "--tsne", "--perplexities", *PERPLEXITIES,
                        "--max-points", MAX_POINTS)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(os.path.join(out, "analysis.json")) as f:
        return out, result, json.load(f)


@pytest.fixture(scope="module")
def reference(tiny_folder, pretrained):
    """h and z of both splits, computed here from the checkpoint as linear_evaluation does:
    {'h': (train (N, F), test (M, F)), 'z': (...), 'y': (train (N,), test (M,))} as numpy."""
    state_dict, meta = load_pretrained(model_path(pretrained))
    model = build_model(meta["arch"], meta["in_channels"], meta["stem"], meta["proj_dims"])
    load_state_strict(model, state_dict, "model.pth")
    model.eval()
    transform = EvalTransform(meta["image_size"], meta["mean"], meta["std"])
    encoder = model.encoder.to(memory_format=torch.channels_last)
    out = {"h": [], "z": [], "y": []}
    for split in ("train", "test"):
        images = find_split(tiny_folder, split, True)
        loader = make_loader(ImageDataset(images, meta["in_channels"], transform), batch_size=12)
        h, y = extract_features(encoder, loader, torch.device("cpu"), channels_last=True)
        with torch.no_grad():
            z = model.head(h)
        out["h"].append(h.numpy())
        out["z"].append(z.numpy())
        out["y"].append(y.numpy())
    return out


def test_every_output_written(analysis, reference):
    out, result, report = analysis
    for name in PNGS:
        path = os.path.join(out, name)
        assert os.path.getsize(path) > 1000, name
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            width, height = img.size
        assert 200 <= width <= 5000 and 200 <= height <= 8000, (name, img.size)
    assert os.path.getsize(os.path.join(out, "retrieval.csv")) > 0
    assert "kNN accuracy (k=5" in result.stdout
    n_train, n_test = len(reference["y"][0]), len(reference["y"][1])
    assert (report["n_train"], report["n_test"]) == (n_train, n_test)
    assert report["classes"] == sorted(os.listdir(os.path.join(report["args"]["datapath"],
                                                               "train")))
    assert report["modelpath"] == os.path.abspath(report["args"]["modelpath"])
    assert report["args"]["k"] == K and report["knn"]["k"] == K
    # t-SNE: MAX_POINTS of each split, perplexities clipped below the number of points
    assert report["tsne"]["n_points"] == {"train": MAX_POINTS, "test": MAX_POINTS}
    assert [(row["requested"], row["train"], row["test"]) for row in report["tsne"]["sweep"]] \
        == [(3.0, 3.0, 3.0), (50.0, MAX_POINTS - 1, MAX_POINTS - 1)]


@pytest.mark.parametrize("rep", ["h", "z"])
def test_knn_accuracy_matches_sklearn(analysis, reference, rep):
    (train_x, test_x), (train_y, test_y) = reference[rep], reference["y"]
    ours = knn_accuracy(torch.as_tensor(train_x), torch.as_tensor(train_y),
                        torch.as_tensor(test_x), torch.as_tensor(test_y), len(set(train_y)), K)
    for accuracy in (ours, analysis[2]["knn"][rep]):  # on these features, and the script's own
        assert_knn_accuracy_matches_sklearn(accuracy, train_x, train_y, test_x, test_y, K)


@pytest.mark.parametrize("rep", ["h", "z"])
def test_pca_explained_variance_matches_sklearn(analysis, reference, rep):
    expected = PCA(n_components=2).fit(reference[rep][0]).explained_variance_ratio_
    np.testing.assert_allclose(analysis[2]["pca_explained_variance"][rep], expected, rtol=1e-4,
                               atol=1e-6)


def test_retrieval_csv_matches_brute_force(analysis, reference):
    out, _, report = analysis
    with open(os.path.join(out, "retrieval.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == QUERIES * TOPK
    classes = report["classes"]
    train_h, test_h = reference["h"]
    train_y, test_y = reference["y"]
    train_n, test_n = (x / np.linalg.norm(x, axis=1, keepdims=True)
                       for x in (train_h.astype(np.float64), test_h.astype(np.float64)))
    queries = sorted({int(r["query_index"]) for r in rows})
    assert queries == report["retrieval_queries"] and len(queries) == QUERIES
    for q in queries:
        mine = [r for r in rows if int(r["query_index"]) == q]
        assert [int(r["rank"]) for r in mine] == list(range(1, TOPK + 1))
        sims = [float(r["similarity"]) for r in mine]
        assert all(a >= b for a, b in zip(sims, sims[1:])), sims
        assert all(r["query_class"] == classes[test_y[q]] for r in mine)
        cosine = train_n @ test_n[q]
        for r in mine:
            j = int(r["train_index"])
            assert 0 <= j < len(train_y)
            assert r["train_class"] == classes[train_y[j]]
            assert float(r["similarity"]) == pytest.approx(cosine[j], abs=1e-5)
        best = int(np.argmax(cosine))
        runner_up = np.sort(cosine)[-2]
        if cosine[best] - runner_up > FLOAT32_RESOLUTION:
            assert int(mine[0]["train_index"]) == best
        else:  # a tie at float32 precision (a 2-epoch encoder's h are nearly parallel)
            assert cosine[int(mine[0]["train_index"])] >= cosine[best] - FLOAT32_RESOLUTION


def test_k_larger_than_train_split_is_one_line_error(tiny_folder, pretrained, tmp_path):
    result = run_in_process("feature_analysis.py", tiny_folder, model_path(pretrained),
                            tmp_path / "out", "-bs", "12", "-nw", "0", "--k", "1000")
    assert_one_line_error(result, "--k 1000", "train images")


@pytest.mark.parametrize("flags, fragment", [
    (["--k", "0"], "--k 0"), (["--queries", "0"], "--queries 0"), (["--topk", "0"], "--topk 0"),
    (["--max-points", "1"], "--max-points 1"), (["--perplexities", "5", "0"], "perplexity 0")])
def test_bad_flags_raise_user_error(tmp_path, flags, fragment):
    """Checked before the model or data are read (in-process: no subprocess start-up)."""
    import feature_analysis

    args = feature_analysis.get_args_parser().parse_args(
        [str(tmp_path / "data"), str(tmp_path / "model.pth"), str(tmp_path / "out"), *flags])
    with pytest.raises(UserError, match=re.escape(fragment)):
        feature_analysis.main(args)
    assert not os.path.exists(tmp_path / "out")


def test_unwritable_outdir_is_user_error(tiny_folder, pretrained, tmp_path):
    import feature_analysis

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = feature_analysis.get_args_parser().parse_args(
        [tiny_folder, model_path(pretrained), str(blocker / "out")])
    with pytest.raises(UserError, match="OUTDIR"):
        feature_analysis.main(args)
