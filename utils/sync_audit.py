"""--sync-debug: find every host-device synchronisation inside the training steps (CUDA).

The engine's steps are meant to run without the host waiting for the GPU (losses stay on the
device until a logging window ends). With --sync-debug, each step after the first `skip`
(cuDNN autotuning, compilation and allocator warm-up synchronise legitimately) runs under
torch.cuda.set_sync_debug_mode("warn"); every synchronising call (.item(), a blocking copy to
the host, nonzero ...) is recorded with the line that made it, and the run ends with one line:
"sync-debug: N synchronisation(s) in M audited steps", followed by the places.
"""
import contextlib
import warnings

import torch

from utils.errors import UserError

SKIPPED_STEPS = 3


class SyncAudit:
    """Counts synchronisations per source line over the audited steps (`step()` contexts)."""

    def __init__(self, enabled, device, skip=SKIPPED_STEPS):
        if enabled and device.type != "cuda":
            raise UserError("--sync-debug audits host-GPU synchronisations: it needs a CUDA "
                            "GPU (-c); drop --sync-debug on the CPU")
        self.enabled, self.skip = enabled, skip
        self.seen, self.audited, self.places = 0, 0, {}

    @contextlib.contextmanager
    def step(self):
        """Context of one training step; audited once `skip` steps have run."""
        self.seen += 1
        if not self.enabled or self.seen <= self.skip:
            yield
            return
        self.audited += 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        for w in caught:
            if "synchroniz" in str(w.message).lower():
                place = f"{w.filename}:{w.lineno}"
                self.places[place] = self.places.get(place, 0) + 1

    def summary(self):
        """'sync-debug: N synchronisation(s) in M audited steps' and one line per place."""
        total = sum(self.places.values())
        lines = [f"sync-debug: {total} synchronisation(s) in {self.audited} audited steps "
                 f"(after the first {self.skip})"]
        lines += [f"  {count} x {place}" for place, count in
                  sorted(self.places.items(), key=lambda item: -item[1])]
        return "\n".join(lines)
