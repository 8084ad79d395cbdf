"""Atomic file writes for every writer in detstream: a file is written under a temporary name
next to its destination and appears under its final name only whole, or not at all."""

from __future__ import annotations

import errno as errno_mod
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .storage import fsync_dir, fsync_file

__all__ = ["AtomicFile", "atomic_output", "io_error", "refuse", "write_atomically"]


def _temp_path(path: Path) -> Path:
    """Create an empty, uniquely named hidden file next to ``path`` (umask-respecting mode)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno_mod.EEXIST, f"no free temporary name next to {path}")


def io_error(exc: BaseException, path: Path, doing: str = "writing") -> OSError:
    """An OSError naming ``path`` for a failed I/O, keeping the errno (h5py reports some
    write failures, e.g. a full disk found at close, as RuntimeError with errno in the text)."""
    code = getattr(exc, "errno", None)
    if code is None:
        m = re.search(r"errno = (\d+)", str(exc))
        code = int(m.group(1)) if m else None
    detail = " ".join(str(exc).split())
    msg = f"{doing} {path} failed: {detail}"
    return OSError(code, msg) if code else OSError(msg)


def refuse(path: Path) -> FileExistsError:
    """The error for a destination that exists when ``overwrite`` was not given."""
    return FileExistsError(
        errno_mod.EEXIST, f"{path} already exists; pass overwrite=True to replace it"
    )


class AtomicFile:
    """A temporary file that becomes ``path`` on ``commit`` and disappears on ``discard``.

    With ``durable`` the data and the new directory entry are fsynced on commit. Errors are
    OSErrors naming ``path``; an existing ``path`` is refused (FileExistsError) unless
    ``overwrite``, both here and at commit, so a file that appears meanwhile is not clobbered.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool, *, durable: bool = True):
        self.path = Path(path)
        self.overwrite = overwrite
        self.durable = durable
        if not overwrite and self.path.exists():
            raise refuse(self.path)
        try:
            self.tmp = _temp_path(self.path)
        except OSError as e:
            raise io_error(e, self.path, "creating") from e

    def commit(self) -> None:
        """Flush the temp file to disk and rename it into place (no-clobber unless overwrite)."""
        try:
            if self.durable:
                fsync_file(self.tmp)
            if self.overwrite:
                os.replace(self.tmp, self.path)
            else:
                self._link_into_place()
            if self.durable:
                fsync_dir(self.path.parent)
        except FileExistsError:
            self.discard()
            raise refuse(self.path) from None
        except OSError as e:
            self.discard()
            raise io_error(e, self.path, "renaming into") from e

    def _link_into_place(self) -> None:
        # link() fails if the target appeared meanwhile, which os.replace would clobber.
        try:
            os.link(self.tmp, self.path)
        except FileExistsError:
            raise
        except OSError:  # filesystem without hard links: check, then rename
            if self.path.exists():
                raise FileExistsError(errno_mod.EEXIST, str(self.path)) from None
            os.replace(self.tmp, self.path)
            return
        with suppress(OSError):  # the file is in place; a leftover temp name is harmless
            os.unlink(self.tmp)

    def discard(self) -> None:
        with suppress(FileNotFoundError):
            os.unlink(self.tmp)


def _annotate(exc: BaseException, path: Path) -> None:
    if hasattr(exc, "add_note") and not isinstance(exc, OSError):
        exc.add_note(f"while writing {path}; it was not written")


@contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temp path to write; rename it to ``path`` when the block succeeds, else delete it."""
    target = AtomicFile(path, overwrite)
    try:
        yield target.tmp
    except OSError as e:
        target.discard()
        if str(target.path) in str(e):
            raise
        raise io_error(e, target.path) from e
    except BaseException as e:
        target.discard()
        _annotate(e, target.path)
        raise
    target.commit()


def write_atomically(path: str | os.PathLike, data: str | bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; returns the path."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(raw)
    return Path(path)
