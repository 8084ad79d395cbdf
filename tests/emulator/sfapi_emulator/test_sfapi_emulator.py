"""The SFAPI emulator driven by the real sfapi_client: auth, status, jobs, srun, cancel and faults."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap

import httpx
import psutil
import pytest
from authlib.integrations.base_client.errors import OAuthError
from joserfc.jwk import RSAKey
from sfapi_client import Client, SfApiError
from sfapi_client.compute import Machine
from sfapi_client.jobs import JobState

from detstream_testing.sfapi_emulator import generate_client_credentials
from detstream_testing.sfapi_emulator.jobs import format_duration
from detstream_testing.sfapi_emulator.sbatch import parse_sbatch_options, parse_time_limit
from detstream_testing.sfapi_emulator.srun import expand_nodelist, parse_args, plan_tasks
from conftest import wait_until

pytestmark = pytest.mark.timeout(120)


def wait_for(predicate, timeout=20.0, interval=0.05, what="condition"):
    """conftest's wait_until with this module's argument names."""
    return wait_until(predicate, timeout_s=timeout, interval_s=interval, what=what)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def script(body: str, *directives: str) -> str:
    """A Perlmutter-valid batch script with extra #SBATCH directives."""
    head = ["#!/bin/bash", "#SBATCH -C cpu", "#SBATCH -q realtime", "#SBATCH -A m0001", *directives]
    return "\n".join(head) + "\n" + textwrap.dedent(body).lstrip("\n")


@pytest.fixture
def client(emu):
    with Client(emu.client_id, emu.credentials.private_key_pem, api_base_url=emu.api_base_url,
                token_url=emu.token_url, wait_interval=1) as c:
        yield c


def update_until(job, states, timeout=30.0):
    """job.update() until its state is one of ``states``."""
    def check():
        job.update()
        return job.state in states
    wait_for(check, timeout, interval=0.1, what=f"job {job.jobid} in {states} (is {job.state})")
    return job.state


# -- authentication ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["pem", "jwk"])
def test_client_authenticates_with_pem_or_jwk_secret(emu, fmt):
    secret = emu.credentials.private_key_pem
    if fmt == "jwk":
        secret = RSAKey.import_key(secret).as_dict(private=True)
    with Client(emu.client_id, secret, api_base_url=emu.api_base_url, token_url=emu.token_url) as c:
        assert c.compute(Machine.perlmutter).status.value == "active"
    assert emu.app_state.tokens_issued == 1


def test_client_reads_sfapi_key_file(emu, tmp_path):
    key_file = emu.credentials.write_key_file(tmp_path / "emu-key.pem")
    assert key_file.stat().st_mode & 0o777 == 0o600
    with Client(key=key_file, api_base_url=emu.api_base_url, token_url=emu.token_url) as c:
        assert c.compute(Machine.perlmutter).name == "perlmutter"


def test_wrong_key_and_unknown_client_are_refused(emu):
    other = generate_client_credentials()
    with Client(emu.client_id, other.private_key_pem, api_base_url=emu.api_base_url,
                token_url=emu.token_url) as c:
        with pytest.raises(OAuthError) as err:
            c.compute(Machine.perlmutter)
    assert err.value.error == "invalid_client"
    with Client(other.client_id, other.private_key_pem, api_base_url=emu.api_base_url,
                token_url=emu.token_url) as c:
        with pytest.raises(OAuthError) as err:
            c.compute(Machine.perlmutter)
    assert err.value.error == "invalid_client"
    assert emu.app_state.tokens_issued == 0 and emu.app_state.token_failures == 2


