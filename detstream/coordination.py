"""Session coordination in etcd: the only module that talks to etcd, so the client can be swapped.

Every key is built here, after the layout in DESIGN.md ("etcd keys"), under a prefix
(default ``/detstream``)::

    <prefix>/detectors/<detector>/lock                   session id, leased
    <prefix>/sessions/<sid>/spec                         JSON
    <prefix>/sessions/<sid>/state                        one of STATES
    <prefix>/sessions/<sid>/events/<seq:010d>            JSON {"state", "reason", "time"}
    <prefix>/sessions/<sid>/job                          JSON
    <prefix>/sessions/<sid>/services/<role>/<name>       JSON, leased
    <prefix>/sessions/<sid>/scans/<scan>/expected        integer
    <prefix>/sessions/<sid>/scans/<scan>/received/<node> integer
    <prefix>/sessions/<sid>/result                       JSON

The client is etcd3gw (etcd's v3 JSON gateway; python-etcd3 no longer imports with protobuf 4).
Everything etcd3gw-specific -- base64, lease objects, watch cancellation, HTTP error mapping --
stays inside this module; callers see plain str/dict/int values and three exceptions:
`CoordinationError` (etcd unreachable or refused), its subclass `AuthenticationError`, and
`DetectorBusy` (a normal outcome, not an etcd failure, so deliberately not a CoordinationError).

Auth: with ``username``/``password`` we call /v3/auth/authenticate and put the token in the
``Authorization`` header of the requests session (which etcd3gw's watches share too). Simple
tokens expire when idle (``--auth-token-ttl``, 300 s by default); on "invalid auth token" we
authenticate again once and retry. Neither the password nor the token is ever logged or put
into an exception message or repr.
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import threading
import time
from datetime import date, datetime
from pathlib import PurePath
from typing import Any, Callable, Iterable, Mapping, Optional, TypeVar, Union
from urllib.parse import urlsplit

import requests
from etcd3gw import exceptions as etcd_exc
from etcd3gw.client import Etcd3Client
from etcd3gw.watch import Watcher

from .config import DEFAULT_PREFIX

__all__ = [
    "STATES",
    "TERMINAL_STATES",
    "AuthenticationError",
    "CoordinationError",
    "Coordinator",
    "DetectorBusy",
    "KeepAliveLease",
    "enable_auth",
]

log = logging.getLogger(__name__)

#: Session states, in their usual order (DESIGN.md).
STATES = ("requested", "reserving", "starting", "streaming", "draining", "completed", "failed", "cancelled")
#: States after which a session holds nothing.
TERMINAL_STATES = frozenset({"completed", "failed", "cancelled"})

#: Session keys that `cleanup_session` keeps as history (plus everything under events/).
HISTORY_KEYS = frozenset({"spec", "state", "job", "result"})

_SEQ_DIGITS = 10
_MAX_TXN_OPS = 100  # etcd's default --max-txn-ops is 128
_RESYNC_S = 2.0  # while waiting on a watch, re-read this often in case the stream dropped

T = TypeVar("T")
LeaseLike = Union["KeepAliveLease", int]


# --------------------------------------------------------------------------- errors
class CoordinationError(RuntimeError):
    """etcd could not be reached or refused a request; the message names the endpoint."""


class AuthenticationError(CoordinationError):
    """etcd rejected the credentials (or auth is required and none were given)."""


class DetectorBusy(RuntimeError):
    """The detector's lock is held by another session."""

    def __init__(self, detector: str, holder: str) -> None:
        super().__init__(f"detector {detector} is in use by session {holder}")
        self.detector = detector
        self.holder = holder


# --------------------------------------------------------------------------- encoding helpers
def _b64(data: Union[str, bytes]) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


def _unb64(data: Optional[str]) -> bytes:
    return base64.b64decode(data) if data else b""


