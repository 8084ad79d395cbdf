"""etcd outages: requests retry within a budget, leases and their keys come back, refusals fail at once."""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import threading
import time
from concurrent.futures import Future
from typing import Callable

import pytest
import requests
from etcd3gw import exceptions as etcd_exc

from detstream.coordination import AuthenticationError, CoordinationError, Coordinator, enable_auth
from detstream.etcd import EtcdClient
from detstream.etcd import watch as etcd_watch
from detstream.etcd.encoding import _b64, _prefix_end
from detstream.etcd.errors import _is_outage
from detstream.etcd.watch import _PrefixView
from detstream.etcd_server import EmbeddedEtcd

ROOT_PW, ALICE_PW = "root-pw-Hk52", "alice-pw-Tw09"


# --------------------------------------------------------------------------- helpers


def _in_background(fn: Callable[[], object]) -> Future:
    """Run `fn` in a daemon thread; its result or exception lands in the returned future."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the test through the future
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


def _messages(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def _most_retries(budget_s: float) -> int:
    """The most retries the backoff (0.1 s doubling to 1 s, the last wait cut at the budget) leaves
    room for within ``budget_s``: a client that retried more went on past its budget. Attempts
    that take time only make fewer."""
    waited, retries = 0.0, 0
    while waited < budget_s:
        waited += min(0.1 * 2 ** retries, 1.0)
        retries += 1
    return retries


def _gave_up_after(err: pytest.ExceptionInfo, budget_s: float) -> None:
    """The error's own account of the outage: it lasted at least the budget when the client gave up."""
    lasted = float(re.search(r"unreachable for (\d+\.\d) s", str(err.value)).group(1))
    assert lasted >= budget_s, str(err.value)


class _Partition:
    """A TCP forwarder in front of etcd that can cut every connection and refuse new ones."""

    def __init__(self, endpoint: str) -> None:
        host, port = endpoint.rsplit("//", 1)[1].rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._cut = False
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except (socket.timeout, OSError):
                continue
            if self._cut:
                client.close()
                continue
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        """Drop every open connection; new ones are closed at once (as a dead network would)."""
        self._cut = True
        with self._lock:
            doomed, self._sockets = self._sockets, []
        for s in doomed:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def heal(self) -> None:
        self._cut = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._thread.join(timeout=5)
        self._listener.close()


@pytest.fixture
def etcd(tmp_path):
    """A private etcd whose data dir (under tmp_path) survives a stop, so a restart keeps keys and leases."""
    server = EmbeddedEtcd(unsafe_no_fsync=True, data_dir=tmp_path / "etcd")
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(tmp_path / "etcd", ignore_errors=True)


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory):
    """A private etcd with auth on: root, and alice with read-write on /ds/ only."""
    data_dir = tmp_path_factory.mktemp("auth-etcd") / "etcd"
    server = EmbeddedEtcd(unsafe_no_fsync=True, data_dir=data_dir)
    try:
        server.start()
        enable_auth(server.endpoint, ROOT_PW, user="alice", user_password=ALICE_PW, prefix="/ds")
        yield server
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def partition(etcd_server):
    proxy = _Partition(etcd_server.endpoint)
    try:
        yield proxy
    finally:
        proxy.close()


# --------------------------------------------------------------------------- what is retried


def _gateway_error(message: str, reason: str, cls=etcd_exc.Etcd3Exception) -> etcd_exc.Etcd3Exception:
    """An exception as etcd3gw raises it for a gateway answer (JSON body, HTTP reason phrase)."""
    return cls(json.dumps({"error": message, "message": message}), reason)


