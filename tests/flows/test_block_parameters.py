"""Sessions configured by saved blocks: an etcd that needs a login, a saved detector; the login
reaches every service by environment, never its command line."""

from __future__ import annotations

import uuid

import pytest
from pydantic import SecretStr

from conftest import detstream_children

pytestmark = pytest.mark.usefixtures("prefect_harness", "no_stray_services")

PASSWORD = "alice-pw-" + uuid.uuid4().hex[:8]


@pytest.fixture
def etcd_with_login():
    """A private etcd with auth on: user alice may read and write under /ds."""
    from detstream.coordination import enable_auth
    from detstream.etcd_server import EmbeddedEtcd

    with EmbeddedEtcd(unsafe_no_fsync=True) as etcd:
        enable_auth(etcd.endpoint, "root-pw", user="alice", user_password=PASSWORD, prefix="/ds")
        yield etcd


def test_a_session_on_saved_blocks_with_an_etcd_login(tmp_path, etcd_with_login):
    from detstream import progress
    from detstream.blocks import DetectorProfile, EtcdCoordinator
    from detstream.flows import streaming_session
    from detstream.flows._hooks import run_parameters

    name = f"login-{uuid.uuid4().hex[:6]}"
    EtcdCoordinator(endpoints=[etcd_with_login.endpoint], prefix="/ds", username="alice",
                    password=SecretStr(PASSWORD)).save(name)
    DetectorProfile(name="blockcam", frame_rows=144, frame_cols=144, sectors=4).save(name)
    etcd, detector = EtcdCoordinator.load(name), DetectorProfile.load(name)
    seen = []

    def listener(_):
        for p in detstream_children():
            seen.append((" ".join(p.cmdline()), p.environ().get("DETSTREAM_ETCD_PASSWORD")))
    progress.LISTENERS.append(listener)
    try:
        summary = streaming_session(etcd=etcd, detector=detector, scan_width=4, scan_height=4, nodes=1,
                                    output_dir=str(tmp_path / "runs"), stall_timeout_s=20.0)
    finally:
        progress.LISTENERS.remove(listener)
    assert summary["frames_received"] == 16
    assert {"producer", "aggregator", "distributor"} <= {w for cmd, _ in seen for w in cmd.split()}
    assert all(PASSWORD not in cmd and env == PASSWORD for cmd, env in seen), seen
    with etcd.get_coordinator() as coord:
        assert coord.get_spec(summary["session_id"])["detector_profile"]["name"] == "blockcam"
        assert coord.lock_holder("blockcam") is None

    # A hook in another process finds the saved block again, login included, from the run's record.
    recorded = streaming_session.serialize_parameters({"etcd": etcd, "detector": detector, "session_id": "x"})
    assert PASSWORD not in str(recorded)
    again = run_parameters(streaming_session, recorded)
    assert again["etcd"].password.get_secret_value() == PASSWORD and again["detector"].name == "blockcam"
