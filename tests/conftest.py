"""Shared pytest fixtures: one private etcd for the whole test session, a Coordinator per test."""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Callable, Optional, TypeVar

import pytest

# No telemetry: this machine has no internet, and Prefect reads these at import time.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"

from detstream.coordination import Coordinator  # noqa: E402
from detstream.etcd_server import EmbeddedEtcd  # noqa: E402
from detstream.processes import wait_until as _wait_until  # noqa: E402

T = TypeVar("T")

KINDS = ("unit", "e2e", "ui", "chaos")


def pytest_collection_modifyitems(config, items) -> None:
    """Every test has one kind: modules under tests/flows/ are ``e2e`` unless marked otherwise,
    and a test with no kind marker is ``unit`` (``make test-fast`` runs only those)."""
    for item in items:
        if any(item.get_closest_marker(k) for k in KINDS):
            continue
        in_flows = "flows" in item.path.relative_to(config.rootpath / "tests").parts[:-1]
        item.add_marker("e2e" if in_flows else "unit")


# --- skips: on CI none, but the logos' downloads ---------------------------------------------

# The one skip CI allows: the block-logo check's download, on a machine without the internet.
NO_INTERNET = "no internet: "
# CI as .ci/run makes it: root, with the Debian packages the browser and Slurm tests need.
CI_PROGRAMS = ("/usr/bin/chromium", "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged")


def strict_skips() -> bool:
    """Whether this machine is CI-like, where every test must run (a skip there would hide a failure)."""
    return os.geteuid() == 0 and all(os.path.exists(p) for p in CI_PROGRAMS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a CI-like machine a skip is a failure, except a logo download without the internet."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and strict_skips():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not reason.startswith(("Skipped: " + NO_INTERNET, NO_INTERNET)):
            report.outcome = "failed"
            report.longrepr = (f"skipped on a CI-like machine (root, {', '.join(CI_PROGRAMS)} installed), "
                               f"where every test must run: {reason}")


def wait_until(
    predicate: Callable[[], Optional[T]], timeout_s: float = 10.0, interval_s: float = 0.05, what: str = "condition"
) -> T:
    """detstream.processes.wait_until, failing the test (not erroring) at the deadline."""
    try:
        return _wait_until(predicate, timeout_s, interval_s, what)
    except TimeoutError as err:
        pytest.fail(str(err))


@pytest.fixture(name="wait_until")
def wait_until_fixture() -> Callable[..., object]:
    """The `wait_until(predicate, timeout_s=10, interval_s=0.05, what=...)` helper, as a fixture."""
    return wait_until


@pytest.fixture(scope="session")
def etcd_server():
    """One EmbeddedEtcd for the whole test session; stopped (data dir removed) at the end, also on failure."""
    with EmbeddedEtcd(unsafe_no_fsync=True) as etcd:
        yield etcd


@pytest.fixture
def etcd_prefix() -> str:
    """A key prefix unique to this test, so tests never see each other's keys."""
    return f"/detstream-test/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def coordinator(etcd_server, etcd_prefix):
    """A Coordinator on the session etcd, under this test's unique prefix."""
    with Coordinator(etcd_server.endpoint, prefix=etcd_prefix) as coord:
        yield coord


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's own test server (temporary SQLite database) for every flow run in the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# Processes that outlive single tests on purpose (a session-wide fixture's helpers), not strays.
SESSION_HELPERS: set[int] = set()


def detstream_children():
    """This test process's descendants that run detstream services (not etcd, not Prefect's server)."""
    import psutil

    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid in SESSION_HELPERS:
                continue
            if "-m detstream" in " ".join(child.cmdline()) and "etcd" not in child.name():
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


