"""Streaming sessions whose nodes come from the Superfacility API (a loopback emulator, real sfapi_client),
its jobs on a real Slurm cluster (tests/slurm_cluster.py)."""

from __future__ import annotations

import sys
import uuid

import pytest
import stempy.io

from detstream.coordination import Coordinator
from detstream.session import SessionCancelled, SessionError
from detstream_testing.sfapi_emulator import EmulatorServer, generate_client_credentials

from conftest import cancel_on_first_progress

pytestmark = pytest.mark.usefixtures("prefect_harness", "no_stray_services")


@pytest.fixture
def emulator(tmp_path, slurm):
    """The emulator running its jobs on the real Slurm cluster (sbatch, scontrol, scancel)."""
    from detstream.backends.slurm import SlurmSettings

    with EmulatorServer(workdir=tmp_path / "slurm", kill_grace=2.0,
                        slurm=SlurmSettings(slurm_conf=str(slurm.conf))) as emu:
        yield emu


def _sfapi(emu, tmp_path, creds=None):
    """The SFAPI blocks for the emulator: a key file, and nodes that run here on loopback."""
    from detstream.backends.jobscript import NerscJobSettings
    from detstream.blocks import NerscCompute, SfapiCredentials

    key = (creds or emu.credentials).write_key_file(tmp_path / f"key-{uuid.uuid4().hex[:6]}.pem")
    return {"sfapi_credentials": SfapiCredentials(key_file=str(key), api_base_url=emu.api_base_url,
                                                  token_url=emu.token_url),
            "nersc_compute": NerscCompute(job=NerscJobSettings(
                command=[sys.executable, "-m", "detstream"], bind_host="127.0.0.1",
                advertise_host="127.0.0.1", walltime_minutes=10))}


def _params(tmp_path, etcd_server, emu, **kw):
    p = dict(etcd_url=etcd_server.endpoint, etcd_prefix=f"/t{uuid.uuid4().hex[:10]}",
             output_dir=str(tmp_path / "runs"), stall_timeout_s=20.0, backend="sfapi",
             **_sfapi(emu, tmp_path), reserve_timeout_s=60.0, scan_width=8, scan_height=6,
             session_id="sf" + uuid.uuid4().hex[:8])
    p.update(kw)
    return p


def _jobs(emu):
    return [j.to_dict() for j in emu.app_state.runner.jobs()]


def test_a_session_on_sfapi_nodes(tmp_path, etcd_server, emulator):
    from detstream.flows import streaming_session

    params = _params(tmp_path, etcd_server, emulator)
    summary = streaming_session(**params)
    assert summary["frames_received"] == 48 and summary["complete"]
    assert stempy.io.load_electron_counts(summary["outputs"]["hdf5"]).scan_shape[0] == 6
    (job,) = _jobs(emulator)
    assert job["qos"] == "realtime" and job["constraint"] == "cpu" and job["num_nodes"] == 2
    assert job["exclusive"] and params["session_id"] in job["job_name"]
    assert job["state"] in ("COMPLETED", "CANCELLED")
    assert not emulator.app_state.runner.live_pids(job["jobid"])
    coord = Coordinator(params["etcd_url"], prefix=params["etcd_prefix"])
    record = coord.get_job(params["session_id"])
    assert record["backend"] == "sfapi" and record["job_id"] == str(job["jobid"])
    assert record["state"] == job["state"] and len(record["node_names"]) == 2
    assert summary["job"]["job_id"] == str(job["jobid"])
    assert coord.lock_holder("4dcamera") is None


def test_job_not_found_on_the_first_polls_is_retried(tmp_path, etcd_server, emulator):
    from detstream.flows import streaming_session

    emulator.app_state.hide_new_jobs_polls = 3
    summary = streaming_session(**_params(tmp_path, etcd_server, emulator))
    assert summary["frames_received"] == 48


def test_an_outage_refuses_clearly_and_submits_nothing(tmp_path, etcd_server, emulator):
    from detstream.flows import streaming_session

    emulator.app_state.set_machine_status("perlmutter", "unavailable", notes=["scheduled maintenance"])
    with pytest.raises(SessionError, match="perlmutter is unavailable.*maintenance"):
        streaming_session(**_params(tmp_path, etcd_server, emulator))
    assert emulator.app_state.count_requests("POST", "compute/jobs") == 0
    assert _jobs(emulator) == []


def test_a_job_that_never_starts_is_cancelled_and_falls_back(tmp_path, etcd_server, emulator):
    from detstream.flows import streaming_session

    emulator.app_state.never_start = True
    params = _params(tmp_path, etcd_server, emulator, reserve_timeout_s=3.0, fallback="file-transfer")
    summary = streaming_session(**params)
    (job,) = _jobs(emulator)
    assert job["state"] == "CANCELLED"
    assert summary["workflow"] == "file-transfer" and summary["frames_received"] == 48
    assert "reservation" in summary["fallback_reason"] and str(job["jobid"]) in summary["fallback_reason"]
    coord = Coordinator(params["etcd_url"], prefix=params["etcd_prefix"])
    assert coord.get_job(params["session_id"])["state"] == "CANCELLED"


def test_bad_credentials_name_the_client_id(tmp_path, etcd_server, emulator):
    from detstream.flows import streaming_session

    impostor = generate_client_credentials(client_id=emulator.client_id)  # same id, unregistered key
    params = _params(tmp_path, etcd_server, emulator, **_sfapi(emulator, tmp_path, impostor))
    with pytest.raises(SessionError) as info:
        streaming_session(**params)
    assert emulator.client_id in str(info.value) and "rejected" in str(info.value)
    assert _jobs(emulator) == []


def test_cancelling_the_flow_run_cancels_the_job(tmp_path, etcd_server, emulator):
    from detstream.flows import streaming_session

    params = _params(tmp_path, etcd_server, emulator, scan_width=64, scan_height=64, counting=False,
                     detector="4dcamera", frame_rate=400.0)  # >= 10 s: outlasts the cancel's way to the flow
    with cancel_on_first_progress(), pytest.raises(SessionCancelled):
        streaming_session(**params)
    (job,) = _jobs(emulator)
    assert job["state"] == "CANCELLED"
    assert not emulator.app_state.runner.live_pids(job["jobid"])
    coord = Coordinator(params["etcd_url"], prefix=params["etcd_prefix"])
    assert coord.get_state(params["session_id"]) == "cancelled"
    assert coord.lock_holder("4dcamera") is None
