"""Sessions on a real Slurm cluster (tests/slurm_cluster.py): through `--backend slurm` and through the
Superfacility API emulator, each distributor under srun on its own Slurm node."""

from __future__ import annotations

import sys
import uuid

import numpy as np
import pytest
import stempy.io

from detstream.backends.slurm import SlurmClient, SlurmJobSettings, SlurmSettings
from detstream.coordination import Coordinator
from detstream.session import SessionCancelled, SessionError

from conftest import cancel_on_first_progress

pytestmark = [pytest.mark.usefixtures("prefect_harness", "no_stray_services"), pytest.mark.timeout(180)]

SCAN = dict(scan_width=8, scan_height=8, nodes=4, seed=11)


def _events(path):
    counts = stempy.io.load_electron_counts(path)
    return [np.sort(np.asarray(counts.data[i][0])) for i in range(counts.data.shape[0])]


def _base(tmp_path, etcd_server, **kw):
    p = dict(etcd_url=etcd_server.endpoint, etcd_prefix=f"/t{uuid.uuid4().hex[:10]}",
             output_dir=str(tmp_path / "runs"), stall_timeout_s=20.0, session_id="sl" + uuid.uuid4().hex[:8],
             reserve_timeout_s=60.0, register_timeout_s=30.0, **SCAN)
    p.update(kw)
    return p


def _job(**kw) -> SlurmJobSettings:
    """The job on the loopback cluster: nodes run this interpreter and listen on 127.0.0.1."""
    fields = dict(command=[sys.executable, "-m", "detstream"], bind_host="127.0.0.1", advertise_host="127.0.0.1",
                  qos="realtime", constraint="cpu", walltime_minutes=10)
    fields.update(kw)
    return SlurmJobSettings(**fields)


def _slurm_params(slurm, tmp_path, etcd_server, job=None, **kw):
    from detstream.blocks import SlurmCompute

    block = SlurmCompute(cluster=SlurmSettings(slurm_conf=str(slurm.conf)), job=job or _job())
    return _base(tmp_path, etcd_server, backend="slurm", slurm_compute=block, **kw)


class Registrations:
    """The distributors registered in etcd, seen from the flow's progress callbacks (they are leased)."""

    def __init__(self, params):
        self.coord = Coordinator(params["etcd_url"], prefix=params["etcd_prefix"])
        self.sid = params["session_id"]
        self.seen: dict = {}

    def __call__(self, _progress) -> None:
        self.seen.update(self.coord.services(self.sid, "distributor"))

    def __enter__(self):
        from detstream import progress

        progress.LISTENERS.append(self)
        return self

    def __exit__(self, *exc):
        from detstream import progress

        progress.LISTENERS.remove(self)
        self.coord.close()


@pytest.fixture(scope="module")
def local_events(etcd_server, prefect_harness, tmp_path_factory):
    """The counted events of the same scan on the local backend (the reference)."""
    from detstream.flows import streaming_session

    tmp = tmp_path_factory.mktemp("local")
    summary = streaming_session(**_base(tmp, etcd_server))
    return _events(summary["outputs"]["hdf5"])


def _same_events(summary, local_events):
    ours = _events(summary["outputs"]["hdf5"])
    assert len(ours) == len(local_events) == 64
    for pos, (a, b) in enumerate(zip(ours, local_events)):
        np.testing.assert_array_equal(a, b, err_msg=f"position {pos}")


def _on_four_slurm_nodes(seen, jobid):
    assert len(seen) == 4, seen
    assert sorted(info.get("slurm_node") for info in seen.values()) == ["n1", "n2", "n3", "n4"]
    assert {info.get("slurm_job_id") for info in seen.values()} == {str(jobid)}


def test_a_four_node_session_on_slurm_counts_as_the_local_backend(slurm, tmp_path, etcd_server, local_events):
    from detstream.flows import streaming_session

    params = _slurm_params(slurm, tmp_path, etcd_server)
    with Registrations(params) as reg:
        summary = streaming_session(**params)
    assert summary["complete"] and summary["frames_received"] == 64
    _same_events(summary, local_events)
    coord = Coordinator(params["etcd_url"], prefix=params["etcd_prefix"])
    record = coord.get_job(params["session_id"])
    assert record["backend"] == "slurm" and sorted(record["node_names"]) == ["n1", "n2", "n3", "n4"]
    assert record["queue_wait_s"] is not None and record["state"] in ("COMPLETED", "CANCELLED")
    _on_four_slurm_nodes(reg.seen, record["job_id"])
    assert coord.lock_holder("4dcamera") is None


