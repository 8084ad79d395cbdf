"""What the part writer and the merge hold does not grow with the scan: issue #10's flat memory."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest

from detstream.output import PartWriter, read_part
from detstream.output.merge import merge_parts
from detstream.services.segments import SegmentedPart

FRAME = (64, 64)
EVENTS_PER_FRAME = 200


def _frames(rng, n: int):
    for p in range(n):
        yield p, rng.choice(FRAME[0] * FRAME[1], EVENTS_PER_FRAME, replace=False).astype(np.uint32)


def _traced_peak(run) -> int:
    """Peak bytes of Python (numpy included) allocations while ``run()`` runs."""
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _write_part(path: Path, n: int) -> Path:
    with PartWriter(path, FRAME) as writer:
        for p, ev in _frames(np.random.default_rng(n), n):
            writer.add(p, ev)
    return path


def test_part_writer_holds_a_bounded_buffer_whatever_the_frames(tmp_path):
    """The frames wait in preallocated buffers bounded in bytes (1 MiB of events by default),
    not in per-frame arrays: 8x the frames, the same peak."""
    def write(n: int) -> int:
        frames = list(_frames(np.random.default_rng(n), n))  # made before tracing starts
        writer = PartWriter(tmp_path / f"p{n}.h5", FRAME)

        def add_all():
            for p, ev in frames:
                writer.add(p, ev)
            writer.close()
        return _traced_peak(add_all)

    small, large = write(2048), write(16384)  # both past one buffer's worth of events
    # Before: +5 MiB (up to 4096 frames as a list of arrays, joined for each append).
    assert large - small < 512 << 10, (small, large)
    # One buffer's events (1 MiB), and h5py's copy of them as it appends.
    assert large < 3 << 20, large


def test_part_writer_flushes_by_bytes(tmp_path):
    """A frame that does not fit in the buffer's room goes through (flushed first), and the
    events come back whole and in order."""
    path = tmp_path / "p.h5"
    writer = PartWriter(path, (2, 2), max_buffered_events=3)
    big = np.array([0, 1, 1, 2, 2, 3, 3, 0, 1], np.uint32)  # repeated pixels: more than 3 + 4
    writer.add(0, np.array([1, 2], np.uint32))
    writer.add(5, big)
    assert writer.positions_written == 2  # the buffered frame first, then the big one alone
    writer.add(7, np.array([3], np.uint32))
    writer.close()
    got = dict(read_part(path).iter_events())
    assert list(got) == [0, 5, 7]
    np.testing.assert_array_equal(got[5], big)


def test_merge_peak_does_not_grow_with_the_frames(tmp_path):
    """The merge reads blocks of at most 256k events into one reused buffer: a part of 8x the
    frames merges within the same Python peak (before: blocks of 8192 frames, +30 MiB here)."""
    def merge(n: int) -> int:
        side = int(np.sqrt(n))
        part = _write_part(tmp_path / f"part{n}.h5", n)
        return _traced_peak(lambda: merge_parts([part], tmp_path / f"m{n}.h5", side, side, FRAME,
                                                on_duplicate="first"))

    small, large = merge(32 * 32), merge(96 * 96)
    # What may grow: per-position arrays (positions, offsets, owner, the two images), ~50 B each.
    assert large - small < (2 << 20), (small, large)


def _open_segments(folder: Path) -> int:
    """Segment files this process has open now (file descriptors under ``folder``)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith(str(folder)) and target.endswith(".h5") and "seg-" in target
    return count


def test_merge_of_a_segmented_part_opens_one_segment_at_a_time(tmp_path):
    """A node's index part reads its events from its segments: HDF5's own virtual dataset would
    keep every segment open, each with its caches (~1.7 MiB a segment, so memory O(scan)); the
    part's reader opens one segment at a time, and the merged events are the segments' own."""
    seg = SegmentedPart(tmp_path / "parts", "node-0", FRAME)
    frames = dict(_frames(np.random.default_rng(0), 24 * 24))
    for p, ev in frames.items():
        seg.add(p, ev)
        if p % 32 == 31:
            seg.commit()
    index = seg.write_index()
    assert len(seg.segments) == 18
    with h5py.File(index, "r") as f:
        assert f["events"].is_virtual

    most = 0
    for positions, flat, offs in read_part(index).iter_blocks(block_positions=16):
        most = max(most, _open_segments(seg.directory))
        for i, p in enumerate(positions):
            np.testing.assert_array_equal(flat[offs[i]:offs[i + 1]], frames[int(p)])
    assert most == 1

    report = merge_parts([index], tmp_path / "m.h5", 24, 24, FRAME)
    assert report.total_events == sum(e.size for e in frames.values())
    with h5py.File(tmp_path / "m.h5", "r") as f:
        stored = f["electron_events/frames"]
        for p in (0, 31, 32, 575):
            np.testing.assert_array_equal(stored[p], frames[p])
    assert _open_segments(seg.directory) == 0


def test_a_segment_gone_is_an_error_naming_it(tmp_path):
    """Through HDF5's virtual dataset a missing segment read as zeros: now the reader says which."""
    seg = SegmentedPart(tmp_path / "parts", "node-0", FRAME)
    for p, ev in _frames(np.random.default_rng(1), 8):
        seg.add(p, ev)
        if p % 4 == 3:
            seg.commit()
    index = seg.write_index()
    seg.segments[1].unlink()
    with pytest.raises(OSError, match="seg-000001.h5"):
        list(read_part(index).iter_blocks())
