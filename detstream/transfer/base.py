"""The transfer interface and what a transfer reports, independent of how the bytes move.

Implementations (``LocalCopyTransfer`` now, rsync or Globus later) take the same file list and
destination and return the same ``TransferReport``, so the flow does not change with the transport.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from ..errors import DetstreamError

PathLike = Union[str, os.PathLike]


class TransferError(DetstreamError):
    """A transfer that did not complete; the message names the file or directory and why.

    ``path`` is the file or directory at fault, ``attempts`` how many copies were tried (0 when
    the transfer was refused before copying), ``reasons`` why each failed attempt failed and
    ``report`` the files that were moved before the failure.
    """

    def __init__(self, message: str, path: Optional[PathLike] = None, attempts: int = 0,
                 reasons: Sequence[str] = ()):
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.attempts = attempts
        self.reasons = list(reasons)
        self.report: Optional["TransferReport"] = None  # what completed before the failure


@dataclass(frozen=True)
class TransferProgress:
    """Where a transfer is, passed to ``on_progress`` after every chunk and every file.

    ``bytes_done`` counts whole files done plus the current attempt's bytes, so it goes back
    when a file is retried.
    """

    file: str
    attempt: int
    file_bytes_done: int
    file_bytes: int
    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int


@dataclass
class FileTransfer:
    """One file moved: its size, the checksum both ends agreed on, attempts and time taken."""

    name: str
    source: str
    destination: str
    bytes: int
    checksum: str  # "<algorithm>:<hex digest>"
    attempts: int
    seconds: float
    source_removed: bool = False


@dataclass
class RetriedFile:
    """One failed attempt that was retried, and why it failed."""

    name: str
    attempt: int
    reason: str


@dataclass
class TransferReport:
    """What a transfer did: per file, totals, and every retried attempt with its reason."""

    method: str
    dest_dir: str
    algorithm: str
    files: list[FileTransfer] = field(default_factory=list)
    retried: list[RetriedFile] = field(default_factory=list)
    started_at: float = 0.0
    finished_at: float = 0.0
    # Bytes this process read from storage (not the page cache) during the transfer, from
    # /proc/self/io; None where the kernel does not say. Proves the read-back hit storage.
    storage_read_bytes: Optional[int] = None

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    @property
    def total_files(self) -> int:
        return len(self.files)

    @property
    def seconds(self) -> float:
        return max(0.0, self.finished_at - self.started_at)

    @property
    def throughput_bytes_s(self) -> float:
        return self.total_bytes / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        """JSON-able form, totals included."""
        d = asdict(self)
        d.update(total_bytes=self.total_bytes, total_files=self.total_files,
                 seconds=self.seconds, throughput_bytes_s=self.throughput_bytes_s)
        return d


ProgressCallback = Callable[[TransferProgress], None]


class Transfer(ABC):
    """Moves files into a directory at another site and proves they arrived intact.

    Implementations: ``LocalCopyTransfer`` (same machine, another directory); rsync over ssh
    and Globus are later implementations of this same interface.
    """

    method: str = "abstract"

    @abstractmethod
    def transfer(self, files: Sequence[PathLike], dest_dir: PathLike, remove_source: bool = False,
                 on_progress: Optional[ProgressCallback] = None, *,
                 overwrite: bool = False) -> TransferReport:
        """Copy ``files`` into ``dest_dir`` (same base names), verify each copy, and return a
        report; with ``remove_source`` a source is deleted once its copy is verified.

        Raises TransferError naming the file or directory at fault. A destination that
        already exists is refused unless ``overwrite``.
        """
