"""The core ``detstream`` commands: start one service (as a batch job does on a node), or salvage
a session after the fact. No Prefect here: flows/cli.py adds ``run``, ``compare``, ``deploy`` and
``render-job`` to the one ``detstream`` command.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from .config import DEFAULT_PREFIX, MAX_SCAN_SIDE

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Stream detector frames into compute-node memory and count electrons on the fly.")

def _parse_scan(scan: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in scan.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"scan {scan!r} is not WIDTHxHEIGHT, e.g. 32x32") from None
    if not (0 < w <= MAX_SCAN_SIDE and 0 < h <= MAX_SCAN_SIDE):
        raise typer.BadParameter(f"scan {scan!r}: each side must be 1 to {MAX_SCAN_SIDE} positions "
                                 "(the wire header carries them as 16-bit numbers)")
    return w, h


def _service_logging(role: str) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {role}[%(process)d] %(levelname)s %(name)s: %(message)s")


def _coordinator(etcd: str, prefix: str):
    """The service's Coordinator; its etcd login comes from the environment (config.ETCD_*_ENV)."""
    from .config import etcd_login_from_env
    from .coordination import Coordinator

    return Coordinator(etcd, prefix=prefix, **etcd_login_from_env())


def _serve(role: str, fn) -> None:
    _service_logging(role)
    # A service stopped from outside leaves every thread's stack in its log: why it was still there.
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    try:
        fn()
    except Exception as err:
        logging.getLogger("detstream").error("%s failed: %s", role, err, exc_info=True)
        raise typer.Exit(1) from None


_session_opt = typer.Option(..., "--session", help="Session id.")
_etcd_opt = typer.Option(..., "--etcd", help="etcd endpoint, e.g. http://127.0.0.1:2379.")
_prefix_opt = typer.Option(DEFAULT_PREFIX, "--prefix", help="etcd key prefix.")


@app.command()
def producer(session: str = _session_opt, etcd: str = _etcd_opt, prefix: str = _prefix_opt,
             sector: int = typer.Option(..., help="Sector (receiver module) this producer sends.")):
    """Send one sector of the session's scan to the aggregator."""
    from .services.serve import serve_producer

    _serve(f"producer-{sector}", lambda: serve_producer(_coordinator(etcd, prefix), session, sector))


@app.command()
def aggregator(session: str = _session_opt, etcd: str = _etcd_opt, prefix: str = _prefix_opt,
               bind_host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
               advertise_host: Optional[str] = typer.Option(None, help="Host name the producers use."),
               shard: int = typer.Option(0, help="This aggregator's shard (0..aggregators-1): it routes "
                                         "that share of the sectors.")):
    """Route every sector (or the shard's share) to the node that owns its frame."""
    from .services import heap
    from .services.serve import serve_aggregator

    heap.keep_freed_buffers()  # first: before a thread of this process (etcd's) takes a malloc arena of its own
    _serve(f"aggregator-{shard}", lambda: serve_aggregator(_coordinator(etcd, prefix), session, bind_host,
                                                            advertise_host, shard))


@app.command()
def distributor(session: str = _session_opt, etcd: str = _etcd_opt, prefix: str = _prefix_opt,
                node_index: Optional[int] = typer.Option(
                    None, help="This node's index; default $SLURM_PROCID (srun), else 0."),
                bind_host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 on a node)."),
                advertise_host: Optional[str] = typer.Option(None, help="Host name the aggregator uses.")):
    """Assemble, count and write this node's share of the scan (one per compute node)."""
    from .services import heap
    from .services.serve import serve_distributor

    heap.keep_freed_buffers()  # first: before a thread of this process (etcd's) takes a malloc arena of its own
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


@app.command()
def merge(session_dir: Path = typer.Argument(..., help="The session's folder (holds spec.json and parts/)."),
          spec: Optional[Path] = typer.Option(None, help="The session's spec; default SESSION_DIR/spec.json."),
          result: Optional[Path] = typer.Option(None, help="Where to write the result as JSON; default "
                                                "SESSION_DIR/merge.json."),
          overwrite: bool = typer.Option(False, help="Replace an existing counted.h5.")):
    """Merge a session's durable parts into counted.h5 and its figures, in this process only; the
    result (or the error: a full disk names the file, the bytes needed and free) goes to --result."""
    import json

    from .atomic import write_atomically
    from .results import merge_error, merge_session

    _service_logging("merge")
    faulthandler.enable()  # a crash inside HDF5 leaves its stack in the log
    out = result or session_dir / "merge.json"
    try:
        outcome = merge_session(session_dir, spec, overwrite=overwrite)
    except Exception as err:
        logging.getLogger("detstream").error("merge of %s failed: %s", session_dir, err)
        outcome = merge_error(err)
    try:
        write_atomically(out, json.dumps(outcome))
    except OSError as err:
        typer.echo(f"cannot write the merge's result {out}: {err}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(0 if outcome["ok"] else 1)


@app.command()
def salvage(session_dir: Path = typer.Argument(..., help="The session's folder (holds spec.json)."),
            etcd: Optional[str] = typer.Option(None, help="etcd to mark the session abandoned in, if reachable."),
            prefix: str = _prefix_opt):
    """Merge a session's durable parts after the fact (its orchestrator died) and write its account."""
    from .salvage import salvage_session
    from .states import EXIT_CODES, SessionState

    _service_logging("salvage")
    coord = _coordinator(etcd, prefix) if etcd else None
    try:
        summary = salvage_session(session_dir, coord)
    except (FileNotFoundError, ValueError, OSError) as err:
        typer.echo(f"cannot salvage {session_dir}: {err}", err=True)
        raise typer.Exit(EXIT_CODES[SessionState.FAILED]) from None
    typer.echo(f"session {summary['session_id']} {summary['state']}: {summary['frames_counted']}/"
               f"{summary['frames_expected']} frames counted into {summary['outputs']['hdf5']}; "
               f"{summary['frames_missing']} missing, listed in {summary['outputs']['summary']}")
    raise typer.Exit(EXIT_CODES[SessionState.ABANDONED])
