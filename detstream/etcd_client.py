"""The etcd transport: etcd3gw, auth, encoding, errors and leases, every request through `EtcdClient.call`.

Kept in one module so the client can be swapped; `call` retries through etcd outages within a budget.
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import threading
import time
import weakref
from datetime import date, datetime
from pathlib import PurePath
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, TypeVar, Union
from urllib.parse import urlsplit

import requests
from etcd3gw import exceptions as etcd_exc
from etcd3gw.client import Etcd3Client
from etcd3gw.watch import Watcher
from tenacity import RetryCallState, Retrying, retry_if_exception, wait_exponential, wait_random

from .config import DEFAULT_PREFIX, check_prefix

__all__ = [
    "AuthenticationError",
    "CoordinationError",
    "DEFAULT_OUTAGE_BUDGET_S",
    "EtcdClient",
    "KeepAliveLease",
    "KeyValue",
    "LeaseLike",
    "RegrantCallback",
    "TxnResult",
    "delete_op",
    "enable_auth",
    "from_json",
    "key_missing",
    "key_segment",
    "lease_id",
    "put_op",
    "range_op",
    "to_json",
    "value_is",
]

log = logging.getLogger(__name__)

_MAX_TXN_OPS = 100  # etcd's default --max-txn-ops is 128
_RESYNC_S = 2.0  # while waiting on a watch, re-read this often in case the stream dropped
DEFAULT_OUTAGE_BUDGET_S = 30.0  # how long a request keeps retrying while etcd is unreachable
# Backoff between retries: 0.1 s doubling to 1 s (below a lease's TTL/3), plus up to 0.1 s jitter.
_backoff = wait_exponential(multiplier=0.1, max=1.0) + wait_random(0, 0.1)

T = TypeVar("T")
LeaseLike = Union["KeepAliveLease", int]


class CoordinationError(RuntimeError):
    """etcd could not be reached or refused a request; the message names the endpoint."""


class AuthenticationError(CoordinationError):
    """etcd rejected the credentials (or auth is required and none were given)."""


# --------------------------------------------------------------------------- encoding
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


def to_json(obj: Any) -> bytes:
    """A value as stored in etcd: sorted-key JSON; pydantic models, paths, dates and sets allowed."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    return json.dumps(obj, sort_keys=True, default=_json_default, ensure_ascii=False).encode("utf-8")


def from_json(raw: Optional[bytes]) -> Any:
    """The inverse of `to_json`; None for a missing value."""
    return None if raw is None else json.loads(raw.decode("utf-8"))


def key_segment(value: Any, what: str) -> str:
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


class KeyValue:
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

    def json(self) -> Any:
        return from_json(self.value)


# --------------------------------------------------------------------------- transactions
def key_missing(key: str) -> dict:
    """Txn compare: `key` does not exist."""
    return {"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": 0}


def value_is(key: str, value: Union[str, bytes]) -> dict:
    """Txn compare: `key` holds exactly `value`."""
    return {"key": _b64(key), "result": "EQUAL", "target": "VALUE", "value": _b64(value)}


def put_op(key: str, value: Union[str, bytes], lease: Optional[LeaseLike] = None) -> dict:
    """Txn operation: write `key`, attached to `lease` if given."""
    put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    attached = lease_id(lease)
    if attached:
        put["lease"] = attached
    return {"request_put": put}


def delete_op(key: str) -> dict:
    """Txn operation: delete `key`."""
    return {"request_delete_range": {"key": _b64(key)}}


def range_op(key: str) -> dict:
    """Txn operation: read `key` (its result is in `TxnResult.ranges`)."""
    return {"request_range": {"key": _b64(key)}}


class TxnResult(NamedTuple):
    succeeded: bool
    #: The key-values read by each operation of the branch that ran ([] for non-reads), in order.
    ranges: list[list[KeyValue]]


# --------------------------------------------------------------------------- errors
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


def _describe(exc: BaseException) -> str:
    """The message of an etcd3gw or requests failure."""
    return _error_message(exc) if isinstance(exc, etcd_exc.Etcd3Exception) else str(exc)


_KNOWN_REASONS = (
    "Connection refused",
    "timed out",
    "Name or service not known",
    "Temporary failure in name resolution",
    "No route to host",
    "Network is unreachable",
    "CERTIFICATE_VERIFY_FAILED",
    "Connection reset",
    "Connection aborted",
    "Remote end closed connection",
)

