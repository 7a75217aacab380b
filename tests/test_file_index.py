"""Issue "a million images": the file index in RESPATH (rebuilt when files are added or removed,
reused otherwise), paths held as numpy arrays (PathTable), unreadable files found by the
workers and replaced by seed, and progress lines without a terminal."""
import json
import os
import pickle
import re
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST_PRETRAIN, run_script
from utils.data import (ImageList, PathTable, TwoViewDataset, UnreadableFiles,
                        load_with_substitute, make_loader)
from utils.errors import UserError
from utils.file_index import find_split, read_index, scan_folder
from utils.sources import read_path_list


def age(*paths, seconds=3600):
    """Set the modification time of `paths` (files or folders, recursively) `seconds` back:
    data written just now is within the index's stamp margin."""
    when = time.time() - seconds
    for path in paths:
        for root, dirs, files in os.walk(path):
            for name in files:
                os.utime(os.path.join(root, name), (when, when))
            os.utime(root, (when, when))
        os.utime(path, (when, when))


# --- PathTable ----------------------------------------------------------------------------------

def test_path_table_equals_the_list_it_packs():
    """Entries, slices, take, relative/absolute entries, non-ASCII names and pickling agree
    with the plain list of str."""
    names = ["a/1.png", "b/ünïcødé 2.png", "/abs/3.png", "c/4.png", ""]
    table = PathTable.from_strings(names, "/root")
    expected = [os.path.join("/root", n) if n else "/root" for n in names]
    expected[-1] = "/root/"
    assert len(table) == 5 and list(table) == [os.path.join("/root", n) for n in names]
    assert table[2] == "/abs/3.png" and table.relative(1) == names[1]
    assert list(table[1:4]) == [os.path.join("/root", n) for n in names[1:4]]
    picked = table.take([3, 0, 3])
    assert list(picked) == [os.path.join("/root", names[i]) for i in (3, 0, 3)]
    assert picked.blob is table.blob  # the characters are shared, not copied
    assert list(pickle.loads(pickle.dumps(table))) == list(table)
    assert table.index("/root/c/4.png") == 3
    images = ImageList(names[:4], [0, 1, 0, 1], ["x", "y"])
    assert isinstance(images.paths, PathTable) and images.labels.dtype == np.int64
    sub = images.subset([1, 3])
    assert sub.paths == ["b/ünïcødé 2.png", "c/4.png"] and sub.labels.tolist() == [1, 1]


# --- the index ----------------------------------------------------------------------------------

def write_folder(root, per_class=3):
    for c in ("cat", "dog"):
        for i in range(per_class):
            os.makedirs(root / "train" / c / "sub", exist_ok=True)
            Image.fromarray(np.full((8, 8), i * 10, np.uint8)).save(
                root / "train" / c / ("sub" if i == 2 else "") / f"{i}.png")
    age(root)
    return root


def test_index_is_reused_and_rebuilt_when_files_are_added_or_removed(tmp_path, capsys):
    data = write_folder(tmp_path / "data")
    index_dir = str(tmp_path / "run" / "data_index")
    scanned = find_split(str(data), "train", True, index_dir)
    assert "scanned" in capsys.readouterr().out
    assert scanned.paths == scan_folder(str(data / "train")).images.paths  # the same listing
    again = find_split(str(data), "train", True, index_dir)
    assert "from" in capsys.readouterr().out and "scanned" not in capsys.readouterr().out
    assert again.paths == scanned.paths and again.labels.tolist() == scanned.labels.tolist()
    assert again.classes == ["cat", "dog"]

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(data / "train" / "dog" / "sub" / "new.png")
    age(data)
    added = find_split(str(data), "train", True, index_dir)
    assert "scanned" in capsys.readouterr().out
    assert len(added) == 7 and str(data / "train" / "dog" / "sub" / "new.png") in list(added.paths)

    os.remove(data / "train" / "cat" / "0.png")
    age(data)
    removed = find_split(str(data), "train", True, index_dir)
    assert "scanned" in capsys.readouterr().out
    assert len(removed) == 6 and str(data / "train" / "cat" / "0.png") not in list(removed.paths)
    assert removed.paths == scan_folder(str(data / "train")).images.paths

    find_split(str(data), "train", True, index_dir, rescan=True)  # --rescan
    assert "scanned" in capsys.readouterr().out
    header = read_index(os.path.join(index_dir, "train.npz"),
                        ("folder", str(data / "train")))[2]
    sizes = sum(os.path.getsize(p) for p in removed.paths)
    assert header["fingerprint"]["count"] == 6 and header["fingerprint"]["total_bytes"] == sizes


def test_index_of_another_source_or_a_fresh_folder_is_not_trusted(tmp_path, capsys):
    """An index built for another DATAPATH is rebuilt; folders changed within the stamp margin
    of the scan are scanned again at the next start."""
    first = write_folder(tmp_path / "a")
    second = write_folder(tmp_path / "b", per_class=2)
    index_dir = str(tmp_path / "run" / "data_index")
    find_split(str(first), "train", True, index_dir)
    other = find_split(str(second), "train", True, index_dir)
    assert "scanned" in capsys.readouterr().out.splitlines()[-1] and len(other) == 4
    os.utime(second / "train" / "cat")  # just now
    find_split(str(second), "train", True, index_dir)
    find_split(str(second), "train", True, index_dir)
    out = capsys.readouterr().out.splitlines()
    assert "scanned" in out[0] and "scanned" in out[1]  # inside the margin: not trusted


