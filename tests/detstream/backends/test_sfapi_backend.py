"""SfapiBackend, the batch script and the SFAPI blocks, against the SFAPI emulator with the real sfapi_client."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import uuid

import psutil
import pytest
from pydantic import SecretStr, ValidationError

from detstream.backends.base import NodeLaunch, JobState, Reservation, ReservationError
from detstream.backends.jobscript import NerscJobSettings, render_for_cli, render_job_script
from detstream.backends.sfapi import (SfapiAuthError, SfapiBackend, SfapiSettings, SfapiUnavailableError,
                                      cancel_sfapi_job, expand_nodelist)
from detstream_testing.sfapi_emulator import generate_client_credentials
from conftest import wait_until

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no internet here; blocks import Prefect
os.environ.setdefault("DO_NOT_TRACK", "1")

pytestmark = pytest.mark.timeout(120)

# A stand-in distributor: records its SLURM_PROCID, pid, argv and environment, then sleeps until killed.
FAKE_DISTRIBUTOR = textwrap.dedent("""
    import json, os, signal, sys
    out = os.environ["FAKE_OUT"]
    rec = {"procid": os.environ["SLURM_PROCID"], "node": os.environ.get("SLURMD_NODENAME"),
           "pid": os.getpid(), "argv": sys.argv[1:], "marker": os.environ.get("FAKE_MARKER")}
    tmp = os.path.join(out, ".%s.tmp" % rec["procid"])
    with open(tmp, "w") as fh:
        json.dump(rec, fh)
    os.rename(tmp, os.path.join(out, rec["procid"] + ".json"))
    while True:
        signal.pause()
