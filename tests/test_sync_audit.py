"""--sync-debug's bookkeeping (utils/sync_audit.py) on the CPU: the first steps are not
audited, every synchronisation warning of an audited step is counted at its line, and the CPU
is refused with a one-line error. (The CUDA run itself is tools/gpu_check.py's.)"""
import inspect
import warnings

import pytest
import torch

from utils.errors import UserError
from utils.sync_audit import SyncAudit


def test_counts_synchronisations_per_line(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    audit = SyncAudit(False, torch.device("cpu"), skip=2)
    audit.enabled = True  # as on CUDA, with the mode setter recorded instead of called
    for step in range(5):
        with audit.step():
            every = inspect.currentframe().f_lineno + 1
            warnings.warn("called a synchronizing CUDA operation")  # steps 3-5
            if step == 4:
                once = inspect.currentframe().f_lineno + 1
                warnings.warn("called a synchronizing CUDA operation")
            warnings.warn("something else")
    assert modes == ["warn", "default"] * 3
    assert audit.audited == 3 and sum(audit.places.values()) == 4
    lines = audit.summary().splitlines()
    assert lines[0] == "sync-debug: 4 synchronisation(s) in 3 audited steps (after the first 2)"
    assert lines[1].startswith("  3 x ") and lines[1].endswith(f"test_sync_audit.py:{every}")
    assert lines[2] == f"  1 x {__file__}:{once}"


def test_refused_on_the_cpu():
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        SyncAudit(True, torch.device("cpu"))
    assert SyncAudit(False, torch.device("cpu")).summary().startswith("sync-debug: 0 ")
