"""detstream.live: a node's running bright and dark field from its counted events, published to a
real etcd in compact chunks, the session's disk agreed there, and live.png drawn from them."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest

from detstream.config import SessionSpec, VirtualImaging
from detstream.live import LiveImages, LiveView, assemble, decode_chunk, encode_chunk, publish
from detstream.output.images import figure_layout
from detstream.output.virtual import VirtualDetectors
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


def test_chunks_round_trip_and_malformed_ones_are_named():
    counted = np.array([1, 0, 1, 1, 0], bool)
    raw = encode_chunk(4096, counted, np.array([5, 0, 7, 9, 0]), np.array([1, 0, 2, 3, 0]))
    start, c, bf, adf = decode_chunk(raw)
    assert start == 4096 and c.tolist() == counted.tolist()
    assert bf.tolist() == [5, 0, 7, 9, 0] and adf.tolist() == [1, 0, 2, 3, 0]
    with pytest.raises(ValueError, match="shorter than its header"):
        decode_chunk(b"\x01")
    with pytest.raises(ValueError, match="format"):
        decode_chunk(b"\x07" + raw[1:])
    with pytest.raises(ValueError, match="decompress"):
        decode_chunk(raw[:9] + b"garbage")
    # assemble skips what it cannot read, and keeps the rest
    counted_all, bf_all, _ = assemble([raw[:5], encode_chunk(0, counted, np.arange(5), np.arange(5))], 10)
    assert counted_all[:5].tolist() == counted.tolist() and bf_all[2] == 2


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
    counted, bf, adf = assemble(chunks.values(), n)
    want_bf, want_adf = _truth(events, live.detectors)
    assert counted.sum() == n // 2 and counted[positions].all()
    np.testing.assert_array_equal(bf[positions], want_bf)
    np.testing.assert_array_equal(adf[positions], want_adf)
    assert sum(len(c) for c in chunks.values()) / len(events) < 8  # bytes per frame, published


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
    counted, bf, adf = assemble(live.changes().values(), 300)
    assert counted.all()
    want_bf, want_adf = _truth(events, agreed)
    np.testing.assert_array_equal(bf, want_bf)
    np.testing.assert_array_equal(adf, want_adf)


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
    counted, bf, _ = assemble(coordinator.live_chunks(sid), n)
    truth, _ = _truth([first[p] if p >= 128 or p % 2 == 0 else shifted[p] for p in range(n)],
                      nodes[0].detectors)
    np.testing.assert_array_equal(bf, truth)
    png = matplotlib.image.imread(spec.paths.live_image)
    layout = figure_layout([(20, 24), (20, 24)])
    assert (png.shape[1], png.shape[0]) == layout.size and png.tobytes() != b""


def test_a_node_without_etcd_answers_uses_its_own_disk_at_the_end():
    rng = np.random.default_rng(4)
    events = _frames(rng, 40)
    live = LiveImages(40, FRAME, VirtualImaging(find_frames=256))  # fewer frames than find_frames
    for p, ev in enumerate(events):
        live.add(p, ev)
    live.finish(own_disk=True)
    assert live.detectors == live.proposal is not None
    counted, bf, _ = assemble(live.changes().values(), 40)
    assert counted.all() and bf.sum() > 0
