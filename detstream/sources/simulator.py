"""A simulated 4D-STEM camera: seeded, realistic enough to count, and cheap enough never to be the bottleneck.

A pool of distinct frames is rendered once at construction; each scan position then reuses a
pool frame chosen from (seed, position) and only its header changes. The pool is laid out as a
grid of bright-field disk offsets, and a position picks a frame from the grid cell that matches
its place in the scan, so the disk drifts smoothly across the scan and a virtual bright-field
image shows structure.
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import numpy as np

from ..profile import DetectorProfile
from .rawv5 import SectorMeta, pixel_dtype

_U64 = np.uint64


class Thresholds(NamedTuple):
    """Counting thresholds that suit the simulated noise; ``CountingParams(**t._asdict())`` takes them."""

    background_threshold: float
    xray_threshold: float


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A fast, well-mixed 64-bit hash (uint64 arithmetic wraps), for picking pool frames."""
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def simulated_dark_reference(profile: DetectorProfile, seed: int = 0,
                             level: float = 20.0, spread: float = 1.5) -> np.ndarray:
    """The simulator's per-pixel dark offset map for ``seed``, without rendering any frame.

    Whole ADU: subtracting it is exact in integer or float arithmetic, so no implementation's
    rounding or truncation rule changes a count.
    """
    rng = np.random.default_rng([seed, 0])
    dark = level + spread * rng.standard_normal(profile.frame_shape)
    return np.clip(np.rint(dark), 0, None).astype(np.float32)


