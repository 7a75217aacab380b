"""Shared fixtures: small real image data (Fashion-MNIST from Debian's package, else
scikit-learn's digits) written as ImageFolder trees, and a helper that runs a script through
its real command line."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from make_demo_data import (FASHION_CLASSES, balanced_subset, load_digits_upscaled,  # noqa: E402
                            load_fashion_mnist, write_image_folder)


@pytest.fixture(scope="session")
def real_images():
    """{'train': (uint8 (N, 28, 28), labels), 'test': ...} and class names of real data."""
    data = load_fashion_mnist()
    if data is not None:
        return data, FASHION_CLASSES
    print("Fashion-MNIST package not installed: tests use scikit-learn digits")
    return load_digits_upscaled(), [str(d) for d in range(10)]


def make_image_folder(root, real_images, n_classes, train_per_class, test_per_class):
    (data, names) = real_images
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = data[split]
        keep = balanced_subset(labels, per_class, seed=0)
        keep = keep[labels[keep] < n_classes]
        write_image_folder(images[keep], labels[keep], names[:n_classes],
                           os.path.join(root, split))
    return str(root)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, real_images):
    """ImageFolder with 3 classes: 12 train and 6 test images per class, 28x28 grayscale."""
    return make_image_folder(tmp_path_factory.mktemp("tiny"), real_images, 3, 12, 6)


# Tests of the CUDA paths run where a GPU is visible and are skipped, with this reason, on CPU
# machines such as CI's (scripts/test.sh prints the skipped count).
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="needs a CUDA GPU (none visible)")
without_cuda = pytest.mark.skipif(torch.cuda.is_available(),
                                  reason="checks the error for a machine without CUDA")

# Settings that make a pretraining run take seconds on a 2-core CPU.
FAST_PRETRAIN = ["--image-size", "16", "--proj-dims", "32", "16", "-bs", "12", "-nw", "0",
                 "--lr", "1.0"]


def run_script(script, *args, timeout=600, env=None):
    """Run `python SCRIPT ARGS...` from the repository root; returns CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def run_in_process(script, *args, env=None):
    """`python SCRIPT ARGS...` inside this process: the same parser, main() and run_main
    error handling (one 'error:' line, exit status 2) as the command line, without the
    interpreter start and imports that make a launch take seconds. For the checks of bad
    arguments and inputs, which stop before any training (every script reports them through
    the same utils.cli.run_main; test_bad_input checks a real process gives the same result).
    Restores argv, cwd, environment, torch threads and the
    global random states; returns a CompletedProcess (text)."""
    import contextlib
    import io
    import random
    import runpy

    argv = [os.path.join(REPO, script), *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    saved = (sys.argv, os.getcwd(), dict(os.environ), torch.get_num_threads(),
             torch.get_rng_state(), np.random.get_state(), random.getstate())
    status = 0
    try:
        sys.argv = argv
        os.chdir(REPO)
        os.environ.update(env or {})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(argv[0], run_name="__main__")
            except SystemExit as stop:  # what the interpreter does with sys.exit(code)
                if isinstance(stop.code, str):
                    print(stop.code, file=sys.stderr)
                status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        os.environ.clear()
        os.environ.update(saved[2])
        torch.set_num_threads(saved[3])
        torch.set_rng_state(saved[4])
        np.random.set_state(saved[5])
        random.setstate(saved[6])
    return subprocess.CompletedProcess(argv, status, out.getvalue(), err.getvalue())


def start_script(script, *args, env=None):
    """Start `python SCRIPT ARGS...` from the repository root without waiting: a Popen (text)."""
    return subprocess.Popen([sys.executable, os.path.join(REPO, script), *map(str, args)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def wait_for_step(checkpoint, min_steps, proc, timeout=300):
    """Wait until the checkpoint file holds at least `min_steps` steps (proc still running)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if os.path.exists(checkpoint):
            try:
                if torch.load(checkpoint, weights_only=True)["step"] >= min_steps:
                    return
            except Exception:  # replaced while reading
                pass
        time.sleep(0.05)
    raise AssertionError(f"{checkpoint} did not reach step {min_steps} in time")


def copy_of_killed_run(killed, tmp_path, layout, steps):
    """A copy of a killed run's RESPATH (checkpoint.pth at its top) whose checkpoint holds a
    step in `steps`, rewritten in the layout of the code before the engine when `layout` is not
    "current" (tests/old_layouts.py): (RESPATH, checkpoint path)."""
    import shutil
    from old_layouts import to_format_1
    respath = shutil.copytree(killed, tmp_path / "run")
    checkpoint = respath / "checkpoint.pth"
    ckpt = torch.load(checkpoint, weights_only=True)
    assert ckpt["step"] in steps, ckpt["step"]
    if layout != "current":
        torch.save(to_format_1(ckpt), checkpoint)
    return respath, checkpoint


def step_losses(checkpoint):
    """The per-step training losses a checkpoint holds (any script): float64 array."""
    ckpt = torch.load(checkpoint, weights_only=True)
    return np.asarray(ckpt["history"]["series"]["loss"], dtype=np.float64)


def assert_one_line_error(result, *fragments):
    """The run failed with exit code != 0, no traceback, and one 'error:' line naming it."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="session")
def gray_image(real_images):
    """A real 28x28 grayscale PIL image (mode L) with visible structure."""
    images, _ = real_images[0]["train"]
    img = images[np.argmax(images[:200].reshape(200, -1).std(1))]
    return Image.fromarray(img, mode="L")


@pytest.fixture(scope="session")
def rgb_image(real_images):
    """A real 28x28 image turned into RGB with three different channels."""
    img = real_images[0]["train"][0][1]
    return Image.fromarray(np.stack([img, 255 - img, img // 2], axis=-1), mode="RGB")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def pretrained(tiny_folder, tmp_path_factory):
    """A 2-epoch main.py run on the tiny folder: (RESPATH, CompletedProcess)."""
    respath = str(tmp_path_factory.mktemp("run"))
    result = run_script("main.py", tiny_folder, respath, "--epochs", "2", *FAST_PRETRAIN)
    assert result.returncode == 0, result.stderr
    return respath, result


def assert_knn_accuracy_matches_sklearn(accuracy, train_x, train_y, test_x, test_y, k):
    """`accuracy` equals scikit-learn's cosine kNN (k, brute force) on these features, except
    that test samples whose k-th and (k+1)-th neighbours are tied to float32 resolution may be
    decided either way (the tiny test models' embeddings are nearly collapsed, so features
    extracted twice, or similarities summed in another order, can reorder such neighbours)."""
    from sklearn.neighbors import KNeighborsClassifier
    train_x, test_x = np.asarray(train_x), np.asarray(test_x)
    expected = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(
        train_x, train_y).score(test_x, test_y)
    a = train_x / np.linalg.norm(train_x.astype(np.float64), axis=1, keepdims=True)
    b = test_x / np.linalg.norm(test_x.astype(np.float64), axis=1, keepdims=True)
    sims = np.sort(b @ a.T, axis=1)[:, ::-1]
    ambiguous = int(np.sum(sims[:, k - 1] - sims[:, k] < 1e-6)) if k < len(train_x) else 0
    print(f"kNN check: {ambiguous} of {len(test_y)} test samples tied at the k-th neighbour")
    assert abs(accuracy - expected) * len(test_y) <= ambiguous + 1e-9, \
        (accuracy, expected, ambiguous)
