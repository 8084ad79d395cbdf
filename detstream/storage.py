"""Durability helpers shared by every writer: fsync a file or a directory entry."""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path


def fsync_file(path: Path) -> None:
    """Flush a closed file's data to storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make new or renamed entries in ``directory`` survive a crash (where the filesystem allows)."""
    with suppress(OSError):  # not every filesystem lets a directory be fsynced
        fsync_file(directory)
