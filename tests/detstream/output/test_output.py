"""Output files: stempy-compatible counted data, parts and their merge, virtual bright field,
PNG and JSON summary; each written atomically."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import PIL.Image
import pytest

import stempy.io as stempy_io  # noqa: E402  (a hard test requirement: never a silent skip)

from detstream.output import (  # noqa: E402
    MergeReport,
    PartWriter,
    disk_mask,
    estimate_disk,
    merge_parts,
    read_part,
    summed_pattern,
    to_uint8,
    virtual_bright_field,
    write_counts,
    write_png,
    write_summary,
)


def random_events(rng, n_positions, frame_shape, max_events=40, empty_every=0):
    """Sorted unique flat pixel indices per position, some positions empty."""
    n_pixels = frame_shape[0] * frame_shape[1]
    out = []
    for i in range(n_positions):
        k = 0 if empty_every and i % empty_every == 0 else int(rng.integers(0, max_events + 1))
        out.append(np.unique(rng.integers(0, n_pixels, k)).astype(np.uint32))
    return out


def only_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ------------------------------------------------------------------------------ stempy layout


def test_stempy_round_trip_non_square_scan_and_frame(tmp_path):
    rng = np.random.default_rng(0)
    width, height, frame_shape = 5, 3, (4, 6)  # frame: 4 rows, 6 cols
    events = random_events(rng, width * height, frame_shape, max_events=10, empty_every=4)
    path = write_counts(tmp_path / "c.h5", events, width, height, frame_shape, attrs={"scan": 7})

    sa = stempy_io.load_electron_counts(path)
    assert tuple(sa.scan_shape) == (height, width)
    assert tuple(sa.frame_shape) == frame_shape
    assert sa.metadata["scan"] == 7
    dense = sa[:]  # (height, width, rows, cols)
    assert dense.shape == (height, width, *frame_shape)
    for y in range(height):
        for x in range(width):
            idx = y * width + x
            np.testing.assert_array_equal(sa.data[idx][0], events[idx])
            expected = np.zeros(frame_shape, dense.dtype)
            rows, cols = np.unravel_index(events[idx], frame_shape)
            expected[rows, cols] = 1
            np.testing.assert_array_equal(dense[y, x], expected)
    assert only_files(tmp_path) == ["c.h5"]


def test_layout_matches_stempys_own_writer(tmp_path):
    """Same groups, dtypes and attributes as stempy's SparseArray.write_to_hdf5."""
    rng = np.random.default_rng(1)
    width, height, frame_shape = 4, 2, (3, 5)
    events = random_events(rng, width * height, frame_shape, max_events=6)
    ours = write_counts(tmp_path / "ours.h5", events, width, height, frame_shape, attrs={"k": 1.5})

    data = np.empty((width * height, 1), dtype=object)
    for i, e in enumerate(events):
        data[i, 0] = e
    ref = tmp_path / "stempy.h5"
    reference = stempy_io.SparseArray(data, (height, width), frame_shape, metadata={"k": 1.5})
    reference.write_to_hdf5(ref)

    def describe(path):
        items = {}
        with h5py.File(path, "r") as f:
            items["/"] = dict(f.attrs)

            def visit(name, obj):
                kind = "group" if isinstance(obj, h5py.Group) else (obj.dtype, obj.shape)
                items[name] = (kind, dict(obj.attrs))

            f.visititems(visit)
        return items

    assert describe(ours).keys() == describe(ref).keys()
    for name, value in describe(ref).items():
        assert repr(describe(ours)[name]) == repr(value), name
    with h5py.File(ours, "r") as a, h5py.File(ref, "r") as b:
        for x, y in zip(a["electron_events/frames"][()], b["electron_events/frames"][()]):
            np.testing.assert_array_equal(x, y)


def test_stempy_round_trip_realistic_frame(tmp_path):
    rng = np.random.default_rng(2)
    width, height, frame_shape = 9, 4, (576, 576)
    events = random_events(rng, width * height, frame_shape, max_events=400, empty_every=7)
    write_counts(tmp_path / "big.h5", events, width, height, frame_shape)
    sa = stempy_io.load_electron_counts(tmp_path / "big.h5")
    assert tuple(sa.scan_shape) == (height, width)
    assert tuple(sa.frame_shape) == frame_shape
    assert len(sa.data) == width * height
    for got, want in zip(sa.data[:, 0], events):
        assert got.dtype == np.uint32
        np.testing.assert_array_equal(got, want)


def test_write_counts_checks_position_count(tmp_path):
    with pytest.raises(ValueError, match="5x3"):
        write_counts(tmp_path / "c.h5", [np.zeros(0, np.uint32)] * 14, 5, 3, (4, 4))
    assert only_files(tmp_path) == []


