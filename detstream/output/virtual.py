"""Virtual detectors: bright field (events inside the disk) and annular dark field (events in a
ring outside it) per scan position, and the centre of mass of each frame's events relative to the
disk centre (DPC), computed from the counted events, never from raw frames.

One geometry (:class:`VirtualDetectors`) serves the live images the nodes publish, the final
``stem/images`` in counted.h5, and the py4DSTEM hand-off, so they agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from .disk import DiskEstimate
from .frames import check_frame_shape, scan_size

#: The names stempy's ``stem/images`` carries for our images, in this order: events in the disk and
#: in the ring, and the centre of mass of the events relative to the disk centre, in detector pixels
#: along frame columns (x) and frame rows (y).
IMAGE_NAMES = ("bright_field", "annular_dark_field", "com_x", "com_y")
COM_NAMES = IMAGE_NAMES[2:]
BF, ADF = 1, 2  # labels of a frame pixel: 0 belongs to neither detector
DEFAULT_ADF_INNER = 1.5  # ADF inner radius, in bright-field radii, when the session gives none


@dataclass(frozen=True)
class VirtualDetectors:
    """A bright-field disk and an annular dark-field ring, in frame pixels.

    A pixel at distance ``r`` from ``center`` (row, col) is bright field if ``r <= bf_radius``
    and dark field if ``adf_inner <= r <= adf_outer`` (the ring lies outside the disk).
    """

    center: tuple[float, float]
    bf_radius: float
    adf_inner: float
    adf_outer: float

    def __post_init__(self) -> None:
        if not (0 <= self.bf_radius <= self.adf_inner <= self.adf_outer):
            raise ValueError(
                f"virtual detectors need 0 <= bf_radius ({self.bf_radius}) <= adf_inner "
                f"({self.adf_inner}) <= adf_outer ({self.adf_outer})")

    @classmethod
    def around(cls, disk: DiskEstimate, frame_shape: Sequence[int], adf_inner: Optional[float] = None,
               adf_outer: Optional[float] = None) -> "VirtualDetectors":
        """Detectors for a bright-field disk: the ring from ``adf_inner`` (default 1.5 disk radii)
        to ``adf_outer`` (default: half the frame's shorter side, as stempy's examples use)."""
        rows, cols = check_frame_shape(frame_shape)
        radius = float(disk.radius)
        # A ring given for an expected disk starts outside the disk that was found.
        inner = max(radius, DEFAULT_ADF_INNER * radius if adf_inner is None else float(adf_inner))
        outer = max(inner, min(rows, cols) / 2 if adf_outer is None else float(adf_outer))
        return cls((float(disk.center[0]), float(disk.center[1])), radius, inner, outer)

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VirtualDetectors":
        try:
            c = d["center"]
            return cls((float(c[0]), float(c[1])), float(d["bf_radius"]), float(d["adf_inner"]),
                       float(d["adf_outer"]))
        except (KeyError, TypeError, IndexError) as err:
            raise ValueError(f"not a virtual detector record: {d!r} ({err})") from None

    def labels(self, frame_shape: Sequence[int]) -> np.ndarray:
        """Flat uint8 map of the frame: BF (1), ADF (2) or neither (0) for every pixel."""
        rows, cols = check_frame_shape(frame_shape)
        r = np.arange(rows, dtype=np.float64)[:, None] - self.center[0]
        c = np.arange(cols, dtype=np.float64)[None, :] - self.center[1]
        d2 = r * r + c * c
        out = np.zeros((rows, cols), np.uint8)
        out[(d2 >= self.adf_inner ** 2) & (d2 <= self.adf_outer ** 2)] = ADF
        out[d2 <= self.bf_radius ** 2] = BF
        return out.ravel()


def session_detectors(imaging: Any, frame_shape: Sequence[int],
                      found: Optional[DiskEstimate] = None) -> Optional[VirtualDetectors]:
    """The detectors of a session's ``VirtualImaging``: its own disk if it gives one, else the
    disk ``found`` in a summed pattern; None if neither is known yet."""
    if imaging.center is not None:
        found = DiskEstimate(tuple(imaging.center), float(imaging.bf_radius))
    if found is None:
        return None
    return VirtualDetectors.around(found, frame_shape, imaging.adf_inner, imaging.adf_outer)


def frame_sums(labels: np.ndarray, flat_events: np.ndarray, offsets: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """Per frame of a block (frame ``i`` = ``flat_events[offsets[i]:offsets[i+1]]``), the events
    in the bright field and in the dark field, as two int64 arrays."""
    lab = labels[flat_events]
    offsets = np.asarray(offsets, dtype=np.int64)
    out = []
    for which in (BF, ADF):
        inside = np.zeros(lab.size + 1, np.int64)
        np.cumsum(lab == which, out=inside[1:])
        out.append(inside[offsets[1:]] - inside[offsets[:-1]])
    return out[0], out[1]


def row_lookup(frame_shape: Sequence[int]) -> np.ndarray:
    """Frame row of every flat pixel index (uint16 if it fits): a gather is cheaper than a division."""
    rows, cols = check_frame_shape(frame_shape)
    return np.repeat(np.arange(rows, dtype=np.uint16 if rows <= 0xFFFF else np.int64), cols)


def frame_moments(rows_of: np.ndarray, cols: int, flat_events: np.ndarray, offsets: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per frame of a block, the sums of its events' columns and of their rows (int64, exact):
    with the event count they give the centre of mass (``centre_of_mass``)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    out = []
    for values in (flat_events, rows_of[flat_events]):
        total = np.zeros(len(values) + 1, np.int64)
        np.cumsum(values, out=total[1:])
        out.append(total[offsets[1:]] - total[offsets[:-1]])
    flat_sum, row_sum = out
    return flat_sum - int(cols) * row_sum, row_sum


def centre_of_mass(events: np.ndarray, col_sum: np.ndarray, row_sum: np.ndarray,
                   center: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``(com_x, com_y)``: the mean column and row of each frame's events less the disk centre's
    (``center`` = row, col), float64; 0 for a frame without events. The live images and the final
    ``stem/images`` both take it from the same exact integer sums, so they agree to the bit."""
    n = np.asarray(events, np.int64)
    row_sum = np.asarray(row_sum, np.int64)
    col_sum = np.asarray(col_sum, np.int64)
    some = n > 0
    safe = np.where(some, n, 1)
    com_x = np.where(some, col_sum / safe - float(center[1]), 0.0)
    com_y = np.where(some, row_sum / safe - float(center[0]), 0.0)
    return com_x, com_y


