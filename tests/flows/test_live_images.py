"""The microscopist's side of a whole session: live images seen through the Prefect API while the
scan streams, the final images in counted.h5 (the simulated specimen in them, and equal to the
live images at the end, centre of mass included) and as figures, and the result opened in py4DSTEM."""

from __future__ import annotations

import base64
import re
import threading
import time
import uuid
from pathlib import Path

import h5py
import matplotlib.image
import numpy as np
import pytest
import stempy.io

import detstream.analysis as dsa
from detstream.coordination import Coordinator
from detstream.etcd.encoding import _b64, _prefix_end
from detstream.live import assemble
from detstream.output.images import figure_layout
from detstream.output.virtual import IMAGE_NAMES, VirtualDetectors
from detstream.profile import get_profile
from detstream.sources import Simulator

pytestmark = pytest.mark.usefixtures("prefect_harness", "no_stray_services")


def _read_artifacts(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def _flow_run_final(flow_run_id) -> bool:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
    return state is not None and state.is_final()


def _live_chunks_at_the_end(coord: Coordinator, sid: str, nodes: int, seen_at: int) -> list[bytes]:
    """Every node's live chunks as they were just before the session deleted them: etcd keeps its
    history (no compaction here), so read the live keys at the last revision where all of them
    still existed (``seen_at`` is a revision at which they did)."""
    key = coord.session_key(sid, "live", "images") + "/"

    def at(revision: int) -> list[bytes]:
        payload = {"key": _b64(key.encode()), "range_end": _b64(_prefix_end(key.encode())), "revision": revision}
        result = coord.etcd.call("kv/range", payload, what=f"read {key} at revision {revision}")
        return [base64.b64decode(kv["value"]) for kv in result.get("kvs", [])]

    _, now = coord.etcd.range(key, prefix=True)
    lo, hi = seen_at, now  # every chunk is there at lo; none is at hi (the session ended)
    assert len(at(lo)) == nodes and not at(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(at(mid)) == nodes else (lo, mid)
    return at(lo)


def test_live_images_fill_in_during_a_64x64_session_and_the_result_opens_in_py4dstem(tmp_path, etcd_server):
    from detstream.flows import streaming_session

    sid = f"live-{uuid.uuid4().hex[:8]}"
    prefix = f"/t{uuid.uuid4().hex[:10]}"
    sim = Simulator(get_profile("4dcamera"), 64, 64, seed=0)  # what the session streams
    # The 4D Camera's 576x576 frames, sent at 200 frames/s (0.13 GB/s): the scan streams for at
    # least 20 s however fast the machine is, as a real one does, and leaves the live view's
    # low-priority drawing thread spare CPU. (At 400 frames/s the simulated specimen's rendering
    # and counting took about 1.9 of CI's 2 cores, and the nice-19 redraws, 0.2-0.3 CPU-s each,
    # managed only 2 versions on a loaded machine.) No disk is given, as
    # in `make run`: the nodes find one for the live images and the merge takes the same one.
    params = dict(scan_width=64, scan_height=64, nodes=2, session_id=sid, frame_rate=200.0,
                  etcd_url=etcd_server.endpoint, etcd_prefix=prefix,
                  output_dir=str(tmp_path / "runs"), stall_timeout_s=20.0, live_interval_s=0.25)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["summary"] = streaming_session(**params)
        except BaseException as err:  # noqa: BLE001 - reported by the test below
            outcome["error"] = err

    flow = threading.Thread(target=run, name="flow")
    flow.start()
    key = f"live-images-{sid}"
    seen: set = set()
    live_at = None  # a revision at which every node's live chunks were in etcd
    deadline = time.monotonic() + 240
    with Coordinator(etcd_server.endpoint, prefix=prefix) as coord:
        try:
            while flow.is_alive() and time.monotonic() < deadline:
                arts = _read_artifacts(key)
                # Counted only if the flow run was still going after they were read.
                if arts and not _flow_run_final(arts[0].flow_run_id):
                    seen |= {a.id for a in arts}
                if live_at is None:
                    chunks, revision = coord.etcd.range(coord.session_key(sid, "live", "images") + "/", prefix=True)
                    live_at = revision if len(chunks) == 2 else None
                flow.join(timeout=0.2)
        finally:
            flow.join(timeout=240)
        assert live_at is not None, "the nodes' live chunks were never all seen in etcd"
        live_chunks = _live_chunks_at_the_end(coord, sid, 2, live_at)
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert summary["frames_counted"] == 64 * 64
    assert len(seen) >= 3, f"only {len(seen)} versions of {key} seen while the flow ran"
    versions = _read_artifacts(key)
    assert all(a.type == "markdown" and "data:image/png;base64," in a.data for a in versions)
    assert any("4096/4096 frames counted" in a.data for a in versions)  # the last one is whole

    out = Path(summary["outputs"]["hdf5"])
    folder = out.parent
    # The final bright field equals one computed afresh from counted.h5's events.
    with h5py.File(out, "r") as f:
        images = f["stem/images"][()]
        detectors = VirtualDetectors.from_dict({k: f["stem/images"].attrs[k]
                                                for k in ("center", "bf_radius", "adf_inner", "adf_outer")})
    sa = stempy.io.load_electron_counts(out)
    labels = detectors.labels(tuple(sa.frame_shape))
    bf = np.array([np.count_nonzero(labels[sa.data[p][0]] == 1) for p in range(64 * 64)]).reshape(64, 64)
    np.testing.assert_array_equal(images[0], bf)
    assert images[0].sum() > 0 and images[1].sum() > 0

    # The specimen: every position its own frame, so thousands of distinct bright-field values
    # that follow the simulator's thickness, and a centre of mass that follows its deflection.
    truth = sim.ground_truth()
    assert len(np.unique(images[0])) >= 2048
    assert np.corrcoef(images[0].ravel(), truth.thickness.ravel())[0, 1] >= 0.9
    for com, deflection in ((images[2], truth.deflection_x), (images[3], truth.deflection_y)):
        assert np.corrcoef(com.ravel(), deflection.ravel())[0, 1] >= 0.9

    # The live images at the end of the scan are the final ones, centre of mass included: the
    # merge took the disk the nodes found for the live images (near the simulator's own).
    assert np.hypot(*np.subtract(detectors.center, sim.centre)) < 5 and abs(detectors.bf_radius - sim.disk_radius) < 5
    live = assemble(live_chunks, 64 * 64)
    assert live.counted.all()
    np.testing.assert_array_equal(np.stack([live.bf, live.adf, *live.com(detectors.center)]).reshape(4, 64, 64),
                                  images)
    assert len(IMAGE_NAMES) == len(images) == 4

    # The figures: a 64x64 scan enlarged 7x, the 576x576 pattern as it is; live.png all four images.
    for name, shapes in (("virtual_bright_field.png", [(64, 64)]), ("virtual_dark_field.png", [(64, 64)]),
                         ("summed_pattern.png", [(576, 576)]), ("live.png", [(64, 64)] * 4)):
        png = matplotlib.image.imread(folder / name)
        assert (png.shape[1], png.shape[0]) == figure_layout(shapes).size, name

    # The flow run's guide links the live and final images and carries a py4DSTEM snippet that runs.
    guides = _read_artifacts(f"analysis-{sid}")
    assert {a.flow_run_id for a in guides} == {versions[0].flow_run_id}
    guide = max(guides, key=lambda a: a.created).data
    assert f"/artifacts/key/{key}" in guide and f"/artifacts/key/bright-field-{sid}" in guide
    assert str(folder / "live.png") in guide and str(out) in guide
    snippet = re.search(r"```python\n(.*?)```", guide, re.S).group(1)
    scope: dict = {}
    exec(compile(snippet, "snippet", "exec"), scope)  # noqa: S102 - the snippet a user would paste
    assert scope["bf"].data.shape == (64, 64) and scope["adf"].data.shape == (64, 64)

    # py4DSTEM: the result opens binned 8x (unbinned, 2.7 GB), every event in it, and its virtual
    # bright field is detstream's up to the pixels binning moves across the disk's edge.
    dc = dsa.open_datacube(folder, bin=8)
    assert dc.data.shape == (64, 64, 72, 72) and int(dc.data.sum()) == summary["events"]
    vbf = dc.get_virtual_image(mode="circle", geometry=dsa.py4dstem_geometry(dc)["bright_field"], name="bf")
    assert np.corrcoef(vbf.data.ravel(), images[0].ravel())[0, 1] > 0.95
    assert abs(int(vbf.data.sum()) - int(images[0].sum())) < 0.05 * images[0].sum()