def test_write_counts_refuses_to_overwrite(tmp_path):
    path = tmp_path / "c.h5"
    first = [np.array([1], np.uint32)] * 4
    write_counts(path, first, 2, 2, (4, 4))
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=str(path)):
        write_counts(path, [np.array([2], np.uint32)] * 4, 2, 2, (4, 4))
    assert path.read_bytes() == before
    write_counts(path, [np.array([2], np.uint32)] * 4, 2, 2, (4, 4), overwrite=True)
    assert stempy_io.load_electron_counts(path).data[0][0].tolist() == [2]
    assert only_files(tmp_path) == ["c.h5"]


@pytest.mark.parametrize(
    "bad, error",
    [
        (np.array([1.0, 2.0]), TypeError),  # not integers
        (np.array([0, 16]), ValueError),  # outside a 4x4 frame
        (np.array([[1, 2]]), ValueError),  # not 1-D
    ],
)
def test_bad_events_partway_leave_no_file(tmp_path, bad, error):
    n = 5000  # past the first write block, so some frames are already in the temp file
    events = [np.array([3], np.uint32)] * n
    events[n - 2] = bad
    with pytest.raises(error, match=f"scan position {n - 2}"):
        write_counts(tmp_path / "c.h5", events, n, 1, (4, 4))
    assert only_files(tmp_path) == []


def test_events_source_raising_partway_leaves_no_file(tmp_path):
    class Flaky:
        """A position-indexed source that fails midway, like a lost node's buffer."""

        def __len__(self):
            return 6000

        def __getitem__(self, i):
            if i == 4500:
                raise RuntimeError("source went away")
            return np.array([i % 16], np.uint32)

    with pytest.raises(RuntimeError, match="source went away"):
        write_counts(tmp_path / "c.h5", Flaky(), 100, 60, (4, 4))
    assert only_files(tmp_path) == []


