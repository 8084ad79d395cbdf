"""Parameters shared by the session flows, declared once, and the spec, etcd and backend they make.

The types are also the deployment's run form: a description each (Doc), union members titled,
blocks picked by name.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Literal, Optional, Union

from pydantic import Field, WithJsonSchema
from pydantic.fields import FieldInfo
from pydantic.json_schema import SkipJsonSchema

from detstream.backends.local import LocalBackend
from detstream.blocks import DetectorProfile, EtcdCoordinator, NerscCompute, SfapiCredentials, SlurmCompute
from detstream.config import DEFAULT_PREFIX, MAX_SCAN_SIDE
from detstream.profile import PROFILES, get_profile
from detstream.session import make_spec


def Doc(description: str, **constraints) -> FieldInfo:  # noqa: N802 (reads like Field)
    """A pydantic Field whose description reaches Prefect's parameter schema (which sets its own, None)."""
    return Field(description=description, json_schema_extra={"description": description}, **constraints)


def _titled_none(title: str):
    """``None`` as a union member the form labels ``title`` (e.g. "generated", "private etcd")."""
    return Annotated[None, WithJsonSchema({"type": "null", "title": title})]


class _ByReference:
    """Lets the form give a saved block as ``{"$ref": ...}``: Prefect wants exactly one of the block's fields
    or a reference to match, and a block whose fields all have defaults matched both, so here they are required."""

    def __get_pydantic_json_schema__(self, core_schema, handler):
        schema = handler(core_schema)
        definition = handler.resolve_ref_schema(schema)
        definition["required"] = list(definition.get("properties", {}))
        return schema


def _saved(block: type, title: str = "saved block"):
    """A block type as a union member: the form offers the saved blocks of that type."""
    return Annotated[block, Field(title=title), _ByReference()]


Positions = Annotated[int, Field(gt=0, le=MAX_SCAN_SIDE, title="positions")]
ScanSide = Annotated[Union[Positions, _titled_none("from the replay files")], Doc(
    "Scan positions along this axis. For source=replay, 'from the replay files' reads it from the files.")]
# The detector: a built-in profile picked from a list, or a saved DetectorProfile block picked
# from the saved ones. Code may also pass a saved block's name (not offered by the form).
BuiltinDetector = Annotated[Literal[tuple(PROFILES)], Field(title="built-in profile")]
Detector = Annotated[Union[BuiltinDetector, _saved(DetectorProfile, "saved DetectorProfile block"),
                           SkipJsonSchema[str]], Doc(
    f"Detector profile: a built-in one ({', '.join(PROFILES)}) or a saved DetectorProfile "
    "block. One session per detector at a time.")]
Nodes = Annotated[int, Doc("Compute nodes (one distributor each).", gt=0)]
Workers = Annotated[int, Doc("Counting processes per node.", gt=0)]
Source = Annotated[Literal["simulated", "replay"], Doc(
    "Where the frames come from: the simulated camera, or raw v5 files replayed (replay_dir).")]
ReplayDir = Annotated[Union[Annotated[str, Field(title="folder")], _titled_none("none")], Doc(
    "Folder of raw v5 files, for source=replay.")]
Seed = Annotated[int, Doc("Simulator seed.")]
OutputDir = Annotated[str, Doc(
    "Each session writes into output_dir/<session id>. A relative path is relative to the flow "
    "run's working directory (a process worker's is temporary): give an absolute path.")]
FrameRate = Annotated[Union[Annotated[float, Field(title="frames/s", gt=0)], _titled_none("as fast as taken")], Doc(
    "Frames per second the producers send at, as the camera acquires (the 4D Camera: 87000); "
    "'as fast as taken': as fast as the data plane takes them.")]
Counting = Annotated[bool, Doc("Count electrons (off: move and assemble frames only).")]
Background = Annotated[float, Doc("Background threshold, ADU after dark subtraction.")]
Xray = Annotated[float, Doc("X-ray threshold, ADU.")]
NpyPath = Annotated[Union[Annotated[str, Field(title=".npy path")], _titled_none("none")], Doc(
    "Path to a .npy map of the frame's shape.")]
LiveImages = Annotated[bool, Doc(
    "Live virtual images: the nodes publish bright field, dark field and centre of mass as they count; "
    "live.png in the session "
    "folder and a live artifact follow the scan.")]
LiveInterval = Annotated[float, Doc(
    "Seconds between redraws of the live images (the nodes publish twice as often).", gt=0)]
Disk = Annotated[Union[Annotated[list[float], Field(title="row, col, radius", min_length=3, max_length=3)],
                       _titled_none("found in the pattern")], Doc(
    "The bright-field disk for the virtual images: centre row, centre column and radius in detector "
    "pixels. 'found in the pattern': located in the summed diffraction pattern.")]