@pytest.mark.parametrize("exc", [
    etcd_exc.ConnectionFailedError("HTTPConnectionPool: [Errno 111] Connection refused"),
    etcd_exc.ConnectionFailedError("('Connection aborted.', ConnectionResetError(104, 'Connection reset by peer'))"),
    etcd_exc.ConnectionTimeoutError("Read timed out. (read timeout=10)"),
    _gateway_error("etcdserver: leader changed", "Service Unavailable", etcd_exc.ConnectionFailedError),
    _gateway_error("etcdserver: request timed out", "Internal Server Error", etcd_exc.InternalServerError),
    _gateway_error("etcdserver: not leader", "Precondition Failed", etcd_exc.PreconditionFailedError),
    _gateway_error("etcdserver: too many requests", "Too Many Requests"),
    etcd_exc.Etcd3Exception("<html>bad gateway</html>", "Bad Gateway"),
    requests.ConnectionError("[Errno 111] Connection refused"),
], ids=["refused", "reset", "timeout", "leader-changed", "500", "not-leader", "too-many", "502", "watch-refused"])
def test_what_an_outage_causes_is_retried(exc):
    assert _is_outage(exc)


@pytest.mark.parametrize("exc", [
    _gateway_error("etcdserver: authentication failed, invalid user ID or password", "Bad Request"),
    _gateway_error("etcdserver: user name is empty", "Bad Request"),
    _gateway_error("etcdserver: permission denied", "Forbidden"),
    _gateway_error("etcdserver: invalid auth token", "Unauthorized"),
    _gateway_error("illegal base64 data at input byte 0", "Bad Request"),
    _gateway_error("etcdserver: requested lease not found", "Not Found"),
    _gateway_error("etcdserver: mvcc: database space exceeded", "Too Many Requests"),
    etcd_exc.ConnectionFailedError("SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED]'))"),
    etcd_exc.ConnectionFailedError("Failed to resolve 'etcd.example' ([Errno -2] Name or service not known)"),
    ValueError("not an etcd error"),
], ids=["auth-failed", "no-user", "permission", "token", "bad-request", "no-lease", "no-space", "tls", "dns", "other"])
def test_refusals_and_set_up_errors_are_not_retried(exc):
    assert not _is_outage(exc)


def test_a_prefix_view_ignores_events_its_read_or_a_later_event_covers():
    view = _PrefixView()
    assert view.reset([], 10) is False

    def event(key: str, revision: int, kind: str = "PUT", value: bytes = b"v") -> dict:
        return {"type": kind, "kv": {"key": key.encode(), "value": value, "mod_revision": str(revision)}}

    view.apply(event("/a", 9))  # before the read: covered by it
    view.apply(event("/b", 11, value=b"new"))
    view.apply(event("/b", 11, value=b"again"))  # a re-opened watch repeats it
    view.apply(event("/c", 12))
    view.apply(event("/c", 13, "DELETE"))
    view.apply(event("/c", 12))  # an old stream's late copy must not bring it back
    assert view.current == {"/b": b"new"}


