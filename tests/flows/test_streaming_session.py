"""A whole streaming session on the embedded default pieces: real etcd, Prefect, ZeroMQ, stempy."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import stempy.image
import stempy.io
from prefect.exceptions import ParameterTypeError

from detstream.coordination import Coordinator
from detstream.profile import get_profile
from detstream.session import SessionCancelled, SessionError
from detstream.sources import ReplayError, Simulator, write_scan

pytestmark = pytest.mark.usefixtures("prefect_harness", "no_stray_services")

from conftest import detstream_children as _detstream_children  # noqa: E402


def _prefix() -> str:
    return f"/t{uuid.uuid4().hex[:10]}"


def _run(tmp_path, etcd_server, **params):
    from detstream.flows import streaming_session

    params.setdefault("etcd_url", etcd_server.endpoint)
    params.setdefault("etcd_prefix", _prefix())
    params.setdefault("output_dir", str(tmp_path / "runs"))
    params.setdefault("stall_timeout_s", 20.0)
    return streaming_session(**params), params


def _no_leftovers(coord: Coordinator, sid: str, detector: str = "4dcamera"):
    keys = coord.session_keys(sid)
    leased = [k for k in keys if k.startswith("services/") or "/received/" in k]
    assert leased == [], f"leased keys left behind: {leased}"
    assert coord.lock_holder(detector) is None


def test_two_node_session_matches_stempy(tmp_path, etcd_server):
    summary, params = _run(tmp_path, etcd_server, scan_width=32, scan_height=32, nodes=2, seed=7)
    assert summary["frames_received"] == 32 * 32
    assert summary["missing_positions"] == [] and summary["partial_positions"] == []
    counts = stempy.io.load_electron_counts(summary["outputs"]["hdf5"])
    assert tuple(counts.scan_shape) == (32, 32)
    assert tuple(counts.frame_shape) == (576, 576)

    sim = Simulator(get_profile("4dcamera"), 32, 32, seed=7)
    dark = sim.dark_reference()
    by_pool: dict[int, np.ndarray] = {}
    for pos in range(32 * 32):
        idx = sim.pool_index(pos)
        if idx not in by_pool:  # pool frames repeat; stempy's answer for one is its answer for all
            by_pool[idx] = stempy.image.electron_count_frame(
                sim.frame(pos), darkreference=dark, background_threshold=12.0,
                xray_threshold=2000.0).data[0, 0]
        ours = counts.data[pos // 32 * 32 + pos % 32][0] if counts.data.ndim == 2 else counts.data[pos][0]
        np.testing.assert_array_equal(np.sort(ours), np.sort(by_pool[idx]), err_msg=f"position {pos}")
    assert summary["events"] == sum(len(by_pool[sim.pool_index(p)]) for p in range(32 * 32))

    out = Path(summary["outputs"]["hdf5"]).parent
    assert (out / "virtual_bright_field.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["frames_received"] == 1024 and on_disk["bytes_moved"] == 1024 * 576 * 576 * 2
    coord = Coordinator(params["etcd_url"], prefix=params["etcd_prefix"])
    assert coord.get_state(summary["session_id"]) == "completed"
    assert coord.get_result(summary["session_id"])["events"] == summary["events"]
    _no_leftovers(coord, summary["session_id"])


def test_replay_equals_simulated_stream(tmp_path, etcd_server):
    profile = get_profile("4dcamera")
    sim = Simulator(profile, 8, 6, seed=3)
    rec = tmp_path / "recorded"
    write_scan(sim, rec)
    dark = tmp_path / "dark.npy"
    np.save(dark, sim.dark_reference())
    simulated, _ = _run(tmp_path, etcd_server, scan_width=8, scan_height=6, seed=3, nodes=2,
                        dark_reference=str(dark))
    replayed, _ = _run(tmp_path, etcd_server, source="replay", replay_dir=str(rec), nodes=3,
                       dark_reference=str(dark), scan_width=None, scan_height=None)
    a = stempy.io.load_electron_counts(simulated["outputs"]["hdf5"])
    b = stempy.io.load_electron_counts(replayed["outputs"]["hdf5"])
    assert a.scan_shape == b.scan_shape
    assert simulated["events"] == replayed["events"] > 0
    for pos in range(48):
        np.testing.assert_array_equal(a.data.reshape(-1)[pos] if a.data.dtype == object else a.data[pos],
                                      b.data.reshape(-1)[pos] if b.data.dtype == object else b.data[pos])


def test_keys_live_during_the_session_and_vanish_after(tmp_path, etcd_server):
    from detstream import progress

    prefix = _prefix()
    coord = Coordinator(etcd_server.endpoint, prefix=prefix)
    sid = "keys" + uuid.uuid4().hex[:6]
    seen = {}

    def listener(p):
        if "keys" not in seen:
            seen["keys"] = coord.session_keys(sid)
            seen["lock"] = coord.lock_holder("4dcamera")
            ep = json.loads(seen["keys"].get("services/distributor/node-0", "{}")).get("endpoint", "")
            if ep.startswith("ipc://"):
                seen["socket_dir_mode"] = os.stat(os.path.dirname(ep[len("ipc://"):])).st_mode & 0o777
    progress.LISTENERS.append(listener)
    try:
        summary, _ = _run(tmp_path, etcd_server, scan_width=8, scan_height=8, session_id=sid,
                          etcd_prefix=prefix)
    finally:
        progress.LISTENERS.remove(listener)
    keys = seen["keys"]
    assert seen["lock"] == sid
    assert {"spec", "state", "job", "scans/1/expected"} <= set(keys)
    assert json.loads(keys["scans/1/expected"]) == 64
    assert {"services/distributor/node-0", "services/distributor/node-1", "services/aggregator/0"} <= set(keys)
    node0 = json.loads(keys["services/distributor/node-0"])
    # The local backend's nodes share this host: ipc, in a private folder removed with the session.
    assert node0["endpoint"].startswith("ipc://") and node0["pid"] > 0
    assert seen["socket_dir_mode"] == 0o700
    assert not os.path.exists(os.path.dirname(node0["endpoint"][len("ipc://"):]))
    _no_leftovers(coord, sid)
    states = [e["state"] for e in coord.events(sid)]
    assert states == ["requested", "reserving", "starting", "streaming", "draining", "completed"]


def test_a_failed_session_releases_everything(tmp_path, etcd_server):
    """A producer killed mid-scan ends the session; no process, lease, endpoint or lock remains."""
    import signal

    from detstream import progress

    prefix = _prefix()
    coord = Coordinator(etcd_server.endpoint, prefix=prefix)
    sid = "fail" + uuid.uuid4().hex[:6]
    killed = []

    def listener(p):
        if not killed:
            producers = coord.services(sid, "producer")
            if producers:
                pid = next(iter(producers.values()))["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    progress.LISTENERS.append(listener)
    try:
        with pytest.raises(SessionError, match="service failed|stalled"):
            _run(tmp_path, etcd_server, scan_width=64, scan_height=64, session_id=sid,
                 etcd_prefix=prefix, counting=False)
    finally:
        progress.LISTENERS.remove(listener)
    assert killed
    # failed if nothing was counted before the kill, incomplete with what was (tests/flows/test_account.py)
    assert coord.get_state(sid) in ("failed", "incomplete")
    _no_leftovers(coord, sid)


def test_cancelling_the_flow_run_cancels_the_session(tmp_path, etcd_server):
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    from prefect.states import Cancelling

    from detstream import progress

    prefix = _prefix()
    coord = Coordinator(etcd_server.endpoint, prefix=prefix)
    sid = "cncl" + uuid.uuid4().hex[:6]
    asked = []

    def listener(p):
        if not asked:
            run_id = FlowRunContext.get().flow_run.id
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(run_id, Cancelling(), force=True)
            asked.append(run_id)
    progress.LISTENERS.append(listener)
    try:
        with pytest.raises(SessionCancelled):
            _run(tmp_path, etcd_server, scan_width=64, scan_height=64, session_id=sid,
                 etcd_prefix=prefix, counting=False)
    finally:
        progress.LISTENERS.remove(listener)
    assert asked
    assert coord.get_state(sid) == "cancelled"
    _no_leftovers(coord, sid)


def test_a_busy_detector_refuses_a_second_session_at_once(tmp_path, etcd_server):
    from detstream.coordination import DetectorBusy

    prefix = _prefix()
    coord = Coordinator(etcd_server.endpoint, prefix=prefix)
    with coord.lease(10) as lease:
        coord.lock_detector("4dcamera", "the-running-one", lease)
        with pytest.raises(DetectorBusy, match="the-running-one"):
            _run(tmp_path, etcd_server, scan_width=4, scan_height=4, etcd_prefix=prefix)
        assert coord.lock_holder("4dcamera") == "the-running-one"
    assert not _detstream_children()


@pytest.mark.parametrize("params, error, message", [
    ({"scan_width": 0, "scan_height": 0}, ParameterTypeError, "scan_width"),
    ({"nodes": 0}, ParameterTypeError, "nodes"),
    ({"detector": "no-such-camera"}, ValueError, "no-such-camera"),
])
def test_bad_parameters_fail_before_any_process_starts(tmp_path, etcd_server, params, error, message):
    with pytest.raises(error, match=message):
        _run(tmp_path, etcd_server, **{"scan_width": 4, "scan_height": 4, **params})
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("logs"))


def test_a_dark_reference_of_the_wrong_shape_fails_before_any_process_starts(tmp_path, etcd_server):
    bad = tmp_path / "dark.npy"
    np.save(bad, np.zeros((10, 10), np.float32))
    with pytest.raises(ValueError, match=r"dark reference .*\(10, 10\).*\(576, 576\)"):
        _run(tmp_path, etcd_server, scan_width=4, scan_height=4, dark_reference=str(bad))
    assert not any((tmp_path / "runs").rglob("logs"))


def test_an_empty_replay_directory_fails_naming_it(tmp_path, etcd_server):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReplayError, match=str(empty)):
        _run(tmp_path, etcd_server, source="replay", replay_dir=str(empty), scan_width=None,
             scan_height=None)
