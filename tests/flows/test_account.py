"""Every session ends with an account of every frame: a scan with frames missing is never
completed, a failure still leaves summary.json, and a full disk is an error that names it."""

from __future__ import annotations

import errno
import json
import os
import signal
import uuid
from pathlib import Path

import pytest

from account_check import check_account
from detstream.coordination import Coordinator
from detstream.results import DiskFull
from detstream.session import SessionIncomplete
from disks import When, mounted_tmpfs

pytestmark = [pytest.mark.chaos, pytest.mark.usefixtures("prefect_harness", "no_stray_services")]


def _params(tmp_path, etcd_server, **kw):
    p = {"detector": "testcam", "scan_width": 32, "scan_height": 32, "nodes": 2,
         "etcd_url": etcd_server.endpoint, "etcd_prefix": f"/t{uuid.uuid4().hex[:10]}",
         "output_dir": str(tmp_path / "runs"), "session_id": "acct" + uuid.uuid4().hex[:6],
         "stall_timeout_s": 20.0}
    p.update(kw)
    return p


def _assert_account(summary_path, h5_path, expected: int) -> dict:
    """Every position is in counted.h5 with the events the simulator's frame gives (recounted
    independently, tests/account_check.py), or listed lost and absent; never both."""
    assert Path(h5_path) == summary_path.parent / "counted.h5"
    check_account(summary_path.parent, expected)
    return json.loads(summary_path.read_text())


def _session_keys_released(coord, sid):
    keys = coord.session_keys(sid)
    assert [k for k in keys if k.startswith("services/") or "/received/" in k] == []
    assert coord.lock_holder(coord.get_spec(sid)["detector_profile"]["name"]) is None


def test_a_producer_killed_mid_scan_ends_incomplete_with_what_was_counted(tmp_path, etcd_server):
    from detstream.flows import streaming_session

    params = _params(tmp_path, etcd_server, detector="4dcamera", scan_width=48, scan_height=48)
    coord = Coordinator(etcd_server.endpoint, prefix=params["etcd_prefix"])
    sid = params["session_id"]

    def kill_a_producer():
        pid = coord.services(sid, "producer")["sector-1"]["pid"]
        os.kill(pid, signal.SIGKILL)

    with When(lambda p: p.frames_received >= 256, kill_a_producer) as fault:
        state = streaming_session(**params, return_state=True)
    assert fault.done
    assert state.is_failed() and state.name == "Incomplete"
    with pytest.raises(SessionIncomplete) as info:
        state.result()
    summary = info.value.summary
    assert summary["state"] == "incomplete" and not summary["complete"]
    assert 0 < summary["frames_counted"] < 48 * 48
    on_disk = _assert_account(tmp_path / "runs" / sid / "summary.json", summary["outputs"]["hdf5"], 48 * 48)
    assert on_disk["state"] == "incomplete" and "service failed" in on_disk["reason"]
    assert coord.get_state(sid) == "incomplete"
    assert not list((tmp_path / "runs" / sid / "parts").rglob("*.partial"))
    _session_keys_released(coord, sid)


