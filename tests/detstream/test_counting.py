"""detstream.counting must give exactly stempy.image.electron_count_frame's events, frame by frame."""

from __future__ import annotations

import threading
import zlib

import numpy as np
import pytest
import stempy.image as stempy_image

from detstream.counting import Counter, _float32_above, _float32_below, _uint16_bounds, count_frame

FULL = (576, 576)
SMALL = (37, 23)  # non-square, odd sizes


def stempy_events(frame, dark=None, gain=None, bg=4.0, xr=2000.0) -> np.ndarray:
    """The reference: stempy's single-frame counter."""
    out = stempy_image.electron_count_frame(
        frame, darkreference=dark, background_threshold=bg, xray_threshold=xr, gain=gain
    )
    return np.asarray(out.data[0, 0])


def assert_same(frame, dark=None, gain=None, bg=4.0, xr=2000.0) -> np.ndarray:
    """Count with detstream and stempy; the events must be identical (values, order, dtype)."""
    before = frame.copy()
    ours = Counter(frame.shape, dark, gain, bg, xr).count(frame)
    assert np.array_equal(frame, before), "the counter modified its input frame"
    ref = stempy_events(frame, dark, gain, bg, xr)
    assert ours.dtype == np.uint32
    assert np.all(np.diff(ours.astype(np.int64)) > 0), "events not strictly ascending"
    if not np.array_equal(ours, ref):
        only_ours = np.setdiff1d(ours, ref)[:10]
        only_ref = np.setdiff1d(ref, ours)[:10]
        raise AssertionError(
            f"{len(ours)} events vs stempy's {len(ref)}; only ours {only_ours}, only stempy's {only_ref}"
        )
    return ours


# ----------------------------------------------------------------------------- frame makers