def test_path_list_index_follows_the_list_file(tmp_path, capsys):
    data = write_folder(tmp_path / "data")
    files = sorted(str(p.relative_to(tmp_path)) for p in (data / "train").rglob("*.png"))
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{f},{f.split(os.sep)[2]}\n" for f in files))
    age(listing)
    index_dir = str(tmp_path / "run" / "data_index")
    built = read_path_list(str(listing), True, index_dir)
    reused = read_path_list(str(listing), True, index_dir)
    out = capsys.readouterr().out
    assert "scanned" in out and "from" in out.splitlines()[-1]
    assert built.paths == reused.paths == [str(tmp_path / f) for f in files]
    assert reused.labels.tolist() == [["cat", "dog"].index(f.split(os.sep)[2]) for f in files]
    listing.write_text("".join(f"{f},{f.split(os.sep)[2]}\n" for f in files[:-1]))
    age(listing)
    assert len(read_path_list(str(listing), True, index_dir)) == len(files) - 1
    assert "scanned" in capsys.readouterr().out


# --- unreadable files in the workers ------------------------------------------------------------

def test_substitute_is_a_pure_function_of_seed_epoch_and_index(tmp_path):
    """The image that replaces an unreadable one depends on (seed, epoch, index) only: the
    same in two data sets and in worker processes, another in another epoch; UserError when
    nothing can be read."""
    folder = tmp_path / "train" / "c"
    folder.mkdir(parents=True)
    for i in range(20):
        Image.fromarray(np.full((4, 4), i, np.uint8)).save(folder / f"{i:02d}.png")
    (folder / "05.png").write_bytes(b"not an image")
    images = scan_folder(str(tmp_path / "train")).images
    unreadable = UnreadableFiles(len(images), 0.1)
    dataset = TwoViewDataset(images, 1, lambda img: int(np.asarray(img)[0, 0]), seed=3,
                             unreadable=unreadable)
    picks = {epoch: dataset[(5, epoch)] for epoch in range(6)}
    assert all(v != 5 for v in picks.values()) and len(set(picks.values())) > 1
    for epoch, value in picks.items():
        _, used = load_with_substitute(images, 5, 1, (3, epoch))
        assert used == value
    loader = make_loader(dataset, batch_sampler=[[(5, e)] for e in range(6)], num_workers=2)
    assert [int(b[0]) for b in loader] == [picks[e] for e in range(6)]
    deadline = time.monotonic() + 10  # reports travel through a queue's feeder thread
    while unreadable.count() < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert unreadable.count() == 1 and str(folder / "05.png") in unreadable.failed
    with pytest.raises(UserError, match="more than --max-unreadable"):
        UnreadableFiles(len(images), 0.01).check(2)
    broken = ImageList([str(folder / "05.png")] * 3)
    with pytest.raises(UserError, match="could not be decoded; the data is not readable"):
        load_with_substitute(broken, 0, 1)


def losses(respath):
    return np.load(os.path.join(respath, "model", "lossesfile.npz"))["step_losses"]


def test_corrupt_image_mid_epoch_progress_lines_and_resume_with_the_index(tiny_folder, tmp_path):
    """A file that is not an image, met by the statistics pass and by the workers during the
    epochs: one warning naming it from each, the same number of steps, its count in run.json. Without a terminal, a progress line
    every --print-freq steps. A run resumed with its index kept gives the per-step losses of
    the uninterrupted run, which listed the folder at its start."""
    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    (data / "train" / "Trouser" / "00005_garbage.png").write_bytes(os.urandom(300))
    age(data)
    flags = [*FAST_PRETRAIN, "-nw", "2", "--max-unreadable", "0.05", "--print-freq", "2"]
    full = tmp_path / "full"
    result = run_script("main.py", data, full, "--epochs", "2", *flags)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "00005_garbage.png" in line]
    assert len(warnings) == 2 and all(w.startswith("warning:") for w in warnings), result.stderr
    assert "left out of the mean/std" in warnings[0]  # the statistics pass, once
    assert "takes its place" in warnings[1]  # training, once over two epochs
    run = json.loads((full / "run.json").read_text())
    assert run["steps_done"] == 2 * run["steps_per_epoch"] == 2 * (37 // 12)
    assert run["unreadable_images"]["files"] == 1
    progress = re.findall(r"^epoch (\d)/2  step (\d)/3  loss [\d.]+  lr", result.stdout, re.M)
    assert progress == [("1", "2"), ("2", "1"), ("2", "3")], result.stdout  # steps 2, 4, 6
    assert "data index: scanned" in result.stdout

    resumed_path = tmp_path / "resumed"
    assert run_script("main.py", data, resumed_path, "--epochs", "1", *flags).returncode == 0
    resumed = run_script("main.py", data, resumed_path, "--epochs", "2", *flags)
    assert resumed.returncode == 0, resumed.stderr
    assert "data index: 37 files" in resumed.stdout and "scanned" not in resumed.stdout
    np.testing.assert_array_equal(losses(resumed_path), losses(full))  # full: scanned at start
