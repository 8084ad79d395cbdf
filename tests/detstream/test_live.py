"""detstream.live: a node's running bright and dark field and centre of mass from its counted
events, published to a real etcd in compact chunks, the session's disk agreed there, live.png drawn
from them, and the live images at the end equal to the merge's ``stem/images``."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest

from detstream.config import SessionSpec, VirtualImaging
import h5py

from detstream.live import LiveImages, LiveView, assemble, chunk_format, decode_chunk, encode_chunk, publish
from detstream.output import PartWriter, merge_parts
from detstream.output.images import figure_layout
from detstream.output.virtual import IMAGE_NAMES, VirtualDetectors
from detstream.profile import get_profile

pytestmark = pytest.mark.unit

FRAME = (144, 144)
DISK = ((70.0, 75.0), 12.0)


def _frames(rng, n, center=DISK[0], radius=DISK[1]):
    """Events: many inside a disk, a few anywhere, per frame."""
    rr, cc = np.divmod(np.arange(FRAME[0] * FRAME[1]), FRAME[1])
    inside = np.flatnonzero((rr - center[0]) ** 2 + (cc - center[1]) ** 2 <= radius ** 2)
    out = []
    for _ in range(n):
        ev = np.concatenate([rng.choice(inside, int(rng.integers(20, 60)), replace=False),
                             rng.integers(0, FRAME[0] * FRAME[1], int(rng.integers(0, 20)))])
        out.append(np.unique(ev).astype(np.uint32))
    return out


def _truth(events, detectors):
    lab = detectors.labels(FRAME)
    return (np.array([np.count_nonzero(lab[e] == 1) for e in events]),
            np.array([np.count_nonzero(lab[e] == 2) for e in events]))


def _com_truth(events, center):
    """The centre of mass of each frame's events, one frame at a time: mean column and row less
    the disk centre's (0 for a frame without events)."""
    out = np.zeros((2, len(events)))
    for i, e in enumerate(events):
        if len(e):
            r, c = np.divmod(e.astype(np.int64), FRAME[1])
            out[:, i] = c.mean() - center[1], r.mean() - center[0]
    return out


def test_chunks_round_trip_and_malformed_ones_are_named():
    counted = np.array([1, 0, 1, 1, 0], bool)
    raw = encode_chunk(4096, counted, np.array([5, 0, 7, 9, 0]), np.array([1, 0, 2, 3, 0]),
                       np.array([6, 0, 9, 12, 0]), np.array([300, 0, 410, 999, 0]), np.array([30, 0, 41, 99, 0]))
    start, c = decode_chunk(raw)
    assert start == 4096 and c.counted.tolist() == counted.tolist()
    assert c.bf.tolist() == [5, 0, 7, 9, 0] and c.adf.tolist() == [1, 0, 2, 3, 0]
    assert c.events.tolist() == [6, 0, 9, 12, 0] and c.col_sum.tolist() == [300, 0, 410, 999, 0]
    assert c.row_sum.tolist() == [30, 0, 41, 99, 0]
    # Sums that could pass 2**32 (a frame over 2048x2048) go as 64-bit numbers.
    assert chunk_format((576, 576)) == 2 and chunk_format((4096, 4096)) == 3
    wide = encode_chunk(0, counted, *(np.full(5, 2**40 if k >= 2 else 1) for k in range(5)), fmt=3)
    assert decode_chunk(wide)[1].col_sum.tolist() == [2**40] * 5
    with pytest.raises(ValueError, match="shorter than its header"):
        decode_chunk(b"\x01")
    with pytest.raises(ValueError, match="format"):
        decode_chunk(b"\x07" + raw[1:])
    with pytest.raises(ValueError, match="decompress"):
        decode_chunk(raw[:9] + b"garbage")
    # assemble skips what it cannot read, and keeps the rest
    sums = assemble([raw[:5], encode_chunk(0, counted, np.arange(5), np.arange(5))], 10)
    assert sums.counted[:5].tolist() == counted.tolist() and sums.bf[2] == 2


