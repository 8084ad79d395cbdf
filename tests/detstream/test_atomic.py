"""detstream.atomic: a file appears under its name whole or not at all, an existing file is
refused unless overwrite, and errors name the destination."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

from detstream.atomic import AtomicFile, atomic_output, write_atomically


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_text_and_bytes_are_written_and_replaced(tmp_path):
    path = write_atomically(tmp_path / "a.txt", "héllo\n")
    assert path == tmp_path / "a.txt" and path.read_bytes() == "héllo\n".encode()
    write_atomically(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert names(tmp_path) == ["a.txt"]


def test_existing_file_is_refused_unless_overwrite(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=True") as info:
        write_atomically(path, "new", overwrite=False)
    assert str(path) in str(info.value) and info.value.errno == errno.EEXIST
    assert path.read_text() == "old"
    assert names(tmp_path) == ["a.txt"]


def test_a_file_appearing_meanwhile_is_not_clobbered(tmp_path):
    path = tmp_path / "a.txt"
    target = AtomicFile(path, overwrite=False)
    target.tmp.write_text("mine")
    path.write_text("theirs")  # another writer got there first
    with pytest.raises(FileExistsError, match=str(path)):
        target.commit()
    assert path.read_text() == "theirs"
    assert names(tmp_path) == ["a.txt"]


def test_nothing_appears_when_the_writer_fails(tmp_path):
    path = tmp_path / "a.txt"
    with pytest.raises(RuntimeError, match="half way") as info:
        with atomic_output(path, overwrite=True) as tmp:
            tmp.write_text("half")
            raise RuntimeError("half way")
    if sys.version_info >= (3, 11):  # exceptions carry notes from 3.11
        assert info.value.__notes__ == [f"while writing {path}; it was not written"]
    assert names(tmp_path) == []


def test_an_oserror_from_the_writer_names_the_destination(tmp_path):
    path = tmp_path / "a.txt"
    with pytest.raises(OSError) as info:
        with atomic_output(path, overwrite=True):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(path) in str(info.value) and info.value.errno == errno.ENOSPC
    assert names(tmp_path) == []


def test_unwritable_directory_names_the_destination(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=str(blocker / "a.txt")) as info:
        write_atomically(blocker / "a.txt", "x")
    assert info.value.errno == errno.ENOTDIR


def test_temporary_name_is_hidden_and_unique_and_mode_follows_umask(tmp_path):
    first = AtomicFile(tmp_path / "a.txt", overwrite=False)
    second = AtomicFile(tmp_path / "a.txt", overwrite=False)
    assert first.tmp != second.tmp
    assert all(t.name.startswith(".a.txt.") and t.name.endswith(".partial")
               for t in (first.tmp, second.tmp))
    first.discard()
    second.discard()
    assert names(tmp_path) == []
    old = os.umask(0o027)
    try:
        path = write_atomically(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640
