"""Leases kept alive in the background, re-granted after etcd lost them, with their keys put back.

Each lease remembers the keys written on it (`note_writes`), so a re-grant can restore them.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Union

from .encoding import _unb64, key_missing, put_op, range_op, value_is
from .errors import CoordinationError

if TYPE_CHECKING:
    from .client import EtcdClient

log = logging.getLogger(__name__)

LeaseLike = Union["KeepAliveLease", int]
#: `on_regrant(lease, lost)`: etcd lost the lease and it was granted anew; `lost` maps each key that
#: could not be put back (another writer holds it now) to the value found there.
RegrantCallback = Callable[["KeepAliveLease", dict[str, bytes]], None]

_LIVE_LEASES: "weakref.WeakSet[KeepAliveLease]" = weakref.WeakSet()
_LIVE_LEASES_LOCK = threading.Lock()


def _leases_at(endpoint: str) -> list["KeepAliveLease"]:
    """This process's unrevoked leases on the etcd at `endpoint`."""
    with _LIVE_LEASES_LOCK:
        return [lease for lease in _LIVE_LEASES if lease.endpoint == endpoint]


class KeepAliveLease:
    """An etcd lease kept alive from a daemon thread; keys attached to it vanish on revoke or death.

    Refreshes every TTL/3, through outages: each refresh retries within the client's outage
    budget, and the next one tries again. Refresh failures never raise in the owner: they are
    counted in `failures` (consecutive) and the last one kept in `error`.

    If etcd has lost the lease (it expired while etcd was out of reach), a new one is granted
    (`id` changes, `regranted` counts) and the keys written with it (see `attach`) are put back,
    each only if absent or still holding our value: a key someone else took meanwhile (another
    session's detector lock) is given up, recorded in `lost` and passed to `on_regrant`.
    Use as a context manager, or call `revoke()`.
    """

    def __init__(self, client: EtcdClient, ttl: int = 5, on_regrant: Optional[RegrantCallback] = None) -> None:
        """Grant the lease now (so `.id` is usable at once) and start refreshing it."""
        if ttl < 1:
            raise ValueError(f"lease ttl must be at least 1 s, got {ttl}")
        self._client = client
        self.endpoint = client.endpoint
        self.id, self.ttl = self._grant(ttl)  # etcd may raise a small TTL to its minimum
        self.refreshes = 0
        self.failures = 0
        self.error: Optional[BaseException] = None
        #: etcd reported the lease gone and a new one is not granted yet.
        self.expired = False
        #: How many times the lease was granted anew after etcd lost it.
        self.regranted = 0
        #: Keys that could not be put back after a re-grant -> the value another writer left there.
        self.lost: dict[str, bytes] = {}
        self.on_regrant = on_regrant
        self._revoked = False
        self._keys: dict[str, bytes] = {}  # key -> value, as last written on this lease
        self._keys_lock = threading.Lock()
        self._unrestored: Optional[set[str]] = None  # keys still to put back after a re-grant
        self._lost_now: dict[str, bytes] = {}  # what the current re-grant could not put back
        self._lock = threading.Lock()  # serialises re-grant and revoke
        self._stop = threading.Event()
        with _LIVE_LEASES_LOCK:
            _LIVE_LEASES.add(self)
        self._thread = threading.Thread(target=self._keepalive, name=f"etcd-lease-{self.id:x}", daemon=True)
        self._thread.start()

    def _grant(self, ttl: int) -> tuple[int, int]:
        """A new lease from etcd: (id, the TTL etcd granted)."""
        result = self._client.call("lease/grant", {"TTL": int(ttl), "ID": 0}, what="grant a lease")
        return int(result["ID"]), int(result.get("TTL", ttl))

    @property
    def alive(self) -> bool:
        """Neither revoked nor known to have expired (without a new lease yet)."""
        return not (self._revoked or self.expired)

    # ----------------------------------------------------------------- attached keys
    def attach(self, key: str, value: Union[str, bytes]) -> None:
        """Remember that `key` holds `value` on this lease, to put it back after a re-grant.

        EtcdClient does this for every put and transaction that writes with this lease.
        """
        with self._keys_lock:
            self._keys[key] = value.encode("utf-8") if isinstance(value, str) else bytes(value)

    def detach(self, key: str) -> None:
        """Forget `key` (deleted, or written without this lease): a re-grant leaves it alone."""
        with self._keys_lock:
            self._keys.pop(key, None)

    def _forget(self, start: bytes, end: Optional[bytes]) -> None:
        """Detach the keys an etcd delete-range removed: `start` alone, or [start, end) ("\\0": no end)."""
        with self._keys_lock:
            for key in list(self._keys):
                raw = key.encode("utf-8")
                if (raw == start) if end is None else (start <= raw and (end == b"\0" or raw < end)):
                    del self._keys[key]

    @property
    def keys(self) -> dict[str, bytes]:
        """The keys written with this lease and still on it (as far as this process knows) -> value."""
        with self._keys_lock:
            return dict(self._keys)

    # ----------------------------------------------------------------- refresh and re-grant
    def _keepalive(self) -> None:
        while not self._stop.wait(max(self.ttl / 3.0, 0.2)):
            try:
                self._refresh()
            except Exception as exc:  # never let the refresh thread die on an error
                self.failures += 1
                self.error = exc
                if self.failures in (1, 3) or self.failures % 30 == 0:
                    log.warning("lease %x: refresh failed %d time(s) in a row: %s", self.id, self.failures, exc)

    def _refresh(self) -> None:
        """One keep-alive; a lease etcd no longer knows is granted anew, its keys put back."""
        used = self.id
        result = self._client.call("lease/keepalive", {"ID": used}, what="refresh a lease")
        if self._stop.is_set():
            return
        if int(result.get("result", {}).get("TTL", -1)) <= 0:
            self._recover(used)
        else:
            self.refreshes += 1
            if self._unrestored is not None:  # an outage cut the last put-back short
                self._recover(None)
        self.failures = 0

    def _recover(self, gone: Optional[int]) -> None:
        """If `gone` is still our lease id, grant a new lease; then put back the keys not yet restored.

        Raises CoordinationError if etcd cannot be reached; what is left is done on the next call.
        """
        with self._lock:
            if self._revoked:
                return
            if gone is not None and gone == self.id:
                self.expired = True
                self.id, self.ttl = self._grant(self.ttl)
                self.expired = False
                self.regranted += 1
                self._unrestored = set(self.keys)
                log.warning("lease %x at %s was gone (expired while etcd was out of reach?); granted %x, "
                            "putting back %d key(s)", gone, self.endpoint, self.id, len(self._unrestored))
            if self._unrestored is None:
                return
            for key in sorted(self._unrestored):
                value = self.keys.get(key)
                holder = None if value is None else self._put_back(key, value)
                if holder is not None:
                    self.detach(key)
                    self._lost_now[key] = holder
                    log.error("lease %x: could not put %s back: another writer holds it (%r)",
                              self.id, key, holder[:100])
                self._unrestored.discard(key)
            self._unrestored = None
            lost, self._lost_now = self._lost_now, {}
            self.lost.update(lost)
        if self.on_regrant is not None:
            try:
                self.on_regrant(self, lost)
            except Exception:
                log.exception("lease %x: on_regrant callback failed", self.id)

    def _put_back(self, key: str, value: bytes) -> Optional[bytes]:
        """Write `key` on this lease if it is absent or still holds `value`; else return what it holds."""
        what = f"put {key} back on lease {self.id:x}"
        claim = self._client.txn([key_missing(key)], [put_op(key, value, self)], [range_op(key)], what=what)
        if claim.succeeded:
            return None
        holder = claim.ranges[0][0].value if claim.ranges and claim.ranges[0] else b""
        if holder == value and self._client.txn([value_is(key, value)], [put_op(key, value, self)], what=what).succeeded:
            return None
        return holder

    def time_to_live(self) -> int:
        """Seconds left as etcd sees it; -1 if the lease no longer exists."""
        result = self._client.call("kv/lease/timetolive", {"ID": self.id}, what="read a lease")
        return int(result.get("TTL", -1))

    def revoke(self) -> None:
        """Stop refreshing and revoke, deleting attached keys now. Idempotent; a lease already gone is fine.

        Raises CoordinationError if etcd cannot be reached (the keys then expire after the TTL).
        """
        with self._lock:
            if self._revoked:
                return
            self._revoked = True
            self._stop.set()
        with _LIVE_LEASES_LOCK:
            _LIVE_LEASES.discard(self)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self._client.timeout + 1.0)
        try:
            self._client.call("kv/lease/revoke", {"ID": self.id}, what="revoke a lease")
        except CoordinationError as exc:
            if "lease not found" not in str(exc):
                raise

    def stop(self) -> None:
        """Stop refreshing without asking etcd (it is out of reach): etcd lets the lease expire
        after its TTL, and nothing here grants it anew or puts its keys back when etcd returns."""
        with self._lock:
            self._revoked = True
            self._stop.set()
        with _LIVE_LEASES_LOCK:
            _LIVE_LEASES.discard(self)

    def __enter__(self) -> "KeepAliveLease":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Revoke; with etcd unreachable the keys expire after the TTL instead, which is no error
        for the work done inside (a service that finished its scan while etcd was gone)."""
        try:
            self.revoke()
        except CoordinationError as err:
            log.warning("lease %x: not revoked (%s); its keys expire within %d s", self.id, err, self.ttl)

    def __repr__(self) -> str:
        state = "alive" if self.alive else ("revoked" if self._revoked else "expired")
        regranted = f" regranted={self.regranted}" if self.regranted else ""
        return f"<KeepAliveLease {self.id:x} ttl={self.ttl}s {state}{regranted}>"


def lease_id(lease: Optional[LeaseLike]) -> Optional[int]:
    """The numeric id of a lease given as a KeepAliveLease or an id; None for None."""
    if lease is None:
        return None
    if isinstance(lease, KeepAliveLease):
        return lease.id
    if isinstance(lease, int):
        return lease
    raise TypeError(f"lease must be a KeepAliveLease or a lease id, not {type(lease).__name__}")


def note_writes(endpoint: str, ops: Iterable[dict]) -> None:
    """Keep this process's leases' records of their keys in step with writes etcd has made at `endpoint`."""
    leases = _leases_at(endpoint)
    if not leases:
        return
    for op in ops:
        if "request_put" in op:
            put = op["request_put"]
            key, attached = _unb64(put["key"]).decode("utf-8", "replace"), int(put.get("lease", 0))
            for lease in leases:  # a key is attached to at most one lease: the last put's
                if lease.id == attached:
                    lease.attach(key, _unb64(put.get("value")))
                else:
                    lease.detach(key)
        elif "request_delete_range" in op:
            delete = op["request_delete_range"]
            for lease in leases:
                lease._forget(_unb64(delete["key"]), _unb64(delete.get("range_end")) or None)
