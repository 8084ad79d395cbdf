"""A retry right after a crash: a dead holder's detector lock is waited out, a live one refused;
with the private etcd, a dead session's folder is found by its orchestrator mark."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from detstream.coordination import DetectorBusy
from detstream.session.lock import LOCK_LEASE_TTL_S, OrchestratorMark, orphaned_sessions, wait_out_dead_holder
from detstream.session_dir import SessionDir


def test_a_dead_holder_s_lock_is_waited_out_and_named(coordinator):
    """The holder's lease is never refreshed (its orchestrator was killed): the wait says so and
    returns the dead session once etcd lets the lease run out."""
    lease = int(coordinator.etcd.call("lease/grant", {"TTL": 3, "ID": 0}, what="grant")["ID"])
    coordinator.lock_detector("cam-dead", "the-dead-one", lease)
    said = []
    t0 = time.monotonic()
    assert wait_out_dead_holder(coordinator, "cam-dead", say=said.append) == "the-dead-one"
    assert coordinator.lock_holder("cam-dead") is None
    assert time.monotonic() - t0 < 3 + 5
    assert "the-dead-one" in said[0] and "ran out" in said[-1]


def test_a_live_holder_is_refused_once_it_refreshes_its_lease(coordinator):
    with coordinator.lease(3) as lease:
        coordinator.lock_detector("cam-live", "the-live-one", lease)
        said = []
        with pytest.raises(DetectorBusy, match="the-live-one"):
            wait_out_dead_holder(coordinator, "cam-live", say=said.append, ttl_s=3)
        assert coordinator.lock_holder("cam-live") == "the-live-one"  # never taken from a live holder
        coordinator.unlock_detector("cam-live", "the-live-one")


def test_a_free_detector_is_not_waited_for(coordinator):
    said = []
    assert wait_out_dead_holder(coordinator, "cam-free", say=said.append) is None and said == []
    assert LOCK_LEASE_TTL_S >= 3


HOLD = """
import sys, time
from pathlib import Path
from detstream.session.lock import OrchestratorMark
from detstream.session_dir import SessionDir
OrchestratorMark(SessionDir(Path(sys.argv[1]))).hold()
print("held", flush=True)
time.sleep(600)
"""


def test_a_killed_orchestrator_s_folder_is_named_and_a_live_one_is_not(tmp_path):
    """Only a folder whose orchestrator mark nobody holds (its holder was killed) is orphaned;
    finished sessions (a summary) and running ones (the mark held) are never named."""
    def folder(name: str, summary: bool = False) -> SessionDir:
        paths = SessionDir(tmp_path / name)
        paths.root.mkdir()
        paths.spec.write_text(json.dumps({"session_id": name}))
        if summary:
            paths.summary.write_text("{}")
        return paths

    dead, live, done = folder("dead"), folder("live"), folder("done", summary=True)
    mine = OrchestratorMark(live)
    mine.hold()
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(dead.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert orphaned_sessions(tmp_path) == []  # both orchestrators alive
        proc.kill()
        proc.wait()
        assert orphaned_sessions(tmp_path) == [dead.root]
        finished = OrchestratorMark(done)
        finished.hold()
        finished.release()
        done.orchestrator_lock.touch()  # a finished session's folder is never named, mark or not
        assert orphaned_sessions(tmp_path) == [dead.root]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        mine.release()
    assert not live.orchestrator_lock.exists()