def test_a_four_node_session_through_the_sfapi_emulator_on_slurm(slurm, tmp_path, etcd_server, local_events):
    from detstream.backends.jobscript import NerscJobSettings
    from detstream.blocks import NerscCompute, SfapiCredentials
    from detstream.flows import streaming_session
    from detstream_testing.sfapi_emulator import EmulatorServer

    with EmulatorServer(workdir=tmp_path / "emu", slurm=SlurmSettings(slurm_conf=str(slurm.conf))) as emu:
        key = emu.credentials.write_key_file(tmp_path / "key.pem")
        params = _base(tmp_path, etcd_server, backend="sfapi", sfapi_credentials=SfapiCredentials(
            key_file=str(key), api_base_url=emu.api_base_url, token_url=emu.token_url),
            nersc_compute=NerscCompute(job=NerscJobSettings(**_job(qos="realtime").model_dump(
                exclude={"machine", "partition"}))))
        with Registrations(params) as reg:
            summary = streaming_session(**params)
        (job,) = [j.to_dict() for j in emu.app_state.runner.jobs()]
    assert summary["complete"]
    _same_events(summary, local_events)
    assert sorted(job["nodes"]) == ["n1", "n2", "n3", "n4"] and job["state"] in ("COMPLETED", "CANCELLED")
    assert "srun -N 4 --ntasks-per-node=1" in (tmp_path / "emu" / "jobs").joinpath(
        next(p.name for p in (tmp_path / "emu" / "jobs").iterdir()), "slurm_script").read_text()
    _on_four_slurm_nodes(reg.seen, job["jobid"])


def test_cancelling_the_flow_run_cancels_the_slurm_job(slurm, tmp_path, etcd_server, wait_until):
    from detstream.flows import streaming_session

    params = _slurm_params(slurm, tmp_path, etcd_server, scan_width=64, scan_height=64, counting=False,
                     detector="4dcamera", frame_rate=400.0)  # >= 10 s: outlasts the cancel's way to the flow
    with cancel_on_first_progress(), pytest.raises(SessionCancelled):
        streaming_session(**params)
    coord = Coordinator(params["etcd_url"], prefix=params["etcd_prefix"])
    jobid = coord.get_job(params["session_id"])["job_id"]
    assert SlurmClient(SlurmSettings(slurm_conf=str(slurm.conf))).show(jobid)["JobState"] == "CANCELLED"
    wait_until(lambda: not slurm.job_processes(), 15, what="the job's processes gone")
    assert coord.get_state(params["session_id"]) == "cancelled"
    assert coord.lock_holder("4dcamera") is None


def test_a_failing_job_ends_the_session_naming_the_job(slurm, tmp_path, etcd_server):
    from detstream.flows import streaming_session

    broken = _job(command=[sys.executable, "-m", "detstream", "--no-such-option"])
    params = _slurm_params(slurm, tmp_path, etcd_server, job=broken)
    with pytest.raises(SessionError, match=r"slurm job \d+ (ended|lost a node) \(.*exit code 2") as info:
        streaming_session(**params)
    jobid = Coordinator(params["etcd_url"], prefix=params["etcd_prefix"]).get_job(params["session_id"])["job_id"]
    assert f"job {jobid} " in str(info.value) and f"slurm-{jobid}.out" in str(info.value)


def test_one_distributor_failing_at_start_ends_the_session_naming_job_and_node(slurm, tmp_path, etcd_server):
    from detstream.flows import streaming_session

    one_broken = _job(command=["bash", "-c", 'if [ "$SLURM_PROCID" = 2 ]; then exit 3; fi; exec "$0" "$@"',
                               sys.executable, "-m", "detstream"])
    params = _slurm_params(slurm, tmp_path, etcd_server, job=one_broken)
    with pytest.raises(SessionError, match=r"slurm job \d+ lost a node .*task 2 on node n3: exited with exit code 3"):
        streaming_session(**params)


@pytest.mark.parametrize("job, said", [(dict(qos="premium-gold"), "Invalid qos specification: premium-gold"),
                                       (dict(constraint="gpu"), "Invalid feature specification")])
def test_a_scheduler_refusal_is_a_clear_error_leaving_nothing(slurm, tmp_path, etcd_server, job, said):
    from detstream.flows import streaming_session

    params = _slurm_params(slurm, tmp_path, etcd_server, job=_job(**job))
    with pytest.raises(SessionError, match=f"Slurm refused job detstream-{params['session_id']}.*{said}"):
        streaming_session(**params)
    assert slurm.jobs() == []
    coord = Coordinator(params["etcd_url"], prefix=params["etcd_prefix"])
    assert coord.lock_holder("4dcamera") is None and coord.live_services(params["session_id"]) == []


