"""A private Slurm cluster on loopback: munge, slurmctld and N slurmd (``slurmd -N nX``) in a temp dir.

Debian's Slurm 22.05 runs several slurmd on one host when each has its own node name and port;
``CommunicationParameters=NoInAddrAny`` keeps every daemon on 127.0.0.1. A job_submit.lua
refuses a QOS outside ``qos`` (without accounting Slurm would accept any). Every daemon is
started by us and stopped by its PID; jobs are cancelled first, because job steps (slurmstepd)
outlive a stopped slurmd. ``env`` (SLURM_CONF) must be set for every client command.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import psutil

PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


def missing_programs() -> list[str]:
    """The Slurm and munge programs not installed here (empty: a cluster can start)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    return [p for p in PROGRAMS if shutil.which(p, path=path) is None]


def _which(name: str) -> str:
    found = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))
    if found is None:
        raise FileNotFoundError(f"{name} is not installed (apt-get install slurmctld slurmd slurm-client munge)")
    return found


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


JOB_SUBMIT_LUA = """\
-- Refuse a QOS this cluster does not define (Slurm without accounting accepts any name).
local allowed = {{{allowed}}}
function slurm_job_submit(job_desc, part_list, submit_uid)
  if job_desc.qos ~= nil and not allowed[job_desc.qos] then
    slurm.log_user("Invalid qos specification: " .. job_desc.qos)
    return slurm.ERROR
  end
  return slurm.SUCCESS
end
function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
  return slurm.SUCCESS
end
"""