def test_an_unreachable_endpoint_fails_after_the_budget_naming_it(caplog):
    """No etcd at all: retried for the budget, then a CoordinationError naming the endpoint and the time."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    client = EtcdClient(endpoint, outage_budget_s=1.5)
    started = time.monotonic()
    with pytest.raises(CoordinationError, match=rf"cannot reach etcd at {endpoint} to read /x: unreachable for") as err:
        client.get("/x")
    assert time.monotonic() - started >= 1.5
    _gave_up_after(err, 1.5)
    # Retried for the budget and no longer (how long that took depends on the machine's load).
    assert 3 <= client.retries <= _most_retries(1.5) and client.outages == 1
    # Still unreachable and past the budget: the next request tries once and fails at once.
    retries = client.retries
    with pytest.raises(CoordinationError, match=endpoint):
        client.put("/x", "1")
    assert client.retries == retries, "a request past the budget was retried"
    assert len(_messages(caplog, "is unreachable")) == 1 and not _messages(caplog, "reachable again")


# --------------------------------------------------------------------------- requests through an outage


@pytest.mark.chaos
def test_a_put_and_a_get_during_an_outage_complete_after_the_restart(etcd, wait_until, caplog):
    endpoint = etcd.endpoint
    writer, reader = EtcdClient(endpoint, outage_budget_s=60), EtcdClient(endpoint, outage_budget_s=60)
    writer.put("/k/before", "kept")
    etcd.stop()
    put = _in_background(lambda: writer.put("/k/during", "written"))
    get = _in_background(lambda: reader.get("/k/before"))
    wait_until(lambda: writer.retries >= 3 and reader.retries >= 3, what="both requests to be retrying")
    wait_until(lambda: reader.outage_s >= 5, what="a five-second outage")  # retries spaced by the backoff
    assert not put.done() and not get.done()
    etcd.start()
    assert etcd.endpoint == endpoint
    assert get.result(timeout=30) == b"kept"
    put.result(timeout=30)
    assert reader.get("/k/during") == b"written"
    for client in (writer, reader):  # one line when it began and one when it ended, not one per retry
        assert client.outages == 1 and client.outage_s == 0.0
    assert len(_messages(caplog, f"etcd at {endpoint} is unreachable")) == 2
    assert len(_messages(caplog, f"etcd at {endpoint} is reachable again")) == 2


@pytest.mark.chaos
def test_etcd_gone_longer_than_the_budget_is_an_error_naming_the_endpoint(etcd, wait_until):
    endpoint = etcd.endpoint
    client = EtcdClient(endpoint, outage_budget_s=3)
    client.put("/k", "v")
    etcd.stop()
    started = time.monotonic()
    with pytest.raises(CoordinationError, match=rf"cannot reach etcd at {endpoint} to read /k: unreachable for") as err:
        client.get("/k")
    assert time.monotonic() - started >= 3
    _gave_up_after(err, 3)
    assert 1 <= client.retries <= _most_retries(3)  # retried for the budget, and no longer
    etcd.start()
    assert client.get("/k") == b"v"  # the same client works again once etcd is back


@pytest.mark.chaos
def test_a_prefix_wait_rides_out_an_outage_and_watches_again(etcd, wait_until, monkeypatch):
    opened: list[int] = []
    real_watcher = etcd_watch.Watcher

    def counting_watcher(*args, **kwargs):
        watcher = real_watcher(*args, **kwargs)
        opened.append(kwargs["start_revision"])
        return watcher

    monkeypatch.setattr(etcd_watch, "Watcher", counting_watcher)
    monkeypatch.setattr(etcd_watch, "_RESYNC_S", 0.2)  # re-read often, so the outage is met at once
    writer = EtcdClient(etcd.endpoint)
    waiter = EtcdClient(etcd.endpoint, outage_budget_s=60)
    found = _in_background(lambda: waiter.wait_prefix("/w/", lambda cur: sorted(cur) or None, timeout_s=120))
    wait_until(lambda: len(opened) == 1, what="the watch to open")
    etcd.stop()
    wait_until(lambda: waiter.retries >= 2, what="the wait's re-read to be retrying")
    etcd.start()
    wait_until(lambda: len(opened) == 2, what="the watch to be opened again after the outage")
    monkeypatch.setattr(etcd_watch, "_RESYNC_S", 600.0)  # from the waiter's next turn, only the watch
    writer.put("/w/a", "1")
    assert found.result(timeout=30) == (["/w/a"], {"/w/a": b"1"})
    assert len(opened) == 2


# --------------------------------------------------------------------------- leases through an outage


@pytest.mark.chaos
def test_a_leased_key_is_there_after_a_restart_past_its_ttl(etcd, wait_until):
    client = EtcdClient(etcd.endpoint, outage_budget_s=60)
    with client.lease(2) as lease:
        client.put("/svc/a", "up", lease)
        etcd.stop()
        wait_until(lambda: client.retries >= 1, what="the refresh to be retrying")
        wait_until(lambda: client.outage_s > lease.ttl + 1, timeout_s=30, what="the TTL to run out")
        refreshed = lease.refreshes
        etcd.start()
        # Several refreshes after the restart: the key lives past more than one TTL.
        wait_until(lambda: lease.refreshes >= refreshed + 4, timeout_s=30, what="refreshes after the restart")
        assert EtcdClient(etcd.endpoint).get("/svc/a") == b"up"
        assert lease.alive and lease.time_to_live() > 0
    assert EtcdClient(etcd.endpoint).get("/svc/a") is None


@pytest.mark.chaos
def test_a_restarted_etcd_that_lost_the_lease_gets_it_granted_again_with_its_keys(tmp_path, wait_until):
    """Restarted without its data (a temporary data dir): the lease is unknown, so it is granted anew."""
    etcd = EmbeddedEtcd(unsafe_no_fsync=True)
    try:
        etcd.start()
        old_dir = etcd.data_dir
        regrants: list[tuple[int, dict]] = []
        coord = Coordinator(etcd.endpoint, prefix="/ds", outage_budget_s=60)
        lease = coord.lease(2, on_regrant=lambda lease, lost: regrants.append((lease.id, lost)))
        try:
            coord.lock_detector("4dcamera", "s1", lease)
            coord.register_service("s1", "distributor", "n0", {"endpoint": "tcp://n0:1"}, lease)
            first_id = lease.id
            etcd.stop()
            assert not old_dir.exists()
            wait_until(lambda: coord.etcd.retries >= 1, what="the refresh to be retrying")
            etcd.start()
            wait_until(lambda: regrants, timeout_s=30, what="the lease to be granted again")
            assert lease.regranted == 1 and lease.id != first_id and regrants == [(lease.id, {})]
            assert coord.lock_holder("4dcamera") == "s1"
            assert coord.services("s1", "distributor") == {"n0": {"endpoint": "tcp://n0:1"}}
            kvs, _ = coord.etcd.range(coord.lock_key("4dcamera"))
            assert kvs[0].lease == lease.id
        finally:
            lease.revoke()
        assert coord.lock_holder("4dcamera") is None and coord.services("s1", "distributor") == {}
    finally:
        etcd.stop()
    assert not etcd.data_dir.exists()


@pytest.mark.chaos
def test_a_lock_taken_by_another_session_during_a_partition_is_not_stolen_back(
    partition, etcd_server, etcd_prefix, wait_until
):
    """Cut off for longer than its TTL, a session loses its lease; on return it puts back what is
    still free (its other lock, its service key) and reports the lock another session took."""
    cut_off = Coordinator(partition.endpoint, prefix=etcd_prefix, outage_budget_s=60)
    direct = Coordinator(etcd_server.endpoint, prefix=etcd_prefix)
    reports: list[dict] = []
    lease = cut_off.lease(2, on_regrant=lambda _lease, lost: reports.append(lost))
    try:
        cut_off.lock_detector("4dcamera", "first", lease)
        cut_off.lock_detector("other", "first", lease)
        cut_off.register_service("first", "aggregator", "0", {"endpoint": "tcp://h:1"}, lease)
        partition.cut()
        wait_until(lambda: cut_off.etcd.retries >= 1, what="the refresh to be retrying")
        wait_until(lambda: direct.lock_holder("4dcamera") is None, timeout_s=lease.ttl + 10,
                   what="the cut-off session's lease to expire")
        with direct.lease(10) as other:
            direct.lock_detector("4dcamera", "second", other)
            partition.heal()
            wait_until(lambda: reports, timeout_s=30, what="the lease to be granted again")
            lock_key = direct.lock_key("4dcamera")
            assert reports == [{lock_key: b"second"}] and lease.lost == {lock_key: b"second"}
            assert lease.regranted == 1
            assert direct.lock_holder("4dcamera") == "second"  # not stolen back
            assert direct.lock_holder("other") == "first"  # free, so put back
            assert direct.services("first", "aggregator") == {"0": {"endpoint": "tcp://h:1"}}
            assert lock_key not in lease.keys
    finally:
        partition.heal()
        lease.revoke()
        cut_off.close()
    assert direct.lock_holder("other") is None


@pytest.mark.chaos
def test_a_put_that_meets_a_lost_lease_grants_it_again_and_writes(coordinator):
    """The owner may learn of the loss before its refresh thread does (a refresh is TTL/3 away)."""
    with coordinator.lease(30) as lease:
        coordinator.register_service("s1", "distributor", "n0", {"pid": 1}, lease)
        first_id = lease.id
        coordinator.etcd.call("kv/lease/revoke", {"ID": first_id}, what="lose the lease")  # etcd forgets it
        coordinator.register_service("s1", "distributor", "n1", {"pid": 2}, lease)
        assert lease.regranted == 1 and lease.id != first_id
        assert coordinator.services("s1", "distributor") == {"n0": {"pid": 1}, "n1": {"pid": 2}}
        kvs, _ = coordinator.etcd.range(coordinator.session_key("s1", "services/distributor/"), prefix=True)
        assert {kv.lease for kv in kvs} == {lease.id}
    assert coordinator.services("s1", "distributor") == {}


def test_a_lease_remembers_only_the_keys_still_written_with_it(coordinator):
    with coordinator.lease(5) as lease, coordinator.lease(5) as other:
        coordinator.lock_detector("4dcamera", "s1", lease)
        coordinator.register_service("s1", "distributor", "n0", {"pid": 1}, lease)
        coordinator.register_service("s1", "distributor", "n1", {"pid": 2}, lease)
        coordinator.set_received("s1", 1, "n0", 5, lease)
        coordinator.set_received("s1", 1, "n1", 5, lease)
        coordinator.set_expected("s1", 1, 10)  # not leased: not remembered
        lock, n0, n1 = (coordinator.lock_key("4dcamera"), coordinator.session_key("s1", "services/distributor/n0"),
                        coordinator.session_key("s1", "services/distributor/n1"))
        received = coordinator.session_key("s1", "scans/1/received/n0"), coordinator.session_key("s1", "scans/1/received/n1")
        assert set(lease.keys) == {lock, n0, n1, *received} and lease.keys[lock] == b"s1"
        coordinator.unregister_service("s1", "distributor", "n0")  # delete
        coordinator.unlock_detector("4dcamera", "s1")  # a transaction that deletes
        coordinator.set_received("s1", 1, "n0", 7)  # written again without the lease
        coordinator.set_received("s1", 1, "n1", 7, other)  # moved to another lease
        assert set(lease.keys) == {n1} and set(other.keys) == {received[1]}
        coordinator.cleanup_session("s1")  # delete_keys: transactions of deletes
        assert lease.keys == {} and other.keys == {}
        coordinator.register_service("s1", "distributor", "n2", {"pid": 3}, lease)
        scope = coordinator.session_key("s1").encode()
        ranged = {"request_delete_range": {"key": _b64(scope), "range_end": _b64(_prefix_end(scope))}}
        coordinator.etcd.txn([], [ranged], what="delete a range")
        assert lease.keys == {}


# --------------------------------------------------------------------------- auth


def test_auth_and_permission_failures_fail_at_once(auth_etcd, caplog):
    endpoint = auth_etcd.endpoint

    def refused(error: type, match: str, request: Callable[[], object]) -> None:
        """Refused, and not as an outage: a retried request logs the outage when it begins."""
        with pytest.raises(error, match=match):
            request()
        assert not _messages(caplog, "is unreachable"), "a refusal was taken for an outage and retried"

    refused(AuthenticationError, "rejected authentication as user 'alice'",
            lambda: EtcdClient(endpoint, username="alice", password="wrong-pw", outage_budget_s=30))
    anonymous = EtcdClient(endpoint, outage_budget_s=30)
    refused(AuthenticationError, "requires a username and password", lambda: anonymous.get("/ds/x"))
    with EtcdClient(endpoint, username="alice", password=ALICE_PW, outage_budget_s=30) as alice:
        refused(CoordinationError, "permission denied", lambda: alice.get("/elsewhere/x"))
    assert anonymous.retries == alice.retries == 0


@pytest.mark.chaos
def test_an_authenticated_client_rides_out_a_restart(auth_etcd, wait_until, caplog):
    """A restarted etcd has forgotten every token: the client logs in again by itself."""
    caplog.set_level(logging.DEBUG, logger="detstream.etcd")
    alice = EtcdClient(auth_etcd.endpoint, username="alice", password=ALICE_PW, outage_budget_s=60)
    alice.put("/ds/k", "v")
    auth_etcd.stop()
    get = _in_background(lambda: alice.get("/ds/k"))
    wait_until(lambda: alice.retries >= 2, what="the read to be retrying")
    auth_etcd.start()
    assert get.result(timeout=30) == b"v"
    alice.put("/ds/k", "w")
    assert alice.get("/ds/k") == b"w"
    assert len(_messages(caplog, "authenticated to etcd")) == 2  # at the start, and after the restart
