"""Nothing outlives a killed orchestrator: a watcher that stops what it was told about when its parent goes.

``detstream run`` starts one reaper and tells it, over the reaper's stdin, every process group
and temporary directory it creates (local services, Prefect's temporary server, a private etcd's
data). When that pipe closes (the parent exited, even by kill -9), the reaper stops whatever of
it is still alive (SIGTERM, then SIGKILL after a grace) and removes the directories.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

GRACE_S = 5.0


#: The reaper of this process, if it has one (``detstream run`` starts it); see :func:`track_group`.
ACTIVE: Optional["Reaper"] = None


def track_group(pgid: int) -> None:
    """Tell this process's reaper, if any, about a process group that must not outlive us."""
    if ACTIVE is not None:
        ACTIVE.track_group(pgid)


def track_process(pid: int) -> None:
    if ACTIVE is not None:
        ACTIVE.track_process(pid)


def track_dir(path: Path) -> None:
    if ACTIVE is not None:
        ACTIVE.track_dir(path)


class Reaper:
    """The parent's side: start the watcher, then ``track`` what must not outlive this process."""

    def __init__(self) -> None:
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "Reaper":
        self.proc = subprocess.Popen([sys.executable, "-m", "detstream.reaper"], stdin=subprocess.PIPE,
                                     start_new_session=True, text=True)
        return self

    def _send(self, line: str) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            try:
                self.proc.stdin.write(line + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                pass

    def track_group(self, pgid: int) -> None:
        """A process group (a service started in its own session) to stop if we die."""
        self._send(f"group {pgid} {_start_time(pgid)}")

    def track_process(self, pid: int) -> None:
        self._send(f"process {pid} {_start_time(pid)}")

    def track_dir(self, path: Path) -> None:
        self._send(f"dir {path}")

    def close(self) -> None:
        """Our normal end: the watcher sweeps up whatever is left, then exits."""
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=GRACE_S + 5)


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks (field 22 of /proc/pid/stat): guards against pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "0"
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: str) -> bool:
    return _start_time(pid) == started and started != "0"


def _stop(groups: list[tuple[int, str]], processes: list[tuple[int, str]]) -> None:
    def signal_all(sig: int) -> bool:
        any_alive = False
        for pid, started in groups + processes:
            if not _alive(pid, started):
                continue
            any_alive = True
            try:
                if (pid, started) in groups:
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        return any_alive

    if not signal_all(signal.SIGTERM):
        return
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline:
        if not any(_alive(pid, started) for pid, started in groups + processes):
            return
        time.sleep(0.1)
    signal_all(signal.SIGKILL)


def main() -> None:
    """The watcher: read what to track until stdin closes, then stop it all."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C at the terminal is the parent's to handle
    groups: list[tuple[int, str]] = []
    processes: list[tuple[int, str]] = []
    dirs: list[str] = []
    for line in sys.stdin:
        kind, _, rest = line.strip().partition(" ")
        if kind == "group":
            pid, started = rest.split()
            groups.append((int(pid), started))
        elif kind == "process":
            pid, started = rest.split()
            processes.append((int(pid), started))
        elif kind == "dir":
            dirs.append(rest)
    _stop(groups, processes)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