def test_a_cancelled_session_still_leaves_its_account(tmp_path, etcd_server):
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    from prefect.states import Cancelling

    from detstream.flows import streaming_session
    from detstream.session import SessionCancelled

    params = _params(tmp_path, etcd_server, detector="4dcamera", scan_width=48, scan_height=48)

    def cancel():
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(FlowRunContext.get().flow_run.id, Cancelling(), force=True)

    with When(lambda p: p.frames_received >= 64, cancel):
        with pytest.raises(SessionCancelled):
            streaming_session(**params)
    on_disk = json.loads((tmp_path / "runs" / params["session_id"] / "summary.json").read_text())
    assert on_disk["state"] == "cancelled"
    check_account(tmp_path / "runs" / params["session_id"], 48 * 48)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs the test may fill; unmounted at the end, also on failure."""
    with mounted_tmpfs(tmp_path / "disk", "64m") as mnt:
        yield mnt


def _fill(mnt, leave_bytes: int) -> None:
    """Fill the disk until only about ``leave_bytes`` are free."""
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    try:
        with open(mnt / "filler", "wb") as f:
            f.write(b"\0" * max(0, free - leave_bytes))
    except OSError as err:  # filling to the last byte may itself meet the full disk: that is the point
        if err.errno != errno.ENOSPC:
            raise


def test_a_full_disk_at_the_merge_fails_naming_it_and_keeps_the_parts(tmp_path, etcd_server, small_disk):
    from detstream.flows import streaming_session

    params = _params(tmp_path, etcd_server, output_dir=str(small_disk / "runs"))
    sid = params["session_id"]
    coord = Coordinator(etcd_server.endpoint, prefix=params["etcd_prefix"])
    session_dir = small_disk / "runs" / sid
    nodes_done = lambda p: len(list((session_dir / "services").glob("distributor-*.json"))) == 2  # noqa: E731

    with When(nodes_done, lambda: _fill(small_disk, 64 << 10)):
        with pytest.raises(DiskFull, match=rf"{session_dir / 'counted.h5'}.*needs about .* MiB .* free"):
            streaming_session(**params)
    assert coord.get_state(sid) == "failed"
    assert "not enough space" in coord.events(sid)[-1]["reason"]
    assert len(list((session_dir / "parts").glob("*.h5"))) == 2
    on_disk = json.loads((session_dir / "summary.json").read_text())
    assert on_disk["state"] == "failed" and "not enough space" in on_disk["salvage_error"]
    assert not (session_dir / "counted.h5").exists()
    _session_keys_released(coord, sid)


def test_a_full_disk_while_a_part_is_written_names_the_part(tmp_path, etcd_server, small_disk):
    from detstream.flows import streaming_session
    from detstream.session import SessionError

    params = _params(tmp_path, etcd_server, detector="4dcamera", output_dir=str(small_disk / "runs"))
    with When(lambda p: p.frames_received >= 64, lambda: _fill(small_disk, 0)):
        # The nodes reserve their parts' room before writing: whichever write meets the full
        # disk names it (a node's part, counted.h5, or the disk when a service could not log).
        with pytest.raises((SessionError, SessionIncomplete, DiskFull),
                           match=rf"not enough space to write {small_disk}|disk holding {small_disk}"):
            streaming_session(**params)


@pytest.mark.parametrize("nodes, victim, counting", [(2, "node-1", True), (4, "node-2", True),
                                                     (2, "node-1", False)])
def test_a_node_killed_mid_scan_is_survived_with_every_frame(tmp_path, etcd_server, nodes, victim, counting):
    from detstream.flows import streaming_session

    # Sent at 600 frames/s (>= 3.8 s): the node is killed mid-scan however fast the machine is.
    params = _params(tmp_path, etcd_server, detector="4dcamera", scan_width=48, scan_height=48, nodes=nodes,
                     counting=counting, frame_rate=600.0)
    coord = Coordinator(etcd_server.endpoint, prefix=params["etcd_prefix"])
    sid = params["session_id"]

    def kill_a_node():
        os.kill(coord.services(sid, "distributor")[victim]["pid"], signal.SIGKILL)

    with When(lambda p: p.frames_received >= 256, kill_a_node) as fault:
        summary = streaming_session(**params)
    assert fault.done
    assert summary["state"] == "completed" and summary["frames_missing"] == 0
    # The summary says what delivery did: which node was lost, and that its share went elsewhere.
    assert [n["node"] for n in summary["delivery"]["nodes_lost"]] == [int(victim.split("-")[1])]
    assert summary["delivery"]["lost_reasons"] == {}
    if counting:
        _assert_account(tmp_path / "runs" / sid / "summary.json", summary["outputs"]["hdf5"], 48 * 48)
    assert coord.get_state(sid) == "completed"
    _session_keys_released(coord, sid)


def test_an_aggregator_killed_mid_scan_salvages_what_was_counted(tmp_path, etcd_server):
    from detstream.flows import streaming_session
    from detstream.session import SessionError

    params = _params(tmp_path, etcd_server, detector="4dcamera", scan_width=48, scan_height=48)
    coord = Coordinator(etcd_server.endpoint, prefix=params["etcd_prefix"])
    sid = params["session_id"]

    def kill_the_aggregator():
        os.kill(coord.services(sid, "aggregator")["0"]["pid"], signal.SIGKILL)

    with When(lambda p: p.frames_received >= 256, kill_the_aggregator):
        with pytest.raises(SessionError, match="aggregator"):
            streaming_session(**params)
    on_disk = json.loads((tmp_path / "runs" / sid / "summary.json").read_text())
    assert on_disk["state"] in ("incomplete", "failed")
    assert (on_disk["state"] == "incomplete") == (on_disk["frames_counted"] > 0)
    # Whatever was counted (nothing, too) is merged: every position there, or listed lost.
    _assert_account(tmp_path / "runs" / sid / "summary.json", tmp_path / "runs" / sid / "counted.h5", 48 * 48)
    assert coord.get_state(sid) == on_disk["state"]
    _session_keys_released(coord, sid)


@pytest.fixture
def own_etcd(tmp_path):
    """An etcd this test may stop and restart (its data kept in tmp_path); stopped at the end."""
    from detstream.etcd_server import EmbeddedEtcd

    with EmbeddedEtcd(data_dir=tmp_path / "etcd") as etcd:
        yield etcd


def test_an_etcd_restart_mid_scan_still_completes(tmp_path, own_etcd):
    import threading

    from detstream.flows import streaming_session

    params = _params(tmp_path, own_etcd, detector="4dcamera", scan_width=48, scan_height=48)
    restarted = threading.Event()

    def restart_in_5_s():  # the fault itself lasts 5 s: etcd is down that long
        own_etcd.stop()
        threading.Timer(5.0, lambda: (own_etcd.start(), restarted.set())).start()

    with When(lambda p: p.frames_received >= 256, restart_in_5_s) as fault:
        summary = streaming_session(**params)
    assert fault.done and restarted.is_set()
    assert summary["state"] == "completed" and summary["frames_missing"] == 0
    check_account(tmp_path / "runs" / params["session_id"], 48 * 48)
    coord = Coordinator(own_etcd.endpoint, prefix=params["etcd_prefix"])
    assert coord.get_state(params["session_id"]) == "completed"
    _session_keys_released(coord, params["session_id"])


def test_etcd_gone_for_good_the_scan_is_still_written_and_recorded_when_it_returns(tmp_path, own_etcd, wait_until):
    from detstream.blocks import EtcdCoordinator
    from detstream.etcd.leases import _leases_at
    from detstream.flows import streaming_session
    from detstream.salvage import record_from_summary

    params = _params(tmp_path, own_etcd, detector="4dcamera", scan_width=48, scan_height=48, etcd_url=None)
    # A short outage budget, so that "gone for good" is reached within the test.
    params["etcd"] = EtcdCoordinator(endpoints=[own_etcd.endpoint], prefix=params["etcd_prefix"],
                                     outage_budget_s=3)
    sid = params["session_id"]
    endpoint = own_etcd.endpoint

    with When(lambda p: p.frames_received >= 256, own_etcd.stop) as fault:
        summary = streaming_session(**params)
    assert fault.done and not own_etcd.running
    # The session's lock lease is no longer refreshed (main's went on retrying for good, and would
    # have taken the detector back once etcd returned).
    assert _leases_at(endpoint) == []
    assert summary["state"] == "completed" and summary["frames_missing"] == 0
    assert "not in etcd" in summary["etcd_unrecorded"]
    on_disk = _assert_account(tmp_path / "runs" / sid / "summary.json", summary["outputs"]["hdf5"], 48 * 48)
    assert on_disk["etcd_unrecorded"] == summary["etcd_unrecorded"]

    own_etcd.start()  # etcd returns: the state it missed is recorded from the summary
    coord = Coordinator(own_etcd.endpoint, prefix=params["etcd_prefix"])
    assert coord.get_state(sid) not in ("completed", None)
    assert record_from_summary(coord, tmp_path / "runs" / sid)["state"] == "completed"
    assert coord.get_state(sid) == "completed"
    # The leases etcd kept through its outage expire: the detector is free, no service key is left.
    wait_until(lambda: coord.lock_holder("4dcamera") is None, timeout_s=30, what="the detector lock to expire")
    _session_keys_released(coord, sid)
