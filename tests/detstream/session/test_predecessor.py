"""A new session on a detector whose last session's orchestrator died: it waits for that
session's services, marks it abandoned and salvages its folder, or refuses while they run."""

from __future__ import annotations

import json
import uuid

import pytest

from detstream.backends.local import LocalBackend
from detstream.coordination import DetectorBusy
from detstream.profile import get_profile
from detstream.session import StreamingSession, make_spec
from detstream.states import SessionState


def _spec(tmp_path, prefix, sid):
    return make_spec(scan_width=4, scan_height=4, profile=get_profile("testcam"), output_dir=str(tmp_path / "runs"),
                     session_id=sid, etcd_prefix=prefix, counting={"enabled": False})


def _dead_session(tmp_path, coordinator, etcd_prefix):
    """A session that opened and streamed, whose orchestrator then vanished (its lock lease gone)."""
    sid = "dead" + uuid.uuid4().hex[:6]
    session = StreamingSession(_spec(tmp_path, etcd_prefix, sid), coordinator,
                               LocalBackend(tmp_path / "logs"), "unused")
    session.open()
    coordinator.set_state(sid, SessionState.STREAMING)
    session.lock_lease.revoke()  # what a kill -9 leaves once the lease expires
    return sid


def test_the_next_session_marks_a_dead_one_abandoned_and_salvages_it(tmp_path, coordinator, etcd_prefix):
    dead = _dead_session(tmp_path, coordinator, etcd_prefix)
    assert coordinator.lock_holder("testcam") is None and coordinator.get_state(dead) == "streaming"
    nxt = StreamingSession(_spec(tmp_path, etcd_prefix, "next" + uuid.uuid4().hex[:6]), coordinator,
                           LocalBackend(tmp_path / "logs"), "unused")
    nxt.open()
    try:
        assert coordinator.get_state(dead) == "abandoned"
        summary = json.loads((tmp_path / "runs" / dead / "summary.json").read_text())
        assert summary["state"] == "abandoned" and summary["frames_missing"] == 16
        assert coordinator.lock_holder("testcam") == nxt.sid
    finally:
        nxt.close(SessionState.CANCELLED, "test over")


def test_the_next_session_refuses_while_the_dead_ones_services_still_run(tmp_path, coordinator, etcd_prefix):
    dead = _dead_session(tmp_path, coordinator, etcd_prefix)
    with coordinator.lease(10) as lease:
        coordinator.register_service(dead, "aggregator", "0", {"pid": 1}, lease)
        nxt = StreamingSession(_spec(tmp_path, etcd_prefix, "next" + uuid.uuid4().hex[:6]), coordinator,
                               LocalBackend(tmp_path / "logs"), "unused")
        with pytest.raises(DetectorBusy, match=rf"{dead}.*aggregator/0 still run"):
            nxt._retire_dead_predecessor(wait_s=0.5)
    assert coordinator.get_state(dead) == "streaming"