@contextlib.contextmanager
def cancel_on_first_progress():
    """Within: the first progress report of a flow run asks Prefect to cancel that run (as the UI would)."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    from prefect.states import Cancelling

    from detstream import progress

    asked = []

    def listener(_progress):
        if not asked:
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(FlowRunContext.get().flow_run.id, Cancelling(), force=True)
            asked.append(True)
    progress.LISTENERS.append(listener)
    try:
        yield
    finally:
        progress.LISTENERS.remove(listener)


# --- leaks: every process a test starts is gone at its end ------------------------------------

_PR_SET_CHILD_SUBREAPER = 36  # prctl(2)
_subreaper_users = 0


def _child_subreaper(on: bool) -> None:
    """Make this process the one orphans of its descendants are re-parented to (not init), so a
    counting worker whose distributor was killed with SIGKILL is still found among them."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def _ids(pid: int) -> Optional[tuple[int, int]]:
    """(session id, process group id) of ``pid``, or None once it is gone."""
    try:
        return os.getsid(pid), os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


class ProcessLedger:
    """The processes a test starts, found by session and process group.

    While a ledger is open this process is a child subreaper, so every process the test starts
    stays a descendant of it, even an orphan whose parent was killed (a counting worker of a
    distributor killed with SIGKILL, the services of a killed ``detstream run``). A process the
    test started is a descendant that was not there when the ledger opened; every service runs
    in its own session, so the sessions and process groups of those are the test's too, and any
    process in one of them (wherever its parent is) is the test's. Not counted: processes that
    outlive tests on purpose (``SESSION_HELPERS``, multiprocessing's resource tracker, which
    serves this process), and zombies (dead, waiting for this process to reap them)."""

    def __init__(self) -> None:
        import psutil

        global _subreaper_users
        if _subreaper_users == 0:
            _child_subreaper(True)
        _subreaper_users += 1
        self.me = psutil.Process()
        self.own_ids = _ids(os.getpid())
        self.before = {self._key(p) for p in self._descendants()}
        self.sessions: set[int] = set()  # sessions and groups seen among the test's processes
        self.groups: set[int] = set()
        self.closed = False

    @staticmethod
    def _key(p) -> tuple:
        try:
            return p.pid, p.create_time()
        except Exception:  # gone
            return p.pid, None

    def _descendants(self) -> list:
        import psutil

        try:
            return self.me.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def _exempt(self) -> set[int]:
        from multiprocessing import resource_tracker

        tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
        return set(SESSION_HELPERS) | ({tracker} if tracker else set())

    def started(self) -> list:
        """The live processes this test started and that are still running."""
        import psutil

        exempt = self._exempt()
        found = {}
        for p in self._descendants():
            if p.pid in exempt or self._key(p) in self.before:
                continue
            ids = _ids(p.pid)
            if ids:
                found[p.pid] = p
                self.sessions.add(ids[0])
                self.groups.add(ids[1])
        # Members of those sessions and groups wherever they are (not this process's own).
        theirs = (self.sessions | self.groups) - set(self.own_ids)
        if theirs:
            for p in psutil.process_iter():
                ids = _ids(p.pid)
                if ids and p.pid not in found and p.pid not in exempt and p.pid != self.me.pid \
                        and (ids[0] in theirs or ids[1] in theirs) and self._key(p) not in self.before:
                    found[p.pid] = p
        live = []
        for p in found.values():
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    live.append(p)
            except psutil.NoSuchProcess:
                pass
        return live

    @staticmethod
    def describe(procs) -> list[str]:
        """pid, session, group, parent and command line of each, for a failure message."""
        import psutil

        out = []
        for p in procs:
            try:
                sid, pgid = _ids(p.pid) or (None, None)
                out.append(f"{p.pid} (session {sid}, group {pgid}, parent {p.ppid()}): {' '.join(p.cmdline())[:200]}")
            except psutil.NoSuchProcess:
                pass
        return out

    def leaks(self, grace_s: float = 10.0) -> list[str]:
        """What the test left running once ``grace_s`` has passed for it to stop (a process still
        shutting down when the test returns is given that long): killed, and described."""
        try:
            _wait_until(lambda: not self.started(), grace_s, 0.1, "the test's processes to exit")
            return []
        except TimeoutError:
            left = self.started()
            described = self.describe(left)
            for p in left:
                try:
                    p.kill()
                except Exception:  # already gone
                    pass
            return described
        finally:
            self.close()

    def close(self) -> None:
        global _subreaper_users
        if not self.closed:
            self.closed = True
            _subreaper_users -= 1
            if _subreaper_users == 0:
                _child_subreaper(False)