BACKENDS = ("local", "sfapi", "slurm")
BackendName = Annotated[Literal[BACKENDS], Doc(
    "Where the nodes come from: this machine (local), NERSC through the Superfacility API (sfapi), "
    "or a Slurm cluster through sbatch (slurm).")]
Credentials = Annotated[Union[_saved(SfapiCredentials), _titled_none("none")], Doc(
    "SFAPI client credentials, for backend=sfapi.")]
Compute = Annotated[Union[_saved(NerscCompute), _titled_none("defaults")], Doc(
    "The batch job for backend=sfapi; 'defaults': exclusive realtime CPU nodes on Perlmutter, 30 minutes.")]
SlurmComputeBlock = Annotated[Union[_saved(SlurmCompute), _titled_none("defaults")], Doc(
    "The Slurm cluster and batch job for backend=slurm; 'defaults': the site's SLURM_CONF, default QOS "
    "and partition, 30 minutes, `detstream` from PATH on the nodes.")]
Etcd = Annotated[Union[_saved(EtcdCoordinator), _titled_none("etcd_url or private")], Doc(
    "etcd endpoints, key prefix and login. 'etcd_url or private' uses etcd_url and etcd_prefix, "
    "or without a URL starts an etcd for the session.")]
EtcdUrl = Annotated[Union[Annotated[str, Field(title="URL")], _titled_none("private etcd")], Doc(
    "etcd endpoint without login, e.g. http://etcd.example.org:2379, if no etcd block is given; "
    "'private etcd' starts one for the session.")]
EtcdPrefix = Annotated[str, Doc("etcd key prefix, with etcd_url or a private etcd (a block has its own).")]
ReserveTimeout = Annotated[float, Doc(
    "Seconds to wait for the nodes (a batch job to start, for backend=sfapi).", gt=0)]
RegisterTimeout = Annotated[float, Doc("Seconds for every service to register in etcd once started.", gt=0)]
StallTimeout = Annotated[float, Doc(
    "Seconds without a new frame, once data flows, before the session fails as stalled.", gt=0)]
Overwrite = Annotated[bool, Doc("Replace an existing output of the same session id.")]
Security = Annotated[Literal["auto", "curve", "none"], Doc(
    "CURVE on the ZeroMQ hops: auto = wherever a socket listens beyond loopback or ipc; curve = always; "
    "none = never.")]
SessionId = Annotated[Union[Annotated[str, Field(title="id")], _titled_none("generated")], Doc(
    "Session id (generated if empty).")]


def _shared(
    scan_width: ScanSide = 32,
    scan_height: ScanSide = 32,
    detector: Detector = "4dcamera",
    nodes: Nodes = 2,
    workers_per_node: Workers = 1,
    source: Source = "simulated",
    replay_dir: ReplayDir = None,
    seed: Seed = 0,
    frame_rate: FrameRate = None,
    output_dir: OutputDir = "runs",
    counting: Counting = True,
    background_threshold: Background = 12.0,
    xray_threshold: Xray = 2000.0,
    dark_reference: NpyPath = None,
    gain: NpyPath = None,
    live_images: LiveImages = True,
    live_interval_s: LiveInterval = 2.0,
    bright_field_disk: Disk = None,
    backend: BackendName = "local",
    sfapi_credentials: Credentials = None,
    nersc_compute: Compute = None,
    slurm_compute: SlurmComputeBlock = None,
    etcd: Etcd = None,
    etcd_url: EtcdUrl = None,
    etcd_prefix: EtcdPrefix = DEFAULT_PREFIX,
    reserve_timeout_s: ReserveTimeout = 300.0,
    register_timeout_s: RegisterTimeout = 60.0,
    stall_timeout_s: StallTimeout = 30.0,
    security: Security = "auto",
    session_id: SessionId = None,
    overwrite: Overwrite = False,
) -> None:
    """The parameters every session flow takes, in the form's order (a signature, never called)."""


SHARED = inspect.signature(_shared, eval_str=True)


def shared_parameters(*, after: Optional[str] = None, only: Optional[tuple[str, ...]] = None, **defaults):
    """Decorator: a flow function with its own keyword-only parameters (placed after ``after``) also takes the
    shared ones (``only`` these, other ``defaults``) in ``**params``; Prefect reads the combined signature."""
    unknown = (set(defaults) | set(only or ()) | {after} - {None}) - set(SHARED.parameters)
    if unknown:
        raise TypeError(f"not shared session parameters: {sorted(unknown)}")

    def decorate(fn):
        own = inspect.signature(fn, eval_str=True)
        shared = [p.replace(kind=p.KEYWORD_ONLY, default=defaults.get(p.name, p.default))
                  for p in SHARED.parameters.values() if only is None or p.name in only]
        mine = [p for p in own.parameters.values() if p.kind is p.KEYWORD_ONLY]
        at = [p.name for p in shared].index(after) + 1 if after else len(shared)
        fn.__signature__ = own.replace(parameters=[*shared[:at], *mine, *shared[at:]])
        return fn
    return decorate