def test_unwritable_destination_names_path(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    target = blocker / "c.h5"
    with pytest.raises(OSError, match=str(target)) as info:
        write_counts(target, [np.zeros(0, np.uint32)], 1, 1, (4, 4))
    assert info.value.errno == errno.ENOTDIR
    assert only_files(tmp_path) == ["not_a_dir"]


def test_write_failure_from_hdf5_is_oserror_and_leaves_nothing(tmp_path):
    """A real write failure (file size limit, like a full disk) surfaces as OSError naming the
    path, even though HDF5 reports it late, and leaves no file under the final name."""
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        import numpy as np
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
        from detstream.output import write_counts
        events = [np.arange(200, dtype=np.uint32)] * 2000  # ~1.6 MB of events
        try:
            write_counts({str(tmp_path / "c.h5")!r}, events, 50, 40, (64, 64))
        except OSError as e:
            print("OSError", e.errno, e)
            sys.exit(0)
        sys.exit("no error raised")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert done.stdout.startswith(f"OSError {errno.EFBIG}")
    assert str(tmp_path / "c.h5") in done.stdout
    assert only_files(tmp_path) == []


# ------------------------------------------------------------------------------ parts


def test_part_writer_random_order_across_flushes(tmp_path):
    rng = np.random.default_rng(3)
    frame_shape = (8, 12)
    positions = rng.permutation(50)[:37]
    events = {int(p): e for p, e in zip(positions, random_events(rng, 37, frame_shape, 15, 5))}
    path = tmp_path / "p0.h5"
    writer = PartWriter(path, frame_shape, flush_every=8)  # 37 frames: 4 flushes + a remainder
    buffer = np.zeros(20, np.uint32)
    for p in positions:
        e = events[int(p)]
        buffer[: e.size] = e
        writer.add(int(p), buffer[: e.size])  # the caller reuses its buffer
        buffer[:] = 99
        assert not path.exists()
    assert writer.positions_written == 32  # flushed so far
    writer.close({"node": "nid001", "rate": np.float32(2.5)})
    assert only_files(tmp_path) == ["p0.h5"]

    part = read_part(path)
    np.testing.assert_array_equal(part.positions, positions)
    assert part.frame_shape == frame_shape
    assert part.extra == {"node": "nid001", "rate": 2.5}
    assert part.n_events == sum(e.size for e in events.values())
    seen = dict(part.iter_events())
    assert seen.keys() == events.keys()
    for p, e in events.items():
        np.testing.assert_array_equal(seen[p], e)
    np.testing.assert_array_equal(part.summed_pattern(), summed_pattern(events, frame_shape))
    stored_positions, stored_events = read_part(path)  # the unpacking form
    for p, e in zip(stored_positions, stored_events, strict=True):
        np.testing.assert_array_equal(e, events[int(p)])


def test_part_writer_bounds_buffer_by_events(tmp_path):
    writer = PartWriter(tmp_path / "p.h5", (4, 4), flush_every=1000, max_buffered_events=10)
    for p in range(4):
        writer.add(p, np.arange(4, dtype=np.uint32))
    assert writer.positions_written == 3  # 12 events buffered after the third frame
    writer.close()
    assert read_part(tmp_path / "p.h5").n_events == 16


def test_part_writer_rejects_duplicates_and_aborts_cleanly(tmp_path):
    path = tmp_path / "p.h5"
    with pytest.raises(ValueError, match="position 3 added twice"):
        with PartWriter(path, (4, 4)) as writer:
            writer.add(3, np.array([1], np.uint32))
            writer.add(3, np.array([2], np.uint32))
    assert only_files(tmp_path) == []


def test_part_writer_refuses_to_overwrite(tmp_path):
    path = tmp_path / "p.h5"
    with PartWriter(path, (4, 4)) as writer:
        writer.add(0, np.array([1], np.uint32))
    with pytest.raises(FileExistsError, match=str(path)):
        PartWriter(path, (4, 4))
    assert only_files(tmp_path) == ["p.h5"]


# ------------------------------------------------------------------------------ merge


def write_parts(tmp_path, assignment, events, frame_shape, flush_every=4):
    paths = []
    for k, positions in enumerate(assignment):
        path = tmp_path / f"part{k}.h5"
        with PartWriter(path, frame_shape, flush_every=flush_every) as writer:
            for p in positions:
                writer.add(int(p), events[int(p)])
        paths.append(path)
    return paths


def test_merge_fills_missing_and_matches_stempy(tmp_path):
    rng = np.random.default_rng(4)
    width, height, frame_shape = 6, 5, (10, 14)
    n = width * height
    events = random_events(rng, n, frame_shape, max_events=30)
    order = rng.permutation(n)
    absent = np.sort(order[:4])
    assignment = [order[4:15], order[15:16], order[16:], []]  # one empty part
    parts = write_parts(tmp_path, assignment, events, frame_shape)

    out = tmp_path / "merged.h5"
    report = merge_parts(parts, out, width, height, frame_shape, block_positions=3)
    assert isinstance(report, MergeReport)
    assert report.missing == absent.tolist()
    assert report.positions_written == n - 4
    assert report.total_events == sum(events[p].size for p in order[4:])
    assert report.parts == parts

    sa = stempy_io.load_electron_counts(out)
    assert tuple(sa.scan_shape) == (height, width)
    for p in range(n):
        want = np.zeros(0, np.uint32) if p in absent else events[p]
        np.testing.assert_array_equal(sa.data[p][0], want)
    assert sorted(only_files(tmp_path)) == sorted([p.name for p in parts] + ["merged.h5"])
    summary = report.summary()
    assert summary["n_missing"] == 4 and summary["missing"] == absent.tolist()


def test_merge_duplicate_position_names_both_parts(tmp_path):
    frame_shape = (4, 4)
    events = [np.array([p % 16], np.uint32) for p in range(12)]
    parts = write_parts(tmp_path, [range(0, 7), range(6, 12)], events, frame_shape)
    with pytest.raises(ValueError) as info:
        merge_parts(parts, tmp_path / "m.h5", 4, 3, frame_shape)
    message = str(info.value)
    assert "position 6" in message and str(parts[0]) in message and str(parts[1]) in message
    assert not (tmp_path / "m.h5").exists()
    assert not any(name.startswith(".") for name in only_files(tmp_path))


def test_merge_refuses_to_overwrite_and_checks_geometry(tmp_path):
    frame_shape = (4, 4)
    events = [np.array([p], np.uint32) for p in range(4)]
    parts = write_parts(tmp_path, [range(4)], events, frame_shape)
    out = tmp_path / "m.h5"
    merge_parts(parts, out, 2, 2, frame_shape)
    with pytest.raises(FileExistsError, match=str(out)):
        merge_parts(parts, out, 2, 2, frame_shape)
    merge_parts(parts, out, 2, 2, frame_shape, overwrite=True)
    with pytest.raises(ValueError, match="frame shape"):
        merge_parts(parts, tmp_path / "m2.h5", 2, 2, (4, 5))
    with pytest.raises(ValueError, match="outside a 3x1 scan"):
        merge_parts(parts, tmp_path / "m2.h5", 3, 1, frame_shape)
    assert not (tmp_path / "m2.h5").exists()


# ------------------------------------------------------------------------------ bright field


def disk_pixels(frame_shape, center, radius):
    rows, cols = np.nonzero(disk_mask(frame_shape, center, radius))
    return rows * frame_shape[1] + cols


def moving_disk_scan(rng, width, height, frame_shape, radius, start, step):
    """Frames with bright-field events inside a disk whose centre moves by ``step`` (rows, cols)
    per scan column, plus dark-field events well outside it. Returns events, centres, BF counts."""
    rows, cols = frame_shape
    rr, cc = np.divmod(np.arange(rows * cols), cols)
    events, centres, n_bf = [], [], np.zeros((height, width), int)
    for y in range(height):
        for x in range(width):
            centre = (start[0] + step[0] * x + 0.5 * y, start[1] + step[1] * x)
            inside = disk_pixels(frame_shape, centre, radius)
            far = np.flatnonzero((rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 > (2 * radius) ** 2)
            k = int(rng.integers(30, 90))
            bf = rng.choice(inside, size=k, replace=False)
            df = rng.choice(far, size=int(rng.integers(0, 15)), replace=False)
            events.append(np.sort(np.concatenate([bf, df])).astype(np.uint32))
            centres.append(centre)
            n_bf[y, x] = k
    return events, np.array(centres), n_bf


def brute_force_disk_counts(events, width, height, frame_shape, center, radius):
    image = np.zeros((height, width), int)
    for p, ev in enumerate(events):
        for e in ev.tolist():
            r, c = divmod(e, frame_shape[1])
            if (r - center[0]) ** 2 + (c - center[1]) ** 2 <= radius**2:
                image[p // width, p % width] += 1
    return image


@pytest.mark.parametrize("level, tolerance", [(200.0, 0.5), (0.5, 2.0)])  # dense, and sparse
def test_estimate_disk_finds_off_centre_disk_among_distractors(level, tolerance):
    rng = np.random.default_rng(8)
    frame_shape = (192, 256)
    centre, radius = (71.4, 150.7), 20.0
    expected = level * disk_mask(frame_shape, centre, radius)
    expected += 0.4 * level * disk_mask(frame_shape, (150, 40), 10)  # a weaker Bragg disk
    expected += 0.02 * level  # diffuse background
    pattern = rng.poisson(expected).astype(np.uint64)
    pattern[20, 20] = 10**7  # a hot pixel outshining the whole disk
    pattern[180, 200:202] = 10**6  # and a hot pair
    got = estimate_disk(pattern)
    assert np.hypot(got.center[0] - centre[0], got.center[1] - centre[1]) < tolerance
    assert abs(got.radius - radius) < tolerance
    with pytest.raises(ValueError, match="empty"):
        estimate_disk(np.zeros(frame_shape))


def test_virtual_bright_field_follows_a_moving_disk():
    rng = np.random.default_rng(5)
    width, height, frame_shape, radius = 9, 4, (96, 128), 10
    events, centres, n_bf = moving_disk_scan(
        rng, width, height, frame_shape, radius, start=(40.0, 30.0), step=(0.5, 3.0)
    )

    # A detector fixed where the disk starts: full counts there, fewer as the disk leaves it.
    start = tuple(centres[0])
    image = virtual_bright_field(events, width, height, frame_shape, center=start, radius=radius)
    assert image.shape == (height, width)
    np.testing.assert_array_equal(
        image, brute_force_disk_counts(events, width, height, frame_shape, start, radius)
    )
    assert image[0, 0] == n_bf[0, 0]
    assert np.all(image[:, -1] < n_bf[:, -1] / 4)  # moved 24 px, more than a diameter

    # Estimated disk: the count-weighted mean of where the disk was.
    disk = estimate_disk(summed_pattern(events, frame_shape))
    weights = n_bf.ravel()
    expected_centre = (weights[:, None] * centres).sum(axis=0) / weights.sum()
    assert np.hypot(*(np.array(disk.center) - expected_centre)) < 1.5
    assert disk.radius > radius  # the sum smears the disk along its path

    # A detector on the disk's own path at each column catches every bright-field event there.
    for x in range(width):
        column = [events[y * width + x] for y in range(height)]
        centre_x = centres[x]  # y == 0 row's centre for column x; rows drift 0.5 px per y
        got = virtual_bright_field(
            column, 1, height, frame_shape, center=centre_x, radius=radius + 2
        )
        np.testing.assert_array_equal(got[:, 0], n_bf[:, x])

    # Iterator input (one pass) gives the same as a sequence, with and without a given disk.
    pairs = ((p, e) for p, e in reversed(list(enumerate(events))))
    np.testing.assert_array_equal(
        virtual_bright_field(pairs, width, height, frame_shape),
        virtual_bright_field(events, width, height, frame_shape),
    )


def test_merge_bright_field_equals_two_pass_result(tmp_path):
    rng = np.random.default_rng(6)
    width, height, frame_shape, radius = 7, 5, (64, 80), 8
    events, _, _ = moving_disk_scan(
        rng, width, height, frame_shape, radius, start=(30.0, 25.0), step=(0.0, 1.0)
    )
    order = rng.permutation(width * height)
    parts = write_parts(tmp_path, [order[:12], order[12:30], order[30:]], events, frame_shape)
    report = merge_parts(parts, tmp_path / "m.h5", width, height, frame_shape, block_positions=5)

    expected_disk = estimate_disk(summed_pattern(events, frame_shape))
    assert report.disk == expected_disk
    np.testing.assert_array_equal(
        report.bright_field, virtual_bright_field(events, width, height, frame_shape)
    )
    fixed = merge_parts(
        parts, tmp_path / "m2.h5", width, height, frame_shape, center=(30, 28), radius=radius
    )
    np.testing.assert_array_equal(
        fixed.bright_field,
        brute_force_disk_counts(events, width, height, frame_shape, (30, 28), radius),
    )


# ------------------------------------------------------------------------------ PNG and JSON


def decode_png(data: bytes) -> np.ndarray:
    """Decode a PNG that must hold an opaque grey image (grey, or RGB(A) with equal channels);
    Pillow checks every chunk's CRC. Returns the grey levels."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    rgba = np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGBA"))
    assert np.all(rgba[..., 3] == 255)
    assert np.all(rgba[..., 0] == rgba[..., 1]) and np.all(rgba[..., 1] == rgba[..., 2])
    return rgba[..., 0]


def test_png_decodes_to_scaled_image(tmp_path):
    rng = np.random.default_rng(7)
    image = rng.normal(50.0, 20.0, size=(5, 9))  # 5 rows, 9 cols
    image[2, 3] = np.nan
    written = write_png(tmp_path / "bf.png", image)
    decoded = decode_png((tmp_path / "bf.png").read_bytes())
    assert decoded.shape == (5, 9)

    finite = np.isfinite(image)
    lo, hi = image[finite].min(), image[finite].max()
    expected = np.zeros(image.shape, np.uint8)
    expected[finite] = np.round((image[finite] - lo) / (hi - lo) * 255).astype(np.uint8)
    np.testing.assert_array_equal(decoded, expected)
    np.testing.assert_array_equal(written, expected)
    assert decoded.min() == 0 and decoded.max() == 255
    assert only_files(tmp_path) == ["bf.png"]


def test_png_of_constant_and_integer_images(tmp_path):
    write_png(tmp_path / "c.png", np.full((3, 4), 7, np.int64))
    np.testing.assert_array_equal(decode_png((tmp_path / "c.png").read_bytes()), np.zeros((3, 4)))
    counts = np.arange(12, dtype=np.uint32).reshape(3, 4) * 10
    expected = np.round(np.arange(12) * 255 / 11).reshape(3, 4)
    np.testing.assert_array_equal(to_uint8(counts), expected)
    with pytest.raises(FileExistsError, match="c.png"):
        write_png(tmp_path / "c.png", counts, overwrite=False)


def test_summary_is_pretty_json_with_numpy_converted(tmp_path):
    summary = {
        "scan": np.int64(12),
        "rate": np.float32(1.5),
        "ok": np.bool_(True),
        "missing": np.array([3, 9], np.uint32),
        "shape": (576, 576),
        "path": tmp_path / "x.h5",
        "nested": {"nan": float("nan"), "values": [np.float64(0.25)]},
    }
    path = write_summary(tmp_path / "summary.json", summary)
    text = path.read_text()
    assert text.startswith("{\n  ")
    assert json.loads(text) == {
        "scan": 12,
        "rate": 1.5,
        "ok": True,
        "missing": [3, 9],
        "shape": [576, 576],
        "path": str(tmp_path / "x.h5"),
        "nested": {"nan": None, "values": [0.25]},
    }
    with pytest.raises(TypeError, match="object"):
        write_summary(tmp_path / "bad.json", {"x": object()})
    assert only_files(tmp_path) == ["summary.json"]


def test_written_files_respect_umask(tmp_path):
    """Temp files are not created 0600: the final file gets the usual umask-based mode."""
    old = os.umask(0o022)
    try:
        path = write_summary(tmp_path / "s.json", {"a": 1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