def test_a_job_that_never_starts_is_cancelled_and_the_session_falls_back(slurm, tmp_path, etcd_server):
    from detstream.flows import streaming_session

    slurm.drain("maintenance")
    try:
        params = _slurm_params(slurm, tmp_path, etcd_server, reserve_timeout_s=2.0, fallback="file-transfer")
        summary = streaming_session(**params)
    finally:
        slurm.resume()
    coord = Coordinator(params["etcd_url"], prefix=params["etcd_prefix"])
    record = coord.get_job(params["session_id"])
    assert record["state"] == "CANCELLED"
    assert SlurmClient(SlurmSettings(slurm_conf=str(slurm.conf))).show(record["job_id"])["JobState"] == "CANCELLED"
    assert summary["workflow"] == "file-transfer" and summary["frames_received"] == 64
    assert f"Slurm job {record['job_id']} did not start" in summary["fallback_reason"]


def test_the_file_transfer_count_job_on_slurm(slurm, tmp_path, etcd_server, local_events):
    from detstream.flows import file_transfer_session

    summary = file_transfer_session(**_slurm_params(slurm, tmp_path, etcd_server))
    assert summary["workflow"] == "file-transfer" and summary["job"]["backend"] == "slurm"
    assert sorted(summary["job"]["node_names"]) == ["n1", "n2", "n3", "n4"]
    _same_events(summary, local_events)


def test_detstream_run_backend_slurm_takes_the_slurm_conf(monkeypatch, tmp_path):
    """`detstream run --backend slurm --slurm-conf F`: a SlurmCompute on F whose nodes run this interpreter
    (a whole `detstream run` on Slurm is the chaos test below)."""
    from detstream.flows.cli import _slurm_block

    monkeypatch.delenv("DETSTREAM_SLURM_COMPUTE_BLOCK", raising=False)
    block = _slurm_block(tmp_path / "slurm.conf")
    assert block.settings().slurm_conf == str(tmp_path / "slurm.conf")
    assert block.job_settings().command == [sys.executable, "-m", "detstream"]


ORCHESTRATOR = """
import sys
from detstream.backends.slurm import SlurmBackend, SlurmJobSettings, SlurmSettings
from detstream.coordination import Coordinator
from detstream.profile import get_profile
from detstream.session import StreamingSession, make_spec
etcd, prefix, conf, out, sid = sys.argv[1:]
spec = make_spec(scan_width=64, scan_height=64, profile=get_profile("4dcamera"), output_dir=out, session_id=sid,
                 nodes=4, etcd_prefix=prefix, counting={"enabled": False})
job = SlurmJobSettings(command=[sys.executable, "-m", "detstream"], bind_host="127.0.0.1", advertise_host="127.0.0.1")
backend = SlurmBackend(SlurmSettings(slurm_conf=conf), job, work_dir=spec.session_dir / "logs")
session = StreamingSession(spec, Coordinator(etcd, prefix=prefix), backend, etcd)
session.open(); session.reserve(60); session.start_services(); session.stream()
"""


@pytest.mark.chaos
def test_a_killed_orchestrator_leaves_no_slurm_job(slurm, tmp_path, etcd_server, wait_until):
    """kill -9 of the orchestrator mid-scan: the distributors stop once its alive key's lease expires, so the
    job ends (the flow's hooks never ran)."""
    import subprocess

    sid, prefix = "killed" + uuid.uuid4().hex[:6], f"/t{uuid.uuid4().hex[:10]}"
    coord = Coordinator(etcd_server.endpoint, prefix=prefix)
    with open(tmp_path / "orchestrator.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", ORCHESTRATOR, etcd_server.endpoint, prefix, str(slurm.conf),
                                 str(tmp_path / "runs"), sid], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until(lambda: sum(coord.received(sid, 1).values()) >= 64, 90, what="frames flowing")
        assert slurm.jobs(), "the session's Slurm job should be running"
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGKILL)  # the orchestrator and its local services
        proc.wait()
    wait_until(lambda: not slurm.jobs() and not slurm.job_processes(), timeout_s=40,
               what="the Slurm job and its processes to end after the orchestrator died")
    from test_cli_run import _described, _session_processes

    try:
        wait_until(lambda: not _session_processes(sid), timeout_s=20, what="the orchestrator's local services to stop")
    except BaseException:
        pytest.fail(f"still running 20 s after the Slurm job ended: {_described(_session_processes(sid))}")