def parameter_schema(flow):
    """The run form's schema: Prefect's own, which reads the shared declaration (as ``prefect deploy`` does)."""
    from prefect.utilities.callables import parameter_schema as prefect_schema

    return prefect_schema(flow)


def resolve_profile(detector):
    """A DetectorProfile block's profile, a built-in profile by name, else a saved block of that name."""
    if isinstance(detector, DetectorProfile):
        return detector.to_profile()
    if detector in PROFILES:
        return get_profile(detector)
    try:
        return DetectorProfile.load(detector).to_profile()
    except ValueError:
        get_profile(detector)  # raises, listing the built-in names
        raise


def etcd_of(p: dict) -> EtcdCoordinator:
    """The flow's etcd: its ``etcd`` block, else one for ``etcd_url`` (none: private) and ``etcd_prefix``."""
    if p.get("etcd") is not None:
        if p.get("etcd_url"):
            raise ValueError("give etcd (a block) or etcd_url, not both")
        return p["etcd"]
    return EtcdCoordinator(endpoints=[p["etcd_url"]] if p.get("etcd_url") else [],
                           prefix=p.get("etcd_prefix") or DEFAULT_PREFIX)


def running_etcd(etcd: EtcdCoordinator, endpoint: str) -> EtcdCoordinator:
    """The etcd block to hand a sub-flow: a private etcd named by the endpoint it was started on."""
    return etcd if etcd.endpoints else etcd.model_copy(update={"endpoints": [endpoint]})


def spec_from(p: dict, etcd: EtcdCoordinator, **fields):
    """The SessionSpec for a flow's parameters and a flow's own ``fields`` (validated before anything starts)."""
    return make_spec(
        scan_width=p["scan_width"], scan_height=p["scan_height"], profile=resolve_profile(p["detector"]),
        source=p["source"], replay_dir=p["replay_dir"], output_dir=p["output_dir"],
        session_id=p["session_id"],
        counting={"enabled": p["counting"], "background_threshold": p["background_threshold"],
                  "xray_threshold": p["xray_threshold"], "dark_reference": p["dark_reference"],
                  "gain": p["gain"]},
        virtual=virtual_of(p),
        seed=p["seed"], frame_rate_hz=p.get("frame_rate"), nodes=p["nodes"], workers_per_node=p["workers_per_node"],
        etcd_prefix=etcd.prefix, register_timeout_s=p["register_timeout_s"],
        stall_timeout_s=p["stall_timeout_s"], security=p["security"], **fields)


def virtual_of(p: dict) -> dict:
    """The spec's VirtualImaging from the flow's live-image and disk parameters."""
    disk = p.get("bright_field_disk")
    interval = p.get("live_interval_s", 2.0)
    return {"live": p.get("live_images", True), "redraw_s": interval, "publish_s": interval / 2,
            "center": tuple(disk[:2]) if disk else None, "bf_radius": disk[2] if disk else None}


def make_backend(p: dict, session_dir, service_env: dict[str, str]):
    """The compute backend a flow asked for; local nodes get the etcd login in ``service_env``
    (a batch job's nodes read it from the session's 0600 node.env instead)."""
    from prefect import get_run_logger

    if p["backend"] == "local":
        return LocalBackend(log_dir=session_dir / "logs", env=service_env)
    if p["backend"] not in BACKENDS:
        raise ValueError(f"unknown backend {p['backend']!r}; known: {', '.join(BACKENDS)}")
    if p["backend"] == "sfapi" and p.get("sfapi_credentials") is None:
        raise ValueError("backend 'sfapi' needs sfapi_credentials (an SfapiCredentials block)")
    if p["backend"] == "slurm":
        from detstream.backends.slurm import SlurmBackend

        slurm = p.get("slurm_compute") or SlurmCompute()
        return SlurmBackend(slurm.settings(), slurm.job_settings(), work_dir=session_dir / "logs",
                            logger=get_run_logger())
    from detstream.backends.sfapi import SfapiBackend

    compute = p.get("nersc_compute") or NerscCompute()
    return SfapiBackend(p["sfapi_credentials"].settings(), compute.job_settings(), logger=get_run_logger())
