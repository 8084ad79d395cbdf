"""The transfer stage: verified copies read back from storage, retries on corruption, sources
removed only after a verified copy, and errors that name the file or directory at fault."""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import signal
from pathlib import Path

import pytest

from detstream.pagecache import cached_pages, evict
from detstream.transfer import LocalCopyTransfer, RetriedFile, Transfer, TransferError

CHUNK = 64 << 10  # small chunks so every file takes several reads


def write_evicted(path: Path, data: bytes) -> Path:
    """Write a file, fsync it and drop it from the page cache, as the acquire stage leaves it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        evict(f.fileno())
    return path


@pytest.fixture
def sources(tmp_path) -> list[Path]:
    src = tmp_path / "acquired"
    src.mkdir()
    sizes = {"data_scan0000000001_module0.data": 3 * CHUNK + 17,
             "data_scan0000000001_module1.data": CHUNK,
             "data_scan0000000001_module2.data": 1,
             "data_scan0000000001_module3.data": 0}
    return [write_evicted(src / name, os.urandom(n)) for name, n in sizes.items()]


def b2(data: bytes) -> str:
    return "blake2b:" + hashlib.blake2b(data).hexdigest()


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def flip_byte(offset: int = 5):
    """A fault hook that inverts one byte of the copy (or the last byte, if shorter)."""
    def fault(path: Path, attempt: int) -> None:
        with open(path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            at = min(offset, size - 1)
            f.seek(at)
            b = f.read(1)
            f.seek(at)
            f.write(bytes([b[0] ^ 0xFF]))
    return fault


def test_copies_verifies_and_leaves_nothing_cached(sources, tmp_path):
    originals = {p.name: p.read_bytes() for p in sources}
    for p in sources:  # reading the originals cached them; evict again
        with open(p, "rb") as f:
            evict(f.fileno())
    dest = tmp_path / "scratch" / "transferred"
    seen = []
    report = LocalCopyTransfer(chunk_bytes=CHUNK).transfer(sources, dest, on_progress=seen.append)

    # Evicted (checked before this test reads them): the copies are not in the page cache, so
    # the count stage reads storage ...
    for p in dest.iterdir():
        resident, pages = cached_pages(p)
        assert resident == 0, f"{p.name}: {resident} of {pages} pages still cached"
    assert names(dest) == sorted(originals)  # no temporary files left behind
    for f in report.files:
        data = originals[f.name]
        assert (dest / f.name).read_bytes() == data
        assert (f.bytes, f.checksum, f.attempts, f.source_removed) == (len(data), b2(data), 1, False)
        assert f.destination == str(dest / f.name)
    assert [f.name for f in report.files] == [p.name for p in sources]
    assert report.retried == []
    assert report.total_bytes == sum(map(len, originals.values()))
    assert all(p.exists() for p in sources)
    # Progress: monotone within the file list, ending at the total.
    assert seen[-1].files_done == len(sources) and seen[-1].bytes_done == report.total_bytes
    assert max(s.file_bytes_done for s in seen if s.file.endswith("module0.data")) == 3 * CHUNK + 17

    # ... and the verification read the copies back from storage, as it read the sources
    # (/proc/self/io says so on Linux, the only platform detstream runs on: always checked).
    assert report.storage_read_bytes is not None, "no read_bytes in /proc/self/io"
    assert report.storage_read_bytes >= 2 * report.total_bytes
    # The probe does see cached pages: the reads above brought module0's copy back in.
    assert cached_pages(dest / sources[0].name)[0] > 0
    d = report.as_dict()
    assert d["total_files"] == 4 and d["files"][0]["checksum"] == report.files[0].checksum


def test_one_corrupted_byte_is_caught_retried_and_reported(sources, tmp_path):
    target = sources[0]
    data = target.read_bytes()
    corrupt_once = flip_byte(CHUNK + 3)

    def fault(path: Path, attempt: int) -> None:
        if path.name.startswith(f".{target.name}.") and attempt == 1:
            corrupt_once(path, attempt)

    report = LocalCopyTransfer(chunk_bytes=CHUNK, fault=fault).transfer(sources, tmp_path / "out")
    first = report.files[0]
    assert first.attempts == 2 and first.checksum == b2(data)
    assert (tmp_path / "out" / target.name).read_bytes() == data
    assert [f.attempts for f in report.files[1:]] == [1, 1, 1]
    assert len(report.retried) == 1
    retried = report.retried[0]
    assert isinstance(retried, RetriedFile)
    assert (retried.name, retried.attempt) == (target.name, 1)
    assert "checksum mismatch" in retried.reason and b2(data) in retried.reason
    assert names(tmp_path / "out") == sorted(p.name for p in sources)


def test_truncated_copy_is_a_size_mismatch(sources, tmp_path):
    def truncate(path: Path, attempt: int) -> None:
        if attempt == 1:
            os.truncate(path, max(0, os.path.getsize(path) - 1))

    report = LocalCopyTransfer(chunk_bytes=CHUNK, fault=truncate).transfer(sources[:1], tmp_path / "o")
    assert report.files[0].attempts == 2
    assert "size mismatch" in report.retried[0].reason


def test_persistent_corruption_fails_naming_the_file_and_keeps_the_source(sources, tmp_path):
    target = sources[0]
    data = target.read_bytes()
    dest = tmp_path / "out"
    transfer = LocalCopyTransfer(retries=2, chunk_bytes=CHUNK, fault=flip_byte())
    with pytest.raises(TransferError) as info:
        transfer.transfer([target], dest, remove_source=True)
    err = info.value
    assert str(target) in str(err) and "3 attempts" in str(err)
    assert err.path == target and err.attempts == 3 and len(err.reasons) == 3
    assert all("checksum mismatch" in r for r in err.reasons)
    assert target.read_bytes() == data  # never removed, never touched
    assert names(dest) == []  # neither the bad copy nor a temporary file
    assert err.report is not None and err.report.files == []
    assert [r.attempt for r in err.report.retried] == [1, 2, 3]


def test_remove_source_only_after_a_verified_copy(sources, tmp_path):
    originals = {p.name: p.read_bytes() for p in sources}
    present_at_verification = []

    def fault(path: Path, attempt: int) -> None:
        name = path.name.split(".")[1] + ".data"
        present_at_verification.append((name, (sources[0].parent / name).exists()))
        if name == sources[1].name and attempt == 1:
            flip_byte(0)(path, attempt)

    dest = tmp_path / "out"
    report = LocalCopyTransfer(chunk_bytes=CHUNK, fault=fault).transfer(
        sources, dest, remove_source=True)
    # Every attempt, the retried one too, was verified while its source still existed.
    assert len(present_at_verification) == len(sources) + 1
    assert all(exists for _, exists in present_at_verification)
    assert all(f.source_removed for f in report.files)
    assert names(sources[0].parent) == []
    for name, data in originals.items():
        assert (dest / name).read_bytes() == data


def test_remove_source_keeps_the_source_that_failed(sources, tmp_path):
    bad = sources[1]
    data = bad.read_bytes()

    def fault(path: Path, attempt: int) -> None:
        if path.name.startswith(f".{bad.name}."):
            flip_byte(0)(path, attempt)

    with pytest.raises(TransferError) as info:
        LocalCopyTransfer(retries=1, chunk_bytes=CHUNK, fault=fault).transfer(
            sources, tmp_path / "out", remove_source=True)
    assert str(bad) in str(info.value)
    assert not sources[0].exists()  # copied, verified, removed before the failure
    assert bad.read_bytes() == data
    assert sources[2].exists() and sources[3].exists()  # never reached
    assert [f.name for f in info.value.report.files] == [sources[0].name]
    assert names(tmp_path / "out") == [sources[0].name]


def test_unwritable_target_names_the_path(sources, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a regular file where a directory should be")
    dest = blocker / "transferred"
    with pytest.raises(TransferError) as info:
        LocalCopyTransfer().transfer(sources, dest)
    assert str(dest) in str(info.value)
    assert info.value.path == dest
    assert isinstance(info.value.__cause__, OSError)
    assert all(p.exists() for p in sources)


def test_a_write_failing_mid_copy_names_the_destination(sources, tmp_path):
    """A write error part-way through (as a full disk gives) fails at once, chained, no debris.

    The write fails by a file-size limit (EFBIG), which reaches the same code as ENOSPC.
    """
    target = sources[0]
    data = target.read_bytes()
    dest = tmp_path / "out"
    dest.mkdir()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (CHUNK, hard))
    try:
        with pytest.raises(TransferError) as info:
            LocalCopyTransfer(chunk_bytes=CHUNK).transfer([target], dest, remove_source=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    err = info.value
    assert str(dest / target.name) in str(err) and "writing" in str(err)
    assert isinstance(err.__cause__, OSError) and err.__cause__.errno == errno.EFBIG
    assert names(dest) == []
    assert target.read_bytes() == data


def test_existing_destination_is_refused_unless_overwrite(sources, tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    existing = dest / sources[2].name
    existing.write_bytes(b"already here")
    with pytest.raises(TransferError) as info:
        LocalCopyTransfer().transfer(sources, dest)
    assert str(existing) in str(info.value) and "overwrite=True" in str(info.value)
    assert existing.read_bytes() == b"already here"
    assert names(dest) == [existing.name]  # refused before anything was copied

    report = LocalCopyTransfer().transfer(sources, dest, overwrite=True)
    assert existing.read_bytes() == sources[2].read_bytes()
    assert report.total_files == len(sources)


def test_refused_before_copying(sources, tmp_path):
    missing = sources[0].parent / "data_scan0000000001_module9.data"
    with pytest.raises(TransferError, match=str(missing)):
        LocalCopyTransfer().transfer([*sources, missing], tmp_path / "out")
    assert not (tmp_path / "out").exists() or names(tmp_path / "out") == []

    other = tmp_path / "elsewhere"
    other.mkdir()
    twin = write_evicted(other / sources[0].name, b"x")
    with pytest.raises(TransferError, match="two sources have the name"):
        LocalCopyTransfer().transfer([sources[0], twin], tmp_path / "out")

    with pytest.raises(TransferError, match="is the source file itself"):
        LocalCopyTransfer().transfer(sources, sources[0].parent, overwrite=True)
    assert all(p.exists() for p in sources)


def test_transfer_is_an_interface():
    with pytest.raises(TypeError):
        Transfer()  # abstract
    assert isinstance(LocalCopyTransfer(), Transfer)
    with pytest.raises(ValueError, match="retries"):
        LocalCopyTransfer(retries=-1)