# Connection failures that are set-up errors, not an outage: retrying cannot fix them.
_NOT_OUTAGE = ("certificate", "ssl", "name or service not known", "nodename nor servname")
# etcd's answers while it has no quorum, no leader, or is shutting down (gRPC Unavailable and kin).
_OUTAGE_MESSAGES = (
    "no leader",
    "not leader",
    "leader changed",
    "request timed out",
    "server stopped",
    "unhealthy cluster",
    "too many requests",
)


def _is_outage(exc: BaseException) -> bool:
    """True for what an etcd outage causes (no connection, timeouts, 5xx, leader elections): worth retrying.

    Auth, permission and bad-request errors are not: they would fail the same way again.
    """
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):  # raw, from opening a watch
        return not any(p in str(exc).lower() for p in _NOT_OUTAGE)
    if not isinstance(exc, etcd_exc.Etcd3Exception):
        return False
    text = _error_message(exc).lower()
    # etcd3gw's types for no connection, a timeout, or HTTP 408/500/503/504
    if isinstance(exc, (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError, etcd_exc.InternalServerError)):
        return not any(p in text for p in _NOT_OUTAGE)
    http_reason = str(exc.args[0]) if exc.args else ""  # etcd3gw keeps the HTTP reason phrase there
    return http_reason == "Bad Gateway" or any(p in text for p in _OUTAGE_MESSAGES)


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
class _Gateway(Etcd3Client):
    """etcd3gw's client, re-authenticating when a simple token has expired (or an earlier attempt lost it)."""

    reauthenticate: Optional[Callable[[], None]] = None
    #: True between dropping a token and installing the next: requests would go out anonymous.
    token_missing = False

    def post(self, url: str, *args: Any, json: Any = None, **kwargs: Any) -> Any:
        if self.reauthenticate is not None and self.token_missing:
            self.reauthenticate()
        try:
            return super().post(url, *args, json=json, **kwargs)
        except etcd_exc.Etcd3Exception as exc:
            if self.reauthenticate is None or "invalid auth token" not in (exc.detail_text or ""):
                raise
            self.reauthenticate()  # a restarted etcd has forgotten every simple token
            return super().post(url, *args, json=json, **kwargs)

    def post_anonymous(self, url: str, json: Any) -> Any:
        """One POST without the re-authentication above (for authenticating itself)."""
        return super().post(url, json=json)


