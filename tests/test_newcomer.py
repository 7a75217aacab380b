"""The README's two commands in order, as a newcomer runs them in a fresh clone: the demo
(scripts/demo.sh, here with a small data set and one epoch) changes no tracked file, so the
test suite that follows still finds the docs' tables equal to their results files."""
import os
import shutil
import subprocess

from conftest import REPO


def git(cwd, *args):
    """Run git in `cwd`; its stdout."""
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout


def fresh_clone(target):
    """The working tree's tracked files (as they are now, committed or not) in a new repository
    at `target` with one commit, and this checkout's .venv linked in (no install)."""
    for path in git(REPO, "ls-files", "-z").split("\0"):
        if path and os.path.isfile(os.path.join(REPO, path)):
            os.makedirs(os.path.join(target, os.path.dirname(path)), exist_ok=True)
            shutil.copy2(os.path.join(REPO, path), os.path.join(target, path))
    git(target, "init", "-q")
    git(target, "add", "-f", ".")  # -f: the results files the docs quote are force-added
    git(target, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone")
    os.symlink(os.path.join(REPO, ".venv"), os.path.join(target, ".venv"))


def test_demo_then_tests_in_a_fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    fresh_clone(clone)
    env = {**os.environ, "DEMO_PER_CLASS": "6 3", "OMP_NUM_THREADS": "1",
           "DEMO_FLAGS": "--epochs 1 --image-size 16 --proj-dims 32 16 -bs 20 -nw 0"}
    demo = subprocess.run(["bash", "scripts/demo.sh"], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=600)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "raw pixels" in demo.stdout  # the summary table, with its references
    assert (clone / "results" / "demo" / "demo.json").is_file()
    assert git(clone, "status", "--porcelain") == ""
    tables = subprocess.run([os.path.join(clone, ".venv", "bin", "python"),
                             "tools/results_tables.py", "--check"], cwd=clone,
                            capture_output=True, text=True, timeout=300)
    assert tables.returncode == 0, tables.stderr