def _prefix_end(prefix: bytes) -> bytes:
    """The range end covering every key that starts with `prefix` (etcd's "prefix" range)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # all keys


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):  # pydantic models, e.g. SessionSpec
        return obj.model_dump(mode="json")
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, (datetime, date)):
        return obj.isoformat()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"cannot store {type(obj).__name__} as JSON in etcd")


def _dumps(obj: Any) -> bytes:
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    return json.dumps(obj, sort_keys=True, default=_json_default, ensure_ascii=False).encode("utf-8")


def _loads(raw: Optional[bytes]) -> Any:
    return None if raw is None else json.loads(raw.decode("utf-8"))


def _component(value: Any, what: str) -> str:
    """One path segment of a key: non-empty, no '/', no control characters."""
    text = str(value)
    if not text or "/" in text or any(ord(c) < 32 for c in text):
        raise ValueError(f"{what} {value!r} cannot be used in an etcd key (empty, '/' or control character)")
    return text


def _secret(value: Any) -> Optional[str]:
    """Accept str or pydantic SecretStr (anything with get_secret_value)."""
    if value is None:
        return None
    getter = getattr(value, "get_secret_value", None)
    return getter() if callable(getter) else str(value)


def _error_message(exc: etcd_exc.Etcd3Exception) -> str:
    """The server's message from an etcd3gw exception (gateway JSON), else its text."""
    detail = exc.detail_text or ""
    try:
        body = json.loads(detail)
        return str(body.get("message") or body.get("error") or detail)
    except (ValueError, AttributeError):
        pass
    text = detail or " ".join(str(a) for a in exc.args) or type(exc).__name__
    return text[:500]


_KNOWN_REASONS = (
    "Connection refused",
    "timed out",
    "Name or service not known",
    "Temporary failure in name resolution",
    "No route to host",
    "Network is unreachable",
    "CERTIFICATE_VERIFY_FAILED",
    "Connection reset",
)


def _short_reason(text: str) -> str:
    """A connection failure's cause in a few words, not urllib3's nested repr."""
    for phrase in _KNOWN_REASONS:
        if phrase.lower() in text.lower():
            return phrase.lower()
    return text[:300]


