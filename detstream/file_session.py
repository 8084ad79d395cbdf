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

from .backends.base import DistributorLaunch, Reservation, ReservationError
from .session import SessionError, StreamingSession
from .states import SessionState
from .transfer import LocalCopyTransfer, Transfer

ACQUIRED = "acquired"
TRANSFERRED = "transferred"


class FileTransferSession(StreamingSession):
    """acquire -> transfer -> count, with the streaming session's lock, keys and release."""

    workflow = "file-transfer"

    def __init__(self, *args, transfer: Optional[Transfer] = None, remove_source: bool = True, **kw):
        super().__init__(*args, **kw)
        self.transfer_impl = transfer or LocalCopyTransfer()
        self.remove_source = remove_source
        self.transfer_report: Optional[dict] = None

    @property
    def acquired_dir(self) -> Path:
        return self.spec.session_dir / ACQUIRED

    @property
    def transferred_dir(self) -> Path:
        return self.spec.session_dir / TRANSFERRED

    def acquire(self, on_progress: Optional[Callable[[int, int], None]] = None) -> list[Path]:
        """Every producer writes its sector to a raw v5 file (fsync'd, evicted)."""
        self.coord.set_state(self.sid, SessionState.STREAMING, "acquire: writing raw files")
        t0 = time.time()
        procs = [self._start_local("acquire", str(s), "--sector", str(s), "--directory", str(self.acquired_dir))
                 for s in range(self.spec.profile.sectors)]
        for p in procs:
            while p.wait(0.5) is None:
                if on_progress is not None:
                    on_progress(sum(1 for q in procs if q.poll() is not None), len(procs))
            if p.poll() != 0:
                raise SessionError(f"acquire {p.name} failed (exit {p.poll()}): {p.log_tail(5)}")
        self.timings["acquire_s"] = time.time() - t0
        return sorted(self.acquired_dir.glob("data_scan*_module*.data"))

    def transfer(self, files: list[Path], on_progress=None) -> dict:
        """Move the raw files to the compute site's storage, verified by size and checksum."""
        self.coord.set_state(self.sid, SessionState.STREAMING, f"transfer: {len(files)} files")
        t0 = time.time()
        report = self.transfer_impl.transfer(files, self.transferred_dir, remove_source=self.remove_source,
                                             on_progress=on_progress)
        self.timings["transfer_s"] = time.time() - t0
        self.transfer_report = report.as_dict()
        return self.transfer_report

    def reserve(self, timeout_s: float) -> Reservation:
        """Reserve the nodes for the count stage (``detstream count-files`` on each)."""
        self.coord.set_state(self.sid, SessionState.RESERVING, f"{self.spec.nodes} nodes on {self.backend.name}")
        t0 = time.time()
        launch = DistributorLaunch(session_id=self.sid, etcd_endpoint=self.etcd_endpoint,
                                   etcd_prefix=self.spec.etcd_prefix, command="count-files")
        try:
            self.reservation = self.backend.reserve(self.spec.nodes, launch)
            self._record_job()
            self.reservation = self.backend.wait_running(self.reservation, timeout_s)
        except ReservationError as err:
            raise SessionError(f"node reservation failed: {err}") from err
        finally:
            self._record_job()
            self.timings["reserve_s"] = time.time() - t0
        return self.reservation

    def count(self, on_progress=None, cancelled=None) -> None:
        """Wait for every node's count stage to report (the same wait as streaming's)."""
        t0 = time.time()
        self.stream(on_progress=on_progress, cancelled=cancelled, set_state=False)
        self.timings["count_s"] = time.time() - t0
        self.timings.pop("stream_s", None)


def transfer_summary(report: Optional[dict]) -> dict:
    """The part of a transfer report that goes into the session summary."""
    if not report:
        return {}
    return {"transfer": json.loads(json.dumps(report, default=str))}