class SlurmCluster:
    """munged + slurmctld + ``nodes`` slurmd, all on 127.0.0.1, under a fresh temp dir.

        with SlurmCluster(nodes=4) as cluster:
            subprocess.run(["sbatch", ...], env=cluster.client_env())
    """

    def __init__(self, nodes: int = 4, cpus_per_node: int = 4, features: str = "cpu",
                 qos: Sequence[str] = ("normal", "realtime", "debug", "regular"),
                 start_timeout_s: float = 30.0, base_dir: Optional[Path] = None):
        self.node_names = [f"n{i}" for i in range(1, nodes + 1)]
        self.cpus_per_node = cpus_per_node
        self.features = features
        self.qos = list(qos)
        self.start_timeout_s = start_timeout_s
        self._base_parent = base_dir
        self.dir: Optional[Path] = None
        self.procs: dict[str, subprocess.Popen] = {}

    # -- paths and environment -----------------------------------------------------------------

    @property
    def conf(self) -> Path:
        return self.dir / "etc" / "slurm.conf"

    def client_env(self, base: Optional[dict] = None) -> dict:
        """The environment a Slurm client command (sbatch, squeue, ...) needs: SLURM_CONF set."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), *SBIN])
        return env

    def run(self, *argv: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster; its output as text."""
        return subprocess.run([_which(argv[0]), *argv[1:]], env=self.client_env(), capture_output=True,
                              text=True, check=check, timeout=timeout)

    # -- start ---------------------------------------------------------------------------------

    def start(self) -> "SlurmCluster":
        missing = missing_programs()
        if missing:
            raise FileNotFoundError(f"not installed: {', '.join(missing)}")
        self.dir = Path(tempfile.mkdtemp(prefix="detstream-slurm-", dir=self._base_parent))
        try:
            self._layout()
            self._start_munge()
            self._start_daemons()
            self.wait_idle(self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _layout(self) -> None:
        # munged refuses a socket below a directory others cannot traverse.
        for sub in ("etc", "munge", "state", "spool", "log", "run", "jobs"):
            (self.dir / sub).mkdir()
        for path in [self.dir, *(self.dir / s for s in ("etc", "munge", "run", "jobs"))]:
            path.chmod(0o755)
        ctl_port, *node_ports = _free_ports(1 + len(self.node_names))
        d = self.dir
        lines = [
            "ClusterName=detstream-test",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={ctl_port}",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={d / 'munge' / 'munge.socket'}",
            "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}/%n",
            f"SlurmctldPidFile={d / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'run'}/slurmd-%n.pid",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'log'}/slurmd-%n.log",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none", "MpiDefault=none", "ReturnToService=2",
            "MinJobAge=600", "KillWait=2", "EnforcePartLimits=ALL", "InactiveLimit=0",
            "CommunicationParameters=NoInAddrAny", "SlurmdParameters=config_overrides",
            "JobSubmitPlugins=lua",
        ]
        for name, port in zip(self.node_names, node_ports):
            lines.append(f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus_per_node} RealMemory=1000 Features={self.features} State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        allowed = ", ".join(f'["{q}"] = true' for q in self.qos)
        (self.dir / "etc" / "job_submit.lua").write_text(JOB_SUBMIT_LUA.format(allowed=allowed))

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.dir / "log" / f"{name}.out", "ab")
        try:
            proc = subprocess.Popen(argv, env=self.client_env(), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        self.procs[name] = proc
        return proc

    def _start_munge(self) -> None:
        m = self.dir / "munge"
        key = m / "munge.key"
        subprocess.run([_which("mungekey"), "-c", "-k", str(key)], check=True, capture_output=True)
        key.chmod(0o600)
        self._spawn("munged", [_which("munged"), "-F", f"--socket={m / 'munge.socket'}", f"--key-file={key}",
                               f"--pid-file={m / 'munged.pid'}", f"--log-file={self.dir / 'log' / 'munged.log'}",
                               f"--seed-file={m / 'munge.seed'}", "--force"])
        deadline = time.monotonic() + 10
        while not (m / "munge.socket").exists():
            if self.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start: {self.log_tail('munged.log')}")
            time.sleep(0.02)

    def _start_daemons(self) -> None:
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for name in self.node_names:
            self._spawn(f"slurmd-{name}", [_which("slurmd"), "-D", "-N", name, "-f", str(self.conf)])

    def wait_idle(self, timeout_s: float) -> None:
        """Block until every node reads idle in sinfo (RuntimeError with the logs at the deadline)."""
        deadline = time.monotonic() + timeout_s
        states: dict = {}
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}: {self.log_tail(name + '.out')}"
                                       f"{self.log_tail('slurmctld.log')}")
            states = self.node_states()
            if states and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.05)
        raise RuntimeError(f"Slurm nodes not idle within {timeout_s:g} s: {states}; "
                           f"{self.log_tail('slurmctld.log')}")

    def node_states(self) -> dict[str, str]:
        """{node name: sinfo state} (empty while slurmctld does not answer)."""
        try:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=10).stdout
        except subprocess.TimeoutExpired:
            return {}
        return dict(line.split(None, 1) for line in out.splitlines() if " " in line)

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            text = (self.dir / "log" / name).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- state between tests -------------------------------------------------------------------

    def jobs(self) -> list[str]:
        """Ids of the jobs squeue still lists as pending or running."""
        out = self.run("squeue", "-h", "-o", "%i %T", check=False).stdout
        return [line.split()[0] for line in out.splitlines()
                if line.split() and line.split()[1] not in ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT")]

    def cancel_all(self, timeout_s: float = 20.0) -> None:
        """scancel every job and wait until none is left running (with its step processes)."""
        if self.dir is None or "slurmctld" not in self.procs or self.procs["slurmctld"].poll() is not None:
            return
        if self.jobs():
            self.run("scancel", "--full", "-u", "root", check=False)
            self.run("scancel", "-u", "root", check=False)
        deadline = time.monotonic() + timeout_s
        while (self.jobs() or self.job_processes()) and time.monotonic() < deadline:
            time.sleep(0.1)

    def drain(self, reason: str = "test") -> None:
        """Make every node unavailable to new jobs (a job submitted now stays PENDING)."""
        self.run("scontrol", "update", f"NodeName={','.join(self.node_names)}", "State=DRAIN", f"Reason={reason}")

    def resume(self, timeout_s: float = 20.0) -> None:
        self.run("scontrol", "update", f"NodeName={','.join(self.node_names)}", "State=RESUME", check=False)
        self.wait_idle(timeout_s)

    def job_processes(self) -> list[psutil.Process]:
        """Live processes of this cluster's jobs: slurmstepd holding our spool dir, and what runs
        with our SLURM_CONF (scripts, srun, the tasks)."""
        out = []
        mine = {p.pid for p in self.procs.values()}
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            if proc.pid in mine or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            try:
                if (proc.info["cmdline"] or [""])[0].startswith("slurmstepd"):
                    held = [f.path for f in proc.open_files()]
                    held += [c.laddr for c in proc.net_connections(kind="unix") if isinstance(c.laddr, str)]
                    if any(str(self.dir) in path for path in held):
                        out.append(proc)
                elif proc.environ().get("SLURM_CONF") == str(self.conf) and proc.environ().get("SLURM_JOB_ID"):
                    out.append(proc)
            except (psutil.Error, OSError):
                continue
        return out

    # -- stop ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Cancel every job, then stop each daemon by its PID (SIGTERM, then SIGKILL); idempotent."""
        try:
            self.cancel_all()
        except Exception:
            pass
        leftovers = self.job_processes() if self.dir is not None else []
        order = [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for proc in leftovers:
            try:
                proc.kill()
            except psutil.Error:
                pass
        self.procs.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
