"""The transfer's retry policy: only a copy that fails verification is tried again."""

from __future__ import annotations

from pathlib import Path

import pytest

from detstream.transfer import LocalCopyTransfer, TransferError


def test_an_error_other_than_a_bad_copy_is_not_retried(tmp_path):
    src = tmp_path / "data_scan0000000001_module0.data"
    src.write_bytes(b"x" * 1000)
    calls = []

    def fault(path: Path, attempt: int) -> None:
        calls.append(attempt)
        raise RuntimeError("the hook broke")

    dest = tmp_path / "out"
    with pytest.raises(RuntimeError, match="the hook broke"):
        LocalCopyTransfer(retries=3, fault=fault).transfer([src], dest)
    assert calls == [1]
    assert list(dest.iterdir()) == []
    assert src.read_bytes() == b"x" * 1000


def test_no_retries_means_one_attempt(tmp_path):
    src = tmp_path / "data_scan0000000001_module0.data"
    src.write_bytes(b"y" * 10)

    def corrupt(path: Path, attempt: int) -> None:
        path.write_bytes(b"z" * 10)

    with pytest.raises(TransferError, match="1 attempts") as info:
        LocalCopyTransfer(retries=0, fault=corrupt).transfer([src], tmp_path / "out")
    assert info.value.attempts == 1 and [r.attempt for r in info.value.report.retried] == [1]
