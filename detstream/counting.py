"""Electron counting of one detector frame, bit-for-bit as stempy.image.electron_count_frame.

A frame's events are the flat (row-major) indices of pixels that, after dark subtraction,
gain and thresholds, are strictly greater than every neighbour among their 8 that exists.

Rules, checked against stempy 3.6 itself (tests/test_counting.py compares on random frames):

* No gain: the dark (as float32) is truncated to uint16, then subtracted in uint16, which
  wraps: a pixel below its dark level becomes ~65535 and survives unless it is >= the X-ray
  threshold. A fractional dark of 20.7 subtracts 20.
* Gain: stempy multiplies by ``float32(np.power(gain, -1))``; the pixel is
  ``(float32(frame) - float32(dark)) * gain_inv`` in float32 arithmetic.
* Then pixels ``<= background_threshold`` or ``>= xray_threshold`` (compared in double)
  become 0, and maxima are taken over these zeroed values: a zeroed pixel still counts as a
  neighbour, and with a negative background threshold on the gain path a zeroed pixel can
  itself be an event (its neighbours are negative). Plateaus are not events; edge pixels
  compare only with neighbours inside the frame; a 1x1 frame's pixel is always an event.
* stempy refuses a float64 gain or dark that float32 cannot hold exactly; here they are
  rounded to float32, which is what stempy would use if it accepted them.

Implementation: numba (nogil, cache=True) in two passes. It measured ~2x faster than the
best vectorised numpy version (threshold, np.flatnonzero, 8 gathers on a padded frame):
0.16-0.2 against 0.39 ms per 576x576 frame, stempy 6.5 ms; and it releases the GIL for the whole frame. Pass 1
subtracts, applies the gain and thresholds into a scratch frame, with integer or float32
bounds equivalent to stempy's double comparisons so it vectorises; pass 2 skips all-zero
8-byte words and compares only surviving pixels with their neighbours. Scratch buffers are
per thread, so one Counter may serve several threads. benchmarks/bench_counting.py measures.
"""

from __future__ import annotations

import math
import threading
from typing import Optional, Sequence

import numpy as np
from numba import njit

__all__ = ["Counter", "count_frame", "DEFAULT_BACKGROUND_THRESHOLD", "DEFAULT_XRAY_THRESHOLD"]

# stempy.image.electron_count_frame's defaults.
DEFAULT_BACKGROUND_THRESHOLD = 4.0
DEFAULT_XRAY_THRESHOLD = 2000.0

_EMPTY_U16 = np.zeros(0, np.uint16)
_EMPTY_F32 = np.zeros(0, np.float32)


# --------------------------------------------------------------------------- kernels


@njit(nogil=True, cache=True, inline="always")
def _is_max(t, i, rows, cols):
    """Whether t[i] is strictly greater than each of its existing 8 neighbours."""
    r = i // cols
    c = i - r * cols
    v = t[i]
    r0 = r - 1 if r > 0 else r
    r1 = r + 1 if r < rows - 1 else r
    c0 = c - 1 if c > 0 else c
    c1 = c + 1 if c < cols - 1 else c
    for rr in range(r0, r1 + 1):
        base = rr * cols
        for cc in range(c0, c1 + 1):
            j = base + cc
            if j != i and not (v > t[j]):
                return False
    return True


@njit(nogil=True, cache=True)
def _maxima_sparse(t, n, rows, cols, lanes, out):
    """Events among the nonzero pixels of t (zero-padded to whole 8-byte words); returns how many."""
    words = t.view(np.uint64)
    ne = 0
    for k in range(words.shape[0]):
        if words[k] != 0:
            start = k * lanes
            stop = min(start + lanes, n)
            for i in range(start, stop):
                if t[i] != 0 and _is_max(t, i, rows, cols):
                    out[ne] = i
                    ne += 1
    return ne


@njit(nogil=True, cache=True)
def _maxima_dense(t, n, rows, cols, out):
    """Events among all pixels of t (needed when zeroed pixels can be maxima); returns how many."""
    ne = 0
    for i in range(n):
        if _is_max(t, i, rows, cols):
            out[ne] = i
            ne += 1
    return ne


@njit(nogil=True, cache=True)
def _count_raw(frame, dark, lo, span, t, out):
    """uint16 path: t = frame - dark (wrapping), kept iff lo <= t < lo + span; returns event count."""
    rows, cols = frame.shape
    f = frame.ravel()
    n = f.shape[0]
    if dark.shape[0] == 0:
        for i in range(n):
            v = f[i]
            t[i] = v if np.uint16(v - lo) < span else 0
    else:
        for i in range(n):
            v = np.uint16(f[i] - dark[i])
            t[i] = v if np.uint16(v - lo) < span else 0
    for i in range(n, t.shape[0]):
        t[i] = 0
    # Every kept value is >= 1 and zeroed pixels are 0, so only nonzero pixels can be maxima.
    return _maxima_sparse(t, n, rows, cols, 4, out)


