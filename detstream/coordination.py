"""The session key schema: which etcd key holds a session's lock, spec, state, events, job, services, scans, result.

Only what lives where; the transport (etcd3gw, auth, encoding, leases) is `detstream.etcd`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Optional, Union

from .config import DEFAULT_PREFIX, check_prefix
from .errors import DetstreamError
from .etcd import (
    AuthenticationError,
    CoordinationError,
    EtcdClient,
    KeepAliveLease,
    LeaseLike,
    RegrantCallback,
    delete_op,
    enable_auth,
    from_json,
    key_missing,
    key_segment,
    lease_id,
    put_op,
    range_op,
    to_json,
    value_is,
)
from .states import SessionState

__all__ = [
    # Re-exported: Coordinator's methods raise these and hand out leases.
    "AuthenticationError",
    "CoordinationError",
    "Coordinator",
    "DetectorBusy",
    "KeepAliveLease",
    "enable_auth",
]

log = logging.getLogger(__name__)

#: Session keys that `cleanup_session` keeps as history (plus everything under events/).
HISTORY_KEYS = frozenset({"spec", "state", "job", "result"})

_SEQ_DIGITS = 10
# One live-images transaction: under etcd's default operation limit (128) and request size (1.5 MiB).
_LIVE_TXN_OPS, _LIVE_TXN_BYTES = 64, 1 << 20


class DetectorBusy(DetstreamError, RuntimeError):
    """The detector's lock is held by another session (a normal outcome, so not a CoordinationError)."""

    def __init__(self, detector: str, holder: str) -> None:
        super().__init__(f"detector {detector} is in use by session {holder}")
        self.detector = detector
        self.holder = holder


