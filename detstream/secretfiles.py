"""Secrets handed to launched processes in files: written 0600 from the start, refused if others may read them.

The one documented exception to "secrets never on disk": a batch job's nodes cannot inherit
the orchestrator's environment, so they source a 0600 file in the session folder, removed
when the session ends.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Mapping


def write_env_file(path: Path, env: Mapping[str, str]) -> Path:
    """Write NAME=VALUE lines (shell-quoted) to `path`, created 0600 (never readable by others, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(f"{name}={shlex.quote(value)}\n" for name, value in env.items())
    return path


def read_secret_file(path: str, what: str) -> str:
    """The first line of a secret file, refusing one that others may read (the 0600 rule)."""
    try:
        mode = os.stat(path).st_mode
        if mode & 0o077:
            raise ValueError(f"{what} file {path} may be read by others (mode {mode & 0o777:o}); chmod 600 it")
        with open(path, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    except OSError as err:
        raise ValueError(f"cannot read the {what} file {path}: {err.strerror}") from None
