"""Frame sources: the simulator's model and determinism, raw v5 round trips through stempy, and replay validation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from detstream.profile import NCEM_4D_CAMERA, SMALL_TEST_CAMERA
from detstream.sources import (
    FrameSource,
    ReplayError,
    ReplaySource,
    SectorFileWriter,
    SectorMeta,
    Simulator,
    file_name,
    record_size,
    write_scan,
)
from detstream.sources.rawv5 import RAW_HEADER


def assembled(source, sector_blocks: list[list[np.ndarray]], position: int) -> np.ndarray:
    """Stack sector blocks of one position back into a frame."""
    p = source.profile
    frame = np.empty(p.frame_shape, dtype=np.uint16)
    for s in range(p.sectors):
        frame[p.sector_slice(s)] = sector_blocks[s][position]
    return frame


def collect(source) -> tuple[list[list[SectorMeta]], list[list[np.ndarray]]]:
    metas, blocks = [], []
    for s in range(source.profile.sectors):
        m, b = zip(*source.iter_sector(s))
        metas.append(list(m))
        blocks.append([np.array(x) for x in b])
    return metas, blocks


@pytest.fixture(scope="module")
def small_sim() -> Simulator:
    return Simulator(SMALL_TEST_CAMERA, 5, 4, seed=3, scan_number=42, pool_size=16)


@pytest.fixture(scope="module")
def cam_sim() -> Simulator:
    # stempy's v5 reader assumes 576x576 frames in four 144-row sectors: use the real geometry.
    return Simulator(NCEM_4D_CAMERA, 4, 3, seed=11, scan_number=7, pool_size=4)


@pytest.fixture(scope="module")
def cam_files(cam_sim, tmp_path_factory) -> list[Path]:
    return write_scan(cam_sim, tmp_path_factory.mktemp("v5"), evict=True)


# -- simulator ---------------------------------------------------------------------------------


def test_simulator_is_a_frame_source(small_sim):
    assert isinstance(small_sim, FrameSource)
    assert small_sim.frames == 20
    assert (small_sim.scan_width, small_sim.scan_height, small_sim.scan_number) == (5, 4, 42)


def test_same_seed_same_frames_other_seed_other_frames(small_sim):
    again = Simulator(SMALL_TEST_CAMERA, 5, 4, seed=3, scan_number=42, pool_size=16)
    other = Simulator(SMALL_TEST_CAMERA, 5, 4, seed=4, scan_number=42, pool_size=16)
    for p in range(small_sim.frames):
        np.testing.assert_array_equal(small_sim.frame(p), again.frame(p))
    assert any(not np.array_equal(small_sim.frame(p), other.frame(p)) for p in range(other.frames))
    assert not np.array_equal(small_sim.dark_reference(), other.dark_reference())


def test_frame_equals_reassembled_sectors_and_headers_follow_positions(small_sim):
    metas, blocks = collect(small_sim)
    w = small_sim.scan_width
    for s in range(small_sim.profile.sectors):
        assert len(metas[s]) == small_sim.frames
        for p, m in enumerate(metas[s]):
            assert m == SectorMeta(42, p + 1, w, small_sim.scan_height, p % w, p // w)
            assert m.position == p
    for p in range(small_sim.frames):
        np.testing.assert_array_equal(assembled(small_sim, blocks, p), small_sim.frame(p))


def test_sector_blocks_are_read_only_and_sector_shaped(small_sim):
    _, block = next(small_sim.iter_sector(1))
    assert block.shape == SMALL_TEST_CAMERA.sector_shape
    assert block.flags.c_contiguous and not block.flags.writeable
    with pytest.raises(ValueError):
        small_sim.iter_sector(SMALL_TEST_CAMERA.sectors)


def test_every_position_has_its_own_frame_that_follows_the_specimen():
    """No two positions share a frame; the electrons in the disk follow the thickness, and their
    centre of mass follows the deflection (the simulator's ground truth, before any counting)."""
    sim = Simulator(NCEM_4D_CAMERA, 24, 20, seed=5)
    truth = sim.ground_truth()
    assert truth.thickness.shape == truth.deflection_x.shape == truth.deflection_y.shape == (20, 24)
    assert 0 <= truth.thickness.min() and truth.thickness.max() <= 1 and np.ptp(truth.thickness) > 0.5
    frames = {}
    disk, com = np.zeros(sim.frames), np.zeros((2, sim.frames))
    rr, cc = np.divmod(np.arange(576 * 576), 576)
    inside = (rr - sim.centre[0]) ** 2 + (cc - sim.centre[1]) ** 2 <= (1.2 * sim.disk_radius) ** 2
    for p in range(sim.frames):
        frames.setdefault(sim.frame(p).tobytes(), p)
        hits = sim.true_events(p).astype(np.int64)
        near = hits[inside[hits]]
        disk[p] = len(near)
        com[:, p] = cc[near].mean() - sim.centre[1], rr[near].mean() - sim.centre[0]
    assert len(frames) == sim.frames  # every position its own frame
    assert np.corrcoef(disk, truth.thickness.ravel())[0, 1] > 0.95
    assert np.corrcoef(com[0], truth.deflection_x.ravel())[0, 1] > 0.95
    assert np.corrcoef(com[1], truth.deflection_y.ravel())[0, 1] > 0.95
    assert np.std(truth.deflection_x) > 4 and np.std(truth.deflection_y) > 4  # detector pixels


def test_frames_are_the_same_however_they_are_rendered_and_held():
    """A frame depends on (seed, position) only: any chunk size, any sector order, one frame
    alone; blocks a consumer keeps (as a zero-copy send does) are never overwritten by the buffers
    the simulator reuses."""
    sim = Simulator(SMALL_TEST_CAMERA, 9, 7, seed=3, pool_size=4)
    held = [list(sim.iter_sector(s, chunk=4)) for s in range(4)]  # views kept, not copies
    for s in range(4):
        for (m, b), (m2, b2) in zip(held[s], sim.iter_sector(s, chunk=11), strict=True):
            assert m == m2
            np.testing.assert_array_equal(b, b2)
    for p in (0, 17, sim.frames - 1):
        np.testing.assert_array_equal(assembled(sim, [[b for _, b in h] for h in held], p), sim.frame(p))
        np.testing.assert_array_equal(sim.frame(p), Simulator(SMALL_TEST_CAMERA, 9, 7, seed=3, pool_size=4).frame(p))
    # Blocks dropped as soon as they are read free their buffer for the next chunk: still right.
    for (_, b), h in zip(sim.iter_sector(2, chunk=4), held[2]):
        np.testing.assert_array_equal(b, h[1])


def test_dark_level_and_xray_hits(small_sim):
    dark = small_sim.dark_reference()
    assert dark.dtype == np.float32 and dark.shape == SMALL_TEST_CAMERA.frame_shape
    assert 18 < dark.mean() < 22 and np.array_equal(dark, np.rint(dark))
    frames = np.stack([small_sim.frame(p) for p in range(small_sim.frames)])
    assert 18 < np.median(frames) < 22  # most pixels are dark noise
    background, xray = small_sim.suggested_thresholds()
    assert xray == 2000.0 and 8 <= background <= 16
    assert (frames >= xray).sum() > 0  # a few X-rays across the scan
    electrons = (frames.astype(np.float64) - dark > 60).sum()
    assert electrons > (frames >= xray).sum()


# -- raw v5 files and stempy -------------------------------------------------------------------


def test_write_scan_names_and_sizes(cam_sim, cam_files):
    assert [f.name for f in cam_files] == [file_name(7, s) for s in range(4)]
    assert cam_files[2].name == "data_scan0000000007_module2.data"
    for f in cam_files:
        assert f.stat().st_size == cam_sim.frames * (16 + 144 * 576 * 2)
        raw = f.read_bytes()
        assert RAW_HEADER.unpack_from(raw, 0) == (7, 1, 4, 3, 0, 0)
        assert RAW_HEADER.unpack_from(raw, 5 * record_size(NCEM_4D_CAMERA)) == (7, 6, 4, 3, 1, 1)


def test_stempy_reads_written_scan(cam_sim, cam_files):
    import stempy.io as stempy_io

    reader = stempy_io.reader([str(f) for f in cam_files], version=stempy_io.FileVersion.VERSION5)
    seen = []
    for block in reader:
        assert tuple(block.header.scan_dimensions) == (cam_sim.scan_width, cam_sim.scan_height)
        for i, position in enumerate(block.header.image_numbers):
            np.testing.assert_array_equal(block.data[i], cam_sim.frame(position))
            seen.append(position)
    assert sorted(seen) == list(range(cam_sim.frames))


def test_replay_yields_the_simulator_blocks(cam_sim, cam_files):
    replay = ReplaySource(NCEM_4D_CAMERA, cam_files[0].parent)
    assert isinstance(replay, FrameSource)
    assert (replay.scan_number, replay.scan_width, replay.scan_height, replay.frames) == (7, 4, 3, 12)
    assert replay.files == cam_files
    for s in range(4):
        for (rm, rb), (sm, sb) in zip(replay.iter_sector(s), cam_sim.iter_sector(s), strict=True):
            assert rm == sm
            np.testing.assert_array_equal(rb, sb)
    for p in (0, 5, 11):
        np.testing.assert_array_equal(replay.frame(p), cam_sim.frame(p))


def test_sector_file_writer_incremental_equals_write_scan(small_sim, tmp_path):
    paths = write_scan(small_sim, tmp_path / "all", fsync=False)
    inc = tmp_path / "inc"
    inc.mkdir()
    with SectorFileWriter(small_sim.profile, inc, small_sim.scan_number, 1) as w:
        for meta, block in small_sim.iter_sector(1):
            w.write(meta, memoryview(block))  # any buffer of the right size
    assert w.records == small_sim.frames
    assert w.path.read_bytes() == paths[1].read_bytes()
    with pytest.raises(FileExistsError):
        SectorFileWriter(small_sim.profile, inc, small_sim.scan_number, 1)
    with SectorFileWriter(small_sim.profile, inc, 9, 0) as w, pytest.raises(ValueError, match="shape"):
        w.write(small_sim.meta(0), np.zeros((3, 3), np.uint16))


# -- replay validation -------------------------------------------------------------------------


@pytest.fixture
def scan_dir(small_sim, tmp_path) -> Path:
    d = tmp_path / "scan"
    write_scan(small_sim, d, fsync=False)
    return d


def module(d: Path, sector: int, scan: int = 42) -> Path:
    return d / file_name(scan, sector)


def test_replay_small_profile_round_trip(small_sim, scan_dir):
    replay = ReplaySource(SMALL_TEST_CAMERA, scan_dir)
    _, replayed = collect(replay)
    _, simulated = collect(small_sim)
    for s in range(4):
        for a, b in zip(replayed[s], simulated[s], strict=True):
            np.testing.assert_array_equal(a, b)


def test_replay_missing_or_empty_directory(tmp_path):
    with pytest.raises(ReplayError, match=str(tmp_path)):
        ReplaySource(SMALL_TEST_CAMERA, tmp_path)
    (tmp_path / "notes.txt").write_text("not a recording")
    with pytest.raises(ReplayError, match="no raw v5 files"):
        ReplaySource(SMALL_TEST_CAMERA, tmp_path)
    with pytest.raises(ReplayError, match="does not exist"):
        ReplaySource(SMALL_TEST_CAMERA, tmp_path / "nowhere")


def test_replay_missing_module(scan_dir):
    module(scan_dir, 2).unlink()
    with pytest.raises(ReplayError, match=r"missing module.*data_scan0000000042_module2\.data"):
        ReplaySource(SMALL_TEST_CAMERA, scan_dir)


def test_replay_truncated_record(scan_dir):
    path = module(scan_dir, 1)
    rec = record_size(SMALL_TEST_CAMERA)
    os.truncate(path, 20 * rec - 100)
    with pytest.raises(ReplayError) as err:
        ReplaySource(SMALL_TEST_CAMERA, scan_dir)
    assert str(path) in str(err.value)
    assert f"byte offset {19 * rec}" in str(err.value)


@pytest.mark.parametrize("kind", ["directory", "dangling symlink", "fifo"])
def test_replay_unreadable_file(scan_dir, kind):
    # Tests run as root, so chmod 000 would not stop open(); use entries open() cannot read.
    path = module(scan_dir, 3)
    path.unlink()
    if kind == "directory":
        path.mkdir()
    elif kind == "dangling symlink":
        path.symlink_to(scan_dir / "gone.data")
    else:
        os.mkfifo(path)  # opening it would block: must be refused without opening
    with pytest.raises(ReplayError, match=r"module3\.data: cannot be read"):
        ReplaySource(SMALL_TEST_CAMERA, scan_dir)


def _patch_header(path: Path, record: int, **fields) -> None:
    rec = record_size(SMALL_TEST_CAMERA)
    with open(path, "r+b") as f:
        f.seek(record * rec)
        meta = SectorMeta.unpack(f.read(16))._replace(**fields)
        f.seek(record * rec)
        f.write(meta.pack())


def test_replay_scan_size_disagrees_within_a_file(scan_dir):
    _patch_header(module(scan_dir, 1), 7, scan_width=6)
    with pytest.raises(ReplayError, match=r"module1\.data: scan size disagrees at record 7"):
        ReplaySource(SMALL_TEST_CAMERA, scan_dir)


def test_replay_scan_size_disagrees_between_files(scan_dir, tmp_path):
    # Same number of records, other shape: only the headers can tell.
    other = Simulator(SMALL_TEST_CAMERA, 4, 5, seed=3, scan_number=42, pool_size=1)
    paths = write_scan(other, tmp_path / "other", fsync=False)
    os.replace(paths[2], module(scan_dir, 2))
    with pytest.raises(ReplayError, match=r"module2\.data: scan size disagrees at record 0"):
        ReplaySource(SMALL_TEST_CAMERA, scan_dir)


def test_replay_duplicate_and_out_of_range_positions(scan_dir):
    _patch_header(module(scan_dir, 0), 1, x=0)
    with pytest.raises(ReplayError, match=r"module0\.data: scan position 0 .* more than once"):
        ReplaySource(SMALL_TEST_CAMERA, scan_dir)
    _patch_header(module(scan_dir, 0), 1, x=9)
    with pytest.raises(ReplayError, match=r"module0\.data: x=9 .* outside"):
        ReplaySource(SMALL_TEST_CAMERA, scan_dir)


def test_replay_several_scans_needs_a_choice(small_sim, scan_dir):
    other = Simulator(SMALL_TEST_CAMERA, 2, 2, scan_number=43, pool_size=1)
    write_scan(other, scan_dir, fsync=False)
    with pytest.raises(ReplayError, match="several scans"):
        ReplaySource(SMALL_TEST_CAMERA, scan_dir)
    assert ReplaySource(SMALL_TEST_CAMERA, scan_dir, scan_number=43).frames == 4
    assert ReplaySource(SMALL_TEST_CAMERA, scan_dir, scan_number=42).frames == small_sim.frames


def test_source_for_spec(scan_dir):
    # Duck-typed spec: source_for_spec reads only these SessionSpec attributes.
    from types import SimpleNamespace

    from detstream.sources import source_for_spec

    def spec(**kw):
        base = dict(source="simulated", profile=SMALL_TEST_CAMERA, scan_width=3, scan_height=2,
                    seed=5, scan_number=1, replay_dir=None)
        return SimpleNamespace(**{**base, **kw})

    sim = source_for_spec(spec())
    assert isinstance(sim, Simulator) and (sim.scan_width, sim.scan_height, sim.seed) == (3, 2, 5)
    replay = source_for_spec(spec(source="replay", replay_dir=scan_dir, scan_width=5, scan_height=4))
    assert isinstance(replay, ReplaySource) and replay.frames == 20
    with pytest.raises(ReplayError, match="5x4 scan, but the session expects 4x4"):
        source_for_spec(spec(source="replay", replay_dir=scan_dir, scan_width=4, scan_height=4))


def test_the_suggested_thresholds_still_suit_the_frames():
    """Counted with the simulator's own thresholds, nearly every event lies on or next to a true
    electron hit (noise makes none), and most hits are found even where the disk is densest."""
    from detstream.counting import Counter

    sim = Simulator(NCEM_4D_CAMERA, 16, 16, seed=2)
    counter = Counter(NCEM_4D_CAMERA.frame_shape, sim.dark_reference(), None, *sim.suggested_thresholds())
    thickest = int(np.argmax(sim.ground_truth().thickness))
    for p in (0, 77, thickest):
        found = counter.count(sim.frame(p)).astype(np.int64)
        hits = np.zeros(576 * 576, bool)
        hits[sim.true_events(p)] = True
        near = np.zeros((578, 578), bool)  # a hit's pixel and its 8 neighbours
        h = hits.reshape(576, 576)
        for dr in range(3):
            for dc in range(3):
                near[dr:dr + 576, dc:dc + 576] |= h
        on_hits = near[1:-1, 1:-1].ravel()[found].mean()
        assert on_hits > 0.995, (p, on_hits)
        assert 0.7 < len(found) / hits.sum() <= 1.0, (p, len(found), hits.sum())
