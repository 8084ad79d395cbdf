"""Child processes that are always stopped: own process group, log file, terminate-then-kill."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Optional, Sequence

from . import reaper

_LIVE: "weakref.WeakSet[ManagedProcess]" = weakref.WeakSet()


def detstream_argv(*args: str) -> list[str]:
    """The command line that runs ``detstream <args>`` with this interpreter."""
    return [sys.executable, "-m", "detstream", *args]


class ManagedProcess:
    """A child in its own process group, logging to a file, stopped on ``stop()`` or at exit.

    ``env`` is added to this process's environment for the child (e.g. the etcd login).
    """

    def __init__(self, argv: Sequence[str], log_path: Path, env: Optional[dict] = None,
                 cwd: Optional[Path] = None, name: Optional[str] = None):
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.env = env
        self.cwd = cwd
        self.name = name or Path(self.argv[0]).name
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **(self.env or {})}
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=self.cwd, start_new_session=True,
            )
        _LIVE.add(self)
        reaper.track_group(self.proc.pid)
        return self

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def poll(self) -> Optional[int]:
        return self.proc.poll() if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        if not self.proc:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace_s: float = 5.0) -> Optional[int]:
        """SIGTERM the whole group, SIGKILL it after ``grace_s``; safe to call twice."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        # Children of the service (counting workers) may outlive it; the group takes them too.
        self.signal_group(signal.SIGKILL)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        _LIVE.discard(self)
        return self.proc.returncode

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value or ``timeout_s`` passes (TimeoutError)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


@atexit.register
def _stop_all() -> None:
    for p in list(_LIVE):
        p.stop(grace_s=2.0)
