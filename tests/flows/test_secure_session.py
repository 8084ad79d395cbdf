"""A whole session with --security curve: the forged-frame attempt of issue 11 repeated, and the
CURVE secret keys reach the services in their environment only, never their command line."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest
import stempy.io
import zmq

from detstream import wire
from detstream.coordination import Coordinator
from detstream.counting import count_frame
from detstream.profile import SMALL_TEST_CAMERA
from detstream.sources import Simulator

pytestmark = pytest.mark.usefixtures("prefect_harness", "no_stray_services")

from conftest import detstream_children  # noqa: E402

W = H = 8


class Forger(threading.Thread):
    """Reads node-0's endpoint from etcd and pushes garbage sectors for the last position at it."""

    def __init__(self, coord: Coordinator, sid: str, read_token: bool = False):
        super().__init__(daemon=True)
        self.coord, self.sid, self.read_token = coord, sid, read_token
        self.done = threading.Event()
        self.sent_to: str | None = None

    def run(self) -> None:
        ctx = zmq.Context()
        try:
            while not self.done.is_set():
                node = self.coord.services(self.sid, "distributor").get("node-0")
                if node:
                    break
                self.done.wait(0.02)
            else:
                return
            s = ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.SNDTIMEO, 200)
            s.connect(node["endpoint"])
            self.sent_to = node["endpoint"]
            garbage = np.full(SMALL_TEST_CAMERA.sector_shape, 9000, np.uint16).tobytes()
            # As filed, then (an insider who can read the session's spec) with its token as well.
            tokens = [0, self.coord.get_spec(self.sid)["session_token"]] if self.read_token else [0]
            for token in tokens:
                for sector in range(SMALL_TEST_CAMERA.sectors):
                    try:
                        s.send_multipart([wire.data_header(sector, 1, 0, W, H, W - 1, H - 1, 0, token), garbage])
                    except zmq.Again:
                        pass
            self.done.wait(30)
            s.close(0)
        finally:
            ctx.term()


def test_forged_frames_are_refused_and_the_output_is_the_clean_one(tmp_path, etcd_server):
    from detstream.flows import streaming_session

    sid, prefix = "curve" + uuid.uuid4().hex[:8], f"/t{uuid.uuid4().hex[:10]}"
    coord = Coordinator(etcd_server.endpoint, prefix=prefix)
    forger = Forger(coord, sid)
    forger.start()
    environments = []

    def look(_):
        for p in detstream_children():
            try:
                environments.append((" ".join(p.cmdline()), p.environ()))
            except Exception:
                pass
    from detstream import progress
    progress.LISTENERS.append(look)
    try:
        summary = streaming_session(etcd_url=etcd_server.endpoint, etcd_prefix=prefix, session_id=sid,
                                    output_dir=str(tmp_path / "runs"), scan_width=W, scan_height=H, nodes=1,
                                    detector="testcam", seed=7, security="curve", stall_timeout_s=20.0)
    finally:
        progress.LISTENERS.remove(look)
        forger.done.set()
        forger.join(10)
    assert forger.sent_to, "the forger never found node-0's endpoint"
    assert summary["state"] == "completed" and summary["frames_counted"] == W * H
    assert summary["rejected"].get("unauthenticated", 0) >= 1 and "duplicate_sector" not in summary["rejected"]

    sim = Simulator(SMALL_TEST_CAMERA, W, H, seed=7)
    dark = sim.dark_reference()
    counts = stempy.io.load_electron_counts(summary["outputs"]["hdf5"])
    for pos in range(W * H):
        ours = counts.data[pos // W * W + pos % W][0] if counts.data.ndim == 2 else counts.data[pos][0]
        np.testing.assert_array_equal(np.sort(ours), np.sort(count_frame(sim.frame(pos), dark, None, 12.0, 2000.0)),
                                      err_msg=f"position {pos}")

    assert environments, "no service process was seen"
    for cmdline, env in environments:
        secret = env.get("DETSTREAM_CURVE_SECRET_DISTRIBUTOR")
        assert secret, f"{cmdline} has no CURVE key"
        assert secret not in cmdline


def test_without_curve_the_forgery_makes_the_position_conflicted_not_counted(tmp_path, etcd_server):
    """--security none: the issue's forgery as filed is rejected for its session token; sent again with
    the token (read from the spec), the forged copy arrives first and the real one second: the position
    is conflicted, left out of counted.h5, and the session is not completed."""
    from detstream.flows import streaming_session
    from detstream.session import SessionIncomplete

    sid, prefix = "none" + uuid.uuid4().hex[:8], f"/t{uuid.uuid4().hex[:10]}"
    forger = Forger(Coordinator(etcd_server.endpoint, prefix=prefix), sid, read_token=True)
    forger.start()
    try:
        state = streaming_session(etcd_url=etcd_server.endpoint, etcd_prefix=prefix, session_id=sid,
                                  output_dir=str(tmp_path / "runs"), scan_width=W, scan_height=H, nodes=1,
                                  detector="testcam", seed=7, security="none", stall_timeout_s=20.0,
                                  return_state=True)
    finally:
        forger.done.set()
        forger.join(10)
    assert forger.sent_to
    assert state.is_failed() and state.name == "Incomplete"
    with pytest.raises(SessionIncomplete) as info:
        state.result()
    summary = info.value.summary
    last = W * H - 1
    assert summary["state"] == "incomplete" and summary["conflicted_positions"] == [last]
    assert summary["rejected"]["wrong_session"] == SMALL_TEST_CAMERA.sectors
    assert summary["rejected"].get("conflicting_sector", 0) >= 1 and summary["frames_counted"] == last
    counts = stempy.io.load_electron_counts(summary["outputs"]["hdf5"])
    assert len(counts.data[last][0]) == 0