def realistic_frame(rng, shape, dark_level=20.0, n_electrons=None, saturate=3):
    """Noisy dark background, 3x3 electron blobs (also on edges and corners), saturated X-rays."""
    rows, cols = shape
    f = rng.normal(dark_level, 3.0, shape)
    n = n_electrons if n_electrons is not None else max(1, rows * cols // 1000)
    r = rng.integers(0, rows, n)
    c = rng.integers(0, cols, n)
    # Force hits onto each corner and each edge.
    r[:8] = [0, 0, rows - 1, rows - 1, 0, rows - 1, rng.integers(rows), rng.integers(rows)][: min(8, n)]
    c[:8] = [0, cols - 1, 0, cols - 1, rng.integers(cols), rng.integers(cols), 0, cols - 1][: min(8, n)]
    kernel = np.array([[1, 2, 1], [2, 6, 2], [1, 2, 1]], float) / 18.0
    for rr, cc in zip(r, c):
        amp = rng.gamma(4.0, 50.0)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                y, x = rr + dr, cc + dc
                if 0 <= y < rows and 0 <= x < cols:
                    f[y, x] += amp * kernel[dr + 1, dc + 1]
    frame = np.clip(np.rint(f), 0, 65535).astype(np.uint16)
    sat = rng.integers(0, rows * cols, saturate)
    frame.flat[sat] = 65535
    return frame


def coarse_frame(rng, shape, low=0, high=40):
    """Few distinct values: many plateaus (equal neighbours) and exact threshold hits."""
    frame = rng.integers(low, high, shape).astype(np.uint16)
    # Copy some pixels onto a neighbour to make sure plateaus exist at peaks too.
    idx = rng.integers(0, frame.size - 1, frame.size // 20)
    frame.flat[idx + 1] = frame.flat[idx]
    frame.flat[rng.integers(0, frame.size, 3)] = 65535
    return frame


def dark_float32(rng, shape, level=20.0):
    """Fractional dark reference, as a real average of dark frames is."""
    return np.abs(rng.normal(level, 1.5, shape)).astype(np.float32)


def gain_float32(rng, shape):
    return rng.uniform(0.5, 2.0, shape).astype(np.float32)


def gain_float64(rng, shape):
    """float64 gain that stempy accepts: its reciprocal must be exact in float32."""
    g = 1.0 / rng.uniform(0.5, 2.0, shape).astype(np.float32).astype(np.float64)
    while True:
        inv = np.power(g, -1)
        bad = inv.astype(np.float32).astype(np.float64) != inv
        if not bad.any():
            return g
        g[bad] = 1.0 / rng.uniform(0.5, 2.0, int(bad.sum())).astype(np.float32).astype(np.float64)


# ----------------------------------------------------------------------------- equivalence

SEEDS = range(6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [FULL, SMALL])
@pytest.mark.parametrize("dark_kind", ["none", "float32", "float64-exact", "uint16"])
def test_realistic_frames_no_gain(seed, shape, dark_kind):
    # zlib.crc32, not hash(): str hashes differ per process, which made the frames (and, on a
    # small frame now and then, an eventless draw) change from run to run.
    rng = np.random.default_rng([seed, shape[0], zlib.crc32(dark_kind.encode()) % 1000])
    frame = realistic_frame(rng, shape)
    dark = {
        "none": None,
        "float32": dark_float32(rng, shape),
        # float64 values float32 holds exactly (quarters), so stempy accepts them
        "float64-exact": np.round(rng.normal(20, 1.5, shape) * 4) / 4,
        "uint16": rng.integers(15, 25, shape).astype(np.uint16),
    }[dark_kind]
    if dark is not None:
        dark = np.abs(dark)
    bg = float(rng.choice([4.0, 10.0, 12.5]))
    events = assert_same(frame, dark, None, bg, 2000.0)
    assert len(events) > 0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [FULL, SMALL])
@pytest.mark.parametrize("gain_kind", ["float32", "float64"])
@pytest.mark.parametrize("with_dark", [False, True])
def test_realistic_frames_with_gain(seed, shape, gain_kind, with_dark):
    rng = np.random.default_rng([seed, shape[0], 7 + with_dark, len(gain_kind)])
    frame = realistic_frame(rng, shape)
    gain = gain_float32(rng, shape) if gain_kind == "float32" else gain_float64(rng, shape)
    dark = dark_float32(rng, shape) if with_dark else None
    bg = float(rng.uniform(2.0, 15.0))
    events = assert_same(frame, dark, gain, bg, 1500.0)
    assert len(events) > 0


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("shape", [SMALL, (1, 17), (17, 1), (2, 2), (3, 5), (1, 1), (64, 96)])
def test_plateaus_edges_and_thresholds_hit_exactly(seed, shape):
    """Coarse values: equal neighbours everywhere, thresholds equal to many pixel values."""
    rng = np.random.default_rng([seed, *shape])
    frame = coarse_frame(rng, shape)
    vals = np.unique(frame)
    bg = float(rng.choice(vals[vals < 30])) if (vals < 30).any() else 3.0
    xr = float(rng.choice(vals[vals > bg])) if (vals > bg).any() else 2000.0
    assert_same(frame, None, None, bg, xr)
    dark = rng.integers(0, 8, shape).astype(np.float32)
    assert_same(frame, dark, None, bg - 8, xr - 8)
    assert_same(frame, dark, gain_float32(rng, shape), bg - 8, xr - 8)


@pytest.mark.parametrize("seed", range(6))
def test_below_dark_wraps_and_survives_without_xray_cut(seed):
    """Pixels below the dark wrap to ~65535: x-ray-zeroed, or events if the x-ray cut is above them."""
    rng = np.random.default_rng(seed)
    frame = coarse_frame(rng, SMALL, low=0, high=30)
    dark = dark_float32(rng, SMALL, level=15.0)
    wrapped = (frame.astype(np.int64) - dark.astype(np.uint16)) % 65536
    high = np.unique(wrapped[wrapped > 60000])
    assert len(high) > 2
    for xr in (70000.0, 65536.0, float(high[len(high) // 2]), float(high[0]) + 0.5, 2000.0):
        assert_same(frame, dark, None, 4.0, xr)


@pytest.mark.parametrize("seed", range(6))
def test_fractional_dark_and_fractional_thresholds(seed):
    """Dark 20.7 truncates to 20 without gain; thresholds between integers; both must match."""
    rng = np.random.default_rng(seed)
    frame = coarse_frame(rng, SMALL, low=15, high=45)
    dark = (rng.integers(10, 25, SMALL) + rng.choice([0.0, 0.25, 0.5, 0.7, 0.999], SMALL)).astype(np.float32)
    for bg, xr in [(4.0, 20.0), (4.5, 19.5), (3.999, 20.001), (0.0, 1e9), (-3.0, 25.0)]:
        assert_same(frame, dark, None, bg, xr)
        assert_same(frame, dark, gain_float32(rng, SMALL), bg, xr)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bg", [-1e9, -20.0, -0.5, 0.0])
def test_gain_with_negative_or_zero_background(seed, bg):
    """Float path: values below the dark stay negative; a zeroed pixel among negatives is an event."""
    rng = np.random.default_rng([seed, int(abs(bg) * 10) % 997])
    frame = coarse_frame(rng, SMALL, low=10, high=30)
    dark = dark_float32(rng, SMALL, level=20.0)
    for xr in (5.0, 15.0, 2000.0):
        assert_same(frame, dark, gain_float32(rng, SMALL), bg, xr)
        assert_same(frame, dark, None, bg, xr)


@pytest.mark.parametrize("seed", range(4))
def test_saturated_and_extreme_thresholds(seed):
    rng = np.random.default_rng(seed)
    frame = realistic_frame(rng, SMALL, saturate=40)
    dark = dark_float32(rng, SMALL)
    for bg, xr in [(4.0, 65535.0), (4.0, 65536.0), (4.0, float("inf")), (float("-inf"), 2000.0),
                   (65535.0, 70000.0), (2000.0, 10.0), (5.0, 5.0)]:
        assert_same(frame, None, None, bg, xr)
        assert_same(frame, dark, None, bg, xr)
        assert_same(frame, dark, gain_float32(rng, SMALL), bg, xr)


def test_events_on_every_corner_and_edge():
    """Single bright pixels at the corners and edge midpoints must all be found, as stempy does."""
    rows, cols = SMALL
    frame = np.full(SMALL, 20, np.uint16)
    spots = [(0, 0), (0, cols - 1), (rows - 1, 0), (rows - 1, cols - 1),
             (0, cols // 2), (rows - 1, cols // 2), (rows // 2, 0), (rows // 2, cols - 1)]
    for r, c in spots:
        frame[r, c] = 200
    expected = stempy_events(frame, None, None, 30.0, 2000.0)
    assert len(expected) == len(spots)  # guards the setup, not the counter
    assert np.array_equal(count_frame(frame, None, None, 30.0, 2000.0), expected)


def test_float64_values_float32_cannot_hold_are_rounded_like_float32():
    """stempy refuses these; we round to float32, i.e. what stempy does given float32 inputs."""
    rng = np.random.default_rng(3)
    frame = realistic_frame(rng, SMALL)
    dark64 = rng.uniform(15, 25, SMALL)
    gain64 = rng.uniform(0.5, 2.0, SMALL)
    with pytest.raises(ValueError):
        stempy_events(frame, None, gain64, 4.0, 2000.0)
    # A gain stempy accepts whose reciprocal is our float32-rounded one: 1 / inv32 where that
    # round-trips (most pixels), else a power of two in both (its reciprocal is exact).
    inv32 = np.power(gain64, -1).astype(np.float32).astype(np.float64)
    gain_stempy = 1.0 / inv32
    bad = np.power(gain_stempy, -1) != inv32
    assert bad.mean() < 0.5
    gain64[bad] = gain_stempy[bad] = 1.0
    ours = count_frame(frame, dark64, gain64, 4.0, 2000.0)
    assert np.array_equal(ours, stempy_events(frame, dark64.astype(np.float32), gain_stempy, 4.0, 2000.0))
    ours = count_frame(frame, dark64, None, 4.0, 2000.0)
    assert np.array_equal(ours, stempy_events(frame, dark64.astype(np.float32), None, 4.0, 2000.0))


def stempy_values(frame, dark, gain) -> np.ndarray:
    """Pixel values before thresholding, computed the way stempy does (to place thresholds on them)."""
    if gain is None:
        d = np.zeros(frame.shape, np.uint16) if dark is None else dark.astype(np.float32).astype(np.uint16)
        return (frame - d).astype(np.float64)  # uint16, wrapping
    v = frame.astype(np.float32)
    if dark is not None:
        v = v - dark.astype(np.float32)
    return (v * np.power(gain, -1).astype(np.float32)).astype(np.float64)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("gain_kind", ["none", "float32", "float64"])
def test_every_peak_at_and_next_to_the_thresholds(seed, gain_kind):
    """Isolated peaks; each threshold is set exactly on, and one double ulp either side of, a peak.

    Catches any rounding difference in the dark, the gain or the threshold comparison.
    """
    rng = np.random.default_rng([seed, len(gain_kind)])
    shape = SMALL
    frame = rng.integers(0, 15, shape).astype(np.uint16)
    rows, cols = np.indices(shape)
    peaks = (rows + cols) % 2 == 0
    frame[peaks] = rng.integers(40, 400, int(peaks.sum()))
    dark = (rng.uniform(5, 10, shape)).astype(np.float32)
    gain = {"none": None, "float32": gain_float32(rng, shape), "float64": gain_float64(rng, shape)}[gain_kind]
    v = stempy_values(frame, dark, gain)
    levels = np.unique(v[peaks])
    for level in rng.choice(levels, min(len(levels), 80), replace=False):
        above, below = np.nextafter(level, np.inf), np.nextafter(level, -np.inf)
        for bg, xr in [(level, 2000.0), (below, 2000.0), (above, 2000.0),
                       (1.0, level), (1.0, below), (1.0, above)]:
            assert_same(frame, dark, gain, float(bg), float(xr))


# ----------------------------------------------------------------------------- API behaviour


def test_counter_reuse_views_readonly_and_noncontiguous():
    rng = np.random.default_rng(11)
    frames = np.stack([realistic_frame(rng, SMALL) for _ in range(4)])
    dark = dark_float32(rng, SMALL)
    counter = Counter(SMALL, dark_reference=dark, background_threshold=8.0, xray_threshold=1800.0)
    for f in frames:  # views into one buffer, as shared-memory slots are
        assert np.array_equal(counter.count(f), stempy_events(f, dark, None, 8.0, 1800.0))
    ro = frames[1].copy()
    ro.flags.writeable = False
    assert np.array_equal(counter.count(ro), stempy_events(frames[1], dark, None, 8.0, 1800.0))
    wide = np.zeros((SMALL[0], SMALL[1] * 2), np.uint16)
    wide[:, ::2] = frames[2]
    strided = wide[:, ::2]
    assert not strided.flags.c_contiguous
    assert np.array_equal(counter.count(strided), stempy_events(frames[2], dark, None, 8.0, 1800.0))


def test_threads_share_one_counter():
    """Per-thread scratch: concurrent counts with one Counter give each frame's own events."""
    rng = np.random.default_rng(5)
    frames = [realistic_frame(rng, FULL) for _ in range(6)]
    counter = Counter(FULL, background_threshold=25.0)
    expected = [counter.count(f) for f in frames]
    results: dict[int, list] = {}

    def work(k):
        results[k] = [counter.count(f) for f in frames * 5]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in results.values():
        for i, ev in enumerate(got):
            assert np.array_equal(ev, expected[i % len(frames)])


def test_threshold_translation_matches_double_comparisons():
    """The integer and float32 bounds the kernels use equal stempy's double comparisons."""
    v16 = np.arange(65536, dtype=np.float64)
    rng = np.random.default_rng(0)
    v32 = np.concatenate([rng.normal(0, 50, 20000), rng.uniform(-1e5, 1e5, 20000)]).astype(np.float32)
    thresholds = [-np.inf, -1e300, -1.0, -0.5, 0.0, 0.3, 4.0, 4.1, 12.5, 1999.999, 2000.0,
                  65534.5, 65535.0, 65535.5, 65536.0, 1e300, np.inf, float(np.float32(4.1)),
                  np.nextafter(4.1, 5.0), *rng.uniform(-10, 3000, 30)]
    with np.errstate(over="ignore"):
        near = np.float32(thresholds)
    v32 = np.concatenate([v32, near, np.nextafter(near, np.float32(np.inf)),
                          np.nextafter(near, np.float32(-np.inf))])
    for bg in thresholds:
        for xr in thresholds[::3]:
            lo, hi = _uint16_bounds(bg, xr)
            assert np.array_equal((lo <= v16) & (v16 < hi), (v16 > bg) & (v16 < xr)), (bg, xr)
        ref = v32.astype(np.float64)
        assert np.array_equal(v32 <= _float32_below(bg), ref <= bg), bg
        assert np.array_equal(v32 >= _float32_above(bg), ref >= bg), bg


# ----------------------------------------------------------------------------- bad input


def test_dark_of_wrong_shape_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(576, 575\).*\(576, 576\)"):
        Counter(FULL, dark_reference=np.zeros((576, 575), np.float32))


def test_gain_of_wrong_shape_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(10, 10\).*\(576, 576\)"):
        Counter(FULL, gain=np.ones((10, 10), np.float32))


def test_negative_dark_is_rejected():
    dark = np.full(SMALL, 20.0, np.float32)
    dark[3, 4] = -0.5
    with pytest.raises(ValueError, match="negative"):
        Counter(SMALL, dark_reference=dark)


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf])
def test_non_positive_or_non_finite_gain_is_rejected(bad):
    gain = np.ones(SMALL, np.float32)
    gain[0, 0] = bad
    with pytest.raises(ValueError, match="gain"):
        Counter(SMALL, gain=gain)


def test_nan_threshold_and_bad_frames_are_rejected():
    with pytest.raises(ValueError, match="threshold"):
        Counter(SMALL, background_threshold=float("nan"))
    counter = Counter(SMALL)
    with pytest.raises(ValueError, match=r"\(23, 37\).*\(37, 23\)"):
        counter.count(np.zeros((23, 37), np.uint16))
    with pytest.raises(ValueError, match="uint16"):
        counter.count(np.zeros(SMALL, np.int32))
