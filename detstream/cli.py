"""The ``detstream`` command: run a session, or start one service (as a batch job does on a node).

Service commands import no Prefect; ``run`` (and the other flow commands) load the flows lazily.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Stream detector frames into compute-node memory and count electrons on the fly.")

ETCD_USER_ENV = "DETSTREAM_ETCD_USERNAME"
ETCD_PASSWORD_ENV = "DETSTREAM_ETCD_PASSWORD"


def _parse_scan(scan: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in scan.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"scan {scan!r} is not WIDTHxHEIGHT, e.g. 32x32") from None
    if w <= 0 or h <= 0:
        raise typer.BadParameter(f"scan {scan!r}: width and height must be positive")
    return w, h


def _service_logging(role: str) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {role}[%(process)d] %(levelname)s %(name)s: %(message)s")


def _coordinator(etcd: str, prefix: str):
    from .coordination import Coordinator

    return Coordinator(etcd, prefix=prefix, username=os.environ.get(ETCD_USER_ENV),
                       password=os.environ.get(ETCD_PASSWORD_ENV))


def _serve(role: str, fn) -> None:
    _service_logging(role)
    try:
        fn()
    except Exception as err:
        logging.getLogger("detstream").error("%s failed: %s", role, err, exc_info=True)
        raise typer.Exit(1)


_session_opt = typer.Option(..., "--session", help="Session id.")
_etcd_opt = typer.Option(..., "--etcd", help="etcd endpoint, e.g. http://127.0.0.1:2379.")
_prefix_opt = typer.Option("/detstream", "--prefix", help="etcd key prefix.")


@app.command()
def producer(session: str = _session_opt, etcd: str = _etcd_opt, prefix: str = _prefix_opt,
             sector: int = typer.Option(..., help="Sector (receiver module) this producer sends.")):
    """Send one sector of the session's scan to the aggregator."""
    from .services.serve import serve_producer

    _serve(f"producer-{sector}", lambda: serve_producer(_coordinator(etcd, prefix), session, sector))


@app.command()
def aggregator(session: str = _session_opt, etcd: str = _etcd_opt, prefix: str = _prefix_opt,
               bind_host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
               advertise_host: Optional[str] = typer.Option(None, help="Host name the producers use.")):
    """Route every sector to the node that owns its frame."""
    from .services.serve import serve_aggregator

    _serve("aggregator", lambda: serve_aggregator(_coordinator(etcd, prefix), session, bind_host,
                                                   advertise_host))


@app.command()
def distributor(session: str = _session_opt, etcd: str = _etcd_opt, prefix: str = _prefix_opt,
                node_index: Optional[int] = typer.Option(
                    None, help="This node's index; default $SLURM_PROCID (srun), else 0."),
                bind_host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 on a node)."),
                advertise_host: Optional[str] = typer.Option(None, help="Host name the aggregator uses.")):
    """Assemble, count and write this node's share of the scan (one per compute node)."""
    from .services.serve import serve_distributor

    if node_index is None:
        node_index = int(os.environ.get("SLURM_PROCID", os.environ.get("SLURM_NODEID", "0")))
    _serve(f"distributor-{node_index}",
           lambda: serve_distributor(_coordinator(etcd, prefix), session, node_index, bind_host,
                                     advertise_host))


@app.command()
def acquire(session: str = _session_opt, etcd: str = _etcd_opt, prefix: str = _prefix_opt,
            sector: int = typer.Option(..., help="Sector (receiver module) to record."),
            directory: Path = typer.Option(..., help="Folder for the raw v5 file.")):
    """File-transfer path: write one sector of the scan to a raw v5 file (fsync'd, evicted)."""
    from .services.serve import serve_acquire

    _serve(f"acquire-{sector}", lambda: serve_acquire(_coordinator(etcd, prefix), session, sector, directory))


@app.command("count-files")
def count_files(session: str = _session_opt, etcd: str = _etcd_opt, prefix: str = _prefix_opt,
                node_index: Optional[int] = typer.Option(
                    None, help="This node's index; default $SLURM_PROCID (srun), else 0."),
                data_dir: Optional[Path] = typer.Option(None, help="Raw files; default <session>/transferred.")):
    """File-transfer path: count this node's share of the scan from the transferred raw files."""
    from .services.file_counter import serve_file_counter

    if node_index is None:
        node_index = int(os.environ.get("SLURM_PROCID", os.environ.get("SLURM_NODEID", "0")))
    _serve(f"count-files-{node_index}",
           lambda: serve_file_counter(_coordinator(etcd, prefix), session, node_index, data_dir))


def _prefect_defaults() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


@app.command()
def run(
    scan: str = typer.Option("32x32", help="Scan size WIDTHxHEIGHT (ignored with --replay: read from the files)."),
    replay: Optional[Path] = typer.Option(None, help="Replay a folder of raw v5 files instead of simulating."),
    nodes: int = typer.Option(2, min=1, help="Compute nodes."),
    workers_per_node: int = typer.Option(1, min=1, help="Counting processes per node."),
    output: Path = typer.Option(Path("runs"), help="Output folder (one subfolder per session)."),
    etcd: Optional[str] = typer.Option(None, help="Use this etcd instead of a private one."),
    detector: str = typer.Option("4dcamera", help="Detector profile."),
    seed: int = typer.Option(0, help="Simulator seed."),
    background_threshold: float = typer.Option(12.0, help="Background threshold."),
    xray_threshold: float = typer.Option(2000.0, help="X-ray threshold."),
    dark_reference: Optional[Path] = typer.Option(None, help=".npy dark reference."),
    gain: Optional[Path] = typer.Option(None, help=".npy gain map."),
    no_counting: bool = typer.Option(False, "--no-counting", help="Stream and assemble only."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the summary here."),
):
    """Run a streaming session (private etcd, local nodes, simulated camera by default)."""
    from rich.console import Console

    console = Console(stderr=True)
    w, h = _parse_scan(scan) if replay is None else (None, None)
    _prefect_defaults()
    from .progress import console_progress
    from .flows import streaming_session

    try:
        with console_progress(console):
            summary = streaming_session(
                scan_width=w, scan_height=h, detector=detector, nodes=nodes,
                workers_per_node=workers_per_node, source="replay" if replay else "simulated",
                replay_dir=str(replay) if replay else None, seed=seed, output_dir=str(output),
                counting=not no_counting, background_threshold=background_threshold,
                xray_threshold=xray_threshold,
                dark_reference=str(dark_reference) if dark_reference else None,
                gain=str(gain) if gain else None, etcd_url=etcd)
    except Exception as err:
        console.print(f"[bold red]session failed:[/] {err}")
        raise typer.Exit(1)
    _print_summary(console, summary)
    if json_out:
        json_out.write_text(json.dumps(summary, indent=2))


def _print_summary(console, summary: dict) -> None:
    from rich.table import Table

    table = Table(title=f"detstream session {summary['session_id']} ({summary['workflow']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("frames_expected", "frames_received", "frames_missing", "events", "bytes_moved",
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
