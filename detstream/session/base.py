"""What every session workflow shares, without Prefect: open, reserve, follow the nodes, close.

A workflow (streaming, file transfer) is a subclass that adds its own steps between reserve
and collect. Every step records the session's state in etcd; ``close`` leaves no process,
lease or endpoint behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Optional

from ..atomic import write_atomically
from ..backends.base import ComputeBackend, NodeLaunch, Reservation, ReservationError
from .. import reaper
from ..config import SessionSpec
from ..coordination import Coordinator, DetectorBusy, KeepAliveLease
from ..etcd import CoordinationError
from ..output.virtual import VirtualDetectors
from ..processes import ManagedProcess, detstream_argv
from ..secretfiles import write_env_file
from ..services import security
from ..services.endpoints import remove_session_sockets, session_socket_dir
from ..services.serve import SERVICE_LEASE_TTL_S
from ..errors import DetstreamError
from ..progress import report as report_progress
from ..states import TERMINAL_STATES, SessionState
from .lock import LOCK_LEASE_TTL_S, OrchestratorMark, orphaned_sessions, wait_out_dead_holder
from .spec import validate_spec, with_simulator_dark

log = logging.getLogger("detstream.session")



class SessionError(DetstreamError, RuntimeError):
    """A session step failed; ``fallback_reason`` is set when a file-transfer fallback makes sense."""

    def __init__(self, message: str, fallback_reason: Optional[str] = None):
        super().__init__(message)
        self.fallback_reason = fallback_reason


class SessionCancelled(DetstreamError, RuntimeError):
    """The user cancelled the session."""


class SessionIncomplete(SessionError):
    """The scan finished with frames missing; ``summary`` lists them (the outputs were written)."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


@dataclass
class ScanProgress:
    """Frames the nodes have received so far, as etcd reports them."""

    frames_expected: int
    frames_received: int = 0
    per_node: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    live_image: Optional[Path] = None  # the live virtual images, once drawn (streaming sessions)

    @property
    def fraction(self) -> float:
        return self.frames_received / self.frames_expected if self.frames_expected else 1.0


def _detail(job: Reservation) -> str:
    """', <why>' when the backend said why a job failed (exit code, output file)."""
    return f", {job.failure}" if job.failure else ""


