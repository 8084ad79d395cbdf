"""The ``detstream`` command as installed: the core's service commands plus the Prefect layer's
``run``, ``compare``, ``deploy`` and ``render-job``. Flows are imported only by the commands that run them.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

# sfapi_client's authlib warns, when imported, about authlib's own httpx integration
# (AuthlibDeprecationWarning): nothing a user of detstream can act on, so `detstream run` and the
# services it starts do not print it.
warnings.filterwarnings("ignore", message=r"The httpx module is deprecated")
os.environ.setdefault("PYTHONWARNINGS", "ignore:The httpx module is deprecated")

from detstream.cli import _parse_scan, _prefix_opt  # noqa: E402 (after the warning filter)
from detstream.cli import app as core_app  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Stream detector frames into compute-node memory and count electrons on the fly.")
app.registered_commands.extend(core_app.registered_commands)


def _prefect_defaults() -> None:
    """No telemetry (sites are often offline); a patient wait for Prefect's temporary server."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


@app.command()
def run(
    scan: str = typer.Option("32x32", help="Scan size WIDTHxHEIGHT (ignored with --replay: read from the files)."),
    replay: Optional[Path] = typer.Option(None, help="Replay a folder of raw v5 files instead of simulating."),
    nodes: int = typer.Option(2, min=1, help="Compute nodes."),
    workers_per_node: int = typer.Option(1, min=1, help="Counting processes per node."),
    aggregators: int = typer.Option(1, min=1, help="streaming: aggregator shards (each routes a share of the sectors)."),
    output: Path = typer.Option(Path("runs"), help="Output folder (one subfolder per session)."),
    etcd: Optional[str] = typer.Option(None, help="Use this etcd instead of a private one."),
    detector: str = typer.Option("4dcamera", help="Detector profile."),
    seed: int = typer.Option(0, help="Simulator seed."),
    frame_rate: Optional[float] = typer.Option(None, min=0.001, help="Send at this many frames/s, as the camera "
                                               "acquires (the 4D Camera: 87000); default: as fast as taken."),
    background_threshold: float = typer.Option(12.0, help="Background threshold."),
    xray_threshold: float = typer.Option(2000.0, help="X-ray threshold."),
    dark_reference: Optional[Path] = typer.Option(None, help=".npy dark reference."),
    gain: Optional[Path] = typer.Option(None, help=".npy gain map."),
    no_counting: bool = typer.Option(False, "--no-counting", help="Stream and assemble only."),
    workflow: str = typer.Option("streaming", help="streaming, or file-transfer (the classic path)."),
    fallback: str = typer.Option("none", help="file-transfer: fall back to it if streaming cannot run."),
    fallback_backend: str = typer.Option("local", help="Backend of the fallback's count job: local, sfapi or slurm."),
    backend: str = typer.Option("local", help="local, sfapi (NERSC Superfacility API) or slurm (sbatch)."),
    slurm_conf: Optional[Path] = typer.Option(None, help="SLURM_CONF for --backend slurm (default: the site's)."),
    sfapi_url: Optional[str] = typer.Option(None, help="Superfacility API base URL (e.g. a local emulator)."),
    sfapi_key_file: Optional[Path] = typer.Option(None, help="sfapi_client key file (client id, then PEM; mode 600)."),
    session_id: Optional[str] = typer.Option(None, help="Session id (default: generated)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output of this session id."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the summary here."),
    security: str = typer.Option("auto", help="CURVE on the ZeroMQ hops: auto (wherever a socket listens "
                                 "beyond loopback/ipc), curve (always) or none (never)."),
):
    """Run a session (private etcd, local nodes, simulated camera by default)."""
    from rich.console import Console

    console = Console(stderr=True)
    w, h = _parse_scan(scan) if replay is None else (None, None)
    if security not in ("auto", "curve", "none"):
        raise typer.BadParameter(f"security {security!r}: choose auto, curve or none")
    if workflow not in ("streaming", "file-transfer"):
        raise typer.BadParameter(f"workflow {workflow!r}: choose streaming or file-transfer")
    if backend == "local":
        from detstream.backends.local import LocalBackend

        try:
            LocalBackend(log_dir=output).check_request(nodes, workers_per_node)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None
    if etcd:
        _refuse_if_busy(console, etcd, detector)
    _prefect_defaults()
    _start_reaper()
    from detstream.flows import file_transfer_session, streaming_session
    from detstream.progress import console_progress
    from detstream.session import SessionCancelled, SessionIncomplete
    from detstream.states import EXIT_CODES, SessionState

    extra = ({"fallback": fallback, "fallback_backend": fallback_backend, "aggregators": aggregators}
             if workflow == "streaming" else {})
    if "sfapi" in (backend, extra.get("fallback_backend")):
        extra.update(_sfapi_blocks(sfapi_url, sfapi_key_file))
    if "slurm" in (backend, extra.get("fallback_backend")):
        extra["slurm_compute"] = _slurm_block(slurm_conf)
    flow_fn = streaming_session if workflow == "streaming" else file_transfer_session
    try:
        with console_progress(console):
            summary = flow_fn(
                **extra, backend=backend, session_id=session_id, overwrite=overwrite,
                scan_width=w, scan_height=h, detector=detector, nodes=nodes,
                workers_per_node=workers_per_node, source="replay" if replay else "simulated",
                replay_dir=str(replay) if replay else None, seed=seed, frame_rate=frame_rate, output_dir=str(output),
                counting=not no_counting, background_threshold=background_threshold,
                xray_threshold=xray_threshold,
                dark_reference=str(dark_reference) if dark_reference else None,
                gain=str(gain) if gain else None, security=security, **_etcd_params(etcd))
    except SessionIncomplete as err:
        _print_summary(console, err.summary)
        if json_out:
            json_out.write_text(json.dumps(err.summary, indent=2))
        console.print(f"[bold yellow]session incomplete:[/] {err}")
        raise typer.Exit(EXIT_CODES[SessionState.INCOMPLETE]) from None
    except (KeyboardInterrupt, SessionCancelled) as err:
        console.print(f"[bold yellow]session cancelled[/] ({type(err).__name__}); what was counted is "
                      f"in {output}/<session id>/summary.json")
        raise typer.Exit(EXIT_CODES[SessionState.CANCELLED]) from None
    except Exception as err:
        console.print(f"[bold red]session failed:[/] {err}")
        raise typer.Exit(EXIT_CODES[SessionState.FAILED]) from None
    _print_summary(console, summary)
    if json_out:
        json_out.write_text(json.dumps(summary, indent=2))


def _start_reaper() -> None:
    """Whatever this run starts (services, a private etcd, Prefect's temporary server) is stopped
    by a watcher if this process is killed; Prefect's server is started now so it can be tracked."""
    from detstream import reaper

    reaper.ACTIVE = reaper.Reaper().start()
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()  # the instance Prefect's client uses without an API URL
        server.start()
        reaper.track_process(server.server_process.pid)


def _refuse_if_busy(console, etcd: str, detector: str) -> None:
    """A busy detector is refused before Prefect's temporary server starts: as soon as its holder
    shows it is alive. A holder killed moments ago is waited out (its lease runs down), saying so."""
    from detstream.config import DEFAULT_PREFIX, etcd_login_from_env
    from detstream.coordination import Coordinator, DetectorBusy
    from detstream.etcd import CoordinationError
    from detstream.session.lock import wait_out_dead_holder
    from detstream.states import EXIT_CODES, SessionState

    try:
        with Coordinator(etcd, prefix=DEFAULT_PREFIX, outage_budget_s=2.0, **etcd_login_from_env()) as coord:
            wait_out_dead_holder(coord, detector, say=lambda text: console.print(text, soft_wrap=True))
    except CoordinationError as err:
        console.print(f"[bold red]session failed:[/] {err}")
        raise typer.Exit(EXIT_CODES[SessionState.FAILED]) from None
    except DetectorBusy as busy:
        console.print(f"[bold red]detector {detector} is busy:[/] session {busy.holder} holds it")
        raise typer.Exit(EXIT_CODES[SessionState.FAILED]) from None


def _print_summary(console, summary: dict) -> None:
    from rich.table import Table

    table = Table(title=f"detstream session {summary['session_id']} ({summary['workflow']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("state", "frames_expected", "frames_received", "frames_counted", "frames_missing", "events",
                "bytes_moved",
                "throughput_gb_s", "frames_per_s", "time_to_result_s"):
        v = summary.get(key)
        table.add_row(key, f"{v:.3f}" if isinstance(v, float) else str(v))
    for k, v in summary.get("timings", {}).items():
        table.add_row(f"timing {k}", f"{v:.3f}")
    for k, v in (summary.get("rejected") or {}).items():
        table.add_row(f"rejected {k}", str(v))
    for k, v in summary.get("outputs", {}).items():
        table.add_row(k, str(v))
    console.print(table)


def _sfapi_blocks(sfapi_url: Optional[str], key_file: Optional[Path]) -> dict:
    """The flow's SFAPI blocks: saved ones (DETSTREAM_SFAPI_CREDENTIALS_BLOCK, DETSTREAM_NERSC_COMPUTE_BLOCK),
    else credentials from a key file and URL. An API on this machine (an emulator) runs the job's
    nodes here too, so they start with this interpreter and listen on loopback."""
    from urllib.parse import urlsplit

    from detstream.backends.sfapi_settings import SFAPI_BASE_URL, SFAPI_TOKEN_URL
    from detstream.blocks import NerscCompute, SfapiCredentials

    credentials = os.environ.get("DETSTREAM_SFAPI_CREDENTIALS_BLOCK")
    compute = os.environ.get("DETSTREAM_NERSC_COMPUTE_BLOCK")
    blocks: dict = {"sfapi_credentials": SfapiCredentials.load(credentials) if credentials else None,
                    "nersc_compute": NerscCompute.load(compute) if compute else NerscCompute()}
    if blocks["sfapi_credentials"] is None and key_file:
        api = urlsplit(sfapi_url or SFAPI_BASE_URL)
        token = f"{api.scheme}://{api.netloc}/c2id/token" if sfapi_url else SFAPI_TOKEN_URL
        blocks["sfapi_credentials"] = SfapiCredentials(key_file=str(key_file), api_base_url=api.geturl(),
                                                       token_url=token)
    if sfapi_url and urlsplit(sfapi_url).hostname in ("127.0.0.1", "localhost", "::1"):
        job = blocks["nersc_compute"].job.model_copy(update={
            "command": [sys.executable, "-m", "detstream"], "bind_host": "127.0.0.1", "advertise_host": "127.0.0.1"})
        blocks["nersc_compute"] = NerscCompute(job=job)
    return blocks


def _slurm_block(slurm_conf: Optional[Path]):
    """The flow's SlurmCompute: the saved block DETSTREAM_SLURM_COMPUTE_BLOCK, else defaults with
    ``--slurm-conf``; nodes start detstream with this interpreter (a shared install, as on a login node)."""
    from detstream.blocks import SlurmCompute

    name = os.environ.get("DETSTREAM_SLURM_COMPUTE_BLOCK")
    if name:
        return SlurmCompute.load(name)
    from detstream.backends.slurm import SlurmSettings

    block = SlurmCompute(cluster=SlurmSettings(slurm_conf=str(slurm_conf) if slurm_conf else None))
    block.job = block.job.model_copy(update={"command": [sys.executable, "-m", "detstream"]})
    return block


def _etcd_params(url: Optional[str]) -> dict:
    """The flow's etcd: ``url`` with the login in DETSTREAM_ETCD_* (as services read it), else a private one."""
    if not url:
        return {}
    from detstream.blocks import EtcdCoordinator
    from detstream.config import etcd_login_from_env

    return {"etcd": EtcdCoordinator(endpoints=[url], **etcd_login_from_env())}


@app.command("render-job")
def render_job(
    session: str = typer.Option("SESSION_ID", help="Session id the job serves."),
    etcd: str = typer.Option("http://etcd.example.org:2379", help="etcd endpoint the nodes use."),
    prefix: str = _prefix_opt,
    nodes: int = typer.Option(2, min=1, help="Nodes."),
    service: str = typer.Option("distributor", help="distributor, or count-files."),
    account: Optional[str] = typer.Option(None, help="NERSC project (-A)."),
    qos: Optional[str] = typer.Option(None, help="QOS (default realtime)."),
    constraint: Optional[str] = typer.Option(None, help="cpu or gpu (default cpu)."),
    walltime_minutes: Optional[int] = typer.Option(None, help="Walltime (default 30, at most 120)."),
    reservation: Optional[str] = typer.Option(None, help="Slurm reservation."),
    conda_env: Optional[str] = typer.Option(None, help="conda environment with detstream."),
    image: Optional[str] = typer.Option(None, help="Container image with detstream."),
    env: list[str] = typer.Option([], help="NAME=VALUE for the job's environment (repeatable)."),
):
    """Show the batch script a session would submit through the Superfacility API (no submission)."""
    from detstream.backends.jobscript import render_for_cli

    try:
        typer.echo(render_for_cli(session_id=session, etcd_endpoint=etcd, etcd_prefix=prefix, nodes=nodes,
                                  service=service, env=env, account=account, qos=qos, constraint=constraint,
                                  walltime_minutes=walltime_minutes, reservation=reservation,
                                  conda_env=conda_env, image=image), nl=False)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


@app.command()
def compare(
    scan: str = typer.Option("64x64", help="Scan size WIDTHxHEIGHT."),
    repeat: int = typer.Option(3, min=1, help="Runs of each workflow, alternating."),
    nodes: int = typer.Option(2, min=1, help="Compute nodes."),
    output: Path = typer.Option(Path("runs/compare"), help="Output folder."),
    etcd: Optional[str] = typer.Option(None, help="Use this etcd instead of a private one."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the comparison report here."),
):
    """Run streaming and file transfer on the same scan, alternating, and compare them."""
    from rich.console import Console

    console = Console(stderr=True)
    w, h = _parse_scan(scan)
    _prefect_defaults()
    from detstream.flows import compare_workflows

    try:
        report = compare_workflows(scan_width=w, scan_height=h, repeat=repeat, nodes=nodes,
                                   output_dir=str(output), **_etcd_params(etcd),
                                   json_path=str(json_out) if json_out else None)
    except Exception as err:
        console.print(f"[bold red]comparison failed:[/] {err}")
        raise typer.Exit(1) from None
    from rich.table import Table

    table = Table(title=f"streaming vs file transfer, {scan}, {repeat} runs each")
    for col in ("workflow", "median s", "min s", "max s", "stdev s"):
        table.add_column(col)
    for wf, data in report["workflows"].items():
        st = data["time_to_result_s"]
        table.add_row(wf, *(f"{st[k]:.2f}" for k in ("median", "min", "max", "stdev")))
    console.print(table)
    if report.get("speedup_median"):
        console.print(f"streaming {report['speedup_median']:.1f}x faster; identical events: {report['identical_events']}")


# --- detstream deploy: Prefect deployments from deployments/prefect.yaml -----------------------

def _deployments_file(path: Optional[Path]) -> Path:
    """The prefect.yaml to deploy: as given, else ./deployments/, else the source tree's."""
    candidates = [path] if path else [Path("deployments/prefect.yaml"),
                                      Path(__file__).resolve().parents[1] / "deployments" / "prefect.yaml"]
    for p in candidates:
        if p.is_file():
            return p
    raise typer.BadParameter(f"no deployments file at {', '.join(map(str, candidates))}; pass --file")


def _load_deployments(path: Path, output: Path) -> dict:
    """prefect.yaml with its {{ $ENV }} placeholders filled, as `prefect deploy` fills them."""
    import yaml
    from prefect.utilities.templating import apply_values

    os.environ["DETSTREAM_OUTPUT_DIR"] = str(output.expanduser().resolve())
    config = apply_values(yaml.safe_load(path.read_text()), os.environ, remove_notset=False)
    left = [d["name"] for d in config["deployments"] if "{{" in json.dumps(d)]
    if left:
        raise typer.BadParameter(f"{path}: unfilled placeholders in deployments {left}")
    return config


def _ensure_pool_and_queues(pool: str, queues: set[str]) -> None:
    """A process work pool named ``pool``, and in it each queue with a concurrency limit of 1."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(pool)
            if existing.type != "process":
                raise typer.BadParameter(f"work pool {pool!r} is of type {existing.type!r}, not process")
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        for name in sorted(queues):
            try:
                queue = client.read_work_queue_by_name(name, work_pool_name=pool)
                if queue.concurrency_limit != 1:
                    client.update_work_queue(queue.id, concurrency_limit=1)
            except ObjectNotFound:
                client.create_work_queue(name, work_pool_name=pool, concurrency_limit=1,
                                         description="One session of this detector at a time.")


@app.command()
def deploy(
    file: Optional[Path] = typer.Option(None, "--file", help="Deployments file (default deployments/prefect.yaml)."),
    output: Path = typer.Option(Path("runs"), help="Where the deployed sessions write (made absolute)."),
    pool: Optional[str] = typer.Option(None, help="Work pool (default: the file's); created as a process pool."),
):
    """Register the flows' Prefect deployments (work pool, per-detector queue, block types created if missing).

    The Prefect API is PREFECT_API_URL's. Each entrypoint is a module path in the installed
    detstream package, so a process worker in an environment with detstream runs them as is.
    """
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    _prefect_defaults()
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        console.print("[bold red]no Prefect server:[/] set PREFECT_API_URL, e.g. "
                      "http://127.0.0.1:4200/api (deployments on a temporary server would vanish)")
        raise typer.Exit(2)
    path = _deployments_file(file)
    config = _load_deployments(path, output)
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron
    from prefect.utilities.importtools import import_object

    from detstream import blocks

    for name in blocks.__all__:  # the run form's block pickers list saved blocks of these types
        getattr(blocks, name).register_type_and_schema()
    specs = config["deployments"]
    pool_of = {id(d): pool or d["work_pool"]["name"] for d in specs}
    for name in set(pool_of.values()):
        _ensure_pool_and_queues(name, {d["work_pool"]["work_queue_name"] for d in specs
                                       if pool_of[id(d)] == name and d["work_pool"].get("work_queue_name")})
    table = Table(title=f"deployments from {path}")
    for col in ("deployment", "work queue", "schedule"):
        table.add_column(col, overflow="fold")
    for d in specs:
        fl = import_object(d["entrypoint"])
        limit = d.get("concurrency_limit")
        dep = fl.to_deployment(
            name=d["name"], description=d.get("description"), tags=d.get("tags"),
            parameters=d.get("parameters") or {}, version=d.get("version"),
            work_pool_name=pool_of[id(d)], work_queue_name=d["work_pool"].get("work_queue_name"),
            job_variables=d["work_pool"].get("job_variables") or {},
            schedules=[Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
                       for s in d.get("schedules") or []],
            concurrency_limit=ConcurrencyLimitConfig(**limit) if isinstance(limit, dict) else limit,
            entrypoint_type=EntrypointType.MODULE_PATH)
        dep.entrypoint = d["entrypoint"]
        dep.apply(work_pool_name=pool_of[id(d)])
        table.add_row(f"{fl.name}/{d['name']}", d["work_pool"].get("work_queue_name") or "default",
                      ", ".join(f"{s['cron']} {s.get('timezone') or 'UTC'}" for s in d.get("schedules") or []) or "-")
    console.print(table)
    pools = " ".join(f"--pool {p}" for p in sorted(set(pool_of.values())))
    console.print(f"outputs go to {os.environ['DETSTREAM_OUTPUT_DIR']}", soft_wrap=True)
    console.print(f"start a worker where detstream is installed: prefect worker start {pools}", soft_wrap=True)


if __name__ == "__main__":
    app(prog_name="detstream")
