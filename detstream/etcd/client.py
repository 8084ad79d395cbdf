"""The etcd client: one endpoint over etcd3gw, with auth, key-value reads and writes, and transactions.

Every request goes through `EtcdClient.call`, which retries through etcd outages within a budget.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Optional, TypeVar, Union
from urllib.parse import urlsplit

import requests
from etcd3gw import exceptions as etcd_exc
from etcd3gw.client import Etcd3Client
from tenacity import RetryCallState, Retrying, retry_if_exception, wait_exponential, wait_random

from ..config import DEFAULT_PREFIX, check_prefix
from .encoding import KeyValue, TxnResult, _b64, _prefix_end, delete_op, key_segment, put_op
from .errors import AuthenticationError, CoordinationError, _describe, _error_message, _is_outage, _short_reason
from .leases import KeepAliveLease, LeaseLike, RegrantCallback, note_writes
from .watch import wait_prefix

log = logging.getLogger(__name__)

_MAX_TXN_OPS = 100  # etcd's default --max-txn-ops is 128
DEFAULT_OUTAGE_BUDGET_S = 30.0  # how long a request keeps retrying while etcd is unreachable
# Backoff between retries: 0.1 s doubling to 1 s (below a lease's TTL/3), plus up to 0.1 s jitter.
_backoff = wait_exponential(multiplier=0.1, max=1.0) + wait_random(0, 0.1)

T = TypeVar("T")


def _secret(value: Any) -> Optional[str]:
    """Accept str or pydantic SecretStr (anything with get_secret_value)."""
    if value is None:
        return None
    getter = getattr(value, "get_secret_value", None)
    return getter() if callable(getter) else str(value)


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
        cert_file: Optional[str] = None,
        key_file: Optional[str] = None,
        timeout: float = 10.0,
        outage_budget_s: float = DEFAULT_OUTAGE_BUDGET_S,
    ) -> None:
        """Connect lazily (no request is made unless credentials are given).

        `password` may be a str or a pydantic SecretStr. `ca_file` verifies an https endpoint;
        `cert_file`/`key_file` are the client certificate an etcd with --client-cert-auth asks for.
        `timeout` bounds one HTTP request; `outage_budget_s` how long requests keep retrying
        while etcd is unreachable (0: never retry).
        """
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        if outage_budget_s < 0:
            raise ValueError(f"outage_budget_s must be 0 or more, got {outage_budget_s}")
        if (cert_file is None) != (key_file is None):
            raise ValueError("give both cert_file and key_file, or neither")
        protocol, host, port = _parse_endpoint(endpoint)
        for what, path in (("CA", ca_file), ("client certificate", cert_file), ("client key", key_file)):
            if path is not None and not os.path.isfile(path):
                raise CoordinationError(f"etcd at {endpoint}: the {what} file {path} does not exist")
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
        self._gateway = _Gateway(host=host, port=port, protocol=protocol, ca_cert=ca_file, cert_cert=cert_file,
                                 cert_key=key_file, timeout=self.timeout)
        if ca_file is not None:  # else REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE would silently replace our CA
            self._gateway.session.trust_env = False
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
                if "certificate" in message.lower() or "ssl" in message.lower():
                    raise self._error(exc, "authenticate") from None
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
        lowered = message.lower()
        if "certificate_verify_failed" in lowered or "certificate verify failed" in lowered:
            return CoordinationError(
                f"cannot reach etcd at {self.endpoint} to {what}: its TLS certificate is not signed by a CA "
                f"this client trusts; give the CA bundle (ca_file, or DETSTREAM_ETCD_CA_FILE)")
        if "certificate required" in lowered or "bad_certificate" in lowered or "bad certificate" in lowered:
            return CoordinationError(
                f"cannot reach etcd at {self.endpoint} to {what}: it asks for a client certificate; give "
                f"cert_file and key_file (or DETSTREAM_ETCD_CERT_FILE and DETSTREAM_ETCD_KEY_FILE)")
        if isinstance(exc, (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError, requests.RequestException)):
            return CoordinationError(f"cannot reach etcd at {self.endpoint} to {what}: {_short_reason(message)}")
        cls = CoordinationError
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
        note_writes(self.endpoint, [op])

    def delete(self, key: str) -> None:
        """Delete `key` (no error if it does not exist)."""
        op = delete_op(key)
        self.call("kv/deleterange", op["request_delete_range"], what=f"delete {key}")
        note_writes(self.endpoint, [op])

    def txn(self, compare: Iterable[dict], success: Iterable[dict], failure: Iterable[dict] = (), *, what: str) -> TxnResult:
        """If every `compare` holds, run the `success` operations, else the `failure` ones; atomically."""
        success, failure = list(success), list(failure)
        result = self.call("kv/txn", {"compare": list(compare), "success": success, "failure": failure}, what=what)
        ranges = [
            [KeyValue(kv) for kv in response.get("response_range", {}).get("kvs", [])]
            for response in result.get("responses", [])
        ]
        succeeded = bool(result.get("succeeded"))
        note_writes(self.endpoint, success if succeeded else failure)
        return TxnResult(succeeded, ranges)

    def delete_keys(self, keys: Iterable[str]) -> None:
        """Delete many keys, in as few transactions as etcd's operation limit allows."""
        keys = list(keys)
        for start in range(0, len(keys), _MAX_TXN_OPS):
            ops = [delete_op(k) for k in keys[start : start + _MAX_TXN_OPS]]
            self.txn([], ops, what=f"delete {len(ops)} keys")

    def wait_prefix(
        self, prefix: str, done: Callable[[dict[str, bytes]], Optional[T]], timeout_s: float
    ) -> tuple[Optional[T], dict[str, bytes]]:
        """Watch `prefix` until `done(current keys->values)` returns non-None, or the deadline; see `watch.wait_prefix`."""
        return wait_prefix(self, prefix, done, timeout_s)

    # ----------------------------------------------------------------- server
    def ping(self) -> str:
        """The etcd server version; raises CoordinationError if etcd is unreachable."""
        return str(self.call("maintenance/status", {}, what="read its status").get("version", "?"))

    def lease(self, ttl: int = 5, on_regrant: Optional[RegrantCallback] = None) -> KeepAliveLease:
        """Grant a lease kept alive in the background; use as `with client.lease(5) as lease:`.

        `on_regrant(lease, lost)` is called whenever etcd lost the lease and it was granted anew.
        """
        return KeepAliveLease(self, ttl, on_regrant=on_regrant)