""")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture
def settings(emu) -> SfapiSettings:
    return SfapiSettings(client_id=emu.client_id, private_key=SecretStr(emu.credentials.private_key_pem),
                         api_base_url=emu.api_base_url, token_url=emu.token_url)


@pytest.fixture
def out_dir(tmp_path):
    path = tmp_path / "tasks"
    path.mkdir()
    return path


@pytest.fixture
def job(out_dir) -> NerscJobSettings:
    """Job settings for the emulator: the local interpreter, loopback hosts, a fake distributor."""
    return NerscJobSettings(account="m0001", walltime_minutes=5,
                            command=[sys.executable, "-c", FAKE_DISTRIBUTOR],
                            bind_host="127.0.0.1", advertise_host="127.0.0.1",
                            env={"FAKE_OUT": str(out_dir), "FAKE_MARKER": "it's \"quoted\" $HOME `x`"})


@pytest.fixture
def launch() -> NodeLaunch:
    return NodeLaunch(session_id=uuid.uuid4().hex[:12], etcd_endpoint="http://127.0.0.1:2379",
                             etcd_prefix="/detstream-test")


@pytest.fixture
def backend(settings, job):
    with SfapiBackend(settings, job, poll_interval_s=0.1, max_backoff_s=0.5, release_timeout_s=20) as b:
        yield b


def emu_job(emu, reservation):
    return emu.app_state.runner.get(reservation.job_id)


def started_tasks(out_dir, n):
    recs = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))]
    return recs if len(recs) == n else None


# -- the job lifecycle -----------------------------------------------------------------------------

def test_reserve_runs_one_distributor_per_node_and_release_cancels(emu, backend, launch, out_dir):
    res = backend.reserve(3, launch)
    assert res.backend == "sfapi" and res.state is JobState.PENDING and res.nodes == 3
    assert res.detail == f"detstream-{launch.session_id}" and res.host == "perlmutter"
    assert res.submitted_at is not None

    res = backend.wait_running(res, timeout_s=30)
    assert res.state is JobState.RUNNING and res.scheduler_state == "RUNNING"
    ejob = emu_job(emu, res)
    assert res.node_names == ejob.nodes and len(res.node_names) == 3
    assert res.queue_wait_s is not None and res.queue_wait_s >= 0 and res.started_at >= res.submitted_at
    opts = ejob.options
    assert (opts.nodes, opts.qos, opts.constraint, opts.account, opts.exclusive) == (
        3, "realtime", "cpu", "m0001", True)
    assert opts.job_name == res.detail

    tasks = wait_until(lambda: started_tasks(out_dir, 3), timeout_s=30, what="3 distributor tasks")
    assert [t["procid"] for t in tasks] == ["0", "1", "2"]
    assert sorted(t["node"] for t in tasks) == res.node_names
    for t in tasks:
        assert t["argv"] == ["distributor", "--session", launch.session_id, "--etcd", launch.etcd_endpoint,
                             "--prefix", launch.etcd_prefix, "--bind-host", "127.0.0.1",
                             "--advertise-host", "127.0.0.1"]
        assert t["marker"] == "it's \"quoted\" $HOME `x`"
        assert alive(t["pid"])
    assert backend.poll(res).state is JobState.RUNNING

    released = backend.release(res)
    assert released.state is JobState.CANCELLED
    assert ejob.state == "CANCELLED"
    wait_until(lambda: not any(alive(t["pid"]) for t in tasks), timeout_s=10, what="tasks to exit")
    assert emu.app_state.runner.live_pids(res.job_id) == set()

    deletes = emu.app_state.count_requests("DELETE")
    assert backend.release(released).state is JobState.CANCELLED  # idempotent
    assert backend.poll(released).state is JobState.CANCELLED
    assert emu.app_state.count_requests("DELETE") == deletes


def test_release_of_a_finished_job_does_not_cancel(emu, settings, out_dir, launch):
    quick = NerscJobSettings(command=["true"], bind_host="127.0.0.1", advertise_host="127.0.0.1")
    with SfapiBackend(settings, quick, poll_interval_s=0.1) as b:
        res = b.reserve(1, launch)
        ejob = emu_job(emu, res)
        assert ejob.done.wait(20)
        assert b.poll(res).state is JobState.COMPLETED
        assert b.release(res).state is JobState.COMPLETED
    assert emu.app_state.count_requests("DELETE") == 0


def test_outage_refuses_and_submits_nothing(emu, backend, launch):
    emu.app_state.set_machine_status("perlmutter", "unavailable", notes=["scheduled maintenance"])
    with pytest.raises(ReservationError) as err:
        backend.reserve(2, launch)
    assert isinstance(err.value, SfapiUnavailableError)
    assert str(err.value) == "perlmutter is unavailable: scheduled maintenance"
    assert emu.app_state.count_requests("POST", "/compute/jobs") == 0
    assert emu.app_state.runner.jobs() == []


def test_degraded_machine_still_submits_with_a_warning(emu, backend, launch, caplog):
    emu.app_state.set_machine_status("perlmutter", "degraded", notes=["slow scratch"])
    with caplog.at_level(logging.WARNING, logger="detstream.backends.sfapi"):
        res = backend.reserve(1, launch)
    assert "degraded" in caplog.text and "slow scratch" in caplog.text
    assert backend.release(res).state is JobState.CANCELLED


@pytest.mark.parametrize("hidden, poll_first", [(3, False), (5, True)])
def test_job_not_found_after_submission_is_retried(emu, backend, launch, caplog, hidden, poll_first):
    # Each state query asks squeue then sacct, and each hidden answer uses up one of ``hidden``.
    emu.app_state.hide_new_jobs_polls = hidden
    caplog.set_level(logging.INFO, logger="detstream.backends.sfapi")
    res = backend.reserve(2, launch)
    if poll_first:
        assert backend.poll(res) == res  # young and not visible yet: keeps its state, no error
    res = backend.wait_running(res, timeout_s=30)
    assert res.state is JobState.RUNNING and len(res.node_names) == 2
    assert "not found yet" in caplog.text
    assert backend.release(res).state is JobState.CANCELLED


def test_job_never_found_is_cancelled_after_bounded_retries(emu, settings, job, launch):
    emu.app_state.hide_new_jobs_polls = 10_000
    with SfapiBackend(settings, job, poll_interval_s=0.05, not_found_retries=2) as b:
        res = b.reserve(1, launch)
        with pytest.raises(ReservationError, match=f"job {res.job_id} on perlmutter was still not found "
                                                   "after 3 queries; cancelled it"):
            b.wait_running(res, timeout_s=60)
    ejob = emu_job(emu, res)
    wait_until(lambda: ejob.state == "CANCELLED", timeout_s=10, what="the job to read CANCELLED")


def test_poll_during_an_outage_says_so(emu, settings, job, launch):
    with SfapiBackend(settings, job, poll_interval_s=0.05, not_found_grace_s=0) as b:
        res = b.wait_running(b.reserve(1, launch), timeout_s=30)
        emu.app_state.set_machine_status("perlmutter", "unavailable", notes=["power work"])
        with pytest.raises(SfapiUnavailableError, match=f"cannot find job {res.job_id} on perlmutter "
                                                        r"\(perlmutter is unavailable: power work\)"):
            b.poll(res)
        emu.app_state.set_machine_status("perlmutter", "active")
        assert b.poll(res).state is JobState.RUNNING
        assert b.release(res).state is JobState.CANCELLED


def test_job_that_never_starts_is_cancelled_at_the_timeout(emu, backend, launch):
    emu.app_state.never_start = True
    res = backend.reserve(2, launch)
    with pytest.raises(ReservationError) as err:
        backend.wait_running(res, timeout_s=1.5)
    msg = str(err.value)
    assert res.job_id in msg and "1.5 s" in msg and "PENDING" in msg and "cancelled it" in msg
    ejob = emu_job(emu, res)
    wait_until(lambda: ejob.state == "CANCELLED", timeout_s=10, what="the job to read CANCELLED")
    assert ejob.pid is None  # it never ran


def test_job_ending_before_it_runs_is_an_error(emu, backend, launch):
    emu.app_state.never_start = True
    res = backend.reserve(1, launch)
    emu.app_state.cancel_job("perlmutter", res.job_id)
    assert emu_job(emu, res).done.wait(10)
    with pytest.raises(ReservationError,
                       match=f"{res.job_id} on perlmutter ended CANCELLED before it was seen running"):
        backend.wait_running(res, timeout_s=10)


def test_token_revoked_server_side_logs_in_again(emu, backend, launch):
    res = backend.wait_running(backend.reserve(1, launch), timeout_s=30)
    issued = emu.app_state.tokens_issued
    assert emu.app_state.revoke_tokens() >= 1
    assert backend.poll(res).state is JobState.RUNNING
    assert emu.app_state.tokens_issued == issued + 1
    assert backend.release(res).state is JobState.CANCELLED


def test_http_500_on_a_query_is_retried(emu, backend, launch):
    res = backend.wait_running(backend.reserve(1, launch), timeout_s=30)
    emu.app_state.inject_http_errors(500, count=2)
    assert backend.poll(res).state is JobState.RUNNING
    assert backend.release(res).state is JobState.CANCELLED


# -- credentials --------------------------------------------------------------------------------

def test_rejected_key_is_a_clear_error_naming_the_client(emu, job, launch):
    other = generate_client_credentials()
    for client_id, key in [(emu.client_id, other.private_key_pem), (other.client_id, other.private_key_pem)]:
        bad = SfapiSettings(client_id=client_id, private_key=SecretStr(key),
                            api_base_url=emu.api_base_url, token_url=emu.token_url)
        with SfapiBackend(bad, job) as b, pytest.raises(SfapiAuthError) as err:
            b.reserve(1, launch)
        assert isinstance(err.value, ReservationError)
        assert f"client id {client_id}" in str(err.value) and "rejected the key" in str(err.value)
        assert "PRIVATE KEY" not in str(err.value)
    assert emu.app_state.count_requests("POST", "/compute/jobs") == 0


def test_key_file_readable_by_others_is_refused(emu, job, launch, tmp_path):
    key_file = emu.credentials.write_key_file(tmp_path / "sfapi-key.pem")
    key_file.chmod(0o644)
    loose = SfapiSettings(key_file=key_file, api_base_url=emu.api_base_url, token_url=emu.token_url)
    with SfapiBackend(loose, job) as b, pytest.raises(SfapiAuthError) as err:
        b.reserve(1, launch)
    assert str(key_file) in str(err.value) and "644" in str(err.value) and "chmod 600" in str(err.value)
    assert emu.app_state.count_requests() == 0  # refused before any request

    key_file.chmod(0o400)  # owner-only is fine (sfapi_client itself insists on exactly 600)
    with loose.client() as c:
        assert c.compute("perlmutter").status.value == "active"
    mismatch = SfapiSettings(client_id="aaaaaaaaaaaaa", key_file=key_file)
    with pytest.raises(SfapiAuthError, match=f"{key_file} is for client id {emu.client_id}"):
        mismatch.credentials()


def test_settings_need_exactly_one_key_and_never_show_it(emu, settings):
    with pytest.raises(ValidationError, match="exactly one of private_key and key_file"):
        SfapiSettings(client_id="x")
    with pytest.raises(ValidationError, match="client_id is required"):
        SfapiSettings(private_key=SecretStr("k"))
    with pytest.raises(SfapiAuthError, match="not a PEM private key") as err:
        SfapiSettings(client_id="abc", private_key=SecretStr("hunter2")).credentials()
    assert "hunter2" not in str(err.value)
    pem = emu.credentials.private_key_pem
    backend_repr = repr(SfapiBackend(settings, NerscJobSettings()))
    for text in (repr(settings), str(settings), settings.model_dump_json(), backend_repr):
        assert "PRIVATE KEY" not in text and pem.splitlines()[1] not in text


def test_secrets_never_appear_in_logs(emu, settings, job, launch, caplog, capsys):
    tokens = []
    issue = emu.app_state.issue_token

    def recording_issue(client_id):
        answer = issue(client_id)
        tokens.append(answer["access_token"])
        return answer
    emu.app_state.issue_token = recording_issue
    caplog.set_level(logging.DEBUG)
    with SfapiBackend(settings, job, poll_interval_s=0.1, logger=logging.getLogger("detstream.test")) as b:
        emu.app_state.hide_new_jobs_polls = 2
        res = b.wait_running(b.reserve(1, launch), timeout_s=30)
        emu.app_state.revoke_tokens()
        b.poll(res)
        b.release(res)
    assert len(tokens) >= 2
    captured = capsys.readouterr()
    text = caplog.text + captured.out + captured.err
    assert "job" in caplog.text  # the backend did log
    for token in tokens:
        assert token not in text
    key_lines = [line for line in emu.credentials.private_key_pem.splitlines() if "-----" not in line]
    assert "PRIVATE KEY" not in text and not any(line in text for line in key_lines)


def test_cancel_from_another_process_record(emu, settings, backend, launch):
    res = backend.wait_running(backend.reserve(1, launch), timeout_s=30)
    record = json.loads(res.model_dump_json())  # what the session stores in etcd
    cancelled = cancel_sfapi_job(settings, Reservation.model_validate(record), wait_s=20)
    assert cancelled.state is JobState.CANCELLED
    assert emu_job(emu, res).state == "CANCELLED"
    local = Reservation(backend="local", job_id="local-1", nodes=1)
    assert cancel_sfapi_job(settings, local) is local


# -- the batch script ---------------------------------------------------------------------------

HOSTILE = "x'; touch PWNED; echo '$(touch PWNED)`touch PWNED`"


def test_render_job_script_header_and_quoting(tmp_path):
    launch = NodeLaunch(session_id="s1 ;rm", etcd_endpoint="http://etcd:2379", etcd_prefix="/d s")
    job = NerscJobSettings(account="m1234", reservation="stream_rt", walltime_minutes=90,
                           extra_sbatch=["--mail-type=END", "#SBATCH --licenses=scratch"],
                           modules=["python", HOSTILE], conda_env=HOSTILE, env={"DETSTREAM_X": HOSTILE},
                           srun_options=["--cpu-bind=none"], command=["detstream", HOSTILE])
    script = render_job_script(job, 4, launch)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for expected in ["#SBATCH -N 4", "#SBATCH -q realtime", "#SBATCH -C cpu", "#SBATCH -t 01:30:00",
                     "#SBATCH -J detstream-s1__rm", "#SBATCH -A m1234", "#SBATCH --exclusive",
                     "#SBATCH --reservation=stream_rt", "#SBATCH --mail-type=END",
                     "#SBATCH --licenses=scratch"]:
        assert expected in lines
    header = lines[1:lines.index("set -e")]
    assert all(line.startswith("#") for line in header)  # sbatch reads every directive
    srun = lines[-1]
    assert srun.startswith("srun -N 4 --ntasks-per-node=1 --cpu-bind=none detstream ")
    assert srun.endswith('--bind-host 0.0.0.0 --advertise-host "$(hostname)"')

    # Run it with stand-ins for module, conda and srun: every value arrives verbatim, nothing executes.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    recorder = (f"#!{sys.executable}\nimport json, os, sys\n"
                f"with open({str(log)!r}, 'a') as fh:\n"
                "    fh.write(json.dumps({'argv': [os.path.basename(sys.argv[0])] + sys.argv[1:],"
                " 'env': os.environ.get('DETSTREAM_X')}) + '\\n')\n")
    for name in ("module", "conda", "srun"):
        (bin_dir / name).write_text(recorder)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "job.sh").write_text(script)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", str(tmp_path / "job.sh")], cwd=tmp_path, env=env, check=True, timeout=30)
    assert not list(tmp_path.rglob("PWNED"))
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["argv"][:2] for c in calls] == [["module", "load"], ["module", "load"], ["conda", "shell.bash"],
                                             ["conda", "activate"], ["srun", "-N"]]
    assert calls[1]["argv"][2] == HOSTILE and calls[3]["argv"][2] == HOSTILE
    assert calls[4]["env"] == HOSTILE
    hostname = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    assert calls[4]["argv"][5:] == ["detstream", HOSTILE, "distributor", "--session", "s1 ;rm", "--etcd",
                                    "http://etcd:2379", "--prefix", "/d s", "--bind-host", "0.0.0.0",
                                    "--advertise-host", hostname]


def test_render_containers_and_cli_entry():
    launch = NodeLaunch(session_id="abc", etcd_endpoint="http://e:2379", etcd_prefix="/detstream")
    shifter = render_job_script(NerscJobSettings(image="registry.nersc.gov/m1/detstream:1.0"), 2, launch)
    assert "#SBATCH --image=registry.nersc.gov/m1/detstream:1.0" in shifter
    assert "srun -N 2 --ntasks-per-node=1 shifter detstream distributor" in shifter
    podman = render_job_script(NerscJobSettings(image="detstream:1.0", container="podman-hpc",
                                                env={"A": "1"}), 2, launch)
    assert ("podman-hpc run --rm --network host -e SLURM_PROCID -e SLURM_NODEID -e SLURM_JOB_ID -e A "
            "detstream:1.0 detstream distributor") in podman
    assert "--image" not in podman

    counter = render_job_script(NerscJobSettings(), 2, launch.model_copy(update={"service": "count-files"}))
    assert counter.splitlines()[-1] == ("srun -N 2 --ntasks-per-node=1 detstream count-files --session abc "
                                        "--etcd http://e:2379 --prefix /detstream")

    text = render_for_cli(session_id="abc", etcd_endpoint="http://e:2379", nodes=3, env=["A=b c"],
                          account="m9", qos=None, bind_host="127.0.0.1", advertise_host="127.0.0.1")
    assert "#SBATCH -N 3" in text and "#SBATCH -A m9" in text and "#SBATCH -q realtime" in text
    assert "export A='b c'" in text and text.rstrip().endswith("--advertise-host 127.0.0.1")
    with pytest.raises(ValueError, match="walltime of 121 minutes exceeds the 120-minute cap"):
        render_for_cli(session_id="abc", etcd_endpoint="http://e:2379", walltime_minutes=121)
    with pytest.raises(ValueError, match="not NAME=VALUE"):
        render_for_cli(session_id="abc", etcd_endpoint="http://e:2379", env=["novalue"])


@pytest.mark.parametrize("fields, message", [
    ({"walltime_minutes": 121}, "walltime of 121 minutes exceeds the 120-minute cap"),
    ({"account": "m1 -A m2"}, "account 'm1 -A m2' has characters not allowed"),
    ({"qos": "realtime\n#SBATCH -N 99"}, "qos"),
    ({"extra_sbatch": ["--comment=a b"]}, "at most one value without blanks"),
    ({"extra_sbatch": ["--comment='a'"]}, "not allowed in an #SBATCH line"),
    ({"extra_sbatch": ["echo hi"]}, "must be one option starting with '-'"),
    ({"env": {"BAD-NAME": "1"}}, "not a valid shell name"),
    ({"job_name_prefix": "a b"}, "job_name_prefix"),
    ({"image": "x", "conda_env": "y"}, "either a container image or a conda environment"),
    ({"modules": ["a\0b"]}, "modules contains a NUL"),
    ({"command": []}, "command must name the program"),
])
def test_job_settings_refuse_bad_values(fields, message):
    with pytest.raises(ValidationError, match=message):
        NerscJobSettings(**fields)


def test_expand_nodelist():
    assert expand_nodelist("nid[001000-001002,001007],login01") == [
        "nid001000", "nid001001", "nid001002", "nid001007", "login01"]
    assert expand_nodelist("nid001000") == ["nid001000"]
    assert expand_nodelist("") == [] and expand_nodelist("None assigned") == []
    assert expand_nodelist("(Priority)") == []


# -- Prefect blocks ------------------------------------------------------------------------------

def test_blocks_build_settings_and_clients(emu):
    from detstream.blocks import NerscCompute, SfapiCredentials

    creds = SfapiCredentials(client_id=emu.client_id, private_key=emu.credentials.private_key_pem,
                             api_base_url=emu.api_base_url, token_url=emu.token_url)
    assert "PRIVATE KEY" not in repr(creds)
    assert creds.settings().private_key.get_secret_value() == emu.credentials.private_key_pem
    with creds.get_client() as client:
        assert client.compute("perlmutter").status.value == "active"
    from sfapi_client import AsyncClient
    assert isinstance(creds.get_async_client(), AsyncClient)

    compute = NerscCompute(job=NerscJobSettings(account="m0001", modules=["python"], walltime_minutes=60))
    assert compute.job_settings() == NerscJobSettings(account="m0001", modules=["python"], walltime_minutes=60)
    schema = SfapiCredentials._to_block_schema(block_type_id=uuid.uuid4())
    assert schema.fields["secret_fields"] == ["private_key"]  # Prefect stores and shows it as a secret
    assert NerscCompute._block_type_slug == "detstream-nersc-compute"
    assert SfapiCredentials._block_type_slug == "detstream-sfapi-credentials"
