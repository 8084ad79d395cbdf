"""A node takes a batch with numpy over the batch: every block still checked alone, repeats and
conflicting copies told apart, each frame assembled from the right rows of the right message."""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from detstream import wire
from detstream.config import CountingParams
from detstream.counting import count_frame
from detstream.profile import SMALL_TEST_CAMERA as PROF
from detstream.services.distributor import Distributor
from detstream.services.validation import MessageValidator, SectorCopies
from detstream.sources import Simulator

pytestmark = pytest.mark.unit

W, H = 4, 4
ROWS = PROF.sector_rows


@pytest.mark.parametrize("nbytes", [4, 6, 8, 12, 1000, PROF.sector_nbytes])
def test_a_batchs_fingerprints_equal_each_blocks_own(nbytes):
    blocks = np.random.default_rng(nbytes).integers(0, 256, (7, nbytes), dtype=np.uint8)
    rows = np.array([5, 0, 3])
    expect = [SectorCopies.fingerprint(b.tobytes()) for b in blocks]
    np.testing.assert_array_equal(SectorCopies.fingerprints(blocks), expect)
    np.testing.assert_array_equal(SectorCopies.fingerprints(blocks, rows), [expect[r] for r in rows])
    copies = SectorCopies(positions=16, sectors=4)
    copies.firsts(np.array([9, 2, 4]), np.array([1, 1, 3]), blocks, rows)
    assert copies.second(2, 1, blocks[0].tobytes()).reason == "duplicate_sector"
    assert copies.second(4, 3, blocks[1].tobytes()).reason == "conflicting_sector"


def _block(s: int, pos: int, fill: int) -> tuple[bytes, bytes]:
    y, x = divmod(pos, W)
    return wire.data_header(s, 1, pos, W, H, x, y, pos), np.full(PROF.sector_shape, fill, np.uint16).tobytes()


def test_block_rows_name_each_good_blocks_payload_frame_and_row():
    """One payload frame (a producer's batch) or several (an aggregator's re-sent subset); a bad
    block or a marker in between moves no later block's row."""
    v = MessageValidator(PROF, W, H)
    blocks = [_block(0, p, 10 + p) for p in range(4)]
    bad = wire.data_header(0, 1, 0, W, H, W, 0, 0)  # x outside the scan: payload present, rejected
    end = wire.end_header(0, 1, W, H, 3)
    heads = [blocks[0][0], bad, blocks[1][0], end, blocks[2][0], blocks[3][0]]
    pays = [blocks[0][1], b"\0" * PROF.sector_nbytes, blocks[1][1], blocks[2][1], blocks[3][1]]
    for frames in ([b"".join(pays)], [pays[0], b"".join(pays[1:3]), b"".join(pays[3:])]):
        rejected = []
        batch = v.check_batch([b"".join(heads), *frames], rejected.append)
        assert [r.reason for r in rejected] == ["frame_outside_scan"]
        arrays, frame_of, row_of = batch.block_rows()
        data = np.flatnonzero(batch.headers["kind"] == wire.Kind.DATA)
        got = [arrays[frame_of[i]][row_of[i]].tobytes() for i in data]
        assert got == [b[1] for b in blocks]


def test_a_node_assembles_batches_rejects_bad_blocks_alone_and_tells_repeats_from_conflicts():
    """Through a real socket: each sector one batch (sector 2's as one payload frame per block),
    with a bad block, a repeat and a differing copy inside; every frame counts as it should."""
    sim = Simulator(PROF, W, H, seed=5, pool_size=16)
    frames = [sim.frame(p) for p in range(W * H)]

    def block(s, p, data=None):
        y, x = divmod(p, W)
        data = frames[p][s * ROWS:(s + 1) * ROWS] if data is None else data
        return wire.data_header(s, 1, p, W, H, x, y, p), np.ascontiguousarray(data).tobytes()

    msgs = []
    for s in range(PROF.sectors):
        blocks = [block(s, p) for p in range(W * H)]
        if s == 0:
            blocks.insert(5, (wire.data_header(0, 1, 0, W, H, 0, H, 0), blocks[0][1]))  # y outside the scan
        if s == 1:
            blocks.insert(7, block(1, 3))                                   # the same bytes again
            blocks.insert(9, block(1, 5, frames[5][ROWS:2 * ROWS] + 1))      # a copy that differs
        heads, pays = zip(*blocks)
        msgs.append([b"".join(heads), *(pays if s == 2 else [b"".join(pays)])])
        msgs.append([wire.end_header(s, 1, W, H, W * H), b""])
    late = [block(3, 0), block(3, 6, frames[6][3 * ROWS:] + 1)]  # after assembly: by fingerprint
    msgs.append([late[0][0] + late[1][0], late[0][1] + late[1][1]])

    ctx = zmq.Context()
    got = {}

    class Part:
        def add(self, pos, events):
            got[pos] = np.array(events)

    dist = Distributor(PROF, W, H, 0, 1, CountingParams(), workers=1, part_writer=Part(), ctx=ctx,
                       counting_mode="threads", stall_timeout_s=10.0)
    push = ctx.socket(zmq.PUSH)
    try:
        push.connect(dist.endpoint)
        for m in msgs[:-1]:
            push.send_multipart(m)
        result = dist.run()
        dist._handle(msgs[-1])
        assert result.frames_received == result.frames_counted == W * H and not result.partial
        assert dist.rejects.as_dict() == {"frame_outside_scan": 1, "duplicate_sector": 2, "conflicting_sector": 2}
        assert sorted(dist.copies.conflicted) == [5, 6]
        assert dist._held == {}  # every received message let go once its frames were assembled
        for p in range(W * H):
            np.testing.assert_array_equal(got[p], count_frame(frames[p]))
    finally:
        push.close(0)
        dist.close()
        ctx.term()


@pytest.mark.parametrize("values", [[], [3], [3, 1, 3, 2, 1], list(range(9, -1, -1))])
def test_the_aggregators_distinct_values_are_np_uniques(values):
    from detstream.services.aggregator import distinct

    a = np.array(values, dtype=np.int64)
    np.testing.assert_array_equal(distinct(a), np.unique(a))
