"""CURVE on the session's ZeroMQ hops: only the session's own services may connect.

The orchestrator makes one keypair per role (producer, aggregator, distributor) for each
session (`session_keys`). Public keys go in etcd (``sessions/<sid>/keys/<role>/0``); secret
keys reach the services only in their environment (``DETSTREAM_CURVE_SECRET_<ROLE>``, or a
0600 file a batch job sources), never etcd, logs or command lines.

In a service, one `Guard` per ZeroMQ context runs a ZAP authenticator admitting only the
session's public keys. A bound socket is made a CURVE server with `Guard.server`, a connecting
one a client of a known server with `Guard.client`. A server decides whether it uses CURVE
(`uses_curve`): mode ``curve`` always, ``none`` never, ``auto`` (the default) whenever it
listens on anything but loopback or ipc; it says so in its etcd record (``"curve": true``),
which is how its clients know. A connection with an unknown key, or without CURVE, delivers
nothing: it is counted as rejected ``unauthenticated`` and logged once.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import zmq
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)

ROLES = ("producer", "aggregator", "distributor")
MODES = ("auto", "curve", "none")
_SECRET_ENV = "DETSTREAM_CURVE_SECRET_{}"
# Sockets whose handshake failures a monitor counts; the ZAP callback counts the others'.
_WATCHED, _UNWATCHED = "detstream-watched", "detstream"
_FAILED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


def session_keys() -> dict[str, str]:
    """A fresh keypair per role, as the environment that hands the secret keys to the services."""
    return {_SECRET_ENV.format(role.upper()): zmq.curve_keypair()[1].decode("ascii") for role in ROLES}


def session_env(spec) -> dict[str, str]:
    """The CURVE part of a session's service environment: keys unless its security is 'none'."""
    return {} if spec.security == "none" else session_keys()


def public_keys(env: Mapping[str, str]) -> dict[str, str]:
    """role -> Z85 public key, for the secret keys in `env` (what goes in etcd)."""
    found = {}
    for role in ROLES:
        secret = env.get(_SECRET_ENV.format(role.upper()))
        if secret:
            found[role] = zmq.curve_public(secret.encode("ascii")).decode("ascii")
    return found


def is_local(endpoint_or_host: str) -> bool:
    """True for ipc/inproc endpoints and loopback hosts: nothing beyond this machine can reach them."""
    if endpoint_or_host.startswith(("ipc://", "inproc://")):
        return True
    host = endpoint_or_host.split("://", 1)[-1]
    if "://" in endpoint_or_host:
        host = host.rsplit(":", 1)[0]
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def uses_curve(mode: str, bind: str) -> bool:
    """Whether a server bound at `bind` uses CURVE in `mode` (auto: unless loopback or ipc)."""
    if mode not in MODES:
        raise ValueError(f"security mode {mode!r}: expected one of {', '.join(MODES)}")
    return mode == "curve" or (mode == "auto" and not is_local(bind))


@dataclass(frozen=True)
class Curve:
    """What one service needs for CURVE: its role, the session's public keys (role -> key),
    whether its own bound sockets are CURVE servers, and which roles' servers it connects to
    with CURVE (as their etcd records say)."""

    role: str
    keys: Mapping[str, str]
    serve: bool = False
    servers: frozenset = frozenset()
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)

    def secret(self) -> bytes:
        """This role's secret key, from the environment the session launched us with."""
        name = _SECRET_ENV.format(self.role.upper())
        secret = self.environ.get(name)
        if not secret:
            raise ValueError(f"CURVE is on but this {self.role} has no secret key: {name} is not set in its "
                             "environment (the session hands it over)")
        return secret.encode("ascii")

    def start(self, ctx: zmq.Context, rejects) -> Optional["Guard"]:
        """The process's Guard when it serves CURVE (None otherwise); refusals go to `rejects` (a RejectLog)."""
        if not self.serve:
            return None
        from ..wire import MalformedMessage

        return Guard(ctx, self.secret(), self.keys, lambda reason, detail: rejects.reject(MalformedMessage(reason, detail)))

    def client(self, sock: zmq.Socket, server_role: str) -> zmq.Socket:
        """Make `sock`, before its connect, a CURVE client of `server_role`'s server if that one uses CURVE."""
        if server_role in self.servers:
            secret = self.secret()
            sock.curve_secretkey = secret
            sock.curve_publickey = zmq.curve_public(secret)
            sock.curve_serverkey = self.keys[server_role].encode("ascii")
        return sock


def server(guard: Optional["Guard"], sock: zmq.Socket, watch: bool = True) -> zmq.Socket:
    """`Guard.server` when CURVE is on; the socket unchanged otherwise."""
    return guard.server(sock, watch) if guard is not None else sock


def client(curve: Optional[Curve], sock: zmq.Socket, server_role: str) -> zmq.Socket:
    """`Curve.client` when CURVE is configured; the socket unchanged otherwise."""
    return curve.client(sock, server_role) if curve is not None else sock


class Guard:
    """One process's CURVE: its ZAP authenticator, its own keys, and the count of rejected peers.

    ``reject(reason, detail)`` is called (from a helper thread) for every refused connection.
    Call `stop` before the context is terminated.
    """

    def __init__(self, ctx: zmq.Context, secret: bytes, allowed: Mapping[str, str],
                 reject: Callable[[str, str], None]):
        self.secret = secret
        self.public = zmq.curve_public(self.secret)
        self.allowed = {key.encode("ascii") for key in allowed.values()}
        self._reject = reject
        self.auth = ThreadAuthenticator(ctx, log=logging.getLogger(__name__ + ".zap"))
        self.auth.start()
        for domain in (_WATCHED, _UNWATCHED):  # pyzmq looks providers up by the socket's exact domain
            self.auth.configure_curve_callback(domain, credentials_provider=self)
        self._monitors: list[zmq.Socket] = []
        self._watcher: Optional[threading.Thread] = None
        self._stopping = threading.Event()

    def callback(self, domain: str, key: bytes) -> bool:
        """The ZAP decision: the session's keys only."""
        key = key if isinstance(key, bytes) else str(key).encode("ascii")
        ok = key in self.allowed
        if not ok and domain == _UNWATCHED:
            self._reject("unauthenticated", "a peer with a key that is not the session's")
        return ok

    def server(self, sock: zmq.Socket, watch: bool = True) -> zmq.Socket:
        """Make a socket, before its bind, a CURVE server for the session's keys.

        ``watch`` counts handshakes that fail for want of CURVE too (a socket monitor); leave it
        off for a socket that has its own monitor (a socket has at most one).
        """
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        sock.zap_domain = (_WATCHED if watch else _UNWATCHED).encode()
        if watch:
            self._monitors.append(sock.get_monitor_socket(_FAILED))
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, name="curve-monitor", daemon=True)
                self._watcher.start()
        return sock

    def _watch(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        try:
            while not self._stopping.is_set():
                poller = zmq.Poller()  # anew each turn: servers made later join in
                for m in list(self._monitors):
                    poller.register(m, zmq.POLLIN)
                for m, _ in poller.poll(100):
                    try:
                        event = recv_monitor_message(m, zmq.NOBLOCK)
                    except zmq.ZMQError:
                        continue
                    if event["event"] & _FAILED:
                        self._reject("unauthenticated", f"a peer at {event['endpoint']!r} failed the CURVE "
                                     f"handshake (no CURVE, or a key that is not the session's)")
        finally:
            for m in list(self._monitors):
                m.close(linger=0)

    def stop(self) -> None:
        """Stop the authenticator and the monitor thread (before the context is terminated)."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(5)
        self._monitors = []
        self.auth.stop()