class Coordinator:
    """Reads and writes a detstream deployment's coordination keys in one etcd, under one prefix.

    The layout (DESIGN.md, "etcd keys")::

        <prefix>/detectors/<detector>/lock                   session id, leased
        <prefix>/detectors/<detector>/last                   the last session id to take the lock
        <prefix>/sessions/<sid>/spec                         JSON
        <prefix>/sessions/<sid>/state                        a SessionState value
        <prefix>/sessions/<sid>/events/<seq:010d>            JSON {"state", "reason", "time"}
        <prefix>/sessions/<sid>/alive                        "1", on the orchestrator's lease
        <prefix>/sessions/<sid>/job                          JSON
        <prefix>/sessions/<sid>/services/<role>/<name>       JSON, leased (see below)
        <prefix>/sessions/<sid>/nodes/<node>/done            JSON, the node's done record
        <prefix>/sessions/<sid>/barriers/<barrier>/<name>    "1"
        <prefix>/sessions/<sid>/scans/<scan>/expected        integer
        <prefix>/sessions/<sid>/scans/<scan>/received/<node> integer
        <prefix>/sessions/<sid>/result                       JSON
        <prefix>/sessions/<sid>/live/detectors               JSON: the live images' disk and ring
        <prefix>/sessions/<sid>/live/images/<node>/<chunk:06d> a node's live images of 4096 positions
                                                             (detstream.live.encode_chunk)

    A service record holds ``endpoint``, ``pid`` and ``host``; a distributor's also its
    ``node_index`` and, with acknowledged delivery, the ``ack_endpoint`` it sends acks from; the
    aggregator's the ``sector_endpoints`` (one socket per sector, in sector order).
    """

    def __init__(self, endpoint: str, prefix: str = DEFAULT_PREFIX, **connection: Any) -> None:
        """Keys under `prefix` in the etcd at `endpoint`.

        `connection` is EtcdClient's keywords: username, password (str or SecretStr), ca_file,
        timeout, outage_budget_s (how long requests ride out an etcd outage, default 30 s).
        No request is made unless credentials are given: then it authenticates now.
        """
        self.prefix = check_prefix(prefix)
        #: The transport; every etcd request goes through it.
        self.etcd = EtcdClient(endpoint, **connection)

    @classmethod
    def schema(cls, prefix: str = DEFAULT_PREFIX) -> "Coordinator":
        """Only the key schema under `prefix` (key, session_key, lock_key...): no connection, no requests."""
        layout = cls.__new__(cls)
        layout.prefix = check_prefix(prefix)
        return layout

    @property
    def endpoint(self) -> str:
        return self.etcd.endpoint

    def __repr__(self) -> str:
        user = f" user={self.etcd.username!r}" if self.etcd.username else ""
        return f"<Coordinator {self.endpoint} prefix={self.prefix!r}{user}>"

    def close(self) -> None:
        """Close the connection (leases you hold keep their own refresh thread until revoked)."""
        self.etcd.close()

    def __enter__(self) -> "Coordinator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ping(self) -> str:
        """The etcd server version; raises CoordinationError if etcd is unreachable."""
        return self.etcd.ping()

    def lease(self, ttl: int = 5, on_regrant: Optional[RegrantCallback] = None) -> KeepAliveLease:
        """Grant a lease kept alive in the background; use as `with coordinator.lease(5) as lease:`.

        `on_regrant(lease, lost)` hears when etcd lost the lease and a new one was granted, and
        which keys (e.g. a detector lock another session took meanwhile) could not be put back.
        """
        return self.etcd.lease(ttl, on_regrant)

    # ----------------------------------------------------------------- keys
    def key(self, *parts: Any) -> str:
        """A full key under the prefix from path segments: key("sessions", sid, "spec")."""
        return "/".join([self.prefix, *(str(p) for p in parts)])

    def lock_key(self, detector: str) -> str:
        """<prefix>/detectors/<detector>/lock"""
        return self.key("detectors", key_segment(detector, "detector"), "lock")

    def session_key(self, sid: str, *parts: Any) -> str:
        """<prefix>/sessions/<sid>[/parts...]"""
        return self.key("sessions", key_segment(sid, "session id"), *parts)

    # ----------------------------------------------------------------- detector lock
    def lock_detector(self, detector: str, session_id: str, lease: LeaseLike) -> None:
        """Take the detector for a session, atomically, attached to `lease`.

        Raises DetectorBusy naming the holding session. Taking it again for the session that
        already holds it is a no-op (the key stays on the lease it was first taken with).
        If etcd loses the lease in an outage, the lock is put back on the new lease only if still
        free or ours; if another session took it, the lease's `lost` and `on_regrant` say so.
        """
        key = self.lock_key(detector)
        sid = key_segment(session_id, "session id")
        if not lease_id(lease):
            raise ValueError("the detector lock must be attached to a lease")
        result = self.etcd.txn([key_missing(key)],
                               [put_op(key, sid, lease), put_op(self.last_session_key(detector), sid)],
                               [range_op(key)], what=f"lock detector {detector}")
        if result.succeeded:
            log.info("session %s locked detector %s (lease %x)", sid, detector, lease_id(lease))
            return
        kvs = result.ranges[0] if result.ranges else []
        holder = kvs[0].text if kvs else "<unknown>"
        if holder == sid:
            return
        raise DetectorBusy(detector, holder)

    def unlock_detector(self, detector: str, session_id: str) -> bool:
        """Release the detector only if `session_id` still holds it; True if we deleted it."""
        key = self.lock_key(detector)
        result = self.etcd.txn([value_is(key, session_id)], [delete_op(key)], what=f"unlock detector {detector}")
        return result.succeeded

    def last_session_key(self, detector: str) -> str:
        """<prefix>/detectors/<detector>/last: the session that took the lock last (not leased)."""
        return self.key("detectors", key_segment(detector, "detector"), "last")

    def last_session(self, detector: str) -> Optional[str]:
        """The session that took the detector last, whether or not it still holds it."""
        raw = self.etcd.get(self.last_session_key(detector))
        return None if raw is None else raw.decode("utf-8", "replace")

    def live_services(self, sid: str) -> list[str]:
        """``role/name`` of every service of ``sid`` whose lease is still alive."""
        return [f"{role}/{name}" for role in ("producer", "aggregator", "distributor")
                for name in self.services(sid, role)]

    def lock_holder(self, detector: str) -> Optional[str]:
        """The session id holding the detector, or None if it is free."""
        raw = self.etcd.get(self.lock_key(detector))
        return None if raw is None else raw.decode("utf-8", "replace")

    def lock_lease_left(self, detector: str) -> Optional[tuple[str, int]]:
        """(holder, seconds its lock lease has left as etcd sees it), or None if the detector is free.

        A live holder refreshes its lease every third of its TTL, so the seconds left climb back
        up; a dead one's only fall, to the lock's release."""
        kvs, _ = self.etcd.range(self.lock_key(detector))
        if not kvs:
            return None
        holder = kvs[0].value.decode("utf-8", "replace")
        if not kvs[0].lease:
            return holder, -1
        result = self.etcd.call("kv/lease/timetolive", {"ID": kvs[0].lease}, what="read the lock's lease")
        return holder, int(result.get("TTL", -1))

    # ----------------------------------------------------------------- session documents
    def put_spec(self, sid: str, spec: Any) -> None:
        """Store the session's parameters (a dict or a pydantic model such as SessionSpec) as JSON."""
        self.etcd.put(self.session_key(sid, "spec"), to_json(spec))

    def get_spec(self, sid: str) -> Optional[dict]:
        """The session's parameters, or None."""
        return from_json(self.etcd.get(self.session_key(sid, "spec")))

    def put_job(self, sid: str, job: Mapping[str, Any]) -> None:
        """Store the batch job's description: backend, job id, nodes, state."""
        self.etcd.put(self.session_key(sid, "job"), to_json(job))

    def get_job(self, sid: str) -> Optional[dict]:
        """The batch job's description, or None."""
        return from_json(self.etcd.get(self.session_key(sid, "job")))

    def put_result(self, sid: str, result: Mapping[str, Any]) -> None:
        """Store the session's summary once done."""
        self.etcd.put(self.session_key(sid, "result"), to_json(result))

    def get_result(self, sid: str) -> Optional[dict]:
        """The session's summary, or None."""
        return from_json(self.etcd.get(self.session_key(sid, "result")))

    def sessions(self) -> list[str]:
        """Ids of every session with keys under the prefix, sorted."""
        base = self.key("sessions") + "/"
        kvs, _ = self.etcd.range(base, prefix=True, keys_only=True)
        return sorted({kv.key[len(base) :].split("/", 1)[0] for kv in kvs})

    # ----------------------------------------------------------------- state and events
    def set_state(self, sid: str, state: Union[SessionState, str], reason: Optional[str] = None) -> int:
        """Set the session state and append the matching event, atomically; return the event's seq.

        The seq is one more than the last event's, claimed in a transaction that only succeeds
        if that event key does not exist yet, so concurrent writers never collide or reorder.
        """
        try:
            state = SessionState(state)
        except ValueError:
            raise ValueError(
                f"unknown session state {state!r}; expected one of {', '.join(s.value for s in SessionState)}"
            ) from None
        state_key = self.session_key(sid, "state")
        events_prefix = self.session_key(sid, "events") + "/"
        for _attempt in range(100):
            last, _ = self.etcd.range(events_prefix, prefix=True, keys_only=True, limit=1, descending=True)
            try:
                seq = int(last[0].key[len(events_prefix) :]) + 1 if last else 1
            except ValueError:
                raise CoordinationError(f"unexpected event key {last[0].key} at {self.endpoint}") from None
            event_key = f"{events_prefix}{seq:0{_SEQ_DIGITS}d}"
            event = {"state": state.value, "reason": reason, "time": time.time()}
            result = self.etcd.txn(
                [key_missing(event_key)],
                [put_op(state_key, state.value), put_op(event_key, to_json(event))],
                what=f"set state of session {sid}",
            )
            if result.succeeded:
                log.info("session %s -> %s%s", sid, state, f" ({reason})" if reason else "")
                return seq
        raise CoordinationError(f"could not append an event for session {sid} at {self.endpoint}: too much contention")

    def get_state(self, sid: str) -> Optional[SessionState]:
        """The session state, or None if the session has none."""
        raw = self.etcd.get(self.session_key(sid, "state"))
        return None if raw is None else SessionState(raw.decode("utf-8"))

    def events(self, sid: str) -> list[dict]:
        """The session's state changes in order: [{"seq", "state", "reason", "time"}, ...]."""
        events_prefix = self.session_key(sid, "events") + "/"
        kvs, _ = self.etcd.range(events_prefix, prefix=True)
        out = []
        for kv in kvs:
            event = kv.json()
            event["seq"] = int(kv.key[len(events_prefix) :])
            out.append(event)
        return out

    # ----------------------------------------------------------------- services
    def _services_prefix(self, sid: str, role: str) -> str:
        return self.session_key(sid, "services", key_segment(role, "role")) + "/"

    def register_service(self, sid: str, role: str, name: str, info: Mapping[str, Any], lease: LeaseLike) -> None:
        """Publish a service (e.g. {"endpoint": "tcp://host:port", "pid": ..., "host": ...}), leased."""
        if not lease_id(lease):
            raise ValueError("service keys must be attached to a lease")
        self.etcd.put(self._services_prefix(sid, role) + key_segment(name, "service name"), to_json(info), lease)

    def unregister_service(self, sid: str, role: str, name: str) -> None:
        """Remove one service key (revoking its lease does this too)."""
        key = self._services_prefix(sid, role) + key_segment(name, "service name")
        self.etcd.delete(key)

    def services(self, sid: str, role: str) -> dict[str, dict]:
        """Registered services of a role: {name: info}."""
        prefix = self._services_prefix(sid, role)
        kvs, _ = self.etcd.range(prefix, prefix=True)
        return {kv.key[len(prefix) :]: kv.json() for kv in kvs}

    def wait_for_services(self, sid: str, role: str, count: int, timeout_s: float) -> dict[str, dict]:
        """Block until at least `count` services of `role` are registered; return them {name: info}.

        Uses a watch (after an initial read), so it returns as soon as the count is reached.
        Raises TimeoutError naming how many of how many registered.
        """
        prefix = self._services_prefix(sid, role)

        def enough(current: dict[str, bytes]) -> Optional[dict[str, dict]]:
            if len(current) >= count:
                return {k[len(prefix) :]: from_json(v) for k, v in current.items()}
            return None

        found, current = self.etcd.wait_prefix(prefix, enough, timeout_s)
        if found is None:
            names = sorted(k[len(prefix) :] for k in current)
            raise TimeoutError(
                f"only {len(current)} of {count} {role} services registered for session {sid} "
                f"within {timeout_s:g} s" + (f" (registered: {', '.join(names)})" if names else "")
            )
        return found

    # ----------------------------------------------------------------- barriers
    def arrive(self, sid: str, barrier: str, name: str) -> None:
        """Mark ``name`` as arrived at a session barrier (not leased: it outlives a fast arriver)."""
        key = self.session_key(sid, "barriers", key_segment(barrier, "barrier"), key_segment(name, "name"))
        self.etcd.put(key, b"1")

    def wait_barrier(self, sid: str, barrier: str, count: int, timeout_s: float) -> list[str]:
        """Block until ``count`` names have arrived at the barrier; TimeoutError names who has."""
        prefix = self.session_key(sid, "barriers", key_segment(barrier, "barrier")) + "/"

        def enough(current: dict[str, bytes]) -> Optional[list[str]]:
            return sorted(k[len(prefix):] for k in current) if len(current) >= count else None

        found, current = self.etcd.wait_prefix(prefix, enough, timeout_s)
        if found is None:
            names = sorted(k[len(prefix):] for k in current)
            raise TimeoutError(f"only {len(current)} of {count} arrived at barrier {barrier!r} of session "
                               f"{sid} within {timeout_s:g} s (arrived: {', '.join(names) or 'none'})")
        return found

    # ----------------------------------------------------------------- scan counts
    def set_expected(self, sid: str, scan: int, n: int) -> None:
        """Frames expected for a scan."""
        self.etcd.put(self.session_key(sid, "scans", key_segment(int(scan), "scan"), "expected"), str(int(n)))

    def get_expected(self, sid: str, scan: int) -> Optional[int]:
        """Frames expected for a scan, or None if not set."""
        raw = self.etcd.get(self.session_key(sid, "scans", key_segment(int(scan), "scan"), "expected"))
        return None if raw is None else int(raw)

    def set_received(self, sid: str, scan: int, node: str, n: int, lease: Optional[LeaseLike] = None) -> None:
        """Frames a node has received for a scan (optionally leased, to vanish with the node)."""
        key = self.session_key(sid, "scans", key_segment(int(scan), "scan"), "received", key_segment(node, "node"))
        self.etcd.put(key, str(int(n)), lease)

    def received(self, sid: str, scan: int) -> dict[str, int]:
        """Frames received per node for a scan: {node: n}."""
        prefix = self.session_key(sid, "scans", key_segment(int(scan), "scan"), "received") + "/"
        kvs, _ = self.etcd.range(prefix, prefix=True)
        return {kv.key[len(prefix) :]: int(kv.value) for kv in kvs}

    # ----------------------------------------------------------------- orchestrator liveness
    def put_alive(self, sid: str, lease: LeaseLike) -> None:
        """sessions/<sid>/alive, on the orchestrator's lease: it vanishes when the orchestrator dies."""
        self.etcd.put(self.session_key(sid, "alive"), "1", lease)

    def orchestrator_alive(self, sid: str) -> bool:
        return self.etcd.get(self.session_key(sid, "alive")) is not None

    # ----------------------------------------------------------------- CURVE public keys
    def put_public_keys(self, sid: str, keys: Mapping[str, str]) -> None:
        """sessions/<sid>/keys/<role>/0: each role's CURVE public key (secret keys never go to etcd)."""
        for role, key in keys.items():
            self.etcd.put(self.session_key(sid, "keys", key_segment(role, "role"), "0"), key)

    def public_keys(self, sid: str) -> dict[str, str]:
        """{role: CURVE public key} of the session."""
        prefix = self.session_key(sid, "keys") + "/"
        kvs, _ = self.etcd.range(prefix, prefix=True)
        return {kv.key[len(prefix):].split("/", 1)[0]: kv.text for kv in kvs}

    # ----------------------------------------------------------------- completion
    def put_node_done(self, sid: str, node: str, record: Mapping[str, Any]) -> None:
        """A node's end of the scan: counts, missing, part path (completion comes back here)."""
        self.etcd.put(self.session_key(sid, "nodes", key_segment(node, "node"), "done"), to_json(record))

    def nodes_done(self, sid: str) -> dict[str, dict]:
        """{node: its done record} for every node that has finished its share."""
        prefix = self.session_key(sid, "nodes") + "/"
        kvs, _ = self.etcd.range(prefix, prefix=True)
        return {kv.key[len(prefix):].split("/", 1)[0]: kv.json() for kv in kvs if kv.key.endswith("/done")}

    # ----------------------------------------------------------------- live images
    def _live_detectors_key(self, sid: str) -> str:
        return self.session_key(sid, "live", "detectors")

    def offer_live_detectors(self, sid: str, record: Mapping[str, Any]) -> dict:
        """Propose the session's live disk and ring; the first proposal stays. Returns the one in force."""
        key = self._live_detectors_key(sid)
        result = self.etcd.txn([key_missing(key)], [put_op(key, to_json(record))], [range_op(key)],
                               what=f"offer the live disk of session {sid}")
        if result.succeeded or not (result.ranges and result.ranges[0]):
            return dict(record)
        return result.ranges[0][0].json()

    def live_detectors(self, sid: str) -> Optional[dict]:
        """The session's live disk and ring, once a node (or its parameters) settled them."""
        return from_json(self.etcd.get(self._live_detectors_key(sid)))

    def put_live_chunks(self, sid: str, node: str, chunks: Mapping[int, bytes]) -> None:
        """A node's changed live-image chunks, in as few transactions as etcd's limits allow."""
        prefix = self.session_key(sid, "live", "images", key_segment(node, "node"))
        ops, size = [], 0
        for index, raw in sorted(chunks.items()):
            if ops and (len(ops) >= _LIVE_TXN_OPS or size + len(raw) > _LIVE_TXN_BYTES):
                self.etcd.txn([], ops, what=f"publish live images of {node}")
                ops, size = [], 0
            ops.append(put_op(f"{prefix}/{int(index):06d}", raw))
            size += len(raw)
        if ops:
            self.etcd.txn([], ops, what=f"publish live images of {node}")

    def live_chunks(self, sid: str) -> list[bytes]:
        """Every node's live-image chunks (decode with detstream.live.assemble)."""
        kvs, _ = self.etcd.range(self.session_key(sid, "live", "images") + "/", prefix=True)
        return [kv.value for kv in kvs]

    # ----------------------------------------------------------------- cleanup and inspection
    def cleanup_session(self, sid: str) -> list[str]:
        """Drop a session's ephemeral keys and any detector lock it holds; return the keys deleted.

        Keeps spec, state, events/, job and result (the session's history); everything else
        (services/, scans/, and anything added later) is deleted.
        """
        base = self.session_key(sid) + "/"
        kvs, _ = self.etcd.range(base, prefix=True, keys_only=True)
        doomed = []
        for kv in kvs:
            rel = kv.key[len(base) :]
            if rel in HISTORY_KEYS or rel.startswith("events/"):
                continue
            doomed.append(kv.key)
        self.etcd.delete_keys(doomed)
        locks, _ = self.etcd.range(self.key("detectors") + "/", prefix=True)
        for kv in locks:
            if kv.key.endswith("/lock") and kv.text == sid:
                detector = kv.key[len(self.key("detectors")) + 1 : -len("/lock")]
                if self.unlock_detector(detector, sid):
                    doomed.append(kv.key)
        if doomed:
            log.info("session %s: cleaned up %d key(s)", sid, len(doomed))
        return doomed

    def session_keys(self, sid: str) -> dict[str, str]:
        """Every key of a session, relative to sessions/<sid>/, with its value as text."""
        base = self.session_key(sid) + "/"
        kvs, _ = self.etcd.range(base, prefix=True)
        return {kv.key[len(base) :]: kv.text for kv in kvs}

    def dump(self, prefix: Optional[str] = None) -> dict[str, str]:
        """Every key (full path) under `prefix` (default: this coordinator's prefix), value as text."""
        start = self.prefix + "/" if prefix is None else prefix
        kvs, _ = self.etcd.range(start, prefix=True)
        return {kv.key: kv.text for kv in kvs}
