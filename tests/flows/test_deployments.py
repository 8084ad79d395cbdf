"""Deployments on a real Prefect server: `detstream deploy`, a process worker, runs triggered
through the API, their artifacts, the per-detector queue, and calling a flow from async code."""

from __future__ import annotations

import base64
import re
import struct
from pathlib import Path

import pytest

from prefect_server import NIGHTLY, POOL, STREAMING

pytestmark = pytest.mark.timeout(900)

QUEUE = "detector-4dcamera"


def _client(server):
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _artifacts(server, flow_run_id) -> dict:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with server.settings(), _client(server) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in arts}


def test_every_parameter_of_every_flow_is_described_for_the_form():
    """The schema `detstream deploy` registers: a description on every parameter, the detector
    a list of built-in profiles or a saved block, the scan two integers (or None for replay)."""
    from detstream.flows import _params as P
    from detstream.flows import compare_workflows, file_transfer_session, streaming_session

    for fl in (streaming_session, file_transfer_session, compare_workflows):
        props = P.parameter_schema(fl).properties
        assert [k for k, v in props.items() if not v.get("description")] == [], fl.name
        assert [m.get("title") for m in props["detector"]["anyOf"]] == ["built-in profile", "saved DetectorProfile block"]
        assert [m["type"] for m in props["scan_width"]["anyOf"]] == ["integer", "null"]
    # Code still passes any saved block's name, and None for a replay's scan size.
    params = streaming_session.validate_parameters({"detector": "my-saved-camera", "scan_width": None})
    assert params["detector"] == "my-saved-camera" and params["scan_width"] is None


def test_deploy_registers_the_deployments(prefect_deployments):
    server = prefect_deployments
    assert "streaming-session/4dcamera" in server.deploy_output
    with server.settings(), _client(server) as client:
        pool = client.read_work_pool(POOL)
        queue = client.read_work_queue_by_name(QUEUE, work_pool_name=POOL)
        deps = {name: client.read_deployment_by_name(name)
                for name in (STREAMING, "file-transfer-session/4dcamera", NIGHTLY)}
    assert pool.type == "process"
    assert queue.concurrency_limit == 1
    for name, d in deps.items():
        assert d.entrypoint.startswith("detstream.flows.") and ":" not in d.entrypoint, name
        assert not d.pull_steps and d.storage_document_id is None, name
        assert d.work_pool_name == POOL and d.work_queue_name == QUEUE, name
        assert {"detstream", "detector:4dcamera"} <= set(d.tags), name
        assert d.global_concurrency_limit.limit == 1, name
        assert d.concurrency_options.collision_strategy.value == "ENQUEUE", name
        assert d.enforce_parameter_schema, name
        out = Path(d.parameters["output_dir"])
        assert out.is_absolute() and str(out).startswith(str(server.output)), name
        props = d.parameter_openapi_schema["properties"]
        assert [k for k, v in props.items() if not v.get("description")] == [], name
        detector = props["detector"]["anyOf"]
        assert {"4dcamera", "testcam"} <= set(detector[0]["enum"])
        assert detector[1]["$ref"] == "#/definitions/DetectorProfile"  # the form's block picker
        assert d.parameter_openapi_schema["definitions"]["DetectorProfile"]["block_type_slug"] == \
            "detstream-detector-profile"
        assert props["scan_width"]["anyOf"][0]["type"] == "integer"
        assert props["scan_height"]["anyOf"][0]["type"] == "integer"
        assert props["backend"]["enum"] == ["local", "sfapi", "slurm"]
    nightly = deps[NIGHTLY]
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in nightly.schedules] == [
        ("30 3 * * *", "America/Los_Angeles", True)]
    assert {"health-check", "nightly"} <= set(nightly.tags)
    assert nightly.parameters["repeat"] == 1 and nightly.parameters["scan_width"] == 16
    assert not deps[STREAMING].schedules