class Session:
    """Holds what one session owns (lock lease, reservation, local services) and releases it."""

    workflow: ClassVar[str]
    node_service: ClassVar[str]  # the `detstream` command each reserved node runs
    node_role: ClassVar[str]  # the role its service registers under in etcd
    job_poll_s = 2.0  # how often the node wait asks the backend about the job

    def __init__(self, spec: SessionSpec, coordinator: Coordinator, backend: ComputeBackend,
                 etcd_endpoint: str, overwrite: bool = False, service_env: Optional[dict[str, str]] = None):
        """``service_env`` is added to the environment of every service started here (the etcd login)."""
        self.spec = spec
        self.coord = coordinator
        self.backend = backend
        self.etcd_endpoint = etcd_endpoint
        self.overwrite = overwrite
        self.service_env = service_env or {}
        self.sid = spec.session_id
        self.paths = spec.paths
        self.lock_lease: Optional[KeepAliveLease] = None
        self.reservation: Optional[Reservation] = None
        self.local: list[ManagedProcess] = []
        self.timings: dict[str, float] = {}
        self.fallback_reason: Optional[str] = None
        self.opened = False  # past open(): the session folder and etcd keys are this session's
        self.lock_lost: Optional[str] = None  # who took the detector while etcd had lost our lease
        self._seen_nodes: set[str] = set()  # nodes whose service has registered at some point
        self.etcd_unrecorded: Optional[str] = None  # why the end state could not be written to etcd
        self.etcd_lost: Optional[str] = None  # why etcd is unreachable now (past its outage budget)
        self._last_progress: Optional[ScanProgress] = None
        self.closed = False
        self.mark = OrchestratorMark(self.paths)  # tells a later run in this folder whether we died
        self._t0 = time.time()

    # -- shared steps ------------------------------------------------------------------------
    def open(self) -> None:
        """Validate, take the detector lock, record the spec; fails at once if the detector is busy."""
        validate_spec(self.spec)
        self.backend.check_request(self.spec.nodes, self.spec.workers_per_node)
        out = self.paths.root
        if out.exists() and any(out.iterdir()) and not self.overwrite:
            raise FileExistsError(f"session {self.sid} already has output in {out}; pass overwrite=True "
                                  "(--overwrite) to replace it")
        self._retire_dead_predecessor()
        self.lock_lease = self.coord.lease(LOCK_LEASE_TTL_S, on_regrant=self._on_lock_regrant)
        try:
            try:
                self.coord.lock_detector(self.spec.detector, self.sid, self.lock_lease)
            except DetectorBusy:
                # A retry right after a crash: a dead holder's lease is waited out, a live one refused.
                if wait_out_dead_holder(self.coord, self.spec.detector) is None:
                    raise
                self._retire_dead_predecessor()
                self.coord.lock_detector(self.spec.detector, self.sid, self.lock_lease)
        except BaseException:
            self.lock_lease.revoke()
            self.lock_lease = None
            self.closed = True
            raise
        for dead in orphaned_sessions(self.paths.root.parent):
            log.warning("session %s's orchestrator died before it ended; its counted frames can be "
                        "accounted for with: detstream salvage %s", dead.name, dead)
        if self.overwrite:
            shutil.rmtree(out, ignore_errors=True)
        self.spec = with_simulator_dark(self.spec)
        if self.spec.transport == "auto":  # the backend knows whether the nodes share this host
            self.spec = self.spec.model_copy(update={"transport": self.backend.transport})
        reaper.track_dir(session_socket_dir(self.sid, create=False))  # its services' ipc sockets, if killed
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.mark.hold()
        write_atomically(self.paths.spec, self.spec.model_dump_json(indent=2))
        self.coord.put_spec(self.sid, json.loads(self.spec.model_dump_json()))
        self.coord.set_state(self.sid, SessionState.REQUESTED)
        self.coord.set_expected(self.sid, self.spec.scan_number, self.spec.frames_expected)
        self.coord.put_alive(self.sid, self.lock_lease)
        self.coord.put_public_keys(self.sid, security.public_keys(self.service_env))
        self.opened = True

    def spec_for_merge(self) -> SessionSpec:
        """The spec the merge takes: with no disk given, the one the nodes agreed on in etcd for
        the live images, so that the live images at the end equal ``stem/images`` (the merge
        would otherwise find its own from the whole scan, a pixel or so away)."""
        v = self.spec.virtual
        if v.center is not None or not (v.live and self.spec.counting.enabled):
            return self.spec
        try:
            record = self.coord.live_detectors(self.sid)
            detectors = VirtualDetectors.from_dict(record) if record else None
        except (CoordinationError, ValueError) as err:
            log.warning("session %s: the live images' disk is unreadable (%s); the merge finds its own", self.sid, err)
            return self.spec
        if detectors is None:
            return self.spec
        virtual = v.model_copy(update={"center": detectors.center, "bf_radius": detectors.bf_radius,
                                       "adf_inner": detectors.adf_inner, "adf_outer": detectors.adf_outer})
        return self.spec.model_copy(update={"virtual": virtual})

    def _on_lock_regrant(self, lease, lost: dict) -> None:
        """etcd lost our lease in an outage; if another session took the detector meanwhile, we stop."""
        key = self.coord.lock_key(self.spec.detector)
        if key in lost:
            holder = lost[key]
            self.lock_lost = holder.decode("utf-8", "replace") if isinstance(holder, bytes) else str(holder)
            log.error("session %s lost detector %s to session %s during an etcd outage",
                      self.sid, self.spec.detector, self.lock_lost)

    def _retire_dead_predecessor(self, wait_s: float = 15.0) -> None:
        """If the detector's last session never ended and nothing holds the lock, its orchestrator
        died: wait for its services to stop (or refuse), then mark it abandoned and salvage it."""
        prev = self.coord.last_session(self.spec.detector)
        if prev is None or prev == self.sid or self.coord.lock_holder(self.spec.detector) is not None:
            return
        state = self.coord.get_state(prev)
        if state is None or state in TERMINAL_STATES:
            return
        from ..salvage import mark_abandoned, record_from_summary, salvage_session

        spec = self.coord.get_spec(prev) or {}
        folder = Path(spec.get("output_dir", "")) / prev
        if record_from_summary(self.coord, folder) is not None:
            return  # it ended, but while etcd was gone: its state is recorded now
        deadline = time.monotonic() + wait_s
        while (running := self.coord.live_services(prev)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if running:
            raise DetectorBusy(self.spec.detector, f"{prev} (its orchestrator is gone but "
                               f"{', '.join(running)} still run)")
        reason = f"orchestrator gone; found by session {self.sid}"
        mark_abandoned(self.coord, prev, reason)
        if (folder / "spec.json").exists():
            try:
                salvage_session(folder, self.coord, reason)
                log.warning("session %s was abandoned; its counted frames were salvaged in %s", prev, folder)
            except Exception as err:  # the new session must not fail for the old one's debris
                log.warning("session %s was abandoned; salvaging %s failed: %s", prev, folder, err)

    def reserve(self, timeout_s: float) -> Reservation:
        """Reserve the nodes, each running ``node_service``, and wait until the job runs."""
        self.coord.set_state(self.sid, SessionState.RESERVING, f"{self.spec.nodes} nodes on {self.backend.name}")
        t0 = time.time()
        launch = NodeLaunch(service=self.node_service, session_id=self.sid,
                            etcd_endpoint=self.etcd_endpoint, etcd_prefix=self.spec.etcd_prefix)
        if self.backend.needs_env_file and self.service_env:
            launch.env_file = str(write_env_file(self.paths.node_env.resolve(), self.service_env))
        try:
            self.reservation = self.backend.reserve(self.spec.nodes, launch)
            self._record_job()
            self.reservation = self.backend.wait_running(self.reservation, timeout_s)
        except ReservationError as err:
            raise SessionError(f"node reservation failed: {err}", fallback_reason=f"reservation: {err}") from err
        finally:
            self._record_job()
            self.timings["reserve_s"] = time.time() - t0
        return self.reservation

    def progress(self) -> ScanProgress:
        """What etcd says the nodes received; while etcd is gone, the last count it gave."""
        try:
            per_node = self._from_etcd(self.coord.received, self.sid, self.spec.scan_number)
        except CoordinationError:
            last = self._last_progress or ScanProgress(self.spec.frames_expected)
            return ScanProgress(last.frames_expected, last.frames_received, last.per_node,
                                time.time() - self._t0)
        # After a re-route a lost node's count and its survivors' overlap: never past the scan.
        received = min(sum(per_node.values()), self.spec.frames_expected)
        self._last_progress = ScanProgress(self.spec.frames_expected, received, per_node, time.time() - self._t0)
        return self._last_progress

    def _from_etcd(self, call, *args):
        """One read on the session's path; notes when etcd is gone past its budget, and when back."""
        try:
            value = call(*args)
        except CoordinationError as err:
            if self.etcd_lost is None:
                log.error("session %s: etcd unreachable past its outage budget (%s); the data plane goes "
                          "on, and completion is read from the nodes' reports in %s",
                          self.sid, err, self.paths.services)
            self.etcd_lost = str(err)
            raise
        if self.etcd_lost is not None:
            log.warning("session %s: etcd reachable again", self.sid)
            self.etcd_lost = None
        return value

    def follow_nodes(self, on_progress: Optional[Callable[[ScanProgress], None]] = None,
                     cancelled: Optional[Callable[[], bool]] = None, poll_s: float = 0.5,
                     finish_timeout_s: float = 120.0,
                     on_local_done: Optional[Callable[[], None]] = None) -> ScanProgress:
        """Wait until the scan is finished (see :meth:`scan_finished`); raise on cancellation, a failed
        service, the job ending with nodes unaccounted for, or a stall. ``on_local_done`` runs once
        when every local service has exited 0."""
        last_count, last_change = -1, time.monotonic()
        local_done = False
        last_job_poll = 0.0
        while True:
            prog = self.progress()
            report_progress(prog)
            if on_progress is not None:
                on_progress(prog)
            if cancelled is not None and cancelled():
                raise SessionCancelled("cancelled by the user")
            if self.lock_lost is not None:
                raise SessionError(f"detector {self.spec.detector} was taken by session {self.lock_lost} "
                                   "while etcd had lost this session's lease")
            if self.scan_finished():
                final = self.progress()  # what every node reported, shown once more at the end
                report_progress(final)
                if on_progress is not None:
                    on_progress(final)
                return final
            failed = [p for p in self.local if p.poll() not in (None, 0)]
            if failed:
                names = ", ".join(f"{p.name} (exit {p.poll()}): {p.log_tail(3)}" for p in failed)
                silent = any(not p.log_tail(3).strip() for p in failed)
                raise SessionError(f"service failed: {names}{self._node_errors()}{self._disk_note(always=silent)}",
                                   fallback_reason=f"service failed: {names}")
            if not local_done and self.local and all(p.poll() == 0 for p in self.local):
                local_done = True
                if on_local_done is not None:
                    on_local_done()
            if self.reservation is not None and time.monotonic() - last_job_poll >= self.job_poll_s:
                last_job_poll = time.monotonic()
                self._check_job(poll_s)
            if prog.frames_received != last_count:
                last_count, last_change = prog.frames_received, time.monotonic()
            elif time.monotonic() - last_change > self.spec.stall_timeout_s + finish_timeout_s:
                raise SessionError(f"stream stalled at {prog.frames_received}/{prog.frames_expected} frames",
                                   fallback_reason="stalled")
            time.sleep(poll_s)

    def scan_finished(self) -> bool:
        """Every node has published its done record in etcd, or is gone (it registered, then its
        lease expired) while every local service has finished: a lost node's share was
        re-routed, or is missing."""
        nodes = {f"node-{i}" for i in range(self.spec.nodes)}
        try:
            open_nodes = nodes - set(self._from_etcd(self.coord.nodes_done, self.sid))
            if not open_nodes:
                return True
            alive = set(self._from_etcd(self.coord.services, self.sid, self.node_role))
        except CoordinationError:
            # etcd gone for good: a node's report in the session folder is its done record, and
            # with every local service finished nothing more will come.
            reported = {p.stem.removeprefix(f"{self.node_role}-") for p in self.paths.reports(self.node_role)}
            local_over = all(p.poll() is not None for p in self.local)
            return nodes <= reported or (local_over and self._job_over())
        self._seen_nodes |= alive
        if not self.local or any(p.poll() != 0 for p in self.local):
            return False
        # Gone means registered once and its lease now expired: not a node still starting.
        return open_nodes <= self._seen_nodes - alive

    def note_state(self, state: SessionState, reason: Optional[str] = None) -> None:
        """Record a step of the scan in etcd; while etcd is gone, the scan goes on without it."""
        try:
            self._from_etcd(self.coord.set_state, self.sid, state, reason)
        except CoordinationError:
            pass

    def _job_over(self) -> bool:
        """The compute job has ended (or there is none); unknown counts as not over."""
        if self.reservation is None:
            return True
        try:
            return self.backend.poll(self.reservation).state.finished
        except ReservationError:
            return False

    def _check_job(self, poll_s: float) -> None:
        """Fail if the compute job has ended with nodes unaccounted for and nothing local to wait on."""
        try:
            job = self.backend.poll(self.reservation)
        except ReservationError as err:  # state unknown for now (e.g. API hiccup), not failed
            log.warning("could not poll job %s: %s", self.reservation.job_id, err)
            return
        if job.state.finished:
            if any(p.poll() is None for p in self.local):
                return  # the aggregator may still be re-routing a lost node's share
            # A last done record may be landing, and a killed node's lease takes its TTL to expire.
            deadline = time.monotonic() + SERVICE_LEASE_TTL_S + 2 * poll_s
            while not self.scan_finished() and time.monotonic() < deadline:
                time.sleep(poll_s)
            if not self.scan_finished():
                raise SessionError(f"compute job {job.job_id} ({job.backend}) ended "
                                   f"({job.scheduler_state or job.state.value}{_detail(job)}) "
                                   f"before every node reported{self._node_errors()}{self._disk_note()}")

    def _disk_note(self, always: bool = False) -> str:
        """A service that could not write, not even its log, often met a full disk: say how full
        the session's disk is (always, when ``always``; else only when it is nearly full)."""
        try:
            free = shutil.disk_usage(self.paths.root).free
        except OSError:
            return ""
        if free < (1 << 20):
            return f"; the disk holding {self.paths.root} is full ({free} bytes free)"
        return f"; the disk holding {self.paths.root} has {free / 2**20:.1f} MiB free" if always else ""

    def _node_errors(self) -> str:
        """The last error line of each node's log in the session folder, if any (e.g. a full disk)."""
        found = []
        for log_path in sorted(self.paths.logs.glob("distributor-*.log")):
            try:
                lines = log_path.read_text(errors="replace").splitlines()[-20:]
            except OSError:
                continue
            errors = [ln.strip() for ln in lines if "Error" in ln or "error" in ln or "not enough space" in ln]
            if errors:
                found.append(f"{log_path.stem}: {errors[-1]}")
        return "; " + "; ".join(found) if found else ""

    # -- helpers for the workflows' own steps ------------------------------------------------
    def _record_job(self) -> None:
        if self.reservation is not None:
            self.coord.put_job(self.sid, json.loads(self.reservation.model_dump_json()))

    def _start_local(self, role: str, name: str, *args: str) -> ManagedProcess:
        proc = ManagedProcess(
            detstream_argv(role, "--session", self.sid, "--etcd", self.etcd_endpoint,
                           "--prefix", self.spec.etcd_prefix, *args),
            self.paths.log(role, name), env=self.service_env, name=f"{role}-{name}").start()
        self.local.append(proc)
        return proc

    def _await_nodes(self, timeout_s: float) -> dict:
        """Wait for every node's service to register; give up early if the job has ended."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.coord.wait_for_services(self.sid, "distributor", self.spec.nodes,
                                                    min(2.0, max(0.0, deadline - time.monotonic())))
            except TimeoutError as err:
                job = self.backend.poll(self.reservation) if self.reservation is not None else None
                if job is not None and (job.state.finished or job.failure):
                    how = "ended" if job.state.finished else "lost a node"
                    msg = (f"distributors did not register: {job.backend} job {job.job_id} {how} "
                           f"({job.scheduler_state or job.state.value}{_detail(job)}) first; see {self.paths.logs}")
                    raise SessionError(msg, fallback_reason=f"registration: {msg}") from err
                if time.monotonic() >= deadline:
                    where = (f" ({job.backend} job {job.job_id}: {job.scheduler_state or job.state.value})"
                             if job else "")
                    raise SessionError(f"distributors did not register: {err}{where}",
                                       fallback_reason=f"registration: {err}") from err

    # -- release -----------------------------------------------------------------------------
    drain_s = 10.0  # at most this long for stopped nodes to flush their parts before release

    def _let_nodes_finish(self, timeout_s: float) -> None:
        """Wait until every node still alive (its leased key present) has written its report."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                alive = self.coord.services(self.sid, "distributor")
            except Exception:  # etcd gone: nothing to wait on
                return
            reported = {p.stem.removeprefix("distributor-") for p in self.paths.reports("distributor")}
            if set(alive) <= reported:
                return
            time.sleep(0.2)

    def close(self, state: SessionState, reason: Optional[str] = None, result: Optional[dict] = None) -> None:
        """Stop everything this session holds, record the final state; safe to call twice.

        Processes and the reservation are released even when etcd cannot be reached; what could
        not be recorded there is kept in ``etcd_unrecorded`` (the summary says so).
        """
        if self.closed:
            return
        self.closed = True
        if state != SessionState.COMPLETED:
            # Tell the services to stop, and give the nodes a moment to make their parts
            # durable and report, before their job is cancelled.
            if self._in_etcd(self.coord.set_state, self.sid, state, reason):
                self._let_nodes_finish(self.drain_s)
        for p in self.local:
            p.stop()
        if self.reservation is not None:
            self.reservation = self.backend.release(self.reservation)
            self._in_etcd(self._record_job)
        if result is not None:
            self._in_etcd(self.coord.put_result, self.sid, result)
        self._in_etcd(self.coord.cleanup_session, self.sid)
        self.paths.node_env.unlink(missing_ok=True)
        remove_session_sockets(self.sid)
        if state == SessionState.COMPLETED:
            self._in_etcd(self.coord.set_state, self.sid, state, reason)
        self._in_etcd(self.coord.unlock_detector, self.spec.detector, self.sid)
        if self.lock_lease is not None and not self._in_etcd(self.lock_lease.revoke):
            # etcd is gone: stop refreshing all the same, or the lease's thread would go on for the
            # life of this process and, once etcd returned, take the detector back for a session
            # that has ended.
            self.lock_lease.stop()
        self.mark.release()

    def _in_etcd(self, call, *args) -> bool:
        """Run one etcd step of the release; if etcd is gone, note it and go on releasing."""
        if self.etcd_unrecorded is not None:
            return False  # gone past its budget once already: do not wait for it at every step
        try:
            call(*args)
            return True
        except CoordinationError as err:
            if self.etcd_unrecorded is None:
                log.error("session %s: etcd unreachable while releasing (%s); the state is in summary.json",
                          self.sid, err)
                self.etcd_unrecorded = str(err)
            return False