def _parse_endpoint(endpoint: str) -> tuple[str, str, int]:
    """(protocol, host, port) from "http(s)://host:port"; a bare "host:port" means http."""
    raw = endpoint.strip()
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"etcd endpoint {endpoint!r}: scheme must be http or https")
    if not parts.hostname:
        raise ValueError(f"etcd endpoint {endpoint!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"etcd endpoint {endpoint!r} must be scheme://host:port only")
    try:
        port = parts.port or 2379
    except ValueError as exc:
        raise ValueError(f"etcd endpoint {endpoint!r}: {exc}") from None
    return parts.scheme, parts.hostname, port


# --------------------------------------------------------------------------- client
class _Client(Etcd3Client):
    """etcd3gw's client, re-authenticating once when a simple token has expired."""

    reauthenticate: Optional[Callable[[], None]] = None

    def post(self, url: str, *args: Any, json: Any = None, **kwargs: Any) -> Any:
        try:
            return super().post(url, *args, json=json, **kwargs)
        except etcd_exc.Etcd3Exception as exc:
            if self.reauthenticate is None or "invalid auth token" not in (exc.detail_text or ""):
                raise
            self.reauthenticate()
            return super().post(url, *args, json=json, **kwargs)


class _Kv:
    """One key-value pair as read from etcd, decoded."""

    __slots__ = ("key", "value", "create_revision", "mod_revision", "version", "lease")

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.key: str = _unb64(raw.get("key")).decode("utf-8", "replace")
        self.value: bytes = _unb64(raw.get("value"))
        self.create_revision = int(raw.get("create_revision", 0))
        self.mod_revision = int(raw.get("mod_revision", 0))
        self.version = int(raw.get("version", 0))
        self.lease = int(raw.get("lease", 0))

    @property
    def text(self) -> str:
        return self.value.decode("utf-8", "replace")


# --------------------------------------------------------------------------- leases
class KeepAliveLease:
    """An etcd lease kept alive from a daemon thread; keys attached to it vanish on revoke or death.

    Refreshes every TTL/3. Refresh failures never raise in the owner: they are counted in
    `failures` (consecutive) and the last one kept in `error`; if etcd reports the lease gone,
    `expired` becomes True and the thread ends. Use as a context manager, or call `revoke()`.
    """

    def __init__(self, coordinator: "Coordinator", ttl: int = 5) -> None:
        """Grant the lease now (so `.id` is usable at once) and start refreshing it."""
        if ttl < 1:
            raise ValueError(f"lease ttl must be at least 1 s, got {ttl}")
        self._coordinator = coordinator
        result = coordinator._post("lease/grant", {"TTL": int(ttl), "ID": 0}, what="grant a lease")
        self.id: int = int(result["ID"])
        #: The TTL etcd granted (it may raise small TTLs to its minimum).
        self.ttl: int = int(result.get("TTL", ttl))
        self.refreshes = 0
        self.failures = 0
        self.error: Optional[BaseException] = None
        self.expired = False
        self._revoked = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keepalive, name=f"etcd-lease-{self.id:x}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Neither revoked nor known to have expired."""
        return not (self._revoked or self.expired)

    def _keepalive(self) -> None:
        interval = max(self.ttl / 3.0, 0.2)
        while not self._stop.wait(interval):
            try:
                result = self._coordinator._post("lease/keepalive", {"ID": self.id}, what="refresh a lease")
            except Exception as exc:  # never let the refresh thread die on an error
                self.failures += 1
                self.error = exc
                if self.failures in (1, 3) or self.failures % 30 == 0:
                    log.warning("lease %x: refresh failed %d time(s) in a row: %s", self.id, self.failures, exc)
                continue
            if self._stop.is_set():
                return
            granted = int(result.get("result", {}).get("TTL", -1))
            if granted <= 0:
                self.expired = True
                self.error = CoordinationError(
                    f"lease {self.id:x} at {self._coordinator.endpoint} expired; its keys are gone"
                )
                log.error("%s", self.error)
                return
            self.refreshes += 1
            self.failures = 0

    def time_to_live(self) -> int:
        """Seconds left as etcd sees it; -1 if the lease no longer exists."""
        result = self._coordinator._post("kv/lease/timetolive", {"ID": self.id}, what="read a lease")
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
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self._coordinator.timeout + 1.0)
        try:
            self._coordinator._post("kv/lease/revoke", {"ID": self.id}, what="revoke a lease")
        except CoordinationError as exc:
            if "lease not found" not in str(exc):
                raise

    def __enter__(self) -> "KeepAliveLease":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.revoke()
        except CoordinationError as err:
            if exc_type is None:
                raise
            log.warning("lease %x: revoke failed while handling %s: %s", self.id, exc_type.__name__, err)

    def __repr__(self) -> str:
        state = "alive" if self.alive else ("revoked" if self._revoked else "expired")
        return f"<KeepAliveLease {self.id:x} ttl={self.ttl}s {state}>"


def _lease_id(lease: Optional[LeaseLike]) -> Optional[int]:
    if lease is None:
        return None
    if isinstance(lease, KeepAliveLease):
        return lease.id
    if isinstance(lease, int):
        return lease
    raise TypeError(f"lease must be a KeepAliveLease or a lease id, not {type(lease).__name__}")