@njit(nogil=True, cache=True)
def _count_gain(frame, dark, gain_inv, lo, hi, dense, t, out):
    """float32 path: t = (frame - dark) * gain_inv, kept iff lo < t < hi; returns event count."""
    rows, cols = frame.shape
    f = frame.ravel()
    n = f.shape[0]
    zero = np.float32(0.0)
    if dark.shape[0] == 0:
        for i in range(n):
            v = np.float32(f[i]) * gain_inv[i]
            t[i] = v if (v > lo) & (v < hi) else zero
    else:
        for i in range(n):
            v = (np.float32(f[i]) - dark[i]) * gain_inv[i]
            t[i] = v if (v > lo) & (v < hi) else zero
    for i in range(n, t.shape[0]):
        t[i] = zero
    if dense:
        return _maxima_dense(t, n, rows, cols, out)
    return _maxima_sparse(t, n, rows, cols, 2, out)


# --------------------------------------------------------------------------- thresholds


def _uint16_bounds(background_threshold: float, xray_threshold: float) -> tuple[int, int]:
    """(lo, hi) with, for uint16 v: lo <= v < hi  <=>  bg < v < xray compared as doubles."""
    lo = math.floor(min(max(background_threshold, -1.0), 65536.0)) + 1  # smallest v > bg
    hi = math.ceil(min(max(xray_threshold, 0.0), 65536.0))  # smallest v >= xray
    return min(lo, 65536), hi


def _float32_below(x: float) -> np.float32:
    """Largest float32 <= x, so that for float32 v: v <= x  <=>  v <= _float32_below(x)."""
    with np.errstate(over="ignore"):
        y = np.float32(x)
    if float(y) > x:
        y = np.nextafter(y, np.float32(-np.inf))
    return np.float32(y)


def _float32_above(x: float) -> np.float32:
    """Smallest float32 >= x, so that for float32 v: v >= x  <=>  v >= _float32_above(x)."""
    with np.errstate(over="ignore"):
        y = np.float32(x)
    if float(y) < x:
        y = np.nextafter(y, np.float32(np.inf))
    return np.float32(y)


# --------------------------------------------------------------------------- public API


def _check_map(name: str, arr, frame_shape: tuple[int, int]) -> np.ndarray:
    a = np.asarray(arr)
    if a.shape != frame_shape:
        raise ValueError(f"{name} has shape {a.shape}, expected the frame shape {frame_shape}")
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)
            or a.dtype == np.bool_):
        raise ValueError(f"{name} must be real numbers, got dtype {a.dtype}")
    return a


_warm_lock = threading.Lock()
_warmed: set[tuple[str, bool]] = set()


