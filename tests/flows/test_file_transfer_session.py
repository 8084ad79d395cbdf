"""The file-transfer workflow end to end, and the streaming session's fallback to it."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import stempy.io

from detstream.coordination import Coordinator
from detstream.session import SessionError
from detstream.profile import get_profile
from detstream.sources import Simulator

pytestmark = pytest.mark.usefixtures("prefect_harness", "no_stray_services")


def _params(tmp_path, etcd_server, **kw):
    base = dict(etcd_url=etcd_server.endpoint, etcd_prefix=f"/t{uuid.uuid4().hex[:10]}",
                output_dir=str(tmp_path / "runs"), stall_timeout_s=20.0)
    base.update(kw)
    return base


def _events(path):
    counts = stempy.io.load_electron_counts(path)
    return [np.asarray(counts.data[i][0]) for i in range(counts.data.shape[0])], counts.scan_shape


def test_streaming_and_file_transfer_give_identical_events(tmp_path, etcd_server):
    from detstream.flows import file_transfer_session, streaming_session

    streamed = streaming_session(**_params(tmp_path, etcd_server, scan_width=12, scan_height=10, seed=5))
    filed = file_transfer_session(**_params(tmp_path, etcd_server, scan_width=12, scan_height=10, seed=5,
                                            keep_raw_files=True))
    assert filed["workflow"] == "file-transfer" and streamed["workflow"] == "streaming"
    a, shape_a = _events(streamed["outputs"]["hdf5"])
    b, shape_b = _events(filed["outputs"]["hdf5"])
    assert shape_a == shape_b and len(a) == 120
    for pos, (x, y) in enumerate(zip(a, b)):
        np.testing.assert_array_equal(x, y, err_msg=f"position {pos}")
    assert filed["events"] == streamed["events"] > 0
    for stage in ("acquire_s", "transfer_s", "reserve_s", "count_s", "merge_s"):
        assert filed["timings"][stage] >= 0
    assert filed["transfer"]["files"] and all(f["attempts"] == 1 for f in filed["transfer"]["files"])


def test_stempy_reads_the_acquired_raw_files(tmp_path, etcd_server):
    from detstream.flows import file_transfer_session

    summary = file_transfer_session(**_params(tmp_path, etcd_server, scan_width=5, scan_height=3, seed=9,
                                              keep_raw_files=True))
    acquired = sorted((tmp_path / "runs" / summary["session_id"] / "acquired").glob("*.data"))
    assert len(acquired) == 4
    sim = Simulator(get_profile("4dcamera"), 5, 3, seed=9)
    seen = set()
    for block in stempy.io.reader([str(p) for p in acquired], version=stempy.io.FileVersion.VERSION5):
        data = np.asarray(block.data)
        for i, pos in enumerate(block.header.image_numbers):
            np.testing.assert_array_equal(data[i], sim.frame(pos))
            seen.add(pos)
    assert seen == set(range(15))


def test_registration_timeout_falls_back_to_file_transfer(tmp_path, etcd_server):
    from detstream.flows import streaming_session

    params = _params(tmp_path, etcd_server, scan_width=6, scan_height=4, fallback="file-transfer",
                     register_timeout_s=0.001, session_id="regto" + uuid.uuid4().hex[:6])
    summary = streaming_session(**params)
    assert summary["workflow"] == "file-transfer"
    assert summary["fell_back_from"] == params["session_id"]
    assert "registration" in summary["fallback_reason"]
    assert summary["frames_received"] == 24 and stempy.io.load_electron_counts(summary["outputs"]["hdf5"])
    coord = Coordinator(params["etcd_url"], prefix=params["etcd_prefix"])
    reasons = [e["reason"] or "" for e in coord.events(params["session_id"])]
    assert any("falling back to file-transfer" in r for r in reasons)
    assert coord.get_state(params["session_id"]) == "failed"
    assert coord.get_state(summary["session_id"]) == "completed"
    assert coord.lock_holder("4dcamera") is None


def test_without_fallback_a_registration_timeout_fails_clearly(tmp_path, etcd_server):
    from detstream.flows import streaming_session

    with pytest.raises(SessionError, match="distributors did not register"):
        streaming_session(**_params(tmp_path, etcd_server, scan_width=4, scan_height=4,
                                    register_timeout_s=0.001))


def test_an_existing_output_is_not_overwritten_without_overwrite(tmp_path, etcd_server):
    from detstream.flows import streaming_session

    params = _params(tmp_path, etcd_server, scan_width=4, scan_height=3, session_id="again" + uuid.uuid4().hex[:6])
    first = streaming_session(**params)
    h5 = first["outputs"]["hdf5"]
    before = open(h5, "rb").read()
    with pytest.raises(FileExistsError, match=r"already has output in .*overwrite"):
        streaming_session(**params)
    assert open(h5, "rb").read() == before
    again = streaming_session(**params, overwrite=True)
    assert again["frames_received"] == 12 and again["outputs"]["hdf5"] == h5