class EtcdClient:
    """One etcd endpoint: key-value reads and writes, transactions, prefix waits and leases.

    With ``username``/``password`` it authenticates at once and puts the token in the
    ``Authorization`` header of the HTTP session (which watches share). Simple tokens expire when
    idle (``--auth-token-ttl``); on "invalid auth token" it authenticates again once and retries.
    Neither the password nor the token is ever logged or put into an exception message or repr.

    Requests ride out etcd outages: see `call`. `retries` counts retried attempts and `outages`
    the outages seen (both only grow); `outage_s` is how long the current one has lasted.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        username: Optional[str] = None,
        password: Any = None,
        ca_file: Optional[str] = None,
        timeout: float = 10.0,
        outage_budget_s: float = DEFAULT_OUTAGE_BUDGET_S,
    ) -> None:
        """Connect lazily (no request is made unless credentials are given).

        `password` may be a str or a pydantic SecretStr. `ca_file` verifies an https endpoint.
        `timeout` bounds one HTTP request; `outage_budget_s` how long requests keep retrying
        while etcd is unreachable (0: never retry).
        """
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        if outage_budget_s < 0:
            raise ValueError(f"outage_budget_s must be 0 or more, got {outage_budget_s}")
        protocol, host, port = _parse_endpoint(endpoint)
        self.endpoint = f"{protocol}://{host if ':' not in host else '[' + host + ']'}:{port}"
        self.username = username
        self.timeout = float(timeout)
        self.outage_budget_s = float(outage_budget_s)
        self.retries = 0
        self.outages = 0
        self._outage_since: Optional[float] = None  # monotonic time of the current outage's first failure
        self._outage_lock = threading.Lock()
        self.__password = _secret(password)
        self._auth_lock = threading.Lock()
        self._gateway = _Gateway(host=host, port=port, protocol=protocol, ca_cert=ca_file, timeout=self.timeout)
        if username is not None:
            self._gateway.reauthenticate = self._authenticate
            self._retrying(self._authenticate, "authenticate")

    def __repr__(self) -> str:
        user = f" user={self.username!r}" if self.username else ""
        return f"<EtcdClient {self.endpoint}{user}>"

    def close(self) -> None:
        """Close the HTTP session (leases you hold keep their own refresh thread until revoked)."""
        self._gateway.session.close()

    def __enter__(self) -> "EtcdClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- requests
    def call(self, path: str, payload: Mapping[str, Any], *, what: str) -> dict:
        """POST one v3 gateway request (e.g. "kv/range"); any failure becomes CoordinationError.

        Every unary request goes through here. What an outage causes (see `_is_outage`) is
        retried with backoff until etcd has been unreachable for `outage_budget_s`; anything
        else (auth, permission, bad request) fails at once.
        """
        return self._retrying(lambda: self._gateway.post(self._gateway.get_url(path), json=payload), what)

    def _retrying(self, attempt: Callable[[], T], what: str) -> T:
        """Run `attempt` under the outage policy; its failures become CoordinationError naming `what`."""
        retrying = Retrying(
            retry=retry_if_exception(_is_outage),
            stop=lambda state: self.outage_s >= self.outage_budget_s,
            wait=self._wait,
            before_sleep=self._count_retry,
            reraise=True,
        )
        try:
            return retrying(self._attempt, attempt)
        except CoordinationError:
            raise
        except (etcd_exc.Etcd3Exception, requests.RequestException) as exc:
            if _is_outage(exc):
                raise self._unreachable(exc, what) from None
            raise self._error(exc, what) from None

    def _attempt(self, attempt: Callable[[], T]) -> T:
        """One try; keeps the outage clock: started by the first failure, stopped by any answer."""
        try:
            result = attempt()
        except (etcd_exc.Etcd3Exception, requests.RequestException, CoordinationError) as exc:
            if _is_outage(exc):
                self._outage_began(exc)
            else:
                self._outage_ended()  # etcd answered, if only to refuse
            raise
        self._outage_ended()
        return result

    @property
    def outage_s(self) -> float:
        """How long etcd has been unreachable, from this client's view (0.0 when it is not)."""
        since = self._outage_since
        return 0.0 if since is None else time.monotonic() - since

    def _wait(self, state: RetryCallState) -> float:
        """The backoff, but never past the end of the budget (the last try comes at the budget)."""
        return min(_backoff(state), max(0.0, self.outage_budget_s - self.outage_s))

    def _count_retry(self, state: RetryCallState) -> None:
        self.retries += 1

    def _outage_began(self, exc: BaseException) -> None:
        with self._outage_lock:
            if self._outage_since is not None:
                return
            self._outage_since = time.monotonic()
            self.outages += 1
        log.warning("etcd at %s is unreachable (%s); retrying for up to %g s",
                    self.endpoint, _short_reason(_describe(exc)), self.outage_budget_s)

    def _outage_ended(self) -> None:
        if self._outage_since is None:  # the common case, without taking the lock
            return
        with self._outage_lock:
            if self._outage_since is None:
                return
            lasted = time.monotonic() - self._outage_since
            self._outage_since = None
        log.warning("etcd at %s is reachable again after %.1f s", self.endpoint, lasted)

    def _unreachable(self, exc: BaseException, what: str) -> CoordinationError:
        return CoordinationError(
            f"cannot reach etcd at {self.endpoint} to {what}: unreachable for {self.outage_s:.1f} s, "
            f"the outage budget is {self.outage_budget_s:g} s (last error: {_short_reason(_describe(exc))})"
        )

    def _authenticate(self) -> None:
        """Get a token for username/password and install it on the session; never logs either.

        One attempt: an outage propagates as etcd3gw's exception, for the caller's retry to judge.
        """
        with self._auth_lock:
            gateway = self._gateway
            gateway.session.headers.pop("Authorization", None)
            gateway.token_missing = True
            try:
                body = gateway.post_anonymous(
                    gateway.get_url("auth/authenticate"), json={"name": self.username, "password": self.__password}
                )
            except etcd_exc.Etcd3Exception as exc:
                if _is_outage(exc):
                    raise
                message = _error_message(exc)
                if "authentication is not enabled" in message:
                    log.warning("etcd at %s has auth disabled; continuing without a token", self.endpoint)
                    gateway.token_missing = False
                    return
                raise AuthenticationError(
                    f"etcd at {self.endpoint} rejected authentication as user {self.username!r}: {message[:300]}"
                ) from None
            token = body.get("token")
            if not token:
                raise AuthenticationError(f"etcd at {self.endpoint} returned no token for user {self.username!r}")
            gateway.session.headers["Authorization"] = token
            gateway.token_missing = False
            log.debug("authenticated to etcd at %s as %r", self.endpoint, self.username)

    def _error(self, exc: BaseException, what: str) -> CoordinationError:
        """A failure that is not an outage (or a set-up error such as TLS), with today's clear wording."""
        message = _describe(exc)
        if isinstance(exc, (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError, requests.RequestException)):
            return CoordinationError(f"cannot reach etcd at {self.endpoint} to {what}: {_short_reason(message)}")
        cls = CoordinationError
        lowered = message.lower()
        if "user name is empty" in lowered or "invalid auth token" in lowered or "authentication failed" in lowered:
            cls = AuthenticationError
            if "user name is empty" in lowered:
                message += " (this etcd requires a username and password)"
        elif "permission denied" in lowered and self.username:
            message += f" (user {self.username!r} lacks permission for it)"
        return cls(f"etcd at {self.endpoint} refused to {what}: {message}")

    # ----------------------------------------------------------------- key-value
    def range(
        self,
        key: str,
        *,
        prefix: bool = False,
        keys_only: bool = False,
        limit: Optional[int] = None,
        descending: bool = False,
    ) -> tuple[list[KeyValue], int]:
        """Read one key or a prefix, sorted by key; also return the store revision of the read."""
        raw = key.encode("utf-8")
        payload: dict[str, Any] = {"key": _b64(raw), "sort_order": 2 if descending else 1, "sort_target": 0}
        if prefix:
            payload["range_end"] = _b64(_prefix_end(raw))
        if keys_only:
            payload["keys_only"] = True
        if limit:
            payload["limit"] = limit
        result = self.call("kv/range", payload, what=f"read {key}")
        revision = int(result.get("header", {}).get("revision", 0))
        return [KeyValue(kv) for kv in result.get("kvs", [])], revision

    def get(self, key: str) -> Optional[bytes]:
        """The value of `key`, or None if it does not exist."""
        kvs, _ = self.range(key)
        return kvs[0].value if kvs else None

    def put(self, key: str, value: Union[str, bytes], lease: Optional[LeaseLike] = None) -> None:
        """Write `key`, attached to `lease` if given (the key then vanishes with the lease).

        A KeepAliveLease that etcd lost (say, expired during an outage) is re-granted and the write
        made again on the new one, and the lease remembers the key to put back after a later loss.
        """
        op = put_op(key, value, lease)
        try:
            self.call("kv/put", op["request_put"], what=f"write {key}")
        except CoordinationError as exc:
            if not (isinstance(lease, KeepAliveLease) and "lease not found" in str(exc)):
                raise
            lease._recover(op["request_put"]["lease"])
            op = put_op(key, value, lease)
            self.call("kv/put", op["request_put"], what=f"write {key}")
        self._note_writes([op])

    def delete(self, key: str) -> None:
        """Delete `key` (no error if it does not exist)."""
        op = delete_op(key)
        self.call("kv/deleterange", op["request_delete_range"], what=f"delete {key}")
        self._note_writes([op])

    def txn(self, compare: Iterable[dict], success: Iterable[dict], failure: Iterable[dict] = (), *, what: str) -> TxnResult:
        """If every `compare` holds, run the `success` operations, else the `failure` ones; atomically."""
        success, failure = list(success), list(failure)
        result = self.call("kv/txn", {"compare": list(compare), "success": success, "failure": failure}, what=what)
        ranges = [
            [KeyValue(kv) for kv in response.get("response_range", {}).get("kvs", [])]
            for response in result.get("responses", [])
        ]
        succeeded = bool(result.get("succeeded"))
        self._note_writes(success if succeeded else failure)
        return TxnResult(succeeded, ranges)

    def _note_writes(self, ops: Iterable[dict]) -> None:
        """Keep this process's leases' records of their keys in step with writes etcd has made."""
        leases = _leases_at(self.endpoint)
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

    def delete_keys(self, keys: Iterable[str]) -> None:
        """Delete many keys, in as few transactions as etcd's operation limit allows."""
        keys = list(keys)
        for start in range(0, len(keys), _MAX_TXN_OPS):
            ops = [delete_op(k) for k in keys[start : start + _MAX_TXN_OPS]]
            self.txn([], ops, what=f"delete {len(ops)} keys")

    def wait_prefix(
        self, prefix: str, done: Callable[[dict[str, bytes]], Optional[T]], timeout_s: float
    ) -> tuple[Optional[T], dict[str, bytes]]:
        """Watch `prefix` until `done(current keys->values)` returns non-None, or the deadline.

        An initial read fixes the revision; the watch starts right after it, so nothing is
        missed. Every _RESYNC_S without events we re-read (through `call`, so through outages);
        if that read finds what the watch missed, or an outage came meanwhile, the watch is
        opened again from the read's revision. Returns (done's value or None on timeout, the
        last view of the keys); an outage beyond the budget raises CoordinationError.
        """
        deadline = time.monotonic() + timeout_s
        view = _PrefixView()
        outages = self.outages

        def reread() -> bool:
            return view.reset(*self.range(prefix, prefix=True))

        reread()
        outcome = done(view.current)
        if outcome is not None:
            return outcome, view.current
        events: "queue.Queue[dict]" = queue.Queue()
        watcher: Optional[Watcher] = self._watch(prefix, events.put, view.revision + 1)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None, view.current
                try:
                    event = events.get(timeout=min(remaining, _RESYNC_S))
                except queue.Empty:
                    if reread() or self.outages != outages:  # the stream may have died: open a new one
                        outages = self.outages
                        watcher.stop()
                        watcher = None
                        watcher = self._watch(prefix, events.put, view.revision + 1)
                else:
                    view.apply(event)
                    if not events.empty():
                        continue  # apply a burst before judging
                outcome = done(view.current)
                if outcome is not None:
                    return outcome, view.current
        finally:
            if watcher is not None:
                watcher.stop()

    def _watch(self, prefix: str, callback: Callable[[dict], None], start_revision: int) -> Watcher:
        """Open an etcd3gw watch on `prefix` from `start_revision`, under the same outage policy as `call`."""
        raw = prefix.encode("utf-8")
        return self._retrying(
            lambda: Watcher(self._gateway, raw, callback, range_end=_prefix_end(raw), start_revision=start_revision),
            f"watch {prefix}",
        )

    # ----------------------------------------------------------------- server
    def ping(self) -> str:
        """The etcd server version; raises CoordinationError if etcd is unreachable."""
        return str(self.call("maintenance/status", {}, what="read its status").get("version", "?"))

    def lease(self, ttl: int = 5, on_regrant: Optional["RegrantCallback"] = None) -> "KeepAliveLease":
        """Grant a lease kept alive in the background; use as `with client.lease(5) as lease:`.

        `on_regrant(lease, lost)` is called whenever etcd lost the lease and it was granted anew.
        """
        return KeepAliveLease(self, ttl, on_regrant=on_regrant)


