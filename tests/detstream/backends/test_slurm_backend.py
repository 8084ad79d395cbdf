"""The Slurm backend against a real Slurm cluster (tests/slurm_cluster.py): submit, state, refusals, cancel."""

from __future__ import annotations

import pytest

from detstream.backends.base import JobState, NodeLaunch, Reservation, ReservationError
from detstream.backends.slurm import (SlurmBackend, SlurmClient, SlurmJobSettings, SlurmRefused, SlurmSettings,
                                      _fields, cancel_slurm_job)

pytestmark = pytest.mark.timeout(120)


def _backend(slurm, tmp_path, **job):
    settings = SlurmSettings(slurm_conf=str(slurm.conf), work_dir=str(tmp_path))
    return SlurmBackend(settings, SlurmJobSettings(command=["bash", "-c", "sleep 30", "node"], **job), release_timeout_s=20)


def _launch(sid="t1"):
    return NodeLaunch(session_id=sid, etcd_endpoint="http://127.0.0.1:1", etcd_prefix="/x")


def test_the_cluster_runs_one_task_per_node_on_four_nodes(slurm, tmp_path):
    (tmp_path / "j.sh").write_text("#!/bin/bash\nsrun -N 4 --ntasks-per-node=1 bash -c 'echo $SLURMD_NODENAME'\n")
    tmp_path.chmod(0o755)
    client = SlurmClient(SlurmSettings(slurm_conf=str(slurm.conf)))
    jobid = client.submit(tmp_path / "j.sh", tmp_path, "out-%j.txt", options=["-N", "4"])
    from conftest import wait_until

    wait_until(lambda: (client.show(jobid) or {}).get("JobState") == "COMPLETED", 20, what="job completed")
    assert sorted((tmp_path / f"out-{jobid}.txt").read_text().split()) == ["n1", "n2", "n3", "n4"]


def test_a_job_runs_reports_its_nodes_and_is_cancelled(slurm, tmp_path):
    backend = _backend(slurm, tmp_path, qos="realtime", constraint="cpu")
    res = backend.reserve(4, _launch())
    assert res.state is JobState.PENDING and res.backend == "slurm"
    res = backend.wait_running(res, 30)
    assert res.state is JobState.RUNNING and sorted(res.node_names) == ["n1", "n2", "n3", "n4"]
    assert res.queue_wait_s is not None and res.queue_wait_s >= 0
    res = backend.release(res)
    assert res.state is JobState.CANCELLED and res.scheduler_state.startswith("CANCELLED")
    assert backend.release(res).state is JobState.CANCELLED  # idempotent


@pytest.mark.parametrize("job, nodes, said", [
    ({"qos": "premium-gold"}, 2, "Invalid qos specification: premium-gold"),
    ({"constraint": "gpu"}, 2, "Invalid feature specification"),
    ({}, 5, "Node count specification invalid"),
])
def test_a_refusal_names_what_slurm_said_and_queues_nothing(slurm, tmp_path, job, nodes, said):
    with pytest.raises(SlurmRefused, match=said) as info:
        _backend(slurm, tmp_path, **job).reserve(nodes, _launch())
    assert "detstream-t1" in str(info.value)
    assert slurm.jobs() == []


def test_a_job_that_cannot_start_times_out_and_is_cancelled(slurm, tmp_path):
    slurm.drain("held for a test")
    try:
        backend = _backend(slurm, tmp_path)
        res = backend.reserve(2, _launch())
        with pytest.raises(ReservationError, match=rf"Slurm job {res.job_id} did not start within 1 s.*PENDING"):
            backend.wait_running(res, 1.0)
        assert SlurmClient(backend.settings).show(res.job_id)["JobState"] == "CANCELLED"
    finally:
        slurm.resume()


def test_a_job_gone_from_slurm_counts_as_ended_keeping_its_last_state():
    gone = SlurmBackend(SlurmSettings(slurm_conf="/nonexistent/slurm.conf"))
    ended = Reservation(backend="slurm", job_id="7", nodes=1, state=JobState.FAILED, scheduler_state="FAILED")
    assert gone.poll(ended) == ended  # known end: kept, Slurm not asked


def test_purged_job_reads_ended_not_completed(slurm, tmp_path):
    backend = _backend(slurm, tmp_path)
    res = Reservation(backend="slurm", job_id="987654", nodes=1, state=JobState.RUNNING, scheduler_state="RUNNING")
    polled = backend.poll(res)
    assert polled.state is JobState.ENDED and "last seen RUNNING" in polled.scheduler_state
    assert cancel_slurm_job(backend.settings, polled).state is JobState.ENDED


def test_scontrol_fields():
    f = _fields("JobId=3 JobName=a b JobState=RUNNING Reason=None NodeList=n[1-2] ExitCode=0:0")
    assert f["JobName"] == "a b" and f["NodeList"] == "n[1-2]" and f["ExitCode"] == "0:0"


def test_a_hook_cancels_the_job_from_its_etcd_record(slurm, tmp_path, coordinator):
    """What the flow's on_crashed hook does in another process: cancel from sessions/<sid>/job alone."""
    import json

    from detstream.session import release_session
    from detstream.states import SessionState

    backend = _backend(slurm, tmp_path)
    res = backend.wait_running(backend.reserve(2, _launch("crashed")), 30)
    coordinator.put_spec("crashed", {"detector": "4dcamera"})
    coordinator.put_job("crashed", json.loads(res.model_dump_json()))
    release_session(coordinator, "crashed", SessionState.FAILED, "flow run crashed",
                    backends={"slurm": lambda r: cancel_slurm_job(backend.settings, r)})
    assert SlurmClient(backend.settings).show(res.job_id)["JobState"] == "CANCELLED"
    assert coordinator.get_job("crashed")["state"] == "CANCELLED"