class Counter:
    """Counts electrons in frames of one shape with one dark, gain and pair of thresholds.

    Build one per worker: the dark reference and gain are validated and converted once, and
    the numba kernels are compiled (or loaded from cache) here rather than on the first frame.
    Rejected (ValueError): a dark or gain not of frame_shape, a dark that is negative, NaN or
    above 65535, a gain that is not finite and > 0, a NaN threshold.
    """

    def __init__(
        self,
        frame_shape: Sequence[int],
        dark_reference: Optional[np.ndarray] = None,
        gain: Optional[np.ndarray] = None,
        background_threshold: float = DEFAULT_BACKGROUND_THRESHOLD,
        xray_threshold: float = DEFAULT_XRAY_THRESHOLD,
    ):
        shape = tuple(int(s) for s in frame_shape)
        if len(shape) != 2 or min(shape) <= 0:
            raise ValueError(f"frame_shape must be (rows, cols) with both > 0, got {tuple(frame_shape)}")
        bg, xr = float(background_threshold), float(xray_threshold)
        if math.isnan(bg) or math.isnan(xr):
            raise ValueError(f"thresholds must be numbers, got background {bg}, x-ray {xr}")
        self.frame_shape: tuple[int, int] = shape
        self.background_threshold = bg
        self.xray_threshold = xr
        self._n = shape[0] * shape[1]

        dark32 = None
        if dark_reference is not None:
            d = _check_map("dark reference", dark_reference, shape)
            dark32 = np.ascontiguousarray(d, dtype=np.float32).ravel()
            if not np.all(np.isfinite(dark32)):
                raise ValueError("dark reference contains NaN or infinite values")
            lowest, highest = float(dark32.min()), float(dark32.max())
            if lowest < 0:
                raise ValueError(f"dark reference has negative values (min {lowest}); "
                                 "a dark level is an offset of uint16 counts, so >= 0")
            if highest >= 65536:
                raise ValueError(f"dark reference exceeds the uint16 range (max {highest})")

        self.has_gain = gain is not None
        if self.has_gain:
            g = _check_map("gain", gain, shape)
            if not np.issubdtype(g.dtype, np.floating):
                g = g.astype(np.float64)  # stempy's np.power(int, -1) would raise
            if not np.all(np.isfinite(g)) or not np.all(g > 0):
                raise ValueError("gain must be finite and > 0 everywhere")
            gain_inv = np.power(g, -1).astype(np.float32)  # exactly stempy's conversion
            if not np.all(np.isfinite(gain_inv)):
                raise ValueError("gain has values too small for a float32 reciprocal")
            self._gain_inv = np.ascontiguousarray(gain_inv).ravel()
            self._dark = _EMPTY_F32 if dark32 is None else dark32
            self._lo = _float32_below(bg)
            self._hi = _float32_above(xr)
            # Kept values exceed bg; if bg >= 0 they are > 0 = the zeroed value, so no zeroed
            # pixel can be a maximum and the sparse scan is exact.
            self._dense = not (bg >= 0)
            self._t_dtype, self._lanes = np.float32, 2
        else:
            self._dark = _EMPTY_U16 if dark32 is None else dark32.astype(np.uint16)
            lo, hi = _uint16_bounds(bg, xr)
            # Events need a value >= 1 (a neighbour is >= 0), and keeping a 0 leaves the frame
            # unchanged, so keep [max(lo, 1), hi): then only nonzero pixels can be maxima.
            lo = max(lo, 1)
            span = max(hi - lo, 0)
            self._lo, self._span = np.int64(lo % 65536), np.int64(span)
            self._t_dtype, self._lanes = np.uint16, 4
        self._local = threading.local()
        self._warm_up()

    def _buffers(self) -> tuple[np.ndarray, np.ndarray]:
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            padded = -(-self._n // self._lanes) * self._lanes
            bufs = (np.empty(padded, self._t_dtype), np.empty(self._n, np.uint32))
            self._local.bufs = bufs
        return bufs

    def _run(self, frame: np.ndarray, t: np.ndarray, out: np.ndarray) -> int:
        if self.has_gain:
            return _count_gain(frame, self._dark, self._gain_inv, self._lo, self._hi,
                               self._dense, t, out)
        return _count_raw(frame, self._dark, self._lo, self._span, t, out)

    def _warm_up(self) -> None:
        """Compile (or load) the kernel for writable and read-only frames, once per process."""
        key = ("gain" if self.has_gain else "raw", self._dark.shape[0] > 0)
        with _warm_lock:
            if key in _warmed:
                return
            t, out = self._buffers()
            frame = np.zeros(self.frame_shape, np.uint16)
            self._run(frame, t, out)
            frame.flags.writeable = False
            self._run(frame, t, out)
            _warmed.add(key)

    def count(self, frame: np.ndarray) -> np.ndarray:
        """Flat indices (uint32, ascending) of the electron events in one uint16 frame.

        The frame is only read, so it may be a view into shared memory.
        """
        if frame.shape != self.frame_shape:
            raise ValueError(f"frame has shape {frame.shape}, expected {self.frame_shape}")
        if frame.dtype != np.uint16:
            raise ValueError(f"frame must be native uint16, got dtype {frame.dtype}")
        if self._n == 1:  # no neighbours: stempy reports the pixel whatever its value
            return np.zeros(1, np.uint32)
        if not frame.flags.c_contiguous:
            frame = np.ascontiguousarray(frame)
        t, out = self._buffers()
        ne = self._run(frame, t, out)
        return out[:ne].copy()

    __call__ = count

    def __repr__(self) -> str:
        return (f"Counter(frame_shape={self.frame_shape}, dark={self._dark.shape[0] > 0}, "
                f"gain={self.has_gain}, background_threshold={self.background_threshold}, "
                f"xray_threshold={self.xray_threshold})")


def count_frame(
    frame: np.ndarray,
    dark_reference: Optional[np.ndarray] = None,
    gain: Optional[np.ndarray] = None,
    background_threshold: float = DEFAULT_BACKGROUND_THRESHOLD,
    xray_threshold: float = DEFAULT_XRAY_THRESHOLD,
) -> np.ndarray:
    """Count one frame without keeping a Counter: convenient, but re-validates dark and gain."""
    frame = np.asarray(frame)
    return Counter(frame.shape, dark_reference, gain, background_threshold, xray_threshold).count(frame)


def compile_kernels() -> None:
    """Compile every kernel into numba's on-disk cache (``make install`` runs this), so that no
    service, session or test process pays the ~4 s first-call compilation."""
    frame = np.arange(64, dtype=np.uint16).reshape(8, 8)
    dark = np.zeros(frame.shape, np.float32)
    for gain in (None, np.ones(frame.shape, np.float32)):
        count_frame(frame, dark, gain)
    count_frame(frame)
