"""The count stage of the file workflow: acquire (raw v5, evicted) -> transfer -> count on two
"nodes" with the real counting pool -> merge, checked frame by frame against stempy."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

import stempy.image as stempy_image  # noqa: E402  (a hard test requirement: never a silent skip)
import stempy.io as stempy_io  # noqa: E402

from detstream.config import CountingParams, SessionSpec  # noqa: E402
from detstream.counting import count_frame  # noqa: E402
from detstream.output import merge_parts, read_part  # noqa: E402
from detstream.profile import NCEM_4D_CAMERA  # noqa: E402
from detstream.services.distributor import DistributorResult  # noqa: E402
from detstream.services.file_counter import (  # noqa: E402
    count_files,
    default_data_dir,
    open_scan,
)
from detstream.sources import ReplayError, Simulator, write_scan  # noqa: E402
from detstream.transfer import LocalCopyTransfer, cached_pages  # noqa: E402

# The file workflow's count stage whole (acquired, evicted, transferred, counted by real pools,
# merged): e2e, not in make test-fast.
pytestmark = pytest.mark.e2e

WIDTH, HEIGHT, NODES = 6, 4, 2


@pytest.fixture(scope="module")
def sim() -> Simulator:
    return Simulator(NCEM_4D_CAMERA, WIDTH, HEIGHT, seed=5, scan_number=3, pool_size=6)


@pytest.fixture(scope="module")
def session(sim, tmp_path_factory):
    """A spec, and the scan as the transfer stage leaves it: acquired, evicted, moved."""
    root = tmp_path_factory.mktemp("file-workflow")
    dark = root / "dark.npy"
    np.save(dark, sim.dark_reference())
    t = sim.suggested_thresholds()
    spec = SessionSpec(detector_profile=NCEM_4D_CAMERA, scan_width=WIDTH, scan_height=HEIGHT,
                       scan_number=sim.scan_number, nodes=NODES, workers_per_node=1,
                       output_dir=root / "runs",
                       counting=CountingParams(background_threshold=t.background_threshold,
                                               xray_threshold=t.xray_threshold,
                                               dark_reference=dark))
    acquired = write_scan(sim, root / "acquired", fsync=True, evict=True)
    report = LocalCopyTransfer().transfer(acquired, default_data_dir(spec), remove_source=True)
    assert report.total_files == NCEM_4D_CAMERA.sectors and report.retried == []
    return spec


@pytest.fixture(scope="module")
def counted(session):
    """Both nodes' results, counted one after the other as two batch-job ranks would."""
    spec = session
    data_dir = default_data_dir(spec)
    results = [count_files(spec, data_dir, i, NODES, spec.session_dir / "parts" / f"node-{i}.h5")
               for i in range(NODES)]
    return spec, results


def test_files_are_evicted_before_counting(session):
    for f in sorted(default_data_dir(session).iterdir()):
        resident, pages = cached_pages(f)
        assert resident == 0, f"{f.name}: {resident} of {pages} pages cached before counting"


def test_each_node_counts_its_share_from_storage(counted):
    spec, results = counted
    frame_bytes = spec.profile.frame_nbytes
    for i, r in enumerate(results):
        assert isinstance(r, DistributorResult)
        mine = [p for p in range(WIDTH * HEIGHT) if p % NODES == i]
        assert (r.node_index, r.frames_expected) == (i, len(mine))
        assert r.frames_received == r.frames_counted == len(mine)
        assert r.missing == [] and r.partial == [] and r.finish_reason == "complete"
        assert r.bytes_received == len(mine) * frame_bytes
        assert r.first_recv <= r.last_recv and r.read_seconds > 0
        assert r.peak_rss_mib > 0 and len(r.worker_peak_rss_mib) == 1
        assert sorted(read_part(r.part_path).positions.tolist()) == mine
        # The reads came from storage, not the page cache: every block byte was fetched
        # (/proc/self/io says so on Linux, the only platform detstream runs on: always checked).
        assert r.storage_read_bytes is not None, "no read_bytes in /proc/self/io"
        assert r.storage_read_bytes >= r.bytes_received
    # ... and nothing is left cached for whoever reads the files next.
    for f in sorted(default_data_dir(spec).iterdir()):
        assert cached_pages(f)[0] == 0, f.name
    assert not mp.active_children()  # every counting worker stopped


def test_merged_parts_equal_stempy_frame_by_frame(counted, sim, tmp_path):
    spec, results = counted
    out = tmp_path / "counted.h5"
    merge = merge_parts([r.part_path for r in results], out, WIDTH, HEIGHT,
                        spec.profile.frame_shape)
    assert merge.missing == [] and merge.positions_written == WIDTH * HEIGHT
    assert merge.total_events == sum(r.events for r in results)
    sa = stempy_io.load_electron_counts(out)
    assert tuple(sa.scan_shape) == (HEIGHT, WIDTH)
    dark = sim.dark_reference()
    t = sim.suggested_thresholds()
    total = 0
    for p in range(WIDTH * HEIGHT):
        frame = sim.frame(p)
        want = count_frame(frame, dark, None, t.background_threshold, t.xray_threshold)
        ref = stempy_image.electron_count_frame(
            frame, darkreference=dark, background_threshold=t.background_threshold,
            xray_threshold=t.xray_threshold).data[0, 0]
        np.testing.assert_array_equal(want, np.asarray(ref))
        np.testing.assert_array_equal(sa.data[p][0], want, err_msg=f"position {p}")
        total += len(want)
    assert total > WIDTH * HEIGHT  # the frames do hold electrons


