"""Tasks of the file-transfer path: acquire to raw files, transfer them, count them from storage."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from detstream.session import FileTransferSession

from .stream import _cancel_check


@task(name="acquire-files", cache_policy=NO_CACHE)
def acquire_files(session: FileTransferSession) -> list[Path]:
    """Each producer writes its sector as a raw v5 file, fsync'd and evicted from the page cache."""
    files = session.acquire()
    get_run_logger().info("acquired %d raw files in %.2f s", len(files), session.timings["acquire_s"])
    return files


@task(name="transfer-files", cache_policy=NO_CACHE)
def transfer_files(session: FileTransferSession, files: list[Path]) -> dict:
    """Copy the raw files to the compute site's storage, verifying size and checksum."""
    report = session.transfer(files)
    get_run_logger().info("transferred %d files in %.2f s", len(files), session.timings["transfer_s"])
    return report


@task(name="count-files", cache_policy=NO_CACHE)
def count_from_files(session: FileTransferSession) -> None:
    """Wait for every node's count job to read its share of the files and report."""
    session.count(cancelled=_cancel_check())
