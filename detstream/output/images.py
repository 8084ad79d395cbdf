"""Images of a scan: the virtual bright field (events inside the bright-field disk, per scan
position), and PNG files of any image, drawn by matplotlib."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np

from ..atomic import atomic_output
from .disk import disk_mask, estimate_disk, summed_pattern
from .frames import EventsInput, as_events, check_frame_shape, position_pairs, scan_size


class VirtualBrightField:
    """Accumulates a virtual bright-field image (events inside a disk, per scan position) from
    frames given one at a time or in blocks, so it can ride along with a merge."""

    def __init__(
        self,
        scan_width: int,
        scan_height: int,
        frame_shape: Sequence[int],
        center: Sequence[float],
        radius: float,
    ):
        self.scan_width, self.scan_height = int(scan_width), int(scan_height)
        self._n = scan_size(scan_width, scan_height)
        self.frame_shape = check_frame_shape(frame_shape)
        self.center = (float(center[0]), float(center[1]))
        self.radius = float(radius)
        self._mask = disk_mask(self.frame_shape, self.center, self.radius).ravel()
        self._counts = np.zeros(self._n, dtype=np.int64)

    def add(self, position: int, events: np.ndarray) -> None:
        position = int(position)
        if not 0 <= position < self._n:
            raise ValueError(f"scan position {position} outside a {self._n}-position scan")
        arr = as_events(events, self._mask.size, f"scan position {position}")
        self._counts[position] += int(np.count_nonzero(self._mask[arr]))

    def add_block(
        self, positions: np.ndarray, flat_events: np.ndarray, offsets: np.ndarray
    ) -> None:
        """Frames ``i`` = ``flat_events[offsets[i]:offsets[i+1]]`` at ``positions[i]``."""
        inside = np.concatenate([[0], np.cumsum(self._mask[flat_events], dtype=np.int64)])
        offsets = np.asarray(offsets, dtype=np.int64)
        per_frame = inside[offsets[1:]] - inside[offsets[:-1]]
        np.add.at(self._counts, np.asarray(positions, np.int64), per_frame)

    @property
    def image(self) -> np.ndarray:
        """Counts inside the disk, shape (scan_height, scan_width)."""
        return self._counts.reshape(self.scan_height, self.scan_width).copy()


def virtual_bright_field(
    events: EventsInput,
    scan_width: int,
    scan_height: int,
    frame_shape: Sequence[int],
    center: Sequence[float] | None = None,
    radius: float | None = None,
) -> np.ndarray:
    """Image (scan_height, scan_width) of events inside the bright-field disk per position.

    ``events`` is a sequence indexed by position, a mapping position -> events, or an iterable
    of (position, events). Without ``center``/``radius`` the disk is estimated from the summed
    pattern (``estimate_disk``), which needs two passes, so a one-shot iterator is buffered.
    """
    pairs: Iterable[tuple[int, np.ndarray]] = position_pairs(events)
    if center is None or radius is None:
        pairs = list(pairs)  # two passes: for a sequence this is a list of references only
        disk = estimate_disk(summed_pattern(iter(pairs), frame_shape))
        center = disk.center if center is None else center
        radius = disk.radius if radius is None else radius
    acc = VirtualBrightField(scan_width, scan_height, frame_shape, center, radius)
    for position, ev in pairs:
        acc.add(position, ev)
    return acc.image


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Scale an image's finite min..max linearly to 0..255 (rounded); a constant image and
    non-finite pixels become 0."""
    a = np.asarray(image)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"image must be a non-empty 2-D array, got shape {a.shape}")
    if a.dtype.kind not in "biuf":
        raise TypeError(f"image must be real numbers, got dtype {a.dtype}")
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    out = np.zeros(a.shape, np.uint8)
    if not finite.any():
        return out
    lo, hi = float(a[finite].min()), float(a[finite].max())
    if hi > lo:
        scaled = np.rint((a[finite] - lo) * (255.0 / (hi - lo)))
        out[finite] = np.clip(scaled, 0, 255).astype(np.uint8)
    return out


def write_png(path: str | os.PathLike, image: np.ndarray, *, overwrite: bool = True) -> np.ndarray:
    """Write ``image`` as an 8-bit grey PNG scaled by ``to_uint8``, atomically. Returns the
    pixels written."""
    # Imported here: 32 MiB and 0.3 s that distributors, which never draw, should not pay.
    import matplotlib.image

    pixels = to_uint8(image)
    # Grey as explicit RGBA bytes: a colormap would round some levels one step down.
    rgba = np.dstack([pixels, pixels, pixels, np.full_like(pixels, 255)])
    with atomic_output(path, overwrite=overwrite) as tmp:
        matplotlib.image.imsave(tmp, rgba, format="png")
    return pixels
