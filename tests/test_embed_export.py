"""embed.py and export.py on the 2-epoch model of the tiny folder, checked against features
computed here by hand (the checkpoint loaded into build_model, each image opened with PIL and
put through EvalTransform) and against a torchvision ResNet built with the README's snippet."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from conftest import assert_one_line_error, run_script
from utils.errors import UserError
from utils.checkpoint import load_pretrained
from utils.model import build_model, build_torchvision_backbone, load_state_strict
from utils.transforms import EvalTransform

# The README's loading snippet (export.py stores it in meta["how_to_load"]).
SNIPPET = """\
import torch, torchvision
saved = torch.load("{name}", weights_only=True); meta = saved["meta"]
net = getattr(torchvision.models, meta["arch"])(weights=None)
net.conv1 = torch.nn.Conv2d(meta["in_channels"], 64, **meta["conv1"], bias=False)
if meta["stem"] != "imagenet": net.maxpool = torch.nn.Identity()
net.fc = torch.nn.Identity()
net.load_state_dict(saved["state_dict"], strict=True); net.eval()
"""
TOLERANCE = 1e-5


def model_path(pretrained):
    return os.path.join(pretrained[0], "model", "model.pth")


@pytest.fixture(scope="module")
def reference(pretrained):
    """(meta, features): features(list of PIL images) -> (h (N, F), z (N, P)), computed from
    the checkpoint by hand."""
    state_dict, meta = load_pretrained(model_path(pretrained))
    model = build_model(meta["arch"], meta["in_channels"], meta["stem"], meta["proj_dims"])
    load_state_strict(model, state_dict, "model.pth")
    model.eval()
    transform = EvalTransform(meta["image_size"], meta["mean"], meta["std"])
    mode = "L" if meta["in_channels"] == 1 else "RGB"

    @torch.no_grad()
    def features(images):
        x = torch.stack([transform(img.convert(mode)) for img in images])
        h = model.encoder(x)
        return h, model.head(h)

    return meta, features


def assert_same_features(actual, expected):
    """max |actual - expected| <= 1e-5 * max(1, max |expected|): equal up to float32 rounding,
    which grows with the features' scale (this 2-epoch model's h reach ~1e4)."""
    assert actual.shape == expected.shape
    scale = max(1.0, expected.abs().max().item())
    difference = (actual - expected).abs().max().item()
    assert difference <= TOLERANCE * scale, (difference, scale)


def open_images(paths):
    images = []
    for path in paths:
        with Image.open(path) as img:
            img.load()
            images.append(img)
    return images


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def embed_args(*argv):
    import embed

    return embed.get_args_parser().parse_args([str(a) for a in argv])


@pytest.fixture(scope="module")
def folder_run(tiny_folder, pretrained, tmp_path_factory):
    """embed.py on the tiny folder (train/ and test/, layer h): (OUT folder, CompletedProcess)."""
    out = tmp_path_factory.mktemp("embed")
    result = run_script("embed.py", tiny_folder, model_path(pretrained), out / "feats",
                        "-bs", "10", "-nw", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result


def test_embed_folder_rows_equal_h_in_csv_order(folder_run, tiny_folder, reference):
    out, result = folder_run
    assert sorted(os.listdir(out)) == ["feats.csv", "feats.npy"]  # no temporary file left
    rows = read_csv(out / "feats.csv")
    expected = [(split, os.path.join(tiny_folder, split, name, file))
                for split in ("train", "test")
                for name in sorted(os.listdir(os.path.join(tiny_folder, split)))
                for file in sorted(os.listdir(os.path.join(tiny_folder, split, name)))]
    assert [(r["split"], os.path.abspath(r["path"])) for r in rows] == \
        [(s, os.path.abspath(p)) for s, p in expected]
    assert [int(r["index"]) for r in rows] == list(range(len(rows)))
    assert all(r["label"] == os.path.basename(os.path.dirname(r["path"])) for r in rows)

    features = np.load(out / "feats.npy")
    assert features.dtype == np.float32 and features.shape == (len(rows), 512)
    assert np.load(out / "feats.npy", mmap_mode="r").shape == features.shape
    h, _ = reference[1](open_images(r["path"] for r in rows))
    assert_same_features(torch.from_numpy(features), h)
    assert f"embedded {len(rows)} images: D = 512" in result.stdout
    assert "img/s" in result.stdout


def test_embed_path_list_layer_z(tiny_folder, pretrained, reference, tmp_path):
    """A path list (relative and absolute paths, labels, an order of its own) with --layer z;
    OUT given with .npy; in-process (the command line is exercised above)."""
    import embed

    test_dir = os.path.join(tiny_folder, "test")
    paths = [os.path.join(test_dir, name, f) for name in sorted(os.listdir(test_dir))
             for f in sorted(os.listdir(os.path.join(test_dir, name)))][::-2]
    shutil.copy(paths[0], tmp_path / "local.png")
    paths[0] = str(tmp_path / "local.png")
    labels = [f"class {i % 3}" for i in range(len(paths))]
    lines = ["local.png,class 0"] + [f"{p},{lab}" for p, lab in zip(paths[1:], labels[1:])]
    (tmp_path / "list.txt").write_text("# my images\n" + "\n".join(lines) + "\n")
    assert embed.main(embed_args(tmp_path / "list.txt", model_path(pretrained),
                                 tmp_path / "out" / "z.npy", "--layer", "z", "-bs", "4",
                                 "-nw", "0")) == 0
    rows = read_csv(tmp_path / "out" / "z.csv")
    assert list(rows[0]) == ["index", "path", "label"]  # no split column for a single set
    assert [os.path.abspath(r["path"]) for r in rows] == [os.path.abspath(p) for p in paths]
    assert [r["label"] for r in rows] == labels
    features = torch.from_numpy(np.load(tmp_path / "out" / "z.npy"))
    _, z = reference[1](open_images(paths))
    assert features.shape == z.shape == (len(paths), 16)
    assert_same_features(features, z)


def test_embed_npz_splits_normalised(real_images, pretrained, reference, tmp_path):
    """A MedMNIST-format .npz (train, val, test in that order, labels '0', '1') with
    --normalize, in-process."""
    import embed

    data, _ = real_images
    arrays = {"train": data["train"][0][:5], "val": data["train"][0][5:8],
              "test": data["test"][0][:4]}
    labels = {split: np.arange(len(x)).reshape(-1, 1) % 2 for split, x in arrays.items()}
    np.savez(tmp_path / "small.npz", **{f"{s}_images": x for s, x in arrays.items()},
             **{f"{s}_labels": y for s, y in labels.items()})
    assert embed.main(embed_args(tmp_path / "small.npz", model_path(pretrained),
                                 tmp_path / "n", "--normalize", "-nw", "0")) == 0
    rows = read_csv(tmp_path / "n.csv")
    assert [r["split"] for r in rows] == ["train"] * 5 + ["val"] * 3 + ["test"] * 4
    assert [r["label"] for r in rows] == [str(int(y)) for s in arrays for y in labels[s][:, 0]]
    h, _ = reference[1]([Image.fromarray(x) for s in arrays for x in arrays[s]])
    features = torch.from_numpy(np.load(tmp_path / "n.npy"))
    assert_same_features(features, F.normalize(h, dim=1))
    assert_same_features(features.norm(dim=1), torch.ones(len(rows)))


def test_export_loads_strictly_into_torchvision_and_matches_h(pretrained, reference, tiny_folder,
                                                              tmp_path):
    meta, features = reference
    result = run_script("export.py", model_path(pretrained), tmp_path / "backbone")
    assert result.returncode == 0, result.stdout + result.stderr
    saved = torch.load(tmp_path / "backbone.pth", weights_only=True)
    exported = saved["meta"]
    fc_keys = {"fc.weight", "fc.bias"}
    assert set(saved["state_dict"]) == set(torchvision.models.resnet18().state_dict()) - fc_keys
    assert {k: exported[k] for k in ("arch", "stem", "in_channels", "image_size", "feature_dim")} \
        == {"arch": "resnet18", "stem": "cifar", "in_channels": meta["in_channels"],
            "image_size": meta["image_size"], "feature_dim": 512}
    assert exported["mean"] == pytest.approx(meta["mean"])
    assert exported["std"] == pytest.approx(meta["std"])
    assert exported["source_checkpoint"] == os.path.abspath(model_path(pretrained))
    assert exported["how_to_load"] == SNIPPET.format(name="backbone.pth")

    train_dir = os.path.join(tiny_folder, "train")
    images = open_images(os.path.join(train_dir, name, f) for name in sorted(os.listdir(train_dir))
                         for f in sorted(os.listdir(os.path.join(train_dir, name)))[:2])
    h, _ = features(images)
    transform = EvalTransform(exported["image_size"], exported["mean"], exported["std"])
    x = torch.stack([transform(img.convert("L")) for img in images])

    namespace = {}
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        exec(SNIPPET.format(name="backbone.pth"), namespace)  # the documented way, verbatim
    finally:
        os.chdir(cwd)
    net = namespace["net"]
    assert type(net) is torchvision.models.ResNet
    rebuilt = build_torchvision_backbone(exported)
    rebuilt.load_state_dict(saved["state_dict"], strict=True)
    files = {"meta.json": ""}
    program = torch.export.load(str(tmp_path / "backbone.pt2"), extra_files=files).module()
    assert json.loads(files["meta.json"]) == json.loads(json.dumps(exported))
    with torch.no_grad():
        assert_same_features(net(x), h)
        assert_same_features(rebuilt.eval()(x), h)
        for batch in (x, x[:1]):  # batch sizes other than the one exported with
            assert_same_features(program(batch), h[:len(batch)])
    assert "max |difference|" in result.stdout


def test_embed_missing_modelpath_is_one_line_error(tiny_folder, tmp_path):
    result = run_script("embed.py", tiny_folder, tmp_path / "none.pth", tmp_path / "out")
    assert_one_line_error(result, "none.pth", "does not exist")
    assert not os.path.exists(tmp_path / "out.npy")


@pytest.mark.parametrize("case, fragment", [
    ("empty folder", "contains no images"), ("unwritable OUT", "not writable"),
    ("split of a plain folder", "--split test"), ("missing split", "no val split")])
def test_embed_bad_inputs_raise_user_error(case, fragment, tiny_folder, pretrained, tmp_path):
    import embed

    datapath, out, extra = tiny_folder, tmp_path / "out" / "feats", []
    if case == "empty folder":
        datapath = tmp_path / "empty"
        datapath.mkdir()
    elif case == "unwritable OUT":
        (tmp_path / "a_file").write_text("not a folder")
        out = tmp_path / "a_file" / "feats"
    elif case == "split of a plain folder":
        datapath, extra = os.path.join(tiny_folder, "test", os.listdir(
            os.path.join(tiny_folder, "test"))[0]), ["--split", "test"]
    else:
        extra = ["--split", "val"]
    with pytest.raises(UserError, match=fragment):
        embed.main(embed_args(datapath, model_path(pretrained), out, "-nw", "0", *extra))
    assert not os.path.exists(str(out) + ".npy")


def test_export_bad_inputs_raise_user_error(tmp_path):
    import export

    with pytest.raises(UserError, match="does not exist"):
        export.main(export.get_args_parser().parse_args([str(tmp_path / "none.pth"),
                                                         str(tmp_path / "b")]))
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(UserError, match="not writable"):
        export.main(export.get_args_parser().parse_args([str(tmp_path / "none.pth"),
                                                         str(tmp_path / "a_file" / "b")]))


def test_undecodable_image_stops_with_its_name_and_leaves_no_npy(tiny_folder, pretrained,
                                                                 tmp_path):
    """A truncated PNG is named in the error; the earlier OUT.npy is kept and no temporary file
    is left behind."""
    import embed

    data = tmp_path / "data"
    shutil.copytree(os.path.join(tiny_folder, "test"), data)
    first_class = min(os.listdir(data))
    blob = next((data / first_class).iterdir()).read_bytes()
    (data / first_class / "zz_truncated.png").write_bytes(blob[: len(blob) // 2])
    out = tmp_path / "out"
    out.mkdir()
    np.save(out / "feats.npy", np.zeros(3))
    with pytest.raises(UserError, match="zz_truncated.png could not be decoded"):
        embed.main(embed_args(data, model_path(pretrained), out / "feats", "-bs", "4", "-nw", "0"))
    assert sorted(os.listdir(out)) == ["feats.npy"]
    assert np.array_equal(np.load(out / "feats.npy"), np.zeros(3))
