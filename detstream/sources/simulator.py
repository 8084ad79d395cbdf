"""A simulated 4D-STEM camera: seeded, realistic enough to count, with a specimen worth looking at,
and cheap enough never to be the bottleneck.

A seeded specimen gives every scan position its own thickness and beam deflection: a lattice of
atomic columns (thicker at each column, deflecting the beam towards it) on a wedge whose thickness
rises across the scan, under a slowly turning field. Each position's frame is made from two parts:

* a pool frame (dark offset, read noise, a sparse background of electrons, a few X-ray hits),
  rendered once at construction and chosen by a hash of (seed, position);
* the position's own electrons, drawn from counter-based hashes of (seed, position), so any
  producer renders the same frame for a position without any state: a bright-field disk shifted
  by the deflection, with as many electrons as the thickness asks for, and a halo of scattered
  electrons around it that grows with the thickness. Each electron deposits one of a few hundred
  precomputed 3x3 charge footprints.

A numba kernel does the second part, a sector at a time, so a producer renders only its own
strip (``benchmarks/bench_specimen.py`` measures it against the pipeline that consumes it).
"""

from __future__ import annotations

import math
import sys
from typing import Iterator, NamedTuple

import numpy as np
from numba import njit

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


def _unit(h: np.ndarray) -> np.ndarray:
    """Hashes as floats in [0, 1), from their top 53 bits."""
    return (h >> _U64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def simulated_dark_reference(profile: DetectorProfile, seed: int = 0,
                             level: float = 20.0, spread: float = 1.5) -> np.ndarray:
    """The simulator's per-pixel dark offset map for ``seed``, without rendering any frame.

    Whole ADU: subtracting it is exact in integer or float arithmetic, so no implementation's
    rounding or truncation rule changes a count.
    """
    rng = np.random.default_rng([seed, 0])
    dark = level + spread * rng.standard_normal(profile.frame_shape)
    return np.clip(np.rint(dark), 0, None).astype(np.float32)


# -- the per-position electrons (numba) ---------------------------------------------------------

_GOLDEN = 0x9E3779B97F4A7C15
_HALO_TAG = 0x5851F42D4C957F2D  # a second stream of hashes per position, for the halo
_RING = 4  # chunk buffers an iter_sector keeps for reuse
_STAMPS = 256  # precomputed 3x3 charge footprints; an electron takes one by its hash's low bits


@njit(nogil=True, cache=True, inline="always")
def _mix(x):
    x = x + np.uint64(_GOLDEN)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit(nogil=True, cache=True, inline="always")
def _u01(h):
    return np.float64(h >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(nogil=True, cache=True, inline="always")
def _disk_electron(key, i):
    """Candidate ``i`` of a position's disk, from one hash: (inside the unit disk, row offset,
    col offset, stamp); 24 bits per coordinate, a 2**-23 of the radius."""
    h = _mix(key + np.uint64(i))
    u = np.float64(h >> np.uint64(40)) * (2.0 / 16777216.0) - 1.0
    v = np.float64((h >> np.uint64(16)) & np.uint64(0xFFFFFF)) * (2.0 / 16777216.0) - 1.0
    return u * u + v * v <= 1.0, v, u, np.int64(h & np.uint64(_STAMPS - 1))


@njit(nogil=True, cache=True, inline="always")
def _halo_electron(key, k, halo_scale):
    """Electron ``k`` of a position's halo: (row offset, col offset) in disk radii, and its stamp."""
    h = _mix((key ^ np.uint64(_HALO_TAG)) + np.uint64(k))
    a = (np.float64(h >> np.uint64(40)) + 0.5) * (1.0 / 16777216.0)
    b = np.float64((h >> np.uint64(16)) & np.uint64(0xFFFFFF)) * (1.0 / 16777216.0)
    rad = 1.0 - halo_scale * math.log(a)
    ang = 2.0 * math.pi * b
    return rad * math.sin(ang), rad * math.cos(ang), np.int64(h & np.uint64(_STAMPS - 1))


@njit(nogil=True, cache=True, inline="always")
def _deposit(flat, row0, srows, rows, fr, fc, cols, r, c, stamps, s):
    """Add footprint ``stamps[s]`` centred on the pixel (r, c) falls in to ``flat`` (a frame's
    rows ``row0 .. row0 + srows``, row-major), clipped to the frame, saturating at 65535."""
    if not (0.0 <= r < fr and 0.0 <= c < fc):
        return
    lr = int(r) - row0  # the hit pixel's row within ``flat``
    if lr < -1 or lr > srows:
        return
    pc = int(c)
    if 1 <= lr < srows - 1 and 1 <= pc < cols - 1:  # the footprint lies inside: no checks
        base = np.uint64((lr - 1) * cols + pc - 1)  # unsigned: no negative-index wrap check
        for dr in range(3):
            for dc in range(3):
                i = base + np.uint64(dr * cols + dc)
                v = np.int32(flat[i]) + stamps[s, dr, dc]
                flat[i] = v if v < 65535 else 65535
        return
    for dr in range(3):
        rr = lr + dr - 1
        if rr < 0 or rr >= srows or rr + row0 >= rows:
            continue
        for dc in range(3):
            cc = pc + dc - 1
            if cc < 0 or cc >= cols:
                continue
            v = np.int32(flat[rr * cols + cc]) + stamps[s, dr, dc]
            flat[rr * cols + cc] = v if v < 65535 else 65535


@njit(nogil=True, cache=True)
def _render(out, row0, rows, keys, centre_r, centre_c, n_disk, n_halo, radius, halo_scale, stamps):
    """Each position's own electrons into ``out[j]``, which holds frame rows ``row0`` onwards
    (already the position's pool frame)."""
    srows = out.shape[1]
    cols = out.shape[2]
    fr = float(rows)
    fc = float(cols)
    # Disk electrons whose row cannot touch these rows are skipped before anything else.
    lo = (row0 - 1.0)
    hi = (row0 + srows + 1.0)
    for j in range(out.shape[0]):
        flat = out[j].reshape(srows * cols)
        key = keys[j]
        cr = centre_r[j]
        cc = centre_c[j]
        i = 0
        done = 0
        nd = n_disk[j]
        while done < nd:
            inside, dv, du, s = _disk_electron(key, i)
            i += 1
            if inside:
                done += 1
                r = cr + radius * dv
                if lo <= r < hi:
                    _deposit(flat, row0, srows, rows, fr, fc, cols, r, cc + radius * du, stamps, s)
        for k in range(n_halo[j]):
            dv, du, s = _halo_electron(key, k, halo_scale)
            r = cr + radius * dv
            if lo <= r < hi:
                _deposit(flat, row0, srows, rows, fr, fc, cols, r, cc + radius * du, stamps, s)


@njit(nogil=True, cache=True)
def _hits(rows, cols, key, cr, cc, n_disk, n_halo, radius, halo_scale):
    """Flat pixel indices of a position's own electrons (the ground truth of ``_render``)."""
    out = np.empty(n_disk + n_halo, np.int64)
    n = 0
    i = 0
    done = 0
    while done < n_disk:
        inside, dv, du, s = _disk_electron(key, i)
        i += 1
        if inside:
            done += 1
            r = cr + radius * dv
            c = cc + radius * du
            if 0.0 <= r < rows and 0.0 <= c < cols:
                out[n] = int(r) * cols + int(c)
                n += 1
    for k in range(n_halo):
        dv, du, s = _halo_electron(key, k, halo_scale)
        r = cr + radius * dv
        c = cc + radius * du
        if 0.0 <= r < rows and 0.0 <= c < cols:
            out[n] = int(r) * cols + int(c)
            n += 1
    return out[:n]


# -- the specimen -------------------------------------------------------------------------------


class SpecimenMaps(NamedTuple):
    """A specimen's ground truth per scan position (arrays of the positions' shape): thickness in
    0..1, and the beam's deflection in detector pixels, ``x`` along frame columns, ``y`` along
    frame rows (the centre of mass of a frame's electrons follows it: ``com_x``, ``com_y``)."""

    thickness: np.ndarray
    deflection_x: np.ndarray
    deflection_y: np.ndarray


class Specimen:
    """A seeded specimen over a ``scan_width x scan_height`` scan.

    Atomic columns sit on a square lattice (``COLUMN_SPACING`` scan positions apart, turned by a
    seeded angle, each with its own seeded strength). Thickness is a wedge rising across the scan
    plus a bump at each column; the deflection pulls the beam towards the nearest columns (the
    gradient of their projected potential) plus a slowly turning field of constant strength.
    Deflections are in units of the disk radius (the simulator scales them to pixels).
    """

    COLUMN_SPACING = 8.0  # scan positions between neighbouring columns
    COLUMN_WIDTH = 0.22  # Gaussian sigma of a column, in lattice spacings
    WEDGE = (0.03, 0.75)  # thickness at the wedge's thin edge, and its rise across the scan
    COLUMN_THICKNESS = 0.22  # a column's extra thickness at its centre
    COLUMN_DEFLECTION = 0.14  # peak pull towards a column, disk radii (at one sigma from it)
    FIELD_DEFLECTION = 0.06  # the slowly turning field's strength, disk radii
    FIELD_TURNS = 0.75  # turns of the field's direction across the scan

    def __init__(self, scan_width: int, scan_height: int, seed: int = 0):
        self.scan_width, self.scan_height, self.seed = int(scan_width), int(scan_height), int(seed)
        rng = np.random.default_rng([seed, 2])
        self.angle = float(rng.uniform(0, math.pi / 2))
        self.origin = rng.uniform(0, self.COLUMN_SPACING, 2)
        # Near one of the scan's axes, so thickness is spread evenly over the wedge's range.
        wedge = float(rng.uniform(-0.35, 0.35) + rng.integers(0, 4) * math.pi / 2)
        self.wedge_dir = (math.cos(wedge), math.sin(wedge))
        self.field_phase = float(rng.uniform(0, 2 * math.pi))
        self._site_key = int(rng.integers(0, 2**62))

    def maps(self, positions: np.ndarray) -> SpecimenMaps:
        """Thickness and deflection (disk radii) at row-major scan ``positions``."""
        pos = np.asarray(positions, np.int64)
        x = (pos % self.scan_width).astype(np.float64)
        y = (pos // self.scan_width).astype(np.float64)
        w, h = max(self.scan_width - 1, 1), max(self.scan_height - 1, 1)
        # The wedge: 0 at one corner, 1 at the opposite one, along a seeded direction.
        dx, dy = self.wedge_dir
        corners = [a * dx + b * dy for a in (0, w) for b in (0, h)]
        lo, hi = min(corners), max(corners)
        wedge = (x * dx + y * dy - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
        # The columns: the four lattice sites around each position (farther ones add < e^-10).
        a, ca, sa = self.COLUMN_SPACING, math.cos(self.angle), math.sin(self.angle)
        u = (ca * (x - self.origin[0]) + sa * (y - self.origin[1])) / a
        v = (-sa * (x - self.origin[0]) + ca * (y - self.origin[1])) / a
        iu, iv = np.floor(u), np.floor(v)
        sigma2 = self.COLUMN_WIDTH ** 2
        pot = np.zeros_like(x)
        gu = np.zeros_like(x)
        gv = np.zeros_like(x)
        for su in (0.0, 1.0):
            for sv in (0.0, 1.0):
                site_u, site_v = iu + su, iv + sv
                key = _splitmix64((site_u.astype(np.int64).astype(np.uint64) * _U64(0x100000001B3))
                                  ^ site_v.astype(np.int64).astype(np.uint64) ^ _U64(self._site_key))
                strength = 0.7 + 0.3 * _unit(key)
                du, dv = site_u - u, site_v - v
                g = strength * np.exp(-(du * du + dv * dv) / (2 * sigma2))
                pot += g
                gu += g * du  # towards the site
                gv += g * dv
        # Normalised so that a column of strength 1 pulls with 1 at one sigma from it (its peak).
        peak = self.COLUMN_WIDTH * math.exp(-0.5)
        pull_u, pull_v = gu / peak, gv / peak
        # Back from lattice axes to scan axes (x along scan columns, y along scan rows).
        pull_x = ca * pull_u - sa * pull_v
        pull_y = sa * pull_u + ca * pull_v
        turn = self.field_phase + 2 * math.pi * self.FIELD_TURNS * (x / w + 0.5 * y / h)
        thickness = np.clip(self.WEDGE[0] + self.WEDGE[1] * wedge + self.COLUMN_THICKNESS * pot, 0.0, 1.0)
        return SpecimenMaps(thickness,
                            self.COLUMN_DEFLECTION * pull_x + self.FIELD_DEFLECTION * np.cos(turn),
                            self.COLUMN_DEFLECTION * pull_y + self.FIELD_DEFLECTION * np.sin(turn))


class Simulator:
    """A seeded scan of ``scan_width x scan_height`` frames for ``profile``; a FrameSource.

    Frames are a dark offset map (integer ADU, ~20) plus read noise, Poisson electron hits each
    spreading ~200 ADU over a 3x3 footprint, and a few X-ray hits of thousands of ADU. The
    electrons of a position fill a bright-field disk (radius a quarter of the frame's shorter
    side) shifted by the specimen's deflection, as many as its thickness asks for, and a halo
    around it. Frame numbers start at 1 and follow the row-major position.
    """

    # Detector and beam model; class attributes so a subclass or test can change them.
    DARK_LEVEL = 20.0          # mean dark offset, ADU
    DARK_SPREAD = 1.5          # fixed pixel-to-pixel variation of the dark offset, ADU
    READ_NOISE = 3.0           # read noise sigma, ADU
    ELECTRON_ADU = 200.0       # mean total charge of one electron, ADU
    ELECTRON_ADU_SD = 35.0
    FOOTPRINT_SIGMA = 0.55     # charge cloud sigma, pixels
    DISK_DOSE = (0.006, 0.11)  # electrons per pixel per frame inside the disk: thinnest, added at thickness 1
    HALO_DOSE = 0.02           # halo electrons per disk pixel per frame at thickness 1
    HALO_SCALE = 0.6           # the halo's fall-off beyond the disk edge, in disk radii
    BACKGROUND_DOSE = 0.0005   # electrons per pixel per frame anywhere (in the pool frames)
    XRAYS_PER_FRAME = 2.0
    XRAY_ADU = (3000.0, 9000.0)
    DISK_FRACTION = 0.25       # disk radius / the frame's shorter side
    CHUNK = 64                 # positions rendered at a time by iter_sector

    def __init__(self, profile: DetectorProfile, scan_width: int, scan_height: int, seed: int = 0,
                 scan_number: int = 1, pool_size: int = 16):
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
        rows, cols = profile.frame_shape
        self.disk_radius = min(rows, cols) * self.DISK_FRACTION
        self.centre = ((rows - 1) / 2, (cols - 1) / 2)  # the undeflected disk's centre (row, col)
        self.specimen = Specimen(scan_width, scan_height, seed)

        self._dark = simulated_dark_reference(profile, seed, self.DARK_LEVEL, self.DARK_SPREAD)
        self._dark.setflags(write=False)
        self._pool = np.empty((pool_size, rows, cols), dtype=pixel_dtype(profile))
        self._events: list[np.ndarray] = []
        for i in range(pool_size):
            self._events.append(self._render_pool(i, self._pool[i]))
        self._pool.setflags(write=False)
        self._stamps = self._footprints()
        self._seed_key = int(_splitmix64(np.array([seed], np.uint64))[0])

    # -- the model ------------------------------------------------------------------------------

    def _footprints(self) -> np.ndarray:
        """``_STAMPS`` 3x3 charge footprints (whole ADU): a charge and a centroid within the central
        60% of the hit pixel each, so the hit pixel takes the largest share."""
        rng = np.random.default_rng([self.seed, 3])
        orow = (rng.random(_STAMPS) - 0.5) * 0.6
        ocol = (rng.random(_STAMPS) - 0.5) * 0.6
        charge = np.clip(rng.normal(self.ELECTRON_ADU, self.ELECTRON_ADU_SD, _STAMPS), self.ELECTRON_ADU / 4, None)
        d = np.arange(-1, 2)
        wr = np.exp(-((d[None, :] - orow[:, None]) ** 2) / (2 * self.FOOTPRINT_SIGMA ** 2))
        wc = np.exp(-((d[None, :] - ocol[:, None]) ** 2) / (2 * self.FOOTPRINT_SIGMA ** 2))
        w = wr[:, :, None] * wc[:, None, :]
        w *= (charge / w.sum(axis=(1, 2)))[:, None, None]
        return np.rint(w).astype(np.int32)

    def _render_pool(self, i: int, out: np.ndarray) -> np.ndarray:
        """Pool frame ``i`` (dark, read noise, background electrons, X-rays) into ``out``; return the
        flat pixel indices of its electrons."""
        rows, cols = self._profile.frame_shape
        rng = np.random.default_rng([self.seed, 1, i])
        n_bg = rng.poisson(self.BACKGROUND_DOSE * rows * cols)
        r = rng.random(n_bg) * rows
        c = rng.random(n_bg) * cols
        pr, pc = np.floor(r).astype(np.int64), np.floor(c).astype(np.int64)
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

    def _plan(self, start: int, stop: int):
        """Per position in [start, stop): pool frame, hash key, disk centre (row, col), and its
        disk and halo electron counts."""
        pos = np.arange(start, stop, dtype=np.uint64)
        keys = _splitmix64(pos ^ _U64(self._seed_key))
        noise = (_splitmix64(keys ^ _U64(0xD6E8FEB86659FD93)) % _U64(self.pool_size)).astype(np.intp)
        m = self.specimen.maps(pos.astype(np.int64))
        radius = self.disk_radius
        centre_r = self.centre[0] + radius * m.deflection_y
        centre_c = self.centre[1] + radius * m.deflection_x
        area = math.pi * radius * radius
        lam_disk = area * (self.DISK_DOSE[0] + self.DISK_DOSE[1] * m.thickness)
        lam_halo = area * self.HALO_DOSE * m.thickness
        # Poisson counts, drawn by a normal approximation from the position's own hashes
        # (Box-Muller): the counts run to hundreds or thousands.
        h1 = _unit(_splitmix64(keys ^ _U64(0xA0761D6478BD642F)))
        h2 = _unit(_splitmix64(keys ^ _U64(0xE7037ED1A0B428DB)))
        rad = np.sqrt(-2.0 * np.log1p(-h1))
        z1, z2 = rad * np.cos(2 * math.pi * h2), rad * np.sin(2 * math.pi * h2)
        n_disk = np.maximum(0, np.rint(lam_disk + np.sqrt(lam_disk) * z1)).astype(np.int64)
        n_halo = np.maximum(0, np.rint(lam_halo + np.sqrt(lam_halo) * z2)).astype(np.int64)
        return noise, keys, centre_r, centre_c, n_disk, n_halo

    # -- ground truth ---------------------------------------------------------------------------

    def ground_truth(self) -> SpecimenMaps:
        """The specimen at every scan position, as ``(scan_height, scan_width)`` maps; the
        deflection in detector pixels (x along frame columns, y along frame rows)."""
        m = self.specimen.maps(np.arange(self.frames))
        shape = (self._height, self._width)
        return SpecimenMaps(m.thickness.reshape(shape), (self.disk_radius * m.deflection_x).reshape(shape),
                            (self.disk_radius * m.deflection_y).reshape(shape))

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

    def iter_sector(self, sector: int, chunk: int | None = None) -> Iterator[tuple[SectorMeta, np.ndarray]]:
        """Yield (header, read-only sector block) for every position of the scan, in order; each
        block is the sector's rows of that position's own frame, rendered ``chunk`` at a time."""
        if not 0 <= sector < self._profile.sectors:
            raise ValueError(f"sector {sector} out of range (profile has {self._profile.sectors})")
        return self._iter(sector, chunk or self.CHUNK)

    def _render_rows(self, start: int, stop: int, row0: int, nrows: int, out: np.ndarray | None = None) -> np.ndarray:
        """Frame rows ``row0 .. row0 + nrows`` of positions ``start .. stop`` (into ``out`` if given)."""
        rows, _ = self._profile.frame_shape
        noise, keys, cr, cc, nd, nh = self._plan(start, stop)
        if out is None:
            out = np.empty((stop - start, nrows, self._profile.frame_cols), dtype=self._pool.dtype)
        for j, k in enumerate(noise.tolist()):
            out[j] = self._pool[k, row0:row0 + nrows]
        _render(out, row0, rows, keys, cr, cc, nd, nh, self.disk_radius, self.HALO_SCALE, self._stamps)
        return out

    def _iter(self, sector: int, chunk: int) -> Iterator[tuple[SectorMeta, np.ndarray]]:
        scan, w, h = self._scan_number, self._width, self._height
        rows_sl = self._profile.sector_slice(sector)
        row0, nrows = rows_sl.start, rows_sl.stop - rows_sl.start
        shape = (chunk, nrows, self._profile.frame_cols)
        ring: list[np.ndarray] = []  # chunk buffers, reused once nobody holds a block of them
        for start in range(0, self.frames, chunk):
            stop = min(start + chunk, self.frames)
            buf = None
            for i in range(len(ring)):
                # Only the ring refers to it: every block yielded from it is gone (a consumer that
                # keeps a block, or a zero-copy send in flight, keeps a reference to its base).
                if sys.getrefcount(ring[i]) == 2:
                    buf = ring[i]
                    break
            if buf is None:
                buf = np.empty(shape, dtype=self._pool.dtype)  # new pages: faulted in once
                if len(ring) < _RING:
                    ring.append(buf)
            buf.setflags(write=True)
            self._render_rows(start, stop, row0, nrows, buf[: stop - start])
            buf.setflags(write=False)
            block = buf[: stop - start]  # read-only views, made after the flag
            y, x = divmod(start, w)
            for k in range(stop - start):
                yield SectorMeta(scan, start + k + 1, w, h, x, y), block[k]
                x += 1
                if x == w:
                    x = 0
                    y += 1
            del block, buf

    def pool_index(self, position: int) -> int:
        """A key for the frame's content: positions with equal keys show identical frames. Every
        position has its own frame, so it is the position itself."""
        self._check_position(position)
        return int(position)

    def noise_index(self, position: int) -> int:
        """Which pool frame (dark, noise, background, X-rays) under ``position``'s own electrons."""
        self._check_position(position)
        return int(self._plan(position, position + 1)[0][0])

    def frame(self, position: int) -> np.ndarray:
        """The whole frame at ``position`` (a new array), identical to the sectors iter_sector yields."""
        self._check_position(position)
        return self._render_rows(position, position + 1, 0, self._profile.frame_rows)[0]

    def true_events(self, position: int) -> np.ndarray:
        """Flat pixel indices hit by electrons at ``position`` (ground truth, X-rays excluded)."""
        self._check_position(position)
        noise, keys, cr, cc, nd, nh = self._plan(position, position + 1)
        rows, cols = self._profile.frame_shape
        own = _hits(rows, cols, keys[0], cr[0], cc[0], nd[0], nh[0], self.disk_radius, self.HALO_SCALE)
        return np.unique(np.concatenate([self._events[noise[0]].astype(np.int64), own])).astype(np.uint32)

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


def compile_kernels() -> None:
    """Compile the simulator's kernels into numba's on-disk cache (``make install`` runs this), so
    that no producer pays the ~5 s first-call compilation on its first frame."""
    from ..profile import SMALL_TEST_CAMERA

    sim = Simulator(SMALL_TEST_CAMERA, 1, 1, pool_size=1)
    sim.frame(0)
    sim.true_events(0)
