"""``LocalCopyTransfer``: copy files into another directory on this machine, verified against storage.

Each copy is written under a temporary name and renamed into place only once read back and verified,
so a file under its final name is always whole; a source is removed only after that.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
from contextlib import suppress
from pathlib import Path
from typing import Callable, Optional, Sequence

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

from ..atomic import AtomicFile
from ..errors import DetstreamError
from ..pagecache import evict, storage_read_bytes
from ..storage import fsync_dir
from .base import (FileTransfer, PathLike, ProgressCallback, RetriedFile, Transfer, TransferError,
                   TransferProgress, TransferReport)

log = logging.getLogger("detstream.transfer")


def _why(e: OSError) -> str:
    return e.strerror or str(e)


class _VerifyFailed(DetstreamError):
    """A copy whose size or checksum did not match its source (retried)."""


class LocalCopyTransfer(Transfer):
    """Copy files into another directory on this machine, verified against storage.

    Each file is read in ``chunk_bytes`` chunks and hashed as it is read; the copy is written
    to a temporary name, fsynced, evicted from the page cache and read back from storage to
    be hashed again; only a copy whose size and checksum match is renamed into place. A copy
    that fails its check is deleted and tried again, ``retries`` more times at most (so at
    most ``1 + retries`` attempts). With ``evict`` the source's pages are dropped after it is
    read too, so the next stage (the count) reads storage, not memory; ``evict`` implies
    ``fsync`` (the kernel will not drop dirty pages). Without ``evict`` the read-back
    verifies the page cache, not the storage.

    ``fault(path, attempt)`` is a test hook, called once the copy at ``path`` (its temporary
    name in ``dest_dir``) is written and fsynced and before it is verified, with the 1-based
    attempt number; it may corrupt the copy to show that verification catches it.
    """

    method = "local-copy"

    def __init__(self, retries: int = 3, chunk_bytes: int = 8 << 20, evict: bool = True,
                 fsync: bool = True, algorithm: str = "blake2b",
                 fault: Optional[Callable[[Path, int], None]] = None):
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
        if algorithm not in hashlib.algorithms_available:
            raise ValueError(f"unknown checksum algorithm {algorithm!r}")
        self.retries = retries
        self.chunk_bytes = chunk_bytes
        self.evict = evict
        self.fsync = fsync or evict
        self.algorithm = algorithm
        self.fault = fault

    def __repr__(self) -> str:
        return (f"LocalCopyTransfer(retries={self.retries}, chunk_bytes={self.chunk_bytes}, "
                f"evict={self.evict}, fsync={self.fsync}, algorithm={self.algorithm!r})")

    # -- checks before anything is copied ----------------------------------------------------

    def _check_sources(self, files: Sequence[PathLike]) -> list[tuple[Path, int]]:
        sources: list[tuple[Path, int]] = []
        by_name: dict[str, Path] = {}
        for f in files:
            src = Path(f)
            try:
                st = os.stat(src)
            except OSError as e:
                raise TransferError(f"source {src} cannot be read: {_why(e)}", src) from e
            if not stat.S_ISREG(st.st_mode):
                raise TransferError(f"source {src} is not a regular file", src)
            if src.name in by_name:
                raise TransferError(f"two sources have the name {src.name!r}: {by_name[src.name]} "
                                    f"and {src}; they would overwrite each other", src)
            by_name[src.name] = src
            sources.append((src, st.st_size))
        return sources

    def _prepare_dest(self, dest_dir: Path, sources: list[tuple[Path, int]],
                      overwrite: bool) -> None:
        try:
            dest_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TransferError(f"target directory {dest_dir} cannot be created: {_why(e)}",
                                dest_dir) from e
        if not dest_dir.is_dir():
            raise TransferError(f"target directory {dest_dir} is not a directory", dest_dir)
        for src, _ in sources:
            dest = dest_dir / src.name
            if not (dest.exists() or dest.is_symlink()):
                continue
            with suppress(OSError):
                if os.path.samefile(src, dest):
                    raise TransferError(f"{dest} is the source file itself; choose another "
                                        f"target directory", dest)
            if not overwrite:
                raise TransferError(f"{dest} already exists; pass overwrite=True to replace it",
                                    dest)
        need = sum(size for _, size in sources)
        try:
            vfs = os.statvfs(dest_dir)
        except OSError:
            return
        free = (vfs.f_bfree if os.geteuid() == 0 else vfs.f_bavail) * vfs.f_frsize
        if need > free:
            raise TransferError(f"target directory {dest_dir} has {free} bytes free, the files "
                                f"need {need}", dest_dir)

    # -- one attempt -------------------------------------------------------------------------

    def _new_hash(self):
        return hashlib.new(self.algorithm)

    def _open_target(self, dest: Path, overwrite: bool) -> tuple[AtomicFile, int]:
        """A temporary file next to ``dest``, open for writing, that becomes ``dest`` on commit."""
        try:
            target = AtomicFile(dest, overwrite, durable=self.fsync)
        except OSError as e:
            raise TransferError(str(e), dest) from e
        try:
            return target, os.open(target.tmp, os.O_WRONLY)
        except OSError as e:
            target.discard()
            raise TransferError(f"cannot open {dest} (temporary {target.tmp.name}): {_why(e)}",
                                dest) from e

    def _copy_once(self, src: Path, dest: Path, tmp: Path, out_fd: int,
                   progress: Callable[[int], None]) -> tuple[int, str]:
        """Copy src into out_fd (closed here), hashing what is read; returns (bytes, digest)."""
        h = self._new_hash()
        buf = bytearray(self.chunk_bytes)
        mv = memoryview(buf)
        done = 0
        try:
            try:
                fin = open(src, "rb", buffering=0)
            except OSError as e:
                raise TransferError(f"source {src} cannot be read: {_why(e)}", src) from e
            with fin:
                with suppress(OSError):
                    os.posix_fadvise(fin.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                while True:
                    try:
                        n = fin.readinto(mv)
                    except OSError as e:
                        raise TransferError(f"reading {src} at byte {done} failed: {_why(e)}",
                                            src) from e
                    if not n:
                        break
                    h.update(mv[:n])
                    self._write_all(out_fd, mv[:n], dest)
                    done += n
                    progress(done)
                if self.evict:  # clean pages: the source is only read
                    with suppress(OSError):
                        evict(fin.fileno())
            try:
                if self.fsync:
                    os.fsync(out_fd)
                if self.evict:
                    evict(out_fd)
            except OSError as e:
                raise TransferError(f"writing {dest} failed at fsync: {_why(e)}", dest) from e
        finally:
            os.close(out_fd)
        return done, h.hexdigest()

    @staticmethod
    def _write_all(fd: int, data: memoryview, dest: Path) -> None:
        while data:
            try:
                n = os.write(fd, data)
            except OSError as e:
                raise TransferError(f"writing {dest} failed: {_why(e)}", dest) from e
            data = data[n:]

    def _read_back(self, tmp: Path, dest: Path) -> tuple[int, str]:
        """Hash the copy as stored: flush anything written since, evict, then read it back."""
        h = self._new_hash()
        buf = bytearray(self.chunk_bytes)
        mv = memoryview(buf)
        size = 0
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError as e:
            raise TransferError(f"reading back {dest} (temporary {tmp.name}) failed: {_why(e)}",
                                dest) from e
        try:
            if self.fsync:
                os.fsync(fd)  # flushes changes made through any descriptor, e.g. by a fault hook
            if self.evict:
                evict(fd)
            with suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while True:
                n = os.readv(fd, [mv])
                if not n:
                    break
                h.update(mv[:n])
                size += n
            if self.evict:
                evict(fd)  # leave nothing cached for the next stage
        except OSError as e:
            raise TransferError(f"reading back {dest} (temporary {tmp.name}) failed: {_why(e)}",
                                dest) from e
        finally:
            os.close(fd)
        return size, h.hexdigest()

    def _copy_verified(self, src: Path, dest: Path, overwrite: bool, attempt: int,
                       progress: Callable[[int], None]) -> tuple[int, str]:
        """One attempt: copy, verify against storage, move into place; returns (bytes, digest).

        A copy that fails verification raises _VerifyFailed; a failed attempt leaves no file.
        """
        target, out_fd = self._open_target(dest, overwrite)
        try:
            nbytes, src_digest = self._copy_once(src, dest, target.tmp, out_fd, progress)
            if self.fault is not None:
                self.fault(target.tmp, attempt)
            got_bytes, got_digest = self._read_back(target.tmp, dest)
            if got_bytes != nbytes:
                raise _VerifyFailed(f"size mismatch: read {nbytes} bytes from the source, "
                                    f"the copy holds {got_bytes}")
            if got_digest != src_digest:
                raise _VerifyFailed(f"checksum mismatch: source {self.algorithm}:{src_digest}, "
                                    f"copy {self.algorithm}:{got_digest}")
            try:
                after = os.stat(src).st_size
            except OSError as e:
                raise TransferError(f"source {src} vanished during the copy: {_why(e)}",
                                    src, attempt) from e
            if after != nbytes:
                raise _VerifyFailed(f"source changed during the copy: {nbytes} bytes read, "
                                    f"now {after} bytes")
        except BaseException:
            target.discard()
            raise
        try:
            target.commit()  # discards the temporary file itself if it fails
        except OSError as e:
            raise TransferError(str(e), dest) from e
        return nbytes, src_digest

    # -- the transfer ------------------------------------------------------------------------

    def transfer(self, files: Sequence[PathLike], dest_dir: PathLike, remove_source: bool = False,
                 on_progress: Optional[ProgressCallback] = None, *,
                 overwrite: bool = False) -> TransferReport:
        """Copy and verify each file into ``dest_dir``, in order; see the class docstring.

        Everything that can be checked is checked before the first byte moves: sources exist
        and are regular files with distinct names, ``dest_dir`` can be created, no destination
        exists (unless ``overwrite``) and the files fit in the free space.
        """
        dest_dir = Path(dest_dir)
        report = TransferReport(method=self.method, dest_dir=str(dest_dir),
                                algorithm=self.algorithm, started_at=time.time())
        io0 = storage_read_bytes()
        try:
            sources = self._check_sources(files)
            self._prepare_dest(dest_dir, sources, overwrite)
            bytes_total = sum(size for _, size in sources)
            bytes_before = 0
            for index, (src, size) in enumerate(sources):
                done = self._transfer_one(src, size, dest_dir / src.name, overwrite,
                                          remove_source, report, on_progress, index,
                                          len(sources), bytes_before, bytes_total)
                report.files.append(done)
                bytes_before += done.bytes
                if on_progress is not None:
                    on_progress(TransferProgress(src.name, done.attempts, done.bytes, done.bytes,
                                                 index + 1, len(sources), bytes_before,
                                                 max(bytes_total, bytes_before)))
        except TransferError as e:
            report.finished_at = time.time()
            e.report = report
            raise
        report.finished_at = time.time()
        io1 = storage_read_bytes()
        report.storage_read_bytes = None if io0 is None or io1 is None else io1 - io0
        log.info("transferred %d files, %d bytes to %s in %.2f s (%d retried attempts)",
                 report.total_files, report.total_bytes, dest_dir, report.seconds,
                 len(report.retried))
        return report

    def _transfer_one(self, src: Path, size: int, dest: Path, overwrite: bool,
                      remove_source: bool, report: TransferReport,
                      on_progress: Optional[ProgressCallback], index: int, n_files: int,
                      bytes_before: int, bytes_total: int) -> FileTransfer:
        t0 = time.perf_counter()
        attempts = 1 + self.retries
        reasons: list[str] = []

        def progress(n: int, attempt: int) -> None:
            if on_progress is not None:
                on_progress(TransferProgress(src.name, attempt, n, size, index, n_files,
                                             bytes_before + n, bytes_total))

        def failed_verification(state: RetryCallState) -> None:
            reason = str(state.outcome.exception())
            reasons.append(reason)
            report.retried.append(RetriedFile(src.name, state.attempt_number, reason))
            log.warning("%s: attempt %d of %d failed verification: %s", src.name,
                        state.attempt_number, attempts, reason)

        # A bad copy is tried again at once; any other error ends the transfer.
        retrying = Retrying(stop=stop_after_attempt(attempts),
                            retry=retry_if_exception_type(_VerifyFailed),
                            after=failed_verification, reraise=True)
        try:
            for attempt_manager in retrying:
                with attempt_manager:
                    attempt = attempt_manager.retry_state.attempt_number
                    nbytes, src_digest = self._copy_verified(
                        src, dest, overwrite, attempt, lambda n, attempt=attempt: progress(n, attempt))
        except _VerifyFailed as e:
            raise TransferError(
                f"{src}: copy to {dest} failed verification on all {attempts} attempts "
                f"(last: {reasons[-1]}); the source was kept", src, attempts, reasons) from e
        removed = False
        if remove_source:
            try:
                os.unlink(src)
            except OSError as e:
                raise TransferError(f"{src} was copied and verified to {dest}, but removing "
                                    f"the source failed: {_why(e)}", src, attempt) from e
            if self.fsync:
                fsync_dir(src.parent)
            removed = True
        return FileTransfer(src.name, str(src), str(dest), nbytes,
                            f"{self.algorithm}:{src_digest}", attempt,
                            time.perf_counter() - t0, removed)
