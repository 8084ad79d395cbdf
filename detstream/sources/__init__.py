"""Frame sources: where sector blocks come from (the simulated camera, or a recorded scan replayed).

Each producer process handles one sector, so a source is iterated per sector:
``iter_sector(s)`` yields ``(SectorMeta, block)`` in frame order for sector ``s`` alone.
"""

from __future__ import annotations

from typing import Iterator, Protocol, Union, runtime_checkable

import numpy as np

from ..profile import DetectorProfile
from .rawv5 import (
    RAW_HEADER,
    RAW_HEADER_SIZE,
    ReplayError,
    ReplaySource,
    SectorFileWriter,
    SectorMeta,
    file_name,
    record_size,
    write_scan,
)
from .simulator import Simulator, Thresholds


@runtime_checkable
class FrameSource(Protocol):
    """What producers and tests need from a source of frames."""

    @property
    def profile(self) -> DetectorProfile: ...

    @property
    def scan_width(self) -> int: ...

    @property
    def scan_height(self) -> int: ...

    @property
    def scan_number(self) -> int: ...

    @property
    def frames(self) -> int:
        """Frames in the scan (each sector yields this many blocks)."""
        ...

    def iter_sector(self, sector: int) -> Iterator[tuple[SectorMeta, Union[np.ndarray, memoryview]]]:
        """(header, sector block) for every frame of the scan, in frame order."""
        ...

    def frame(self, position: int) -> np.ndarray:
        """The whole assembled frame at scan position ``position`` (for tests and cross-checks)."""
        ...


def source_for_spec(spec) -> FrameSource:
    """Build the source a SessionSpec asks for; a replay must match the spec's scan size."""
    if spec.source == "simulated":
        return Simulator(spec.profile, spec.scan_width, spec.scan_height, seed=spec.seed,
                         scan_number=spec.scan_number)
    src = ReplaySource(spec.profile, spec.replay_dir)
    if (src.scan_width, src.scan_height) != (spec.scan_width, spec.scan_height):
        raise ReplayError(
            f"replay directory {spec.replay_dir} holds a {src.scan_width}x{src.scan_height} scan, "
            f"but the session expects {spec.scan_width}x{spec.scan_height}"
        )
    return src


__all__ = [
    "FrameSource", "SectorMeta", "Simulator", "Thresholds", "ReplaySource", "ReplayError",
    "SectorFileWriter", "write_scan", "file_name", "record_size", "RAW_HEADER", "RAW_HEADER_SIZE",
    "source_for_spec",
]
