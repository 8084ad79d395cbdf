"""Checks every output writer and reader shares: scan and frame geometry, one frame's events
(flat pixel indices, ``row * frame_cols + col``), and the ways a scan's events are handed in."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Union

import numpy as np

EventsInput = Union[
    Sequence[np.ndarray], Mapping[int, np.ndarray], Iterable[tuple[int, np.ndarray]]
]


def check_frame_shape(frame_shape: Sequence[int]) -> tuple[int, int]:
    """``(rows, cols)`` as ints, both positive."""
    shape = tuple(int(s) for s in frame_shape)
    if len(shape) != 2 or min(shape) <= 0:
        raise ValueError(f"frame_shape must be (rows, cols) of positive ints, got {frame_shape!r}")
    return shape  # type: ignore[return-value]


def scan_size(scan_width: int, scan_height: int) -> int:
    """Number of scan positions; the size must be positive."""
    if int(scan_width) <= 0 or int(scan_height) <= 0:
        raise ValueError(f"scan size must be positive, got {scan_width}x{scan_height}")
    return int(scan_width) * int(scan_height)


def as_events(events: Any, n_pixels: int, where: str) -> np.ndarray:
    """One frame's events as a contiguous uint32 array, checked to be pixel indices of the frame."""
    arr = np.asarray(events)
    if arr.ndim != 1:
        raise ValueError(f"{where}: events must be 1-D flat pixel indices, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, np.uint32)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{where}: events must be integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= n_pixels:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{where}: event index {bad} outside a frame of {n_pixels} pixels")
    return np.ascontiguousarray(arr, dtype=np.uint32)


def position_pairs(events: EventsInput) -> Iterator[tuple[int, np.ndarray]]:
    """(position, events) pairs from a position-indexed sequence, a mapping or pairs."""
    if isinstance(events, Mapping):
        yield from events.items()
    elif isinstance(events, (Sequence, np.ndarray)):
        yield from enumerate(events)
    else:
        yield from events
