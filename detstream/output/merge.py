"""Merging the nodes' part files into one counted dataset in stempy's layout, in one pass that
also draws the virtual bright field, and reporting what was written and what was missing."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..atomic import io_error, refuse
from .disk import DiskEstimate, estimate_disk
from .frames import check_frame_shape, scan_size
from .hdf5 import counts_bound, h5_output
from .layout import (WRITE_BLOCK, create_counts_layout, vlen_block, write_stem_images,
                     write_summed_pattern, write_vlen_points)
from .parts import BLOCK_EVENTS, read_part
from .summary import jsonable
from .virtual import IMAGE_NAMES, VirtualDetectors, VirtualImages


class BlockAccumulator(Protocol):
    """Anything that consumes counted frames in blocks while a merge streams them. The arrays
    are valid during the call only (the merge reads the next block into the same buffer)."""

    def add_block(
        self, positions: np.ndarray, flat_events: np.ndarray, offsets: np.ndarray
    ) -> None: ...


@dataclass
class MergeReport:
    """What a merge wrote: counts, the positions no part covered, and the virtual images."""

    path: Path
    scan_width: int
    scan_height: int
    parts: list[Path]
    positions_written: int  # positions filled from parts (the rest are empty, see missing)
    missing: list[int]  # sorted positions no part held
    total_events: int
    images: np.ndarray | None = None  # (2, scan_height, scan_width): bright field, dark field
    disk: DiskEstimate | None = None
    duplicates: int = 0  # later copies of a position dropped (on_duplicate="first")
    conflicted: list[int] = field(default_factory=list)  # copies whose events differ: left out
    detectors: VirtualDetectors | None = None
    summed_pattern: np.ndarray | None = None  # frame-shaped, every written frame's events

    @property
    def bright_field(self) -> np.ndarray | None:
        """(scan_height, scan_width) events inside the bright-field disk per position."""
        return None if self.images is None else self.images[0]

    @property
    def dark_field(self) -> np.ndarray | None:
        """(scan_height, scan_width) events in the annular dark-field ring per position."""
        return None if self.images is None else self.images[1]

    @property
    def n_positions(self) -> int:
        return self.scan_width * self.scan_height

    def summary(self, max_missing: int = 100) -> dict[str, Any]:
        """JSON-able digest (no image; at most ``max_missing`` missing positions listed)."""
        return {
            "path": str(self.path),
            "scan_width": self.scan_width,
            "scan_height": self.scan_height,
            "parts": [str(p) for p in self.parts],
            "positions_written": self.positions_written,
            "n_missing": len(self.missing),
            "missing": self.missing[:max_missing],
            "total_events": self.total_events,
            "duplicates": self.duplicates,
            "disk": None
            if self.disk is None
            else {"center": list(self.disk.center), "radius": self.disk.radius},
            "virtual_detectors": None if self.detectors is None else self.detectors.as_dict(),
        }


def merge_parts(
    part_paths: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    scan_width: int,
    scan_height: int,
    frame_shape: Sequence[int],
    overwrite: bool = False,
    *,
    attrs: Mapping[str, Any] | None = None,
    bright_field: bool = True,
    center: Sequence[float] | None = None,
    radius: float | None = None,
    adf_inner: float | None = None,
    adf_outer: float | None = None,
    accumulators: Sequence[BlockAccumulator] = (),
    block_positions: int = 8192,
    block_events: int = BLOCK_EVENTS,
    on_duplicate: str = "error",
    exclude: Sequence[int] = (),
) -> MergeReport:
    """Merge part files into one stempy file (temp + rename), reading each part once, a block
    (at most ``block_positions`` frames and ``block_events`` events) at a time into one reused
    buffer: the merge's memory does not grow with the scan's events. Positions in no part are
    written empty and listed in ``missing``; a position in two parts is an error naming both, or
    with ``on_duplicate="first"`` (parts of a session whose frames were re-routed after a node
    was lost) its first copy is kept and the others counted in ``duplicates``. With ``bright_field`` the virtual bright-field and annular
    dark-field images (ring ``adf_inner``..``adf_outer``, see ``VirtualDetectors.around``) and the
    summed pattern are computed in the same pass and written as ``stem/images`` (stempy's
    layout) and ``summed_pattern``; the disk, unless given, comes from the parts' summed patterns.
    Positions in ``exclude`` (conflicted ones) are written empty and listed in ``missing``, and
    so is a position whose copies in two parts differ (listed in ``conflicted`` too).
    """
    if on_duplicate not in ("error", "first"):
        raise ValueError(f"on_duplicate must be 'error' or 'first', not {on_duplicate!r}")
    frame_shape = check_frame_shape(frame_shape)
    n = scan_size(scan_width, scan_height)
    n_pixels = frame_shape[0] * frame_shape[1]
    out = Path(out_path)
    if not overwrite and out.exists():  # fail before reading anything
        raise refuse(out)

    parts = [read_part(p) for p in part_paths]
    conflicted = (_conflicting_copies(parts, n, block_positions, block_events)
                  if on_duplicate == "first" else [])
    owner = np.full(n, -1, dtype=np.int32)  # per position, the part it is taken from
    owner[np.asarray([*exclude, *conflicted], dtype=np.int64)] = -2  # left out whatever the parts hold
    keep: list[np.ndarray | None] = []  # per part, which stored frames to write (None: all)
    duplicates = 0
    for k, part in enumerate(parts):
        if part.frame_shape != frame_shape:
            raise ValueError(f"{part.path}: frame shape {part.frame_shape}, expected {frame_shape}")
        pos = part.positions.astype(np.int64)
        if pos.size and int(pos.max()) >= n:
            raise ValueError(
                f"{part.path}: scan position {int(pos.max())} outside a "
                f"{scan_width}x{scan_height} scan"
            )
        left_out = owner[pos] == -2
        if on_duplicate == "first":
            once = np.zeros(pos.size, bool)
            once[np.unique(pos, return_index=True)[1]] = True
            mask = once & (owner[pos] == -1)
            duplicates += int(pos.size - mask.sum() - left_out.sum())
            keep.append(None if mask.all() else mask)
            owner[pos[mask]] = k
            continue
        keep.append(~left_out if left_out.any() else None)
        pos = pos[~left_out]
        uniq, counts = np.unique(pos, return_counts=True)
        if np.any(counts > 1):
            raise ValueError(f"{part.path}: scan position {int(uniq[counts > 1][0])} appears twice")
        clash = pos[owner[pos] >= 0]
        if clash.size:
            p = int(clash.min())
            raise ValueError(
                f"scan position {p} is in two parts: {parts[owner[p]].path} and {part.path}"
            )
        owner[pos] = k
    missing = np.flatnonzero(owner < 0)

    acc_list: list[BlockAccumulator] = list(accumulators)
    virtual: VirtualImages | None = None
    pattern_sum: np.ndarray | None = None
    disk: DiskEstimate | None = None
    if bright_field:
        if center is None or radius is None:
            pattern = np.zeros(frame_shape, np.uint64)
            for part in parts:
                pattern += part.summed_pattern()
            if np.any(pattern):
                est = estimate_disk(pattern)
                center = est.center if center is None else center
                radius = est.radius if radius is None else radius
            else:  # nothing counted at all: an all-zero image, disk unknown
                center = (frame_shape[0] / 2, frame_shape[1] / 2) if center is None else center
                radius = 0.0 if radius is None else radius
        disk = DiskEstimate((float(center[0]), float(center[1])), float(radius))
        virtual = VirtualImages(scan_width, scan_height, frame_shape,
                                VirtualDetectors.around(disk, frame_shape, adf_inner, adf_outer))
        acc_list.append(virtual)
        pattern_sum = np.zeros(n_pixels, np.int64)

    written = [np.diff(part.offsets.astype(np.int64)) if mask is None
               else np.diff(part.offsets.astype(np.int64))[mask] for part, mask in zip(parts, keep)]
    bound = counts_bound(n, frame_shape, np.concatenate(written) if written else np.zeros(0, np.int64),
                         len(json.dumps(jsonable(dict(attrs or {})))))
    total_events = 0
    # The room counted.h5 can take is held before HDF5 writes: a full disk is a DiskFull here,
    # never a failure inside HDF5 (see output/hdf5.py).
    with h5_output(out, overwrite=overwrite, reserve=bound, what="the merge") as f:
        frames = create_counts_layout(f, scan_width, scan_height, frame_shape, attrs)
        for part, mask in zip(parts, keep):
            start = 0
            for positions, flat, offs in part.iter_blocks(block_positions, block_events, reuse=True):
                stored = len(positions)
                if mask is not None:
                    positions, flat, offs = _select_frames(positions, flat, offs,
                                                           mask[start : start + stored])
                start += stored
                if not len(positions):  # every frame of the block was a later copy
                    continue
                if flat.size and int(flat.max()) >= n_pixels:
                    raise ValueError(
                        f"{part.path}: event index {int(flat.max())} outside a frame of "
                        f"{n_pixels} pixels"
                    )
                block = vlen_block([flat[offs[i] : offs[i + 1]] for i in range(len(positions))])
                try:
                    write_vlen_points(frames, positions, block)
                except (OSError, RuntimeError) as e:
                    raise io_error(e, out) from e
                for acc in acc_list:
                    acc.add_block(positions, flat, offs)
                if pattern_sum is not None:
                    pattern_sum += np.bincount(flat, minlength=n_pixels)
                total_events += int(flat.size)
        empty = np.zeros(0, np.uint32)
        for start in range(0, len(missing), WRITE_BLOCK):
            chunk = missing[start : start + WRITE_BLOCK]
            try:
                write_vlen_points(frames, chunk, vlen_block([empty] * len(chunk)))
            except (OSError, RuntimeError) as e:
                raise io_error(e, out) from e
        if virtual is not None:
            try:
                write_stem_images(f, virtual.images, IMAGE_NAMES, virtual.detectors.as_dict())
                write_summed_pattern(f, pattern_sum.astype(np.uint64).reshape(frame_shape))
            except (OSError, RuntimeError) as e:
                raise io_error(e, out) from e

    return MergeReport(
        path=out,
        scan_width=int(scan_width),
        scan_height=int(scan_height),
        parts=[p.path for p in parts],
        positions_written=int(n - len(missing)),
        missing=[int(p) for p in missing],
        total_events=total_events,
        images=None if virtual is None else virtual.images,
        disk=disk,
        duplicates=duplicates,
        conflicted=conflicted,
        detectors=None if virtual is None else virtual.detectors,
        summed_pattern=None if pattern_sum is None else pattern_sum.astype(np.uint64).reshape(frame_shape),
    )


def _conflicting_copies(parts, n: int, block_positions: int, block_events: int) -> list[int]:
    """Positions held more than once whose copies' events differ (a pass over those positions only)."""
    held = np.concatenate([p.positions.astype(np.int64) for p in parts]) if parts else np.zeros(0, np.int64)
    held = held[(held >= 0) & (held < n)]
    repeated = np.flatnonzero(np.bincount(held, minlength=n) > 1)
    if not repeated.size:
        return []
    first: dict[int, np.ndarray] = {}
    conflicted: set[int] = set()
    for part in parts:
        if not np.isin(part.positions, repeated).any():
            continue
        for positions, flat, offs in part.iter_blocks(block_positions, block_events, reuse=True):
            for i in np.flatnonzero(np.isin(positions, repeated)):
                p, events = int(positions[i]), np.sort(flat[offs[i] : offs[i + 1]])
                if p not in first:
                    first[p] = events
                elif not np.array_equal(first[p], events):
                    conflicted.add(p)
    return sorted(conflicted)


def _select_frames(
    positions: np.ndarray, flat: np.ndarray, offs: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The frames of a block where ``mask`` is True, as ``(positions, flat_events, offsets)``."""
    pieces = [flat[offs[i] : offs[i + 1]] for i in np.flatnonzero(mask)]
    lengths = np.diff(offs)[mask]
    out = np.concatenate(pieces) if pieces else flat[:0]
    return positions[mask], out, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

