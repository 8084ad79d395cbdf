"""Test helpers shared by the full-disk and fault tests: a size-limited tmpfs, and a fault
injected at a deterministic point of a session's own progress reports."""

from __future__ import annotations

import contextlib
import os
import subprocess

import pytest

from detstream import progress


@contextlib.contextmanager
def mounted_tmpfs(where, size: str):
    """A tmpfs of ``size`` (e.g. "64m") mounted at ``where``; unmounted at the end, also on failure.
    Without root it skips; as root (CI) a tmpfs that cannot be mounted fails the test: a
    full-disk test that skips proves nothing."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"cannot mount a tmpfs as root: {done.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(where)], check=False)
        assert not os.path.ismount(where)


class When:
    """Run ``action`` once, from the session's own progress reports, when ``ready(progress)``."""

    def __init__(self, ready, action):
        self.ready, self.action, self.done = ready, action, False

    def __call__(self, p) -> None:
        if not self.done and self.ready(p):
            self.done = True
            self.action()

    def __enter__(self):
        progress.LISTENERS.append(self)
        return self

    def __exit__(self, *exc):
        progress.LISTENERS.remove(self)
