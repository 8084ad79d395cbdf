"""Virtual detectors and what a merge makes of them: stempy's ``stem/images`` (bright and dark
field) and the summed pattern in counted.h5, and figures a person can read."""

from __future__ import annotations

import h5py
import matplotlib
import matplotlib.image
import numpy as np
import pytest
import stempy.io as stempy_io

from detstream.output import PartWriter, merge_parts
from detstream.output.disk import DiskEstimate
from detstream.output.images import figure_layout, pattern_panel, scan_panel, write_figure
from detstream.output.virtual import IMAGE_NAMES, VirtualDetectors, frame_sums

pytestmark = pytest.mark.unit


def _ring_counts(events, width, height, frame_shape, center, lo, hi):
    """Events at distance lo..hi (inclusive) from center, per position: the brute-force answer."""
    out = np.zeros((height, width), np.int64)
    for p, ev in enumerate(events):
        r, c = np.divmod(ev.astype(np.int64), frame_shape[1])
        d2 = (r - center[0]) ** 2 + (c - center[1]) ** 2
        out[p // width, p % width] = int(np.count_nonzero((d2 >= lo * lo) & (d2 <= hi * hi)))
    return out


def _scan(rng, n, frame_shape, k=60):
    n_pixels = frame_shape[0] * frame_shape[1]
    return [np.unique(rng.integers(0, n_pixels, int(rng.integers(0, k)))).astype(np.uint32) for _ in range(n)]


def test_labels_split_disk_and_ring():
    d = VirtualDetectors((10.0, 12.0), 3.0, 5.0, 8.0)
    lab = d.labels((24, 30)).reshape(24, 30)
    assert lab[10, 12] == 1 and lab[10, 15] == 1 and lab[10, 16] == 0  # r=3 in, r=4 neither
    assert lab[10, 17] == 2 and lab[10, 20] == 2 and lab[10, 21] == 0  # ring 5..8
    assert VirtualDetectors.from_dict(d.as_dict()) == d
    with pytest.raises(ValueError, match="bf_radius"):
        VirtualDetectors((0, 0), 5.0, 4.0, 8.0)
    with pytest.raises(ValueError, match="not a virtual detector record"):
        VirtualDetectors.from_dict({"center": [1, 2]})


def test_around_a_disk_defaults_and_keeps_the_ring_outside():
    d = VirtualDetectors.around(DiskEstimate((50, 60), 10), (100, 120))
    assert (d.adf_inner, d.adf_outer) == (15.0, 50.0)
    assert VirtualDetectors.around(DiskEstimate((50, 60), 10), (100, 120), adf_inner=4).adf_inner == 10


def test_frame_sums_match_brute_force():
    rng = np.random.default_rng(0)
    shape = (20, 24)
    events = _scan(rng, 9, shape)
    d = VirtualDetectors((9.5, 11.0), 4.0, 6.0, 9.0)
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in events])])
    bf, adf = frame_sums(d.labels(shape), np.concatenate(events), offsets)
    np.testing.assert_array_equal(bf, _ring_counts(events, 9, 1, shape, d.center, 0, 4).ravel())
    np.testing.assert_array_equal(adf, _ring_counts(events, 9, 1, shape, d.center, 6, 9).ravel())


def _merged(tmp_path, width=7, height=5, shape=(40, 48), **kw):
    rng = np.random.default_rng(3)
    events = _scan(rng, width * height, shape)
    paths = []
    for k, positions in enumerate((range(0, width * height, 2), range(1, width * height, 2))):
        with PartWriter(tmp_path / f"p{k}.h5", shape) as w:
            for p in positions:
                w.add(p, events[p])
        paths.append(tmp_path / f"p{k}.h5")
    report = merge_parts(paths, tmp_path / "counted.h5", width, height, shape, **kw)
    return events, report


def test_counted_h5_carries_stem_images_in_stempys_layout(tmp_path):
    width, height, shape = 7, 5, (40, 48)
    events, report = _merged(tmp_path, width, height, shape, center=(20, 22), radius=6, adf_inner=9,
                             adf_outer=18)
    with h5py.File(tmp_path / "counted.h5", "r") as f:
        images = f["stem/images"]
        # Counts beside a centre of mass: one float64 stack, whole counts exact in it.
        assert images.shape == (4, height, width) and images.dtype == np.float64
        names = [n.decode() if isinstance(n, bytes) else n for n in images.attrs["names"]]
        assert names == list(IMAGE_NAMES) == ["bright_field", "annular_dark_field", "com_x", "com_y"]
        bf, adf, com = images[0], images[1], images[2:]
        pattern = f["summed_pattern"][()]
    # Computed afresh from the counted events stempy loads back from the same file.
    sa = stempy_io.load_electron_counts(tmp_path / "counted.h5")
    loaded = [sa.data[p][0] for p in range(width * height)]
    np.testing.assert_array_equal(bf, _ring_counts(loaded, width, height, shape, (20, 22), 0, 6))
    np.testing.assert_array_equal(adf, _ring_counts(loaded, width, height, shape, (20, 22), 9, 18))
    np.testing.assert_array_equal(bf, report.bright_field)
    # The centre of mass relative to the disk centre: stempy's own com_sparse (mean column, then
    # mean row, float32) less the centre, wherever a frame has events.
    import stempy.image as stempy_image

    theirs = stempy_image.com_sparse(sa, replace_nans=False)
    some = np.array([len(e) > 0 for e in loaded]).reshape(height, width)
    assert some.sum() > 20
    np.testing.assert_allclose(com[0][some], theirs[0][some] - 22, atol=1e-4)
    np.testing.assert_allclose(com[1][some], theirs[1][some] - 20, atol=1e-4)
    assert np.all(com[:, ~some] == 0)  # none here; an empty frame's is 0 (tests/detstream/test_live.py)
    expected = np.bincount(np.concatenate(events), minlength=shape[0] * shape[1]).reshape(shape)
    np.testing.assert_array_equal(pattern, expected)