# --------------------------------------------------------------------------- admin
def enable_auth(
    endpoint: str,
    root_password: Any,
    *,
    user: Optional[str] = None,
    user_password: Any = None,
    prefix: str = DEFAULT_PREFIX,
    ca_file: Optional[str] = None,
    cert_file: Optional[str] = None,
    key_file: Optional[str] = None,
    timeout: float = 10.0,
) -> None:
    """Turn on etcd auth: create `root` (role root) and optionally `user` with read-write on `prefix`/.

    For first-time setup of a private etcd and for tests. Entries that already exist are kept.
    """
    if (user is None) != (user_password is None):
        raise ValueError("give both user and user_password, or neither")
    check_prefix(prefix)
    with EtcdClient(endpoint, ca_file=ca_file, cert_file=cert_file, key_file=key_file, timeout=timeout) as admin:
        add_user(admin, "root", root_password, role="root")
        if user is not None:
            add_user(admin, user, user_password, role=f"{key_segment(user, 'user')}-rw", prefixes=[prefix + "/"])
        admin_call(admin, "auth/enable", {}, "enable auth")


def admin_call(admin: EtcdClient, path: str, payload: dict, what: str) -> None:
    """One auth-admin request; an entry that already exists is kept."""
    try:
        admin.call(path, payload, what=what)
    except CoordinationError as exc:
        if "already exists" not in str(exc) and "already granted" not in str(exc):
            raise


def add_user(admin: EtcdClient, user: str, password: Any, *, role: str, prefixes: Iterable[str] = (),
             keys: Iterable[str] = ()) -> None:
    """Add `user` with `password` and its own `role`, read-write on each of `prefixes` and `keys` only."""
    admin_call(admin, "auth/user/add", {"name": user, "password": _secret(password)}, f"add user {user}")
    admin_call(admin, "auth/role/add", {"name": role}, f"add role {role}")
    scopes = [(p.encode("utf-8"), True) for p in prefixes] + [(k.encode("utf-8"), False) for k in keys]
    for scope, whole_prefix in scopes:
        perm = {"permType": "READWRITE", "key": _b64(scope)}
        if whole_prefix:
            perm["range_end"] = _b64(_prefix_end(scope))
        admin_call(admin, "auth/role/grant", {"name": role, "perm": perm}, f"grant {role} read-write on {scope!r}")
    admin_call(admin, "auth/user/grant", {"user": user, "role": role}, f"grant role {role}")