def test_node_sums_equal_brute_force_with_the_sessions_disk_and_cost_a_few_bytes_per_frame():
    rng = np.random.default_rng(1)
    n = 64 * 64
    events = _frames(rng, n // 2)
    imaging = VirtualImaging(center=DISK[0], bf_radius=DISK[1])
    live = LiveImages(n, FRAME, imaging)
    positions = np.arange(0, n, 2)  # one node of two
    for p, ev in zip(positions, events):
        live.add(int(p), ev)
    chunks = live.changes()
    assert live.changes() == {}  # nothing new since
    sums = assemble(chunks.values(), n)
    want_bf, want_adf = _truth(events, live.detectors)
    assert sums.counted.sum() == n // 2 and sums.counted[positions].all()
    np.testing.assert_array_equal(sums.bf[positions], want_bf)
    np.testing.assert_array_equal(sums.adf[positions], want_adf)
    com_x, com_y = sums.com(DISK[0])
    want = _com_truth(events, DISK[0])
    np.testing.assert_allclose(com_x[positions], want[0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(com_y[positions], want[1], rtol=0, atol=1e-9)
    assert np.ptp(want[0]) > 1 and np.ptp(want[1]) > 1  # frames whose centres of mass differ
    assert sum(len(c) for c in chunks.values()) / len(events) < 16  # bytes per frame, published

    # The same frames handed over as one block (a data loop that collects in batches).
    blocks = LiveImages(n, FRAME, imaging)
    blocks.add_block(positions, np.concatenate(events),
                     np.concatenate([[0], np.cumsum([len(e) for e in events])]))
    assert blocks.changes() == chunks


def test_a_node_finds_the_disk_in_its_first_frames_and_keeps_them_until_agreed():
    rng = np.random.default_rng(2)
    events = _frames(rng, 300)
    live = LiveImages(300, FRAME, VirtualImaging(find_frames=128))
    for p, ev in enumerate(events[:200]):
        live.add(p, ev)
    live.finish()
    assert live.needs_disk and live.proposal is not None
    assert np.hypot(live.proposal.center[0] - DISK[0][0], live.proposal.center[1] - DISK[0][1]) < 2
    assert live.changes() == {}  # nothing to show before the session's disk is known
    agreed = VirtualDetectors(DISK[0], DISK[1], 18.0, 60.0)
    live.agree(agreed)
    for p, ev in enumerate(events[200:], start=200):
        live.add(p, ev)
    sums = assemble(live.changes().values(), 300)
    assert sums.counted.all()
    want_bf, want_adf = _truth(events, agreed)
    np.testing.assert_array_equal(sums.bf, want_bf)
    np.testing.assert_array_equal(sums.adf, want_adf)
    # Frames held back before the disk was known carry their centre of mass too.
    np.testing.assert_allclose(np.stack(sums.com(agreed.center)), _com_truth(events, agreed.center), atol=1e-9)


def test_nodes_agree_on_the_first_proposal_through_etcd_and_the_view_draws_it(coordinator, tmp_path):
    sid = "live-1"
    spec = SessionSpec(session_id=sid, scan_width=24, scan_height=20, output_dir=tmp_path,
                       detector_profile=get_profile("testcam"), virtual=VirtualImaging(find_frames=64))
    n = spec.frames_expected
    rng = np.random.default_rng(3)
    first = _frames(rng, n)
    shifted = _frames(rng, n, center=(80.0, 60.0))  # node 1 sees a different disk first
    nodes = [LiveImages(n, FRAME, spec.virtual) for _ in range(2)]
    for p in range(0, 128, 2):
        nodes[0].add(p, first[p])
    publish(coordinator, sid, "node-0", nodes[0])
    for p in range(1, 129, 2):
        nodes[1].add(p, shifted[p])
    publish(coordinator, sid, "node-1", nodes[1])
    assert nodes[1].detectors == nodes[0].detectors == nodes[0].proposal  # the first proposal wins
    assert VirtualDetectors.from_dict(coordinator.live_detectors(sid)) == nodes[0].proposal

    view = LiveView(coordinator, spec, interval_s=0.0)
    assert view.refresh() and view.version == 1 and view.frames_shown == 128
    assert not view.refresh()  # nothing new: no redraw
    for p in range(128, n):
        nodes[p % 2].add(p, first[p])
    for i, live in enumerate(nodes):
        publish(coordinator, sid, f"node-{i}", live, final=True)
    assert view.refresh() and view.version == 2 and view.frames_shown == n
    sums = assemble(coordinator.live_chunks(sid), n)
    seen = [first[p] if p >= 128 or p % 2 == 0 else shifted[p] for p in range(n)]
    truth, _ = _truth(seen, nodes[0].detectors)
    np.testing.assert_array_equal(sums.bf, truth)
    # The view's centre of mass is relative to the disk the nodes agreed in etcd.
    assert view.detectors == nodes[0].detectors
    np.testing.assert_allclose(np.stack(view.com()).reshape(2, -1), _com_truth(seen, nodes[0].detectors.center),
                               atol=1e-9)
    png = matplotlib.image.imread(spec.paths.live_image)
    layout = figure_layout([(20, 24)] * 4)  # bright field, dark field, centre of mass x and y
    assert (png.shape[1], png.shape[0]) == layout.size and png.tobytes() != b""

    # As a session runs it: drawn by a low-priority thread, waited for at the end.
    spec.paths.live_image.unlink()
    background = LiveView(coordinator, spec, interval_s=0.0, background=True)
    try:
        assert background.refresh() and background.wait_drawn(30)
        assert background.version == 1 and background.drawn_frames == n and spec.paths.live_image.is_file()
    finally:
        background.close()
    assert not background.refresh() and not background._thread.is_alive()


def test_a_node_without_etcd_answers_uses_its_own_disk_at_the_end():
    rng = np.random.default_rng(4)
    events = _frames(rng, 40)
    live = LiveImages(40, FRAME, VirtualImaging(find_frames=256))  # fewer frames than find_frames
    for p, ev in enumerate(events):
        live.add(p, ev)
    live.finish(own_disk=True)
    assert live.detectors == live.proposal is not None
    sums = assemble(live.changes().values(), 40)
    assert sums.counted.all() and sums.bf.sum() > 0


def test_live_images_at_the_end_equal_the_merged_stem_images(tmp_path):
    """Two nodes' live sums, and their parts merged with the same disk: bright field, dark field
    and centre of mass agree to the bit (both from the same integer sums)."""
    rng = np.random.default_rng(5)
    width, height = 12, 10
    n = width * height
    events = _frames(rng, n, center=(66.3, 79.8))
    events[7] = np.zeros(0, np.uint32)  # a frame without events: centre of mass 0 on both sides
    detectors = VirtualDetectors(DISK[0], DISK[1], 18.0, 60.0)
    imaging = VirtualImaging(center=DISK[0], bf_radius=DISK[1], adf_inner=18.0, adf_outer=60.0)
    nodes = [LiveImages(n, FRAME, imaging) for _ in range(2)]
    parts = []
    for k, live in enumerate(nodes):
        with PartWriter(tmp_path / f"node-{k}.h5", FRAME) as w:
            for p in range(k, n, 2):
                live.add(p, events[p])
                w.add(p, events[p])
        parts.append(tmp_path / f"node-{k}.h5")
    sums = assemble([c for live in nodes for c in live.changes().values()], n)
    report = merge_parts(parts, tmp_path / "counted.h5", width, height, FRAME, center=DISK[0], radius=DISK[1],
                         adf_inner=18.0, adf_outer=60.0)
    assert report.detectors == detectors
    with h5py.File(tmp_path / "counted.h5", "r") as f:
        stored = f["stem/images"][()]
        names = [x.decode() if isinstance(x, bytes) else x for x in f["stem/images"].attrs["names"]]
    assert names == list(IMAGE_NAMES) == ["bright_field", "annular_dark_field", "com_x", "com_y"]
    live = np.stack([sums.bf, sums.adf, *sums.com(detectors.center)]).reshape(4, height, width)
    np.testing.assert_array_equal(live, stored)
    assert stored[2, 0, 7] == 0 and stored[3, 0, 7] == 0
    np.testing.assert_allclose(stored[2:].reshape(2, -1), _com_truth(events, DISK[0]), atol=1e-9)
    assert np.ptp(stored[2]) > 1 and np.ptp(stored[3]) > 1