class _PrefixView:
    """A prefix wait's view: keys->values as read at `revision`, plus the watch events after it."""

    def __init__(self) -> None:
        self.current: dict[str, bytes] = {}
        self.revision = 0
        self._seen: dict[str, int] = {}  # key -> revision of the last event applied

    def reset(self, kvs: list[KeyValue], revision: int) -> bool:
        """Take a fresh read; True if it differs from the view it replaces."""
        fresh = {kv.key: kv.value for kv in kvs}
        changed = fresh != self.current
        self.current, self.revision, self._seen = fresh, revision, {}
        return changed

    def apply(self, event: dict) -> None:
        """Apply one watch event, unless the read or a later event covers it (a re-opened watch repeats some)."""
        kv = event.get("kv", {})
        key = bytes(kv.get("key", b"")).decode("utf-8", "replace")
        revision = int(kv.get("mod_revision", 0))
        if revision and revision <= max(self.revision, self._seen.get(key, 0)):
            return
        self._seen[key] = revision
        if event.get("type") == "DELETE":
            self.current.pop(key, None)
        else:
            self.current[key] = bytes(kv.get("value", b""))


# --------------------------------------------------------------------------- leases
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
    check_prefix(prefix)
    with EtcdClient(endpoint, ca_file=ca_file, timeout=timeout) as admin:

        def call(path: str, payload: dict, what: str) -> None:
            try:
                admin.call(path, payload, what=what)
            except CoordinationError as exc:
                if "already exists" not in str(exc) and "already granted" not in str(exc):
                    raise

        call("auth/user/add", {"name": "root", "password": _secret(root_password)}, "add user root")
        call("auth/role/add", {"name": "root"}, "add role root")
        call("auth/user/grant", {"user": "root", "role": "root"}, "grant role root")
        if user is not None:
            role = f"{key_segment(user, 'user')}-rw"
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