class Simulator:
    """A seeded scan of ``scan_width x scan_height`` frames for ``profile``; a FrameSource.

    Frames are a dark offset map (integer ADU, ~20) plus read noise, Poisson electron hits
    (denser in the bright-field disk) each spreading ~200 ADU over a 3x3 footprint, and a few
    X-ray hits of thousands of ADU. Frame numbers start at 1 and follow the row-major position.
    """

    # Detector and beam model; class attributes so a subclass or test can change them.
    DARK_LEVEL = 20.0          # mean dark offset, ADU
    DARK_SPREAD = 1.5          # fixed pixel-to-pixel variation of the dark offset, ADU
    READ_NOISE = 3.0           # read noise sigma, ADU
    ELECTRON_ADU = 200.0       # mean total charge of one electron, ADU
    ELECTRON_ADU_SD = 35.0
    FOOTPRINT_SIGMA = 0.55     # charge cloud sigma, pixels
    DISK_DOSE = 0.02           # electrons per pixel per frame inside the disk
    BACKGROUND_DOSE = 0.0005   # electrons per pixel per frame outside it
    XRAYS_PER_FRAME = 2.0
    XRAY_ADU = (3000.0, 9000.0)

    def __init__(self, profile: DetectorProfile, scan_width: int, scan_height: int, seed: int = 0,
                 scan_number: int = 1, pool_size: int = 64):
        if not (0 < scan_width <= 0xFFFF and 0 < scan_height <= 0xFFFF):
            raise ValueError(f"scan size {scan_width}x{scan_height} must be 1..65535 each way")
        if scan_width * scan_height > 0xFFFFFFFF:
            raise ValueError("scan has more frames than a u32 frame number can count")
        if not 0 <= scan_number <= 0xFFFFFFFF:
            raise ValueError(f"scan_number {scan_number} does not fit a u32")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        self._profile = profile
        self._width = scan_width
        self._height = scan_height
        self._scan_number = scan_number
        self.seed = seed
        self.pool_size = pool_size
        self.grid = max(1, math.isqrt(pool_size))  # disk offsets form a grid x grid lattice
        self.disk_radius = min(profile.frame_rows, profile.frame_cols) / 8.0

        rows, cols = profile.frame_shape
        self._dark = simulated_dark_reference(profile, seed, self.DARK_LEVEL, self.DARK_SPREAD)
        self._dark.setflags(write=False)

        self._pool = np.empty((pool_size, rows, cols), dtype=pixel_dtype(profile))
        self._events: list[np.ndarray] = []
        for i in range(pool_size):
            self._events.append(self._render(i, self._pool[i]))
        self._pool.setflags(write=False)
        # Views made once, so iteration only indexes a list.
        self._sector_views = [[self._pool[i, profile.sector_slice(s)] for i in range(pool_size)]
                              for s in range(profile.sectors)]

    # -- the model ------------------------------------------------------------------------------

    def _cell_of_pool(self, i: int) -> tuple[int, int]:
        cells = self.grid * self.grid
        c = i % cells
        return c % self.grid, c // self.grid

    def disk_centre(self, cu: int, cv: int) -> tuple[float, float]:
        """Disk centre (row, col) for grid cell (cu, cv): a smooth drift of up to radius/2."""
        g = self.grid
        u, v = (cu + 0.5) / g, (cv + 0.5) / g
        amp = self.disk_radius / 2
        rows, cols = self._profile.frame_shape
        dc = amp * math.sin(math.pi * (u - 0.5)) + 0.2 * amp * math.sin(2 * math.pi * v)
        dr = amp * math.sin(math.pi * (v - 0.5)) + 0.2 * amp * math.sin(2 * math.pi * u)
        return (rows - 1) / 2 + dr, (cols - 1) / 2 + dc

    def _render(self, i: int, out: np.ndarray) -> np.ndarray:
        """Render pool frame ``i`` into ``out``; return the flat pixel indices of its electrons."""
        rows, cols = self._profile.frame_shape
        rng = np.random.default_rng([self.seed, 1, i])
        cu, cv = self._cell_of_pool(i)
        cr, cc = self.disk_centre(cu, cv)
        g = self.grid
        # Mild dose modulation across the scan, as a sample's thickness would give.
        dose = self.DISK_DOSE * (1 + 0.3 * math.cos(2 * math.pi * (cu + 0.5) / g)
                                 * math.cos(2 * math.pi * (cv + 0.5) / g))
        radius = self.disk_radius

        n_disk = rng.poisson(dose * math.pi * radius * radius)
        rad = radius * np.sqrt(rng.random(n_disk))
        ang = 2 * math.pi * rng.random(n_disk)
        n_bg = rng.poisson(self.BACKGROUND_DOSE * rows * cols)
        r = np.concatenate([cr + rad * np.sin(ang), rng.random(n_bg) * rows])
        c = np.concatenate([cc + rad * np.cos(ang), rng.random(n_bg) * cols])
        keep = (r >= 0) & (r < rows) & (c >= 0) & (c < cols)
        r, c = r[keep], c[keep]
        pr, pc = np.floor(r).astype(np.int64), np.floor(c).astype(np.int64)
        # Centroid within the central 60% of the hit pixel, so the hit pixel takes the largest share.
        orow = (r - pr - 0.5) * 0.6
        ocol = (c - pc - 0.5) * 0.6
        charge = np.clip(rng.normal(self.ELECTRON_ADU, self.ELECTRON_ADU_SD, r.size),
                         self.ELECTRON_ADU / 4, None)

        d = np.arange(-1, 2)
        wr = np.exp(-((d[None, :] - orow[:, None]) ** 2) / (2 * self.FOOTPRINT_SIGMA ** 2))
        wc = np.exp(-((d[None, :] - ocol[:, None]) ** 2) / (2 * self.FOOTPRINT_SIGMA ** 2))
        w = wr[:, :, None] * wc[:, None, :]
        w *= (charge / w.sum(axis=(1, 2)))[:, None, None]
        pcols = cols + 2  # a one-pixel border catches charge that spills off the edge
        idx = ((pr + 1)[:, None, None] + d[None, :, None]) * pcols + (pc + 1)[:, None, None] + d
        signal = np.bincount(idx.ravel(), weights=w.ravel(), minlength=(rows + 2) * pcols)
        signal = signal.reshape(rows + 2, pcols)[1:-1, 1:-1]

        n_x = rng.poisson(self.XRAYS_PER_FRAME)
        xr = rng.integers(0, rows, n_x)
        xc = rng.integers(0, cols, n_x)
        lo, hi = self.XRAY_ADU
        np.add.at(signal, (xr, xc), rng.uniform(lo, hi, n_x))

        frame = signal + self._dark + self.READ_NOISE * rng.standard_normal((rows, cols), dtype=np.float32)
        np.clip(np.rint(frame), 0, np.iinfo(out.dtype).max, out=frame)
        out[...] = frame
        return np.unique(pr * cols + pc).astype(np.uint32)

    def _pool_index(self, start: int, stop: int) -> np.ndarray:
        """Pool frame for each position in [start, stop): from the position's grid cell, then a
        hash of (seed, position) among that cell's frames."""
        pos = np.arange(start, stop, dtype=np.uint64)
        x = pos % _U64(self._width)
        y = pos // _U64(self._width)
        g = _U64(self.grid)
        cell = (y * g // _U64(self._height)) * g + x * g // _U64(self._width)
        cells = _U64(self.grid * self.grid)
        variants = (_U64(self.pool_size) - cell + cells - _U64(1)) // cells  # >= 1
        h = _splitmix64(pos ^ _splitmix64(np.full_like(pos, self.seed)))
        return (cell + (h % variants) * cells).astype(np.intp)

    # -- FrameSource ----------------------------------------------------------------------------

    @property
    def profile(self) -> DetectorProfile:
        return self._profile

    @property
    def scan_width(self) -> int:
        return self._width

    @property
    def scan_height(self) -> int:
        return self._height

    @property
    def scan_number(self) -> int:
        return self._scan_number

    @property
    def frames(self) -> int:
        return self._width * self._height

    def meta(self, position: int) -> SectorMeta:
        """The header of every sector at ``position``: frame number is position + 1."""
        self._check_position(position)
        y, x = divmod(position, self._width)
        return SectorMeta(self._scan_number, position + 1, self._width, self._height, x, y)

    def iter_sector(self, sector: int, chunk: int = 4096) -> Iterator[tuple[SectorMeta, np.ndarray]]:
        """Yield (header, read-only sector block view) for every position of the scan, in order."""
        if not 0 <= sector < self._profile.sectors:
            raise ValueError(f"sector {sector} out of range (profile has {self._profile.sectors})")
        return self._iter(self._sector_views[sector], chunk)

    def _iter(self, views: list, chunk: int) -> Iterator[tuple[SectorMeta, np.ndarray]]:
        scan, w, h = self._scan_number, self._width, self._height
        for start in range(0, self.frames, chunk):
            stop = min(start + chunk, self.frames)
            y, x = divmod(start, w)
            for p, k in zip(range(start, stop), self._pool_index(start, stop).tolist()):
                yield SectorMeta(scan, p + 1, w, h, x, y), views[k]
                x += 1
                if x == w:
                    x = 0
                    y += 1

    def pool_index(self, position: int) -> int:
        """Which pool frame scan ``position`` shows."""
        self._check_position(position)
        return int(self._pool_index(position, position + 1)[0])

    def frame(self, position: int) -> np.ndarray:
        """The whole frame at ``position`` (a copy), identical to the sectors iter_sector yields."""
        return self._pool[self.pool_index(position)].copy()

    def true_events(self, position: int) -> np.ndarray:
        """Flat pixel indices hit by electrons at ``position`` (ground truth, X-rays excluded)."""
        return self._events[self.pool_index(position)].copy()

    def dark_reference(self) -> np.ndarray:
        """The per-pixel dark offset map (float32, whole ADU), as a dark reference for counting."""
        return self._dark.copy()

    def suggested_thresholds(self) -> Thresholds:
        """Background at 4 sigma of the read noise; X-ray threshold at 2000 ADU."""
        return Thresholds(4.0 * self.READ_NOISE, 2000.0)

    def _check_position(self, position: int) -> None:
        if not 0 <= position < self.frames:
            raise IndexError(f"position {position} outside scan of {self.frames} frames")

    def __repr__(self) -> str:
        return (f"Simulator({self._profile.name!r}, {self._width}x{self._height}, seed={self.seed}, "
                f"scan_number={self._scan_number}, pool_size={self.pool_size})")