# --------------------------------------------------------------------------- coordinator
class Coordinator:
    """Reads and writes a detstream deployment's coordination keys in one etcd, under one prefix."""

    def __init__(
        self,
        endpoint: str,
        prefix: str = DEFAULT_PREFIX,
        *,
        username: Optional[str] = None,
        password: Any = None,
        ca_file: Optional[str] = None,
        timeout: float = 10.0,
    ) -> None:
        """Connect lazily (no request is made unless credentials are given: then we authenticate now).

        `password` may be a str or a pydantic SecretStr. `ca_file` verifies an https endpoint.
        """
        if not prefix.startswith("/") or prefix.endswith("/"):
            raise ValueError(f"etcd prefix {prefix!r} must start with '/' and not end with '/'")
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        protocol, host, port = _parse_endpoint(endpoint)
        self.endpoint = f"{protocol}://{host if ':' not in host else '[' + host + ']'}:{port}"
        self.prefix = prefix
        self.username = username
        self.timeout = float(timeout)
        self.__password = _secret(password)
        self._auth_lock = threading.Lock()
        self._client = _Client(host=host, port=port, protocol=protocol, ca_cert=ca_file, timeout=self.timeout)
        if username is not None:
            self._client.reauthenticate = self._authenticate
            self._authenticate()

    # ----------------------------------------------------------------- plumbing
    def __repr__(self) -> str:
        user = f" user={self.username!r}" if self.username else ""
        return f"<Coordinator {self.endpoint} prefix={self.prefix!r}{user}>"

    def close(self) -> None:
        """Close the HTTP session (leases you hold keep their own refresh thread until revoked)."""
        self._client.session.close()

    def __enter__(self) -> "Coordinator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _authenticate(self) -> None:
        """Get a token for username/password and install it on the session; never logs either."""
        with self._auth_lock:
            session = self._client.session
            session.headers.pop("Authorization", None)
            url = self._url("auth/authenticate", "authenticate")
            try:
                resp = session.post(
                    url, json={"name": self.username, "password": self.__password}, timeout=self.timeout
                )
            except requests.RequestException as exc:
                raise CoordinationError(f"cannot reach etcd at {self.endpoint} to authenticate: {exc}") from None
            if resp.status_code != 200:
                try:
                    message = resp.json().get("message") or resp.text
                except ValueError:
                    message = resp.text
                if "authentication is not enabled" in message:
                    log.warning("etcd at %s has auth disabled; continuing without a token", self.endpoint)
                    return
                raise AuthenticationError(
                    f"etcd at {self.endpoint} rejected authentication as user {self.username!r}: {message[:300]}"
                )
            token = resp.json().get("token")
            if not token:
                raise AuthenticationError(f"etcd at {self.endpoint} returned no token for user {self.username!r}")
            session.headers["Authorization"] = token
            log.debug("authenticated to etcd at %s as %r", self.endpoint, self.username)

    def _url(self, path: str, what: str = "discover its API version") -> str:
        try:
            return self._client.get_url(path)
        except (etcd_exc.Etcd3Exception, requests.RequestException) as exc:  # API-path discovery asks etcd
            raise self._error(exc, what) from None

    def _error(self, exc: BaseException, what: str) -> CoordinationError:
        if isinstance(exc, (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError, requests.RequestException)):
            reason = _error_message(exc) if isinstance(exc, etcd_exc.Etcd3Exception) else str(exc)
            return CoordinationError(f"cannot reach etcd at {self.endpoint} to {what}: {_short_reason(reason)}")
        message = _error_message(exc) if isinstance(exc, etcd_exc.Etcd3Exception) else str(exc)
        cls = CoordinationError
        lowered = message.lower()
        if "user name is empty" in lowered or "invalid auth token" in lowered or "authentication failed" in lowered:
            cls = AuthenticationError
            if "user name is empty" in lowered:
                message += " (this etcd requires a username and password)"
        elif "permission denied" in lowered and self.username:
            message += f" (user {self.username!r} lacks permission under {self.prefix!r})"
        return cls(f"etcd at {self.endpoint} refused to {what}: {message}")

    def _post(self, path: str, payload: Mapping[str, Any], *, what: str) -> dict:
        """POST one v3 gateway call; any failure becomes CoordinationError naming the endpoint."""
        url = self._url(path, what)
        try:
            return self._client.post(url, json=payload)
        except (etcd_exc.Etcd3Exception, requests.RequestException) as exc:
            raise self._error(exc, what) from None

    def _range(
        self,
        key: str,
        *,
        prefix: bool = False,
        keys_only: bool = False,
        limit: Optional[int] = None,
        descending: bool = False,
    ) -> tuple[list[_Kv], int]:
        """Read one key or a prefix, sorted by key; also return the store revision of the read."""
        raw = key.encode("utf-8")
        payload: dict[str, Any] = {"key": _b64(raw), "sort_order": 2 if descending else 1, "sort_target": 0}
        if prefix:
            payload["range_end"] = _b64(_prefix_end(raw))
        if keys_only:
            payload["keys_only"] = True
        if limit:
            payload["limit"] = limit
        result = self._post("kv/range", payload, what=f"read {key}")
        revision = int(result.get("header", {}).get("revision", 0))
        return [_Kv(kv) for kv in result.get("kvs", [])], revision

    def _get(self, key: str) -> Optional[bytes]:
        kvs, _ = self._range(key)
        return kvs[0].value if kvs else None

    def _put(self, key: str, value: Union[str, bytes], lease: Optional[LeaseLike] = None) -> None:
        payload: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        lease_id = _lease_id(lease)
        if lease_id:
            payload["lease"] = lease_id
        self._post("kv/put", payload, what=f"write {key}")

    def _txn(self, compare: list, success: list, failure: list = (), *, what: str) -> dict:
        return self._post(
            "kv/txn", {"compare": list(compare), "success": list(success), "failure": list(failure)}, what=what
        )

    def _delete_keys(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        for start in range(0, len(keys), _MAX_TXN_OPS):
            ops = [{"request_delete_range": {"key": _b64(k)}} for k in keys[start : start + _MAX_TXN_OPS]]
            self._txn([], ops, what=f"delete {len(ops)} keys under {self.prefix}")

    def _wait_prefix(
        self, prefix: str, done: Callable[[dict[str, bytes]], Optional[T]], timeout_s: float
    ) -> tuple[Optional[T], dict[str, bytes]]:
        """Watch `prefix` until `done(current keys->values)` returns non-None, or the deadline.

        An initial read fixes the revision; the watch starts right after it, so nothing is
        missed. Every _RESYNC_S without events we re-read, in case the watch stream dropped.
        Returns (done's value or None on timeout, the last view of the keys).
        """
        deadline = time.monotonic() + timeout_s

        def snapshot() -> tuple[dict[str, bytes], int]:
            kvs, rev = self._range(prefix, prefix=True)
            return {kv.key: kv.value for kv in kvs}, rev

        current, revision = snapshot()
        outcome = done(current)
        if outcome is not None:
            return outcome, current
        events: "queue.Queue[dict]" = queue.Queue()
        raw = prefix.encode("utf-8")
        try:
            watcher = Watcher(
                self._client, raw, events.put, range_end=_prefix_end(raw), start_revision=revision + 1
            )
        except (etcd_exc.Etcd3Exception, requests.RequestException) as exc:
            raise self._error(exc, f"watch {prefix}") from None
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None, current
                try:
                    event = events.get(timeout=min(remaining, _RESYNC_S))
                except queue.Empty:
                    current, _ = snapshot()
                else:
                    kv = event.get("kv", {})
                    key = bytes(kv.get("key", b"")).decode("utf-8", "replace")
                    if event.get("type") == "DELETE":
                        current.pop(key, None)
                    else:
                        current[key] = bytes(kv.get("value", b""))
                    if not events.empty():
                        continue  # apply a burst before judging
                outcome = done(current)
                if outcome is not None:
                    return outcome, current
        finally:
            watcher.stop()

    # ----------------------------------------------------------------- keys
    def key(self, *parts: Any) -> str:
        """A full key under the prefix from path segments: key("sessions", sid, "spec")."""
        return "/".join([self.prefix, *(str(p) for p in parts)])

    def lock_key(self, detector: str) -> str:
        """<prefix>/detectors/<detector>/lock"""
        return self.key("detectors", _component(detector, "detector"), "lock")

    def session_key(self, sid: str, *parts: Any) -> str:
        """<prefix>/sessions/<sid>[/parts...]"""
        return self.key("sessions", _component(sid, "session id"), *parts)

    # ----------------------------------------------------------------- health
    def ping(self) -> str:
        """The etcd server version; raises CoordinationError if etcd is unreachable."""
        return str(self._post("maintenance/status", {}, what="read its status").get("version", "?"))

    # ----------------------------------------------------------------- leases
    def lease(self, ttl: int = 5) -> KeepAliveLease:
        """Grant a lease kept alive in the background; use as `with coordinator.lease(5) as lease:`."""
        return KeepAliveLease(self, ttl)

    # ----------------------------------------------------------------- detector lock
    def lock_detector(self, detector: str, session_id: str, lease: LeaseLike) -> None:
        """Take the detector for a session, atomically, attached to `lease`.

        Raises DetectorBusy naming the holding session. Taking it again for the session that
        already holds it is a no-op (the key stays on the lease it was first taken with).
        """
        key = self.lock_key(detector)
        sid = _component(session_id, "session id")
        lease_id = _lease_id(lease)
        if not lease_id:
            raise ValueError("the detector lock must be attached to a lease")
        result = self._txn(
            [{"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": 0}],
            [{"request_put": {"key": _b64(key), "value": _b64(sid), "lease": lease_id}}],
            [{"request_range": {"key": _b64(key)}}],
            what=f"lock detector {detector}",
        )
        if result.get("succeeded"):
            log.info("session %s locked detector %s (lease %x)", sid, detector, lease_id)
            return
        kvs = result.get("responses", [{}])[0].get("response_range", {}).get("kvs", [])
        holder = _Kv(kvs[0]).text if kvs else "<unknown>"
        if holder == sid:
            return
        raise DetectorBusy(detector, holder)

    def unlock_detector(self, detector: str, session_id: str) -> bool:
        """Release the detector only if `session_id` still holds it; True if we deleted it."""
        key = self.lock_key(detector)
        result = self._txn(
            [{"key": _b64(key), "result": "EQUAL", "target": "VALUE", "value": _b64(session_id)}],
            [{"request_delete_range": {"key": _b64(key)}}],
            what=f"unlock detector {detector}",
        )
        return bool(result.get("succeeded"))

    def lock_holder(self, detector: str) -> Optional[str]:
        """The session id holding the detector, or None if it is free."""
        raw = self._get(self.lock_key(detector))
        return None if raw is None else raw.decode("utf-8", "replace")

    # ----------------------------------------------------------------- session documents
    def put_spec(self, sid: str, spec: Any) -> None:
        """Store the session's parameters (a dict or a pydantic model such as SessionSpec) as JSON."""
        self._put(self.session_key(sid, "spec"), _dumps(spec))

    def get_spec(self, sid: str) -> Optional[dict]:
        """The session's parameters, or None."""
        return _loads(self._get(self.session_key(sid, "spec")))

    def put_job(self, sid: str, job: Mapping[str, Any]) -> None:
        """Store the batch job's description: backend, job id, nodes, state."""
        self._put(self.session_key(sid, "job"), _dumps(job))

    def get_job(self, sid: str) -> Optional[dict]:
        """The batch job's description, or None."""
        return _loads(self._get(self.session_key(sid, "job")))

    def put_result(self, sid: str, result: Mapping[str, Any]) -> None:
        """Store the session's summary once done."""
        self._put(self.session_key(sid, "result"), _dumps(result))

    def get_result(self, sid: str) -> Optional[dict]:
        """The session's summary, or None."""
        return _loads(self._get(self.session_key(sid, "result")))

    def sessions(self) -> list[str]:
        """Ids of every session with keys under the prefix, sorted."""
        base = self.key("sessions") + "/"
        kvs, _ = self._range(base, prefix=True, keys_only=True)
        return sorted({kv.key[len(base) :].split("/", 1)[0] for kv in kvs})

    # ----------------------------------------------------------------- state and events
    def set_state(self, sid: str, state: str, reason: Optional[str] = None) -> int:
        """Set the session state and append the matching event, atomically; return the event's seq.

        The seq is one more than the last event's, claimed in a transaction that only succeeds
        if that event key does not exist yet, so concurrent writers never collide or reorder.
        """
        if state not in STATES:
            raise ValueError(f"unknown session state {state!r}; expected one of {', '.join(STATES)}")
        state_key = self.session_key(sid, "state")
        events_prefix = self.session_key(sid, "events") + "/"
        for _attempt in range(100):
            last, _ = self._range(events_prefix, prefix=True, keys_only=True, limit=1, descending=True)
            try:
                seq = int(last[0].key[len(events_prefix) :]) + 1 if last else 1
            except ValueError:
                raise CoordinationError(f"unexpected event key {last[0].key} at {self.endpoint}") from None
            event_key = f"{events_prefix}{seq:0{_SEQ_DIGITS}d}"
            event = {"state": state, "reason": reason, "time": time.time()}
            result = self._txn(
                [{"key": _b64(event_key), "result": "EQUAL", "target": "CREATE", "create_revision": 0}],
                [
                    {"request_put": {"key": _b64(state_key), "value": _b64(state)}},
                    {"request_put": {"key": _b64(event_key), "value": _b64(_dumps(event))}},
                ],
                what=f"set state of session {sid}",
            )
            if result.get("succeeded"):
                log.info("session %s -> %s%s", sid, state, f" ({reason})" if reason else "")
                return seq
        raise CoordinationError(f"could not append an event for session {sid} at {self.endpoint}: too much contention")

    def get_state(self, sid: str) -> Optional[str]:
        """The session state, or None if the session has none."""
        raw = self._get(self.session_key(sid, "state"))
        return None if raw is None else raw.decode("utf-8")

    def events(self, sid: str) -> list[dict]:
        """The session's state changes in order: [{"seq", "state", "reason", "time"}, ...]."""
        events_prefix = self.session_key(sid, "events") + "/"
        kvs, _ = self._range(events_prefix, prefix=True)
        out = []
        for kv in kvs:
            event = _loads(kv.value)
            event["seq"] = int(kv.key[len(events_prefix) :])
            out.append(event)
        return out

    # ----------------------------------------------------------------- services
    def _services_prefix(self, sid: str, role: str) -> str:
        return self.session_key(sid, "services", _component(role, "role")) + "/"

    def register_service(self, sid: str, role: str, name: str, info: Mapping[str, Any], lease: LeaseLike) -> None:
        """Publish a service (e.g. {"endpoint": "tcp://host:port", "pid": ..., "host": ...}), leased."""
        if not _lease_id(lease):
            raise ValueError("service keys must be attached to a lease")
        self._put(self._services_prefix(sid, role) + _component(name, "service name"), _dumps(info), lease)

    def unregister_service(self, sid: str, role: str, name: str) -> None:
        """Remove one service key (revoking its lease does this too)."""
        key = self._services_prefix(sid, role) + _component(name, "service name")
        self._post("kv/deleterange", {"key": _b64(key)}, what=f"delete {key}")

    def services(self, sid: str, role: str) -> dict[str, dict]:
        """Registered services of a role: {name: info}."""
        prefix = self._services_prefix(sid, role)
        kvs, _ = self._range(prefix, prefix=True)
        return {kv.key[len(prefix) :]: _loads(kv.value) for kv in kvs}

    def wait_for_services(self, sid: str, role: str, count: int, timeout_s: float) -> dict[str, dict]:
        """Block until at least `count` services of `role` are registered; return them {name: info}.

        Uses a watch (after an initial read), so it returns as soon as the count is reached.
        Raises TimeoutError naming how many of how many registered.
        """
        prefix = self._services_prefix(sid, role)

        def enough(current: dict[str, bytes]) -> Optional[dict[str, dict]]:
            if len(current) >= count:
                return {k[len(prefix) :]: _loads(v) for k, v in current.items()}
            return None

        found, current = self._wait_prefix(prefix, enough, timeout_s)
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
        key = self.session_key(sid, "barriers", _component(barrier, "barrier"), _component(name, "name"))
        self._put(key, b"1")

    def wait_barrier(self, sid: str, barrier: str, count: int, timeout_s: float) -> list[str]:
        """Block until ``count`` names have arrived at the barrier; TimeoutError names who has."""
        prefix = self.session_key(sid, "barriers", _component(barrier, "barrier")) + "/"

        def enough(current: dict[str, bytes]) -> Optional[list[str]]:
            return sorted(k[len(prefix):] for k in current) if len(current) >= count else None

        found, current = self._wait_prefix(prefix, enough, timeout_s)
        if found is None:
            names = sorted(k[len(prefix):] for k in current)
            raise TimeoutError(f"only {len(current)} of {count} arrived at barrier {barrier!r} of session "
                               f"{sid} within {timeout_s:g} s (arrived: {', '.join(names) or 'none'})")
        return found

    # ----------------------------------------------------------------- scan counts
    def set_expected(self, sid: str, scan: int, n: int) -> None:
        """Frames expected for a scan."""
        self._put(self.session_key(sid, "scans", _component(int(scan), "scan"), "expected"), str(int(n)))

    def get_expected(self, sid: str, scan: int) -> Optional[int]:
        """Frames expected for a scan, or None if not set."""
        raw = self._get(self.session_key(sid, "scans", _component(int(scan), "scan"), "expected"))
        return None if raw is None else int(raw)

    def set_received(self, sid: str, scan: int, node: str, n: int, lease: Optional[LeaseLike] = None) -> None:
        """Frames a node has received for a scan (optionally leased, to vanish with the node)."""
        key = self.session_key(sid, "scans", _component(int(scan), "scan"), "received", _component(node, "node"))
        self._put(key, str(int(n)), lease)

    def received(self, sid: str, scan: int) -> dict[str, int]:
        """Frames received per node for a scan: {node: n}."""
        prefix = self.session_key(sid, "scans", _component(int(scan), "scan"), "received") + "/"
        kvs, _ = self._range(prefix, prefix=True)
        return {kv.key[len(prefix) :]: int(kv.value) for kv in kvs}

    # ----------------------------------------------------------------- cleanup and inspection
    def cleanup_session(self, sid: str) -> list[str]:
        """Drop a session's ephemeral keys and any detector lock it holds; return the keys deleted.

        Keeps spec, state, events/, job and result (the session's history); everything else
        (services/, scans/, and anything added later) is deleted.
        """
        base = self.session_key(sid) + "/"
        kvs, _ = self._range(base, prefix=True, keys_only=True)
        doomed = []
        for kv in kvs:
            rel = kv.key[len(base) :]
            if rel in HISTORY_KEYS or rel.startswith("events/"):
                continue
            doomed.append(kv.key)
        self._delete_keys(doomed)
        locks, _ = self._range(self.key("detectors") + "/", prefix=True)
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
        kvs, _ = self._range(base, prefix=True)
        return {kv.key[len(base) :]: kv.text for kv in kvs}

    def dump(self, prefix: Optional[str] = None) -> dict[str, str]:
        """Every key (full path) under `prefix` (default: this coordinator's prefix), value as text."""
        start = self.prefix + "/" if prefix is None else prefix
        kvs, _ = self._range(start, prefix=True)
        return {kv.key: kv.text for kv in kvs}


# --------------------------------------------------------------------------- admin
def enable_auth(
    endpoint: str,
    root_password: Any,
    *,
    user: Optional[str] = None,
    user_password: Any = None,
    prefix: str = DEFAULT_PREFIX,
    ca_file: Optional[str] = None,
    timeout: float = 10.0,
) -> None:
    """Turn on etcd auth: create `root` (role root) and optionally `user` with read-write on `prefix`/.

    For first-time setup of a private etcd and for tests. Entries that already exist are kept.
    """
    if (user is None) != (user_password is None):
        raise ValueError("give both user and user_password, or neither")
    admin = Coordinator(endpoint, prefix, ca_file=ca_file, timeout=timeout)
    try:

        def call(path: str, payload: dict, what: str) -> None:
            try:
                admin._post(path, payload, what=what)
            except CoordinationError as exc:
                if "already exists" not in str(exc) and "already granted" not in str(exc):
                    raise

        call("auth/user/add", {"name": "root", "password": _secret(root_password)}, "add user root")
        call("auth/role/add", {"name": "root"}, "add role root")
        call("auth/user/grant", {"user": "root", "role": "root"}, "grant role root")
        if user is not None:
            role = f"{_component(user, 'user')}-rw"
            scope = (prefix + "/").encode("utf-8")
            call("auth/user/add", {"name": user, "password": _secret(user_password)}, f"add user {user}")
            call("auth/role/add", {"name": role}, f"add role {role}")
            call(
                "auth/role/grant",
                {"name": role, "perm": {"permType": "READWRITE", "key": _b64(scope), "range_end": _b64(_prefix_end(scope))}},
                f"grant {role} read-write on {prefix}/",
            )
            call("auth/user/grant", {"user": user, "role": role}, f"grant role {role}")
        call("auth/enable", {}, "enable auth")
    finally:
        admin.close()