@pytest.fixture
def process_ledger():
    """The test's processes (ProcessLedger); any still running at its end fails the test."""
    ledger = ProcessLedger()
    yield ledger
    left = ledger.leaks()
    assert not left, f"processes the test started are still running (killed now): {left}"


@pytest.fixture
def no_stray_services(process_ledger):
    """Every process a session starts (services, their counting workers, orphans of a killed
    one, helpers) is gone when the test ends; a leak is killed and fails the test."""
    yield


# --- a real Prefect server with detstream's deployments (tests/prefect_server.py) ---------------

@pytest.fixture(scope="session")
def prefect_deployments(tmp_path_factory):
    """A real `prefect server start` (own PREFECT_HOME and SQLite database, telemetry off) with
    detstream's deployments registered by `detstream deploy`; stopped at the end, also on failure.
    ``.output`` is where the deployments write; ``.deploy_output`` what `detstream deploy` printed."""
    from prefect_server import PrefectServer

    base = tmp_path_factory.mktemp("prefect-deployments")
    with PrefectServer(base / "server") as server:
        server.output = base / "deployed-runs"
        server.deploy_output = server.deploy(server.output)
        yield server


@pytest.fixture(scope="session")
def deployment_runs(prefect_deployments, tmp_path_factory):
    """The streaming-session deployment (8x8 scan, output in tmp) and the nightly health check
    (8x8), triggered together through the API and run by a process worker, stopped afterwards.
    ``{"streaming": flow run, "nightly": flow run, "history": {...}, "output": Path}``."""
    from prefect_server import NIGHTLY, STREAMING, run_deployments

    out = tmp_path_factory.mktemp("triggered")
    runs = run_deployments(prefect_deployments, {
        "streaming": (STREAMING, {"scan_width": 8, "scan_height": 8, "output_dir": str(out)}),
        "nightly": (NIGHTLY, {"scan_width": 8, "scan_height": 8}),
    })
    runs["output"] = out
    return runs


@pytest.fixture
def emu(tmp_path):
    """A Superfacility API emulator on loopback; its job processes are checked gone after the test."""
    from detstream_testing.sfapi_emulator import EmulatorServer

    with EmulatorServer(workdir=tmp_path / "emu", kill_grace=1.0) as server:
        yield server
    leftovers = {j.jobid: server.app_state.runner.live_pids(j.jobid) for j in server.app_state.runner.jobs()}
    assert not any(leftovers.values()), f"job processes survived the emulator: {leftovers}"


# --- a real Slurm cluster (tests/slurm_cluster.py) ----------------------------------------------

@pytest.fixture(scope="session")
def slurm_cluster():
    """munge + slurmctld + 4 slurmd on loopback, shared by the whole test session; every job is
    cancelled and every daemon stopped by its PID at the end, also on failure. Skips only where
    the Debian packages (slurmctld slurmd slurm-client munge; .ci/run installs them) are absent."""
    from slurm_cluster import SlurmCluster, missing_programs

    missing = missing_programs()
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing): "
                    "apt-get install slurmctld slurmd slurm-client munge")
    with SlurmCluster(nodes=4) as cluster:
        SESSION_HELPERS.add(cluster.reaper_pid)
        yield cluster


@pytest.fixture
def slurm(slurm_cluster):
    """The shared cluster with every node idle; after the test its jobs are cancelled and none of
    their processes may be left."""
    if any(s != "idle" for s in slurm_cluster.node_states().values()):
        slurm_cluster.cancel_all()
        slurm_cluster.resume()
    yield slurm_cluster
    left = slurm_cluster.jobs()
    slurm_cluster.cancel_all()
    procs = slurm_cluster.job_processes()
    for p in procs:
        p.kill()
    assert not left, f"Slurm jobs left running after the test: {left}"
    assert not procs, f"Slurm job processes left running: {[p.pid for p in procs]}"
