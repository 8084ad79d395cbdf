"""HDF5 files written atomically: an h5py file on a temporary name that appears under its
final name only if everything succeeded, with h5py's failures raised as OSErrors naming it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import h5py

from ..atomic import atomic_output, io_error


def close_h5(f: h5py.File, path: Path) -> None:
    """Close an HDF5 file being written; HDF5 reports deferred write failures (full disk) here."""
    try:
        f.close()
    except (OSError, RuntimeError) as e:
        force_close(f)
        raise io_error(e, path) from e


def force_close(f: h5py.File) -> None:
    """Close ``f`` whatever state it is in: after a failed close h5py can leave the file id
    open, and with it the file descriptor."""
    with suppress(Exception):
        f.close()
    with suppress(Exception):
        if f.id.valid:
            f.id.close()


@contextmanager
def h5_output(path: str | os.PathLike, *, overwrite: bool) -> Iterator[h5py.File]:
    """An HDF5 file open for writing that appears under ``path`` only if everything succeeded."""
    with atomic_output(path, overwrite=overwrite) as tmp:
        try:
            f = h5py.File(tmp, "w")
        except (OSError, RuntimeError) as e:
            raise io_error(e, Path(path), "creating") from e
        try:
            yield f
        except BaseException:
            force_close(f)
            raise
        close_h5(f, Path(path))