class VirtualImages:
    """Bright-field, dark-field and centre-of-mass images of a scan, accumulated from blocks of
    counted frames (a merge's ``BlockAccumulator``)."""

    def __init__(self, scan_width: int, scan_height: int, frame_shape: Sequence[int],
                 detectors: VirtualDetectors):
        self.scan_width, self.scan_height = int(scan_width), int(scan_height)
        self.frame_shape = check_frame_shape(frame_shape)
        self.detectors = detectors
        self._labels = detectors.labels(self.frame_shape)
        self._rows_of = row_lookup(self.frame_shape)
        n = scan_size(scan_width, scan_height)
        self._bf = np.zeros(n, np.uint64)
        self._adf = np.zeros(n, np.uint64)
        self._events = np.zeros(n, np.int64)
        self._col_sum = np.zeros(n, np.int64)
        self._row_sum = np.zeros(n, np.int64)

    def add_block(self, positions: np.ndarray, flat_events: np.ndarray, offsets: np.ndarray) -> None:
        bf, adf = frame_sums(self._labels, flat_events, offsets)
        col_sum, row_sum = frame_moments(self._rows_of, self.frame_shape[1], flat_events, offsets)
        positions = np.asarray(positions, np.int64)
        np.add.at(self._bf, positions, bf.astype(np.uint64))
        np.add.at(self._adf, positions, adf.astype(np.uint64))
        np.add.at(self._events, positions, np.diff(np.asarray(offsets, np.int64)))
        np.add.at(self._col_sum, positions, col_sum)
        np.add.at(self._row_sum, positions, row_sum)

    @property
    def com(self) -> tuple[np.ndarray, np.ndarray]:
        """``(com_x, com_y)``, each ``(scan_height, scan_width)`` float64 (see ``centre_of_mass``)."""
        cx, cy = centre_of_mass(self._events, self._col_sum, self._row_sum, self.detectors.center)
        shape = (self.scan_height, self.scan_width)
        return cx.reshape(shape), cy.reshape(shape)

    @property
    def images(self) -> np.ndarray:
        """float64 ``(4, scan_height, scan_width)`` in IMAGE_NAMES order: bright field and dark field
        (whole event counts, exact in float64), then the centre of mass, x and y."""
        shape = (self.scan_height, self.scan_width)
        return np.stack([self._bf.astype(np.float64).reshape(shape), self._adf.astype(np.float64).reshape(shape),
                         *self.com])