def test_the_report_feeds_collect_unchanged(counted):
    """Reports named as a distributor's let results.collect merge the file workflow's parts."""
    from detstream.results import collect

    spec, results = counted
    services = spec.session_dir / "services"
    services.mkdir(parents=True, exist_ok=True)
    for r in results:
        (services / f"distributor-node-{r.node_index}.json").write_text(
            json.dumps(r.as_dict(), default=str))
    summary = collect(spec, "file", timings={}, overwrite=True)
    assert summary["frames_received"] == WIDTH * HEIGHT and summary["frames_missing"] == 0
    assert summary["events"] == sum(r.events for r in results)
    assert summary["bytes_moved"] == WIDTH * HEIGHT * spec.profile.frame_nbytes
    assert Path(summary["outputs"]["hdf5"]).is_file()


def test_a_stop_request_ends_reading_and_lists_what_was_not_read(session, tmp_path):
    spec = session
    asked = []

    def stop():
        asked.append(1)
        return "session cancelled"

    r = count_files(spec, default_data_dir(spec), 1, NODES, tmp_path / "part.h5",
                    should_stop=stop, progress_interval_s=0)
    assert r.finish_reason == "session cancelled" and asked == [1]
    assert 1 <= r.frames_received < r.frames_expected
    assert r.frames_counted == r.frames_received  # what was read was still counted
    read = [p for p in range(WIDTH * HEIGHT) if p % NODES == 1][:r.frames_received]
    assert sorted(read_part(r.part_path).positions.tolist()) == read
    assert r.missing == [p for p in range(WIDTH * HEIGHT) if p % NODES == 1][r.frames_received:]
    assert not mp.active_children()


def test_counting_disabled_reads_and_assembles_only(session, tmp_path):
    spec = session.model_copy(update={"counting": CountingParams(enabled=False)})
    r = count_files(spec, default_data_dir(spec), 0, 3, tmp_path / "part.h5")
    assert r.frames_received == r.frames_expected == len(range(0, WIDTH * HEIGHT, 3))
    assert r.frames_counted == 0 and r.part_path is None
    assert not (tmp_path / "part.h5").exists()


def test_refusals_name_what_was_wrong(session, tmp_path):
    spec = session
    data_dir = default_data_dir(spec)
    wrong = spec.model_copy(update={"scan_width": WIDTH + 1})
    with pytest.raises(ReplayError, match=rf"{WIDTH}x{HEIGHT} scan.*expects {WIDTH + 1}x{HEIGHT}"):
        count_files(wrong, data_dir, 0, NODES, tmp_path / "p.h5")
    with pytest.raises(ValueError, match="node index 2 outside 0..1"):
        count_files(spec, data_dir, 2, NODES, tmp_path / "p.h5")
    with pytest.raises(ReplayError, match=str(tmp_path / "nowhere")):
        open_scan(spec, tmp_path / "nowhere")
    existing = tmp_path / "exists.h5"
    existing.write_bytes(b"")
    with pytest.raises(FileExistsError, match=str(existing)):
        count_files(spec, data_dir, 0, NODES, existing)
    assert not mp.active_children()


def test_serve_file_counter_registers_reports_and_feeds_collect(session, etcd_server, etcd_prefix,
                                                                tmp_path):
    """Through etcd, as a node runs it: spec read, leased registration as 'file-counter',
    received counts published, report written under the distributor's name."""
    from detstream.coordination import Coordinator
    from detstream.results import collect
    from detstream.services.file_counter import ROLE, serve_file_counter

    class Watching(Coordinator):
        """The real Coordinator, noting which file counters are registered at each count update."""

        registered: list = []

        def set_received(self, sid, scan, node, n, lease=None):
            self.registered.append((node, n, sorted(self.services(sid, ROLE))))
            super().set_received(sid, scan, node, n, lease)

    spec = session.model_copy(update={"output_dir": tmp_path / "runs", "session_id": "filesrv"})
    with Watching(etcd_server.endpoint, prefix=etcd_prefix) as coord:
        coord.put_spec(spec.session_id, spec)
        reports = [serve_file_counter(coord, spec.session_id, i, data_dir=default_data_dir(session))
                   for i in range(NODES)]
        per_node = len(range(0, WIDTH * HEIGHT, NODES))
        assert coord.received(spec.session_id, spec.scan_number) == {
            f"node-{i}": per_node for i in range(NODES)}
        # Registered (leased) while working, gone once done.
        assert {node for node, _, _ in coord.registered} == {f"node-{i}" for i in range(NODES)}
        for node, _, names in coord.registered:
            assert node in names
        assert coord.services(spec.session_id, ROLE) == {}

    for i in range(len(reports)):
        path = spec.session_dir / "services" / f"distributor-node-{i}.json"
        on_disk = json.loads(path.read_text())
        assert on_disk["node_index"] == i and on_disk["workflow"] == "file"
        assert on_disk["frames_counted"] == per_node and on_disk["finish_reason"] == "complete"
        assert on_disk["part_path"] == str(spec.session_dir / "parts" / f"node-{i}.h5")
    summary = collect(spec, "file", timings={})
    assert summary["frames_received"] == WIDTH * HEIGHT and summary["frames_missing"] == 0
    assert summary["events"] == sum(r["events"] for r in reports)
    assert not mp.active_children()