def test_api_requires_a_valid_bearer_token(emu):
    r = httpx.get(f"{emu.api_base_url}/compute/jobs/perlmutter")
    assert r.status_code == 401
    r = httpx.get(f"{emu.api_base_url}/compute/jobs/perlmutter", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401


def test_short_token_lifetime_makes_client_fetch_new_tokens(emu, client):
    # authlib refreshes 60 s before expiry, so a 30 s token is renewed before every request
    # (sfapi_client 0.6.0 checks twice per request, so it even fetches two).
    emu.app_state.token_lifetime = 30
    client.compute(Machine.perlmutter)
    before = emu.app_state.tokens_issued
    for _ in range(3):
        client.compute(Machine.perlmutter)
    assert emu.app_state.tokens_issued >= before + 3


def test_token_expiry_triggers_refresh(emu, client):
    # A 61 s token counts as expired (leeway 60 s) about a second after it is issued.
    emu.app_state.token_lifetime = 61
    client.compute(Machine.perlmutter)
    assert emu.app_state.tokens_issued == 1

    def refreshed():
        client.compute(Machine.perlmutter)
        return emu.app_state.tokens_issued >= 2
    wait_for(refreshed, timeout=10, interval=0.2, what="a second token")


def test_server_side_revocation_is_not_recovered_by_client(emu, client):
    client.compute(Machine.perlmutter)
    emu.app_state.revoke_tokens()
    # sfapi_client only renews on its own clock: a 401 is raised, not retried.
    with pytest.raises(httpx.HTTPStatusError) as err:
        client.compute(Machine.perlmutter).jobs(user=emu.app_state.user)
    assert err.value.response.status_code == 401
    assert emu.app_state.tokens_issued == 1


def test_no_secrets_in_logs(emu, caplog):
    caplog.set_level(logging.DEBUG)
    with Client(emu.client_id, emu.credentials.private_key_pem, api_base_url=emu.api_base_url,
                token_url=emu.token_url) as c:
        c.compute(Machine.perlmutter)
        token = c.token
    assert token not in caplog.text
    assert "PRIVATE KEY" not in caplog.text
    assert "PRIVATE KEY" not in repr(emu.credentials)


# -- status and outages --------------------------------------------------------------------------

def test_status_and_outage_visible(emu, client):
    pm = client.compute(Machine.perlmutter)
    assert pm.status.value == "active"
    assert client.resources.status("perlmutter").status.value == "active"
    assert "perlmutter" in client.resources.status()

    emu.app_state.set_machine_status("perlmutter", "unavailable", notes=["scheduled maintenance"])
    pm = client.compute(Machine.perlmutter)
    assert pm.status.value == "unavailable" and pm.notes == ["scheduled maintenance"]
    assert pm.outages()[0].status.value == "Active"
    # sfapi_client's check_auth looks for .status on the Client, not the Compute, so it does not
    # refuse; the submission task fails instead, and job queries read as "Job not found".
    with pytest.raises(SfApiError, match="Unable to contact slurm controller"):
        pm.submit_job(script("true\n"))

    emu.app_state.set_machine_status("perlmutter", "degraded", notes=["slow scratch"])
    pm = client.compute(Machine.perlmutter)
    assert pm.status.value == "degraded"
    job = pm.submit_job(script("true\n"))
    assert update_until(job, [JobState.COMPLETED]) == JobState.COMPLETED


def test_job_queries_during_outage_read_as_not_found(emu, client):
    pm = client.compute(Machine.perlmutter)
    job = pm.submit_job(script("sleep 600\n"))
    update_until(job, [JobState.RUNNING])
    emu.app_state.set_machine_status("perlmutter", "unavailable", notes=["down"])
    # The API answers {"status": "ERROR", "output": []}; sfapi_client 0.6.0 ignores the ERROR
    # status, so an outage looks like a missing job / an empty queue to the caller.
    with pytest.raises(SfApiError, match="Job not found"):
        job.update()
    assert pm.jobs(user=emu.app_state.user) == []
    emu.app_state.set_machine_status("perlmutter", "active")
    job.update()
    assert job.state == JobState.RUNNING


# -- HTTP faults ---------------------------------------------------------------------------------

@pytest.mark.e2e  # a whole multi-process pipeline: not in make test-fast
def test_429_and_503_are_retried_by_sfapi_client(emu, client):
    client.compute(Machine.perlmutter)
    emu.app_state.inject_http_errors(429, count=1, retry_after=1)
    emu.app_state.inject_http_errors(503, count=1)
    pm = client.compute(Machine.perlmutter)  # tenacity: waits 1 s, then 2 s, then succeeds
    assert pm.status.value == "active"
    statuses = [s for _, _, p, s in emu.app_state.request_log if p.endswith("/status/perlmutter")]
    assert statuses[-3:] == [429, 503, 200]


def test_500_is_not_retried(emu, client):
    client.compute(Machine.perlmutter)
    emu.app_state.inject_http_errors(500, count=1)
    with pytest.raises(httpx.HTTPStatusError) as err:
        client.compute(Machine.perlmutter)
    assert err.value.response.status_code == 500


def test_503_on_token_endpoint_is_retried(emu, client):
    emu.app_state.inject_http_errors(503, count=1, scope="token")
    assert client.compute(Machine.perlmutter).status.value == "active"
    assert emu.app_state.count_requests("POST", "/c2id/token") == 2
    assert emu.app_state.tokens_issued == 1


# -- jobs ----------------------------------------------------------------------------------------

def test_submit_runs_srun_over_nodes_and_completes(emu, client, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    go = tmp_path / "go"
    pm = client.compute(Machine.perlmutter)
    job = pm.submit_job(script(f"""
        srun -N 4 --ntasks-per-node 1 bash -c 'echo "$SLURM_NODEID $SLURM_LOCALID $SLURMD_NODENAME $SLURM_NNODES" > {out}/$SLURM_PROCID'
        echo "$SLURM_JOB_ID $SLURM_NNODES $SLURM_JOB_NODELIST $SLURM_SUBMIT_DIR" > {out}/batch
        while [ ! -e {go} ]; do sleep 0.05; done
        """, "#SBATCH -N 4", "#SBATCH --exclusive", "#SBATCH -t 00:05:00", "#SBATCH -J emu-test"))
    assert job.jobid is not None
    wait_for(lambda: (out / "batch").exists(), what="batch line")
    files = sorted(p.name for p in out.iterdir() if p.name != "batch")
    assert files == ["0", "1", "2", "3"]
    nodes = [(out / str(i)).read_text().split() for i in range(4)]
    assert [n[0] for n in nodes] == ["0", "1", "2", "3"] and {n[1] for n in nodes} == {"0"}
    assert len({n[2] for n in nodes}) == 4 and {n[3] for n in nodes} == {"4"}
    jobid, nnodes, nodelist, _ = (out / "batch").read_text().split()
    assert jobid == job.jobid and nnodes == "4"
    assert expand_nodelist(nodelist) == [n[2] for n in nodes]

    job.update()
    assert job.state == JobState.RUNNING
    assert job.name == "emu-test" and job.nodes == "4" and job.nodelist == nodelist
    assert job.qos == "realtime" and job.features == "cpu" and job.account == "m0001"
    listed = pm.jobs(user=emu.app_state.user)
    assert [j.jobid for j in listed] == [job.jobid]

    go.touch()
    assert update_until(job, [JobState.COMPLETED, JobState.FAILED]) == JobState.COMPLETED
    sacct = pm.job(job.jobid)  # sacct view
    assert sacct.state == JobState.COMPLETED and sacct.exitcode == "0:0" and sacct.nnodes == "4"


def test_failing_task_fails_the_job(emu, client):
    pm = client.compute(Machine.perlmutter)
    job = pm.submit_job(script("""
        set -e
        srun -N 2 bash -c 'exit $SLURM_PROCID'
        """, "#SBATCH -N 2"))
    assert update_until(job, [JobState.COMPLETED, JobState.FAILED]) == JobState.FAILED
    assert pm.job(job.jobid).exitcode == "1:0"
    log = emu.app_state.job_output(job.jobid)["stdout"]
    assert "task 1: Exited with exit code 1" in log


def test_cancel_kills_job_processes(emu, client, tmp_path):
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    pm = client.compute(Machine.perlmutter)
    job = pm.submit_job(script(f"""
        srun -N 2 bash -c 'echo $$ > {pids_dir}/$SLURM_PROCID; exec sleep 600'
        """, "#SBATCH -N 2", "#SBATCH -t 01:00:00"))
    wait_for(lambda: len(list(pids_dir.iterdir())) == 2 and all(p.read_text().strip() for p in pids_dir.iterdir()),
             what="both tasks to start")
    pids = [int(p.read_text()) for p in pids_dir.iterdir()]
    assert all(alive(pid) for pid in pids)
    update_until(job, [JobState.RUNNING])

    job.cancel()
    assert update_until(job, [JobState.CANCELLED, JobState.COMPLETED, JobState.FAILED]) == JobState.CANCELLED
    assert not any(alive(pid) for pid in pids)
    assert emu.app_state.runner.live_pids(job.jobid) == set()


def test_cancel_escalates_to_sigkill(emu, client, tmp_path):
    pidfile = tmp_path / "pid"
    pm = client.compute(Machine.perlmutter)
    job = pm.submit_job(script(f"""
        srun -N 1 bash -c 'trap "" TERM; echo $$ > {pidfile}; while true; do sleep 0.1; done'
        """))
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="task pid")
    pid = int(pidfile.read_text())
    job.cancel()
    assert update_until(job, [JobState.CANCELLED], timeout=20) == JobState.CANCELLED
    assert not alive(pid)


def test_walltime_timeout(emu, client, tmp_path):
    pidfile = tmp_path / "pid"
    pm = client.compute(Machine.perlmutter)
    job = pm.submit_job(script(f"echo $$ > {pidfile}\nsleep 600\n", "#SBATCH -t 0:01"))  # 1 second
    assert update_until(job, [JobState.TIMEOUT, JobState.COMPLETED, JobState.FAILED]) == JobState.TIMEOUT
    assert not alive(int(pidfile.read_text()))


def test_job_not_found_for_first_polls(emu, client):
    emu.app_state.hide_new_jobs_polls = 2
    pm = client.compute(Machine.perlmutter)
    job = pm.submit_job(script("sleep 0.2\n"))
    # update() asks squeue, then sacct when squeue is empty: both hidden -> the client gives up.
    with pytest.raises(SfApiError) as err:
        job.update()
    assert err.value.message == f"Job not found: {job.jobid}"
    # sfapi_client does not retry this itself; once the cache has the job, update() works.
    assert update_until(job, [JobState.COMPLETED]) == JobState.COMPLETED

    emu.app_state.hide_new_jobs_polls = 1
    job2 = pm.submit_job(script("true\n"))
    with pytest.raises(SfApiError, match="Job not found"):
        pm.job(job2.jobid)  # sacct lookup
    assert pm.job(job2.jobid).jobid == job2.jobid


def test_never_start_stays_pending_until_released_or_cancelled(emu, client):
    emu.app_state.never_start = True
    pm = client.compute(Machine.perlmutter)
    held = pm.submit_job(script("true\n"))
    other = pm.submit_job(script("true\n"))
    held.update()
    assert held.state == JobState.PENDING and held.reason == "Priority"
    other.cancel()
    assert update_until(other, [JobState.CANCELLED]) == JobState.CANCELLED
    assert emu.app_state.runner.get(other.jobid).pid is None  # never ran
    emu.app_state.release_job(held.jobid)
    assert update_until(held, [JobState.COMPLETED]) == JobState.COMPLETED


def test_start_delay_keeps_job_pending(emu, client):
    emu.app_state.start_delay = 1.0
    pm = client.compute(Machine.perlmutter)
    job = pm.submit_job(script("true\n"))
    job.update()
    assert job.state == JobState.PENDING
    assert update_until(job, [JobState.COMPLETED]) == JobState.COMPLETED


def test_task_delay_and_sbatch_rejection(emu, client):
    emu.app_state.task_delay = 0.5
    pm = client.compute(Machine.perlmutter)
    with pytest.raises(SfApiError) as err:
        pm.submit_job("#!/bin/bash\n#SBATCH -N 1\ntrue\n")  # no -C cpu|gpu on Perlmutter
    assert "No architecture specified" in err.value.message
    with pytest.raises(SfApiError, match="Invalid qos"):
        pm.submit_job("#!/bin/bash\n#SBATCH -C cpu\n#SBATCH -q nosuchqos\ntrue\n")


# -- admin API and CLI ---------------------------------------------------------------------------

def test_admin_api(emu, client):
    admin = emu.admin_url
    r = httpx.post(f"{admin}/machines/perlmutter", json={"status": "degraded", "notes": ["x"]})
    assert r.status_code == 200
    assert client.compute(Machine.perlmutter).status.value == "degraded"
    r = httpx.post(f"{admin}/faults", json={"http_errors": {"status": 503, "count": 1}, "task_delay": 0})
    assert r.json()["http_errors"][0]["status"] == 503
    assert httpx.get(f"{emu.api_base_url}/status/perlmutter").status_code == 503
    job = client.compute(Machine.perlmutter).submit_job(script("echo hello from the job; echo oops >&2\n"))
    update_until(job, [JobState.COMPLETED])
    out = httpx.get(f"{admin}/jobs/{job.jobid}/output").json()
    assert "hello from the job" in out["stdout"] and "oops" in out["stdout"]
    info = httpx.get(f"{admin}/jobs/{job.jobid}").json()
    assert info["state"] == "COMPLETED" and info["live_pids"] == []
    state = httpx.get(f"{admin}/state").json()
    assert state["tokens_issued"] >= 1 and "access_token" not in str(state)
    assert httpx.post(f"{admin}/tokens/revoke").json()["revoked"] >= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_the_emulator(tmp_path):
    creds = generate_client_credentials()
    pub = creds.write_public_key(tmp_path / "pub.pem")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "detstream_testing.sfapi_emulator", "--port", str(port), "--client-id",
         creds.client_id, "--public-key", str(pub), "--workdir", str(tmp_path / "w"),
         "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(f"{base}/api/v1.2/status/perlmutter", timeout=1).status_code == 200
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stdout.read().decode()
                return False
        wait_for(up, timeout=30, interval=0.1, what="the CLI emulator")
        with Client(creds.client_id, creds.private_key_pem, api_base_url=f"{base}/api/v1.2",
                    token_url=f"{base}/c2id/token") as c:
            pm = c.compute(Machine.perlmutter)
            job = pm.submit_job(script("sleep 600\n"))
            update_until(job, [JobState.RUNNING])
            job_pid = httpx.get(f"{base}/_emulator/jobs/{job.jobid}").json()["pid"]
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert not alive(job_pid)  # the emulator's shutdown killed the running job
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- parsing helpers -----------------------------------------------------------------------------

def test_sbatch_and_time_parsing():
    opts = parse_sbatch_options(script("srun hostname\n#SBATCH -N 9\n", "#SBATCH --nodes=3",
                                       "#SBATCH --time 1-02:03:04", "#SBATCH -J name  # comment",
                                       "#SBATCH --exclusive", "#SBATCH --mail-type END"))
    assert (opts.nodes, opts.job_name, opts.exclusive, opts.qos) == (3, "name", True, "realtime")
    assert opts.time_limit == 86400 + 2 * 3600 + 3 * 60 + 4
    assert opts.extra == {"mail-type": "END"}
    assert parse_time_limit("30") == 1800 and parse_time_limit("2:30") == 150
    assert parse_time_limit("1-2") == 93600 and parse_time_limit("UNLIMITED") is None
    assert format_duration(3725) == "1:02:05" and format_duration(65, "sacct") == "00:01:05"


def test_srun_argument_handling():
    env = {"SLURM_JOB_NODELIST": "nid[001000-001003]"}
    opts, cmd = parse_args(["-N", "2", "--ntasks-per-node", "2", "--cpu-bind=cores", "--exclusive",
                            "python", "-m", "x", "-N", "7"])
    assert cmd == ["python", "-m", "x", "-N", "7"]
    nodes, layout = plan_tasks(opts, env)
    assert nodes == ["nid001000", "nid001001"]
    assert layout == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]
    _, layout = plan_tasks(parse_args(["-n", "5", "true"])[0], env)
    assert [n for _, n, _ in layout] == [0, 0, 1, 2, 3]
    assert len(plan_tasks({}, env)[1]) == 4
    assert expand_nodelist("nid[000998-001001,001005],login01") == [
        "nid000998", "nid000999", "nid001000", "nid001001", "nid001005", "login01"]