def _uniform(block):
    return np.all(block == block[:1, :1])


def test_figure_is_enlarged_without_smoothing_with_a_colour_bar(tmp_path):
    image = np.arange(6 * 9, dtype=float).reshape(6, 9)
    write_figure(tmp_path / "bf.png", [scan_panel(image, "Virtual bright field")])
    png = matplotlib.image.imread(tmp_path / "bf.png")[..., :3]
    layout = figure_layout([image.shape])
    assert (png.shape[1], png.shape[0]) == layout.size
    k = layout.scale
    assert k == 480 // 9  # the longer side enlarged by a whole factor to about 480 pixels
    x0, y0, x1, y1 = layout.images[0]
    assert (x1 - x0, y1 - y0) == (9 * k, 6 * k)
    greys = np.zeros(image.shape)
    for r in range(6):
        for c in range(9):  # each scan position is one flat k x k block (borders: the axes frame)
            block = png[y0 + r * k + 2: y0 + (r + 1) * k - 2, x0 + c * k + 2: x0 + (c + 1) * k - 2]
            assert _uniform(block), (r, c)
            greys[r, c] = block[0, 0, 0]
    lut = matplotlib.colormaps["gray"](image / image.max())[..., 0]  # the colormap's own levels
    np.testing.assert_allclose(greys, lut, atol=1 / 255 + 1e-6)
    # The colour bar: a column of grey from white (top) to black (bottom), monotonic.
    bx0, by0, bx1, by1 = layout.colorbars[0]
    column = png[by0 + 2: by1 - 2, (bx0 + bx1) // 2]
    assert np.all(column[:, 0] == column[:, 1]) and np.all(np.diff(column[:, 0]) <= 0)
    assert column[0, 0] > 0.95 and column[-1, 0] < 0.05


def test_summed_pattern_figure_uses_a_log_colour_scale(tmp_path):
    pattern = np.ones((64, 64))
    pattern[20:30, 20:30] = 1000.0
    write_figure(tmp_path / "p.png", [pattern_panel(pattern)])
    png = matplotlib.image.imread(tmp_path / "p.png")[..., :3]
    layout = figure_layout([pattern.shape])
    x0, y0, _, _ = layout.images[0]
    k = layout.scale
    bright = png[y0 + 25 * k, x0 + 25 * k]
    dark = png[y0 + 5 * k, x0 + 5 * k]
    cmap = matplotlib.colormaps["magma"]
    np.testing.assert_allclose(bright, cmap(1.0)[:3], atol=2 / 255)
    np.testing.assert_allclose(dark, cmap(0.0)[:3], atol=2 / 255)
    bx0, by0, bx1, by1 = layout.colorbars[0]
    column = png[by0 + 2: by1 - 2, (bx0 + bx1) // 2]
    assert len({tuple(np.round(p, 2)) for p in column}) > 50  # a colour ramp, not a flat box


def test_a_redrawn_figure_equals_one_drawn_anew():
    import io

    from detstream.output.images import FigureDrawing, draw_figure

    rng = np.random.default_rng(9)
    first = rng.poisson(20, (12, 16)).astype(float)
    later = rng.poisson(50, (12, 16)).astype(float)
    later[8:] = np.nan  # not yet measured
    drawing = FigureDrawing([scan_panel(first, "bf"), scan_panel(first, "adf")], "t0")
    redrawn = drawing.redraw([later, later * 2], "t1")
    fresh = draw_figure([scan_panel(later, "bf"), scan_panel(later * 2, "adf")], "t1")
    np.testing.assert_array_equal(matplotlib.image.imread(io.BytesIO(redrawn)),
                                  matplotlib.image.imread(io.BytesIO(fresh)))
    with pytest.raises(ValueError, match="redraw with shape"):
        drawing.redraw([later[:4], later], "t2")


def test_the_merges_room_bound_covers_the_four_float64_images(tmp_path):
    """counted.h5's room is reserved before HDF5 writes (output.hdf5.counts_bound): it must count
    stem/images as four float64 images, not the two uint64 ones of before, or a long scan of
    sparse frames outgrows its reservation (512x512 here: by about 3 MB)."""
    from detstream.output.hdf5 import counts_bound

    side, shape = 512, (16, 16)
    n = side * side
    counts = np.random.default_rng(0).poisson(0.3, n)
    with PartWriter(tmp_path / "p.h5", shape) as w:
        for p in range(n):
            w.add(p, np.arange(counts[p], dtype=np.uint32))
    merge_parts([tmp_path / "p.h5"], tmp_path / "counted.h5", side, side, shape)
    with h5py.File(tmp_path / "counted.h5", "r") as f:
        assert f["stem/images"].shape == (len(IMAGE_NAMES), side, side) and f["stem/images"].dtype == np.float64
    assert (tmp_path / "counted.h5").stat().st_size <= counts_bound(n, shape, counts)
