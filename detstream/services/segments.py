"""A node's part written as numbered segment files, so that what a node acknowledges survives kill -9.

An HDF5 file open for writing is unreadable after its writer is killed, so a node never
acknowledges a frame that sits in an open file: it writes its part as segments
``<parts>/<name>/seg-NNNNNN.h5``, each a complete part file (PartWriter: written under a
temporary name, fsync'd, renamed), and acknowledges a segment's positions only once it is in
place. At a clean end the node adds ``<parts>/<name>.h5``, an index part over its segments
(positions and offsets copied, events an HDF5 virtual dataset over the segments' events), so a
reader that expects one part per node finds it; ``part_files`` lists what a merge should read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import h5py
import numpy as np

from ..output.hdf5 import h5_output
from ..output.parts import PartWriter, read_part

#: An index's own bytes beyond its arrays: HDF5 metadata, and per segment its virtual mapping
#: (file name, dataset name and two selections, in the global heap).
_INDEX_METADATA = 256 << 10
_PER_SEGMENT = 1 << 10

SEGMENT_GLOB = "seg-*.h5"


class SegmentedPart:
    """Stands in for a PartWriter: ``add`` frames, ``commit`` the open segment into place."""

    def __init__(self, parts_dir: Path, name: str, frame_shape: Sequence[int]):
        self.parts_dir = Path(parts_dir)
        self.name = name
        self.directory = self.parts_dir / name
        self.frame_shape = tuple(frame_shape)
        self.segments: list[Path] = []
        self.frames = 0
        self._writer: Optional[PartWriter] = None

    def add(self, position: int, events: np.ndarray) -> None:
        """Add a counted frame to the open segment (opened on the first frame)."""
        if self._writer is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"seg-{len(self.segments):06d}.h5"
            self._writer = PartWriter(path, self.frame_shape)
        self._writer.add(position, events)

    def commit(self) -> Optional[Path]:
        """Close the open segment and rename it into place; its frames are durable from here."""
        if self._writer is None:
            return None
        writer, self._writer = self._writer, None
        path = writer.close()
        self.segments.append(path)
        self.frames += writer.positions_written
        return path

    def abort(self) -> None:
        """Drop the open segment (its frames were never acknowledged); committed ones stay."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def write_index(self, extra: Optional[Mapping[str, Any]] = None) -> Path:
        """Commit, then write ``<parts>/<name>.h5`` over every segment; returns its path."""
        self.commit()
        return write_index(self.parts_dir / f"{self.name}.h5", self.segments, self.frame_shape, extra)


def write_index(path: Path, segments: Sequence[Path], frame_shape: Sequence[int],
                extra: Optional[Mapping[str, Any]] = None) -> Path:
    """A part file (read_part reads it) whose events are a virtual dataset over ``segments``.

    Segment paths are stored relative to the index, which HDF5 resolves from the index's own
    folder: the parts folder may move as a whole.
    """
    path = Path(path)
    parts = [read_part(s) for s in segments]
    if not parts:  # nothing counted here: an ordinary empty part
        return PartWriter(path, frame_shape, overwrite=True).close({**(extra or {}), "segments": 0})
    with h5py.File(parts[0].path, "r") as f:
        version = f.attrs["detstream_part"]
    positions = np.concatenate([p.positions for p in parts])
    offsets = [np.zeros(1, np.uint64)]
    pattern = np.zeros(tuple(frame_shape), np.uint64)
    layout_n = 0
    for p in parts:
        offsets.append(p.offsets[1:] + np.uint64(layout_n))
        layout_n += p.n_events
        pattern += p.summed_pattern()
    extra_json = json.dumps({**(extra or {}), "segments": len(parts)}, default=str)
    pixels = int(frame_shape[0]) * int(frame_shape[1])
    rels = [os.path.relpath(p.path, path.parent) for p in parts]
    bound = (len(positions) * 4 + (len(positions) + 1) * 8 + pixels * 8 + _INDEX_METADATA
             + sum(_PER_SEGMENT + 2 * len(r) for r in rels) + 2 * len(extra_json))
    # Reserved before HDF5 writes, renamed into place whole (see output/hdf5.py).
    with h5_output(path, overwrite=True, reserve=bound, what="this node's index part") as f:
        f.attrs["detstream_part"] = version
        f.attrs["frame_rows"] = np.int64(frame_shape[0])
        f.attrs["frame_cols"] = np.int64(frame_shape[1])
        f.create_dataset("positions", data=positions.astype(np.uint32))
        f.create_dataset("offsets", data=np.concatenate(offsets).astype(np.uint64))
        if layout_n:
            layout = h5py.VirtualLayout(shape=(layout_n,), dtype=np.uint32)
            start = 0
            for p, rel in zip(parts, rels):
                if p.n_events:
                    layout[start:start + p.n_events] = h5py.VirtualSource(rel, "events", shape=(p.n_events,))
                    start += p.n_events
            f.create_virtual_dataset("events", layout)
        else:
            f.create_dataset("events", (0,), dtype=np.uint32)
        f.create_dataset("summed_pattern", data=pattern)
        f.attrs["n_positions"] = np.int64(len(positions))
        f.attrs["n_events"] = np.int64(layout_n)
        f.attrs["extra"] = extra_json
    return path


def part_files(parts_dir: Path) -> list[Path]:
    """Every committed part under ``parts_dir`` a merge should read: each node's index (or
    single part) ``<name>.h5``, and the segments of a node that left no index (it died)."""
    parts_dir = Path(parts_dir)
    if not parts_dir.is_dir():
        return []
    out = sorted(p for p in parts_dir.glob("*.h5") if not p.name.startswith("."))
    for d in sorted(p for p in parts_dir.iterdir() if p.is_dir()):
        if not (parts_dir / f"{d.name}.h5").exists():
            out.extend(sorted(s for s in d.glob(SEGMENT_GLOB) if not s.name.startswith(".")))
    return out
