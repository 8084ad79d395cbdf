"""A real Prefect server and process worker for the deployment and UI tests.

Each runs in its own process group with its own PREFECT_HOME (the server's SQLite database
inside it), telemetry off, on a free loopback port; :func:`stop_tree` stops a process with
every descendant it had (a flow run's process starts its own group) and checks with psutil
that none is left. Nothing here sleeps for a fixed time: every wait has a condition and a
deadline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Optional

import psutil

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "detstream"
STREAMING = "streaming-session/4dcamera"
NIGHTLY = "compare-workflows/nightly-health-check"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any PREFECT_* setting (a test harness may have set some), with
    telemetry off and ``extra`` added."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str,
             alive: Optional[subprocess.Popen] = None, log: Optional[Path] = None,
             interval_s: float = 0.2):
    """``predicate()`` once truthy; an error naming ``what`` after ``timeout_s``, or as soon as
    ``alive`` has exited (with the end of its ``log``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {alive.returncode}\n{tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}\n{tail(log)}")
        time.sleep(interval_s)


def tail(log: Optional[Path], lines: int = 40) -> str:
    if log is None or not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def start(cmd: list[str], env: dict, log: Path, cwd: Path) -> subprocess.Popen:
    """``cmd`` in a new process group (session), output to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop_tree(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """Stop ``proc``, its process group and every descendant (SIGTERM, then SIGKILL); raise if
    any is still there afterwards."""
    try:
        family = [psutil.Process(proc.pid)]
        family += family[0].children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    groups = {proc.pid}
    for p in family:
        with contextlib.suppress(psutil.Error):
            groups.add(os.getpgid(p.pid))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for g in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(g, sig)
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        _, alive = psutil.wait_procs(family, timeout=timeout_s if sig == signal.SIGTERM else 5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.1)
        if not alive and proc.poll() is not None:
            break
    left = [p for p in family if _alive(p)]
    if left:
        raise RuntimeError(f"processes still running after stop: {[p.pid for p in left]}")


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class PrefectServer:
    """``prefect server start`` on a free loopback port, with the V1 UI as its default UI.

    The V2 UI's bundle starts an analytics client that fetches its configuration from the
    internet on every page load whatever the server's analytics setting; V1 makes no outside
    request. The scheduler service is off so that the nightly schedule makes no run in a test.
    """

    def __init__(self, home: Path, startup_timeout_s: float = 180.0):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.url}/api"
        self.log = home / "server.log"
        self.startup_timeout_s = startup_timeout_s
        self.proc: Optional[subprocess.Popen] = None
        self.workers: list[subprocess.Popen] = []

    def client_env(self, home: Path, **extra: str) -> dict[str, str]:
        """Environment for a Prefect client process (CLI, worker) talking to this server."""
        home.mkdir(parents=True, exist_ok=True)
        return clean_env(PREFECT_API_URL=self.api_url, PREFECT_HOME=str(home), **extra)

    def __enter__(self) -> "PrefectServer":
        self.home.mkdir(parents=True, exist_ok=True)
        env = clean_env(
            PREFECT_HOME=str(self.home / "home"),
            PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{self.home / 'prefect.db'}",
            PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(self.port),
            PREFECT_UI_API_URL=self.api_url, PREFECT_UI_ENABLED="true",
            PREFECT_SERVER_UI_V2_ENABLED="false", PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false",
            PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false")
        self.proc = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                           "--port", str(self.port)], env, self.log, self.home)
        try:
            wait_for(self.healthy, self.startup_timeout_s, f"Prefect server on {self.url}",
                     alive=self.proc, log=self.log, interval_s=0.5)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def __exit__(self, *exc) -> None:
        for w in self.workers:
            stop_tree(w)
        self.workers.clear()
        if self.proc is not None:
            stop_tree(self.proc)
            self.proc = None

    def settings(self):
        """A context in which this process's Prefect client (get_client, run_deployment) uses this server."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        return temporary_settings(updates={PREFECT_API_URL: self.api_url})

    def deploy(self, output: Path, timeout_s: float = 180.0) -> str:
        """``detstream deploy --output OUTPUT`` against this server; its output."""
        out = subprocess.run([str(BIN / "detstream"), "deploy", "--output", str(output)],
                             env=self.client_env(self.home / "client", COLUMNS="200"), cwd=REPO,
                             capture_output=True, text=True, timeout=timeout_s)
        if out.returncode != 0:
            raise RuntimeError(f"detstream deploy failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out.stdout + out.stderr

    @contextlib.contextmanager
    def worker(self, pool: str = POOL, timeout_s: float = 120.0) -> Iterator[subprocess.Popen]:
        """``prefect worker start --pool POOL`` (polling every second), online when this yields;
        stopped with its flow runs' processes on exit."""
        wdir = self.home / "worker"
        wdir.mkdir(exist_ok=True)
        log = self.home / "worker.log"
        env = self.client_env(wdir / "home", PREFECT_WORKER_QUERY_SECONDS="1",
                              PREFECT_WORKER_HEARTBEAT_SECONDS="5")
        proc = start([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
                     env, log, wdir)
        self.workers.append(proc)
        try:
            wait_for(lambda: self._worker_online(pool), timeout_s, f"a worker online in pool {pool!r}",
                     alive=proc, log=log, interval_s=0.5)
            yield proc
        finally:
            self.workers.remove(proc)
            stop_tree(proc)

    def _worker_online(self, pool: str) -> bool:
        from prefect.client.orchestration import get_client

        with self.settings(), get_client(sync_client=True) as client:
            return any(w.status.value == "ONLINE" for w in client.read_workers_for_work_pool(pool))


def run_deployments(server: PrefectServer, requests: dict[str, tuple[str, dict]],
                    timeout_s: float = 420.0) -> dict:
    """Trigger every ``{key: (deployment, parameters)}`` at once through the API
    (``run_deployment``), with a process worker running until all are final (then stopped).
    Returns ``{key: flow run}`` (final state) and, under "history", each run's state history."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    with server.worker():
        with server.settings():
            runs = {key: run_deployment(name, parameters=params, timeout=0)
                    for key, (name, params) in requests.items()}

        def all_final():
            with server.settings(), get_client(sync_client=True) as client:
                now = {k: client.read_flow_run(r.id) for k, r in runs.items()}
            return now if all(r.state is not None and r.state.is_final() for r in now.values()) else None

        final = wait_for(all_final, timeout_s, f"flow runs {sorted(runs)} to finish",
                         log=server.home / "worker.log", interval_s=0.5)
    with server.settings(), get_client(sync_client=True) as client:
        final["history"] = {k: client.read_flow_run_states(r.id) for k, r in runs.items()}
    return final
