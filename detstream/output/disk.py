"""Locating the bright-field disk in a scan's summed diffraction pattern, so a virtual
bright-field image can be drawn without the user giving the disk."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .frames import EventsInput, as_events, check_frame_shape, position_pairs


@dataclass(frozen=True)
class DiskEstimate:
    """The bright-field disk: centre ``(row, col)`` and radius, in frame pixels."""

    center: tuple[float, float]
    radius: float


def disk_mask(frame_shape: Sequence[int], center: Sequence[float], radius: float) -> np.ndarray:
    """Boolean frame-shaped mask of pixels within ``radius`` of ``center`` = (row, col)."""
    rows, cols = check_frame_shape(frame_shape)
    r = np.arange(rows, dtype=np.float64)[:, None] - float(center[0])
    c = np.arange(cols, dtype=np.float64)[None, :] - float(center[1])
    return r * r + c * c <= float(radius) ** 2


def summed_pattern(events: EventsInput, frame_shape: Sequence[int]) -> np.ndarray:
    """Sum of all frames (uint64, frame shape): the input to locating the bright-field disk."""
    frame_shape = check_frame_shape(frame_shape)
    n_pixels = frame_shape[0] * frame_shape[1]
    total = np.zeros(n_pixels, np.uint64)
    for position, ev in position_pairs(events):
        arr = as_events(ev, n_pixels, f"scan position {position}")
        total += np.bincount(arr, minlength=n_pixels).astype(np.uint64)
    return total.reshape(frame_shape)


def _clip_hot_pixels(a: np.ndarray, max_passes: int = 5) -> np.ndarray:
    """Replace pixels far above their neighbours (hot/stuck pixels, which can outshine the whole
    disk in a sum) by their neighbours' mean; the brightest neighbour is left out of that mean
    so a hot pair is caught too. Sparse or noisy real signal is left alone."""
    a = a.copy()
    rows, cols = a.shape
    shifts = [(dr, dc) for dr in range(3) for dc in range(3) if (dr, dc) != (1, 1)]
    for _ in range(max_passes):
        p = np.pad(a, 1, mode="edge")
        # The neighbours' sum and maximum one shift at a time: two frame-sized arrays, not eight.
        total, top = np.zeros_like(a), np.full_like(a, -np.inf)
        for dr, dc in shifts:
            v = p[dr : dr + rows, dc : dc + cols]
            total += v
            np.maximum(top, v, out=top)
        typical = (total - top) / (len(shifts) - 1)
        hot = a > 4.0 * typical + 10.0 * np.sqrt(typical) + 10.0
        if not hot.any():
            break
        a[hot] = typical[hot]
    return a


def _box(a: np.ndarray, b: int) -> np.ndarray:
    """b x b mean (b odd, edge padded) through an integral image."""
    if b == 1:
        return a
    p = np.pad(a, b // 2, mode="edge")
    c = np.zeros((p.shape[0] + 1, p.shape[1] + 1))
    c[1:, 1:] = p.cumsum(axis=0).cumsum(axis=1)
    return (c[b:, b:] - c[:-b, b:] - c[b:, :-b] + c[:-b, :-b]) / (b * b)


def _component(mask: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 4-connected region of ``mask`` containing ``seed`` (grown by repeated dilation)."""
    region = np.zeros_like(mask)
    if not mask[seed]:
        return region
    region[seed] = True
    count = 1
    while True:
        grown = region.copy()
        grown[1:] |= region[:-1]
        grown[:-1] |= region[1:]
        grown[:, 1:] |= region[:, :-1]
        grown[:, :-1] |= region[:, 1:]
        grown &= mask
        new_count = int(grown.sum())
        if new_count == count:
            return grown
        region, count = grown, new_count


_MIN_DISK_AREA = 9  # pixels; a smaller bright region is a hot spot, not the bright-field disk
_MAX_INTERIOR_CV = 0.1  # the disk's level must be known well enough for "half of it" to mean much


def _disk_at_scale(clean: np.ndarray, smooth: np.ndarray) -> tuple[DiskEstimate, float, int]:
    """Disk from one smoothing of the pattern, with its interior's relative spread and area."""
    rows = np.arange(clean.shape[0], dtype=np.float64)[:, None]
    cols = np.arange(clean.shape[1], dtype=np.float64)[None, :]

    def centre_and_area(region: np.ndarray) -> tuple[float, float, int]:
        w = np.where(region, clean, 0.0)
        total = w.sum()
        if total <= 0:  # only the smoothing put signal here: use the region's geometric centre
            w, total = region.astype(np.float64), float(region.sum())
        return float((w * rows).sum() / total), float((w * cols).sum() / total), int(region.sum())

    def within(cr: float, cc: float, r: float) -> np.ndarray:
        return (rows - cr) ** 2 + (cols - cc) ** 2 <= max(1.0, r) ** 2

    peak = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
    half_peak = 0.5 * float(smooth[peak])
    cr, cc, area = centre_and_area(_component(smooth >= half_peak, peak))
    level = float(smooth[within(cr, cc, math.sqrt(area / math.pi) / 2)].mean())
    seed = (int(round(cr)), int(round(cc)))
    above = smooth >= 0.5 * level
    if level >= half_peak and above[seed]:  # else (a ring, a noise blob) keep the first region
        cr, cc, area = centre_and_area(_component(above, seed))
    radius = math.sqrt(area / math.pi)
    interior = smooth[within(cr, cc, radius / 2)]
    mean = float(interior.mean())
    cv = float(interior.std()) / mean if mean > 0 else math.inf
    return DiskEstimate((cr, cc), radius), cv, area


def estimate_disk(pattern: np.ndarray) -> DiskEstimate:
    """Locate the bright-field disk in a summed diffraction pattern.

    Rule: after clipping hot pixels, smooth with the smallest box (1, 3, 5, 9, ...
    px) at which the disk's interior is even to within 10%, so sparse or noisy sums still work.
    Then: the connected region around the brightest pixel above half the peak gives a first
    centre (intensity-weighted centre of mass); the connected region above half the level near
    that centre gives the final centre and the radius of a disk of equal area, i.e. where the
    intensity falls to half. Separate bright spots (Bragg disks, hot spots) are ignored.
    """
    s = np.asarray(pattern, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"pattern must be 2-D, got shape {s.shape}")
    clean = _clip_hot_pixels(s)
    if not np.any(clean > 0):
        raise ValueError("the summed pattern is empty; cannot locate a bright-field disk")
    best: tuple[float, DiskEstimate] | None = None
    b = 1
    while True:
        disk, cv, area = _disk_at_scale(clean, _box(clean, b))
        if area >= max(_MIN_DISK_AREA, 4 * b * b):  # else the region is mostly the smoothing
            if cv <= _MAX_INTERIOR_CV:
                return disk
            if best is None or cv < best[0]:
                best = (cv, disk)
        b = 3 if b == 1 else 2 * b - 1  # 1, 3, 5, 9, 17, 33, ...
        if b > max(1, min(s.shape) // 8):
            return best[1] if best is not None else disk

