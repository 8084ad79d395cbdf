"""Taking the detector after a crash: a dead holder's lock is waited out, a live one refused.

The detector lock lives on its orchestrator's lease (``LOCK_LEASE_TTL_S``). A live orchestrator
refreshes that lease every third of its TTL, so the seconds etcd says it has left climb back up;
a killed one's only run down. A retry started right after a ``kill -9`` therefore waits the lease
out, saying so, instead of being told that a dead session is busy. With the private etcd, which
dies with its orchestrator, there is no lock to wait for: the dead session's folder is found by
its orchestrator flock, which the kernel released when the process died.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional

from ..coordination import Coordinator, DetectorBusy
from ..session_dir import SessionDir

log = logging.getLogger("detstream.session")

#: The detector lock's lease, in seconds: how long a killed orchestrator's lock outlives it.
LOCK_LEASE_TTL_S = 10


def wait_out_dead_holder(coord: Coordinator, detector: str, say: Callable[[str], None] = log.warning,
                         ttl_s: float = LOCK_LEASE_TTL_S, poll_s: float = 0.25) -> Optional[str]:
    """Return once ``detector`` is free, with the dead holder's session id if one was waited out.

    Raises DetectorBusy as soon as the holder refreshes its lease (it is alive), or if the lock
    is still held a little past a whole lease (``ttl_s``) later.
    """
    seen = coord.lock_lease_left(detector)
    if seen is None:
        return None
    holder, lowest = seen
    say(f"detector {detector} is held by session {holder}; its lock lease has {max(lowest, 0)} s left. "
        f"Waiting to see whether its orchestrator is alive (a dead one's lease runs out by itself)")
    deadline = time.monotonic() + ttl_s + 5.0
    last_said = time.monotonic()
    while True:
        time.sleep(poll_s)
        now = coord.lock_lease_left(detector)
        if now is None:
            say(f"session {holder}'s lock lease ran out: its orchestrator is gone; taking detector {detector}")
            return holder
        who, left = now
        if who != holder or left > lowest:
            raise DetectorBusy(detector, who)  # refreshed, or taken by another session: alive
        lowest = left
        if time.monotonic() > deadline:
            raise DetectorBusy(detector, holder)
        if time.monotonic() - last_said >= 3.0:
            last_said = time.monotonic()
            say(f"still waiting for session {holder}'s lock lease to run out: {max(left, 0)} s left")


class OrchestratorMark:
    """An exclusive flock on the session folder's ``orchestrator.lock``, held while the session runs:
    the kernel drops it when the orchestrator dies, however it dies."""

    def __init__(self, paths: SessionDir) -> None:
        self.path = paths.orchestrator_lock
        self._fd: Optional[int] = None

    def hold(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.path.unlink(missing_ok=True)


def orphaned_sessions(output_dir: Path) -> list[Path]:
    """Session folders under ``output_dir`` whose orchestrator died: a spec, no summary, and an
    orchestrator mark nobody holds (so a session still running elsewhere is never named)."""
    found = []
    try:
        folders = sorted(p for p in Path(output_dir).iterdir() if p.is_dir())
    except OSError:
        return []
    for folder in folders:
        paths = SessionDir(folder)
        if not paths.spec.exists() or paths.summary.exists() or not paths.orchestrator_lock.exists():
            continue
        try:
            fd = os.open(paths.orchestrator_lock, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its orchestrator is alive
        finally:
            os.close(fd)
        found.append(folder)
    return found
