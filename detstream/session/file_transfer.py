"""The file-transfer session: acquire to raw files, transfer them, count them from storage.

The classic path that streaming replaces, and the baseline it is measured against. It takes
the same lock, keys and backend as a streaming session and writes the same outputs; each
stage reads what the previous one wrote from storage (written files are fsync'd and evicted
from the page cache), so one machine models the separate machines of the real path.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

from ..states import SessionState
from ..transfer import LocalCopyTransfer, Transfer
from .base import Session, SessionError


class FileTransferSession(Session):
    """open -> acquire -> transfer -> reserve -> count -> collect -> close."""

    workflow = "file-transfer"
    node_service = "count-files"
    node_role = "file-counter"

    def __init__(self, *args, transfer: Optional[Transfer] = None, remove_source: bool = True, **kw):
        super().__init__(*args, **kw)
        self.transfer_impl = transfer or LocalCopyTransfer()
        self.remove_source = remove_source
        self.transfer_report: Optional[dict] = None

    def acquire(self, on_progress: Optional[Callable[[int, int], None]] = None) -> list[Path]:
        """Every producer writes its sector to a raw v5 file (fsync'd, evicted)."""
        self.coord.set_state(self.sid, SessionState.STREAMING, "acquire: writing raw files")
        t0 = time.time()
        procs = [self._start_local("acquire", str(s), "--sector", str(s), "--directory", str(self.paths.acquired))
                 for s in range(self.spec.profile.sectors)]
        for p in procs:
            while p.wait(0.5) is None:
                if on_progress is not None:
                    on_progress(sum(1 for q in procs if q.poll() is not None), len(procs))
            if p.poll() != 0:
                raise SessionError(f"acquire {p.name} failed (exit {p.poll()}): {p.log_tail(5)}")
        self.timings["acquire_s"] = time.time() - t0
        return sorted(self.paths.acquired.glob("data_scan*_module*.data"))

    def transfer(self, files: list[Path], on_progress=None) -> dict:
        """Move the raw files to the compute site's storage, verified by size and checksum."""
        self.coord.set_state(self.sid, SessionState.STREAMING, f"transfer: {len(files)} files")
        t0 = time.time()
        report = self.transfer_impl.transfer(files, self.paths.transferred, remove_source=self.remove_source,
                                             on_progress=on_progress)
        self.timings["transfer_s"] = time.time() - t0
        self.transfer_report = report.as_dict()
        return self.transfer_report

    def reserve(self, timeout_s: float):
        """Reserve the nodes for the count stage; a failure here has nothing to fall back to."""
        try:
            return super().reserve(timeout_s)
        except SessionError as err:
            err.fallback_reason = None
            raise

    def count(self, on_progress=None, cancelled=None) -> None:
        """Wait for every node's count stage to report."""
        t0 = time.time()
        self.follow_nodes(on_progress=on_progress, cancelled=cancelled)
        self.timings["count_s"] = time.time() - t0


def transfer_summary(report: Optional[dict]) -> dict:
    """The part of a transfer report that goes into the session summary."""
    if not report:
        return {}
    return {"transfer": json.loads(json.dumps(report, default=str))}