def test_streaming_session_runs_from_its_deployment(prefect_deployments, deployment_runs):
    run = deployment_runs["streaming"]
    assert run.state.is_completed(), f"{run.state.type}: {run.state.message}"
    assert run.parameters["scan_width"] == 8 and run.parameters["output_dir"] == str(deployment_runs["output"])
    arts = _artifacts(prefect_deployments, run.id)
    sids = {m.group(1) for k in arts if (m := re.fullmatch(r"summary-(.+)", k))}
    assert len(sids) == 1, sorted(arts)
    sid = sids.pop()
    assert {f"summary-{sid}", f"report-{sid}", f"scan-progress-{sid}", f"bright-field-{sid}"} <= set(arts)
    assert arts[f"summary-{sid}"].type == "table"
    rows = {r["metric"]: r["value"] for r in _table(arts[f"summary-{sid}"].data)}
    assert rows["frames_received"] == 64 and rows["frames_missing"] == 0
    assert arts[f"scan-progress-{sid}"].type == "progress" and float(arts[f"scan-progress-{sid}"].data) == 100.0
    report = arts[f"report-{sid}"]
    assert report.type == "markdown" and "64/64 frames" in report.data and "counted.h5" in report.data
    image = arts[f"bright-field-{sid}"]
    m = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", image.data)
    assert m, image.data[:200]
    png = base64.b64decode(m.group(1))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 384 and height >= 384, (width, height)  # 8x8 positions, enlarged for the UI
    session_dir = deployment_runs["output"] / sid
    assert (session_dir / "counted.h5").is_file() and (session_dir / "virtual_bright_field.png").is_file()


def _table(data):
    import json

    return json.loads(data) if isinstance(data, str) else data


def test_nightly_health_check_posts_its_comparison_table(prefect_deployments, deployment_runs):
    run = deployment_runs["nightly"]
    assert run.state.is_completed(), f"{run.state.type}: {run.state.message}"
    assert {"health-check", "nightly"} <= set(run.tags)
    arts = _artifacts(prefect_deployments, run.id)
    assert arts["comparison-8x8"].type == "table", sorted(arts)
    workflows = {r["workflow"] for r in _table(arts["comparison-8x8"].data)}
    assert workflows == {"streaming", "file-transfer"}
    assert "data:image/png;base64," in arts["comparison-report-8x8"].data


def test_one_session_per_detector_queues_the_second_run(deployment_runs):
    """Both runs went to the detector's queue (limit 1) at once: one waited in Scheduled until
    the other had finished."""
    spans = {}
    for key, states in deployment_runs["history"].items():
        pending = min(s.timestamp for s in states if s.type.value == "PENDING")
        final = max(s.timestamp for s in states if s.is_final())
        spans[key] = (pending, final)
    (a0, a1), (b0, b1) = sorted(spans.values())
    assert a1 <= b0, f"runs overlapped: {spans}"


def test_deployment_slots_are_released(prefect_deployments, deployment_runs):
    """Each deployment's own limit (a global concurrency limit) gave its slot back: the next run
    of that deployment will not wait for a finished one."""
    from prefect_server import wait_for

    def free():
        with prefect_deployments.settings(), _client(prefect_deployments) as client:
            return all(client.read_deployment_by_name(n).global_concurrency_limit.active_slots == 0
                       for n in (STREAMING, NIGHTLY))

    wait_for(free, 60, "the deployments' concurrency slots to be released")


SCRIPT = """
import asyncio, json, sys
from prefect.exceptions import ParameterTypeError
from detstream.flows import streaming_session

params = dict(scan_width=4, scan_height=4, detector="testcam", nodes=1, etcd_url=sys.argv[1],
              etcd_prefix=sys.argv[2], output_dir=sys.argv[3])

async def main():
    try:                                       # in a running loop a direct call is still
        streaming_session(scan_width=0)        # synchronous (no coroutine to await): it is
    except ParameterTypeError:                 # validated and raised right here
        direct = "raised"
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.05)

    t = asyncio.create_task(ticker())
    summary = await asyncio.to_thread(streaming_session, **params)
    t.cancel()
    return {"direct": direct, "ticks": ticks, "frames": summary["frames_received"]}

print("RESULT " + json.dumps(asyncio.run(main())))
"""


def test_flow_from_a_script_and_from_async_code(prefect_deployments, etcd_server, etcd_prefix,
                                                tmp_path, no_stray_services):
    """``from detstream.flows import streaming_session`` in a plain script's event loop: a direct
    call runs synchronously (it would block the loop), ``await asyncio.to_thread(...)`` runs the
    session while the loop goes on. (Plain calls are what the other flow tests make.)"""
    import json
    import sys

    from prefect_server import start, stop_tree, tail, wait_for

    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    log = tmp_path / "script.log"
    env = prefect_deployments.client_env(tmp_path / "home")
    proc = start([sys.executable, str(script), etcd_server.endpoint, etcd_prefix, str(tmp_path / "out")],
                 env, log, tmp_path)
    try:
        wait_for(lambda: proc.poll() is not None, 300, "the script to finish", log=log, interval_s=0.2)
    finally:
        stop_tree(proc)
    assert proc.returncode == 0, tail(log)
    line = next(x for x in log.read_text().splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["frames"] == 16
    assert result["direct"] == "raised"
    assert result["ticks"] > 3, result  # the loop ran while the session did
