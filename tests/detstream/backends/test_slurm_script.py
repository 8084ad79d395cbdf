"""The Slurm backend's pure parts: the job script for any Slurm site, scontrol's fields, srun's task reports,
and a job Slurm no longer knows (no cluster needed)."""

from __future__ import annotations

import pytest

from detstream.backends.base import JobState, NodeLaunch, Reservation
from detstream.backends.slurm import SlurmBackend, SlurmJobSettings, SlurmSettings, _fields


def _launch(sid="t1"):
    return NodeLaunch(session_id=sid, etcd_endpoint="http://127.0.0.1:1", etcd_prefix="/x")

def test_a_job_gone_from_slurm_counts_as_ended_keeping_its_last_state():
    gone = SlurmBackend(SlurmSettings(slurm_conf="/nonexistent/slurm.conf"))
    ended = Reservation(backend="slurm", job_id="7", nodes=1, state=JobState.FAILED, scheduler_state="FAILED")
    assert gone.poll(ended) == ended  # known end: kept, Slurm not asked


def test_scontrol_fields():
    f = _fields("JobId=3 JobName=a b JobState=RUNNING Reason=None NodeList=n[1-2] ExitCode=0:0")
    assert f["JobName"] == "a b" and f["NodeList"] == "n[1-2]" and f["ExitCode"] == "0:0"


def test_the_job_script_for_any_slurm_site():
    """Same renderer as NERSC's; QOS and constraint only when given, a partition when given."""
    from detstream.backends.jobscript import render_job_script

    plain = render_job_script(SlurmJobSettings(), 2, _launch())
    assert "#SBATCH -q" not in plain and "#SBATCH -C" not in plain and "#SBATCH -p" not in plain
    assert "srun -N 2 --ntasks-per-node=1 detstream distributor --session t1" in plain
    full = render_job_script(SlurmJobSettings(qos="realtime", constraint="cpu", partition="rt", account="m1",
                                              reservation="beam", modules=["detstream/1.0"]), 4, _launch())
    for line in ("#SBATCH -q realtime", "#SBATCH -C cpu", "#SBATCH -p rt", "#SBATCH -A m1",
                 "#SBATCH --reservation=beam", "module load detstream/1.0"):
        assert line in full
    with pytest.raises(ValueError, match="partition"):
        SlurmJobSettings(partition="rt; rm -rf /")


def test_dead_tasks_are_read_from_srun_s_own_report(tmp_path):
    from detstream.backends.slurm import _failed_tasks

    out = tmp_path / "slurm-5.out"
    out.write_text("starting\nsrun: error: n3: task 2: Exited with exit code 3\nsrun: error: n4: task 3: Killed\n")
    assert _failed_tasks(str(out)) == (f"task 2 on node n3: exited with exit code 3; task 3 on node n4: killed; "
                                       f"output {out}")
    assert _failed_tasks(str(tmp_path / "missing.out")) is None
    out.write_text("all well\n")
    assert _failed_tasks(str(out)) is None
