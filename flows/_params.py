"""Parameters shared by the session flows, and the spec and backend they make."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field

from detstream.backends.local import LocalBackend
from detstream.profile import PROFILES, get_profile
from detstream.session import make_spec

from .sfapi_backend import SfapiOptions

ScanSide = Annotated[Optional[int], Field(gt=0, le=65535, description="Scan positions along this axis; replay: read from the files if empty.")]
Detector = Annotated[str, Field(description="Detector profile: a built-in name (4dcamera, testcam) or a saved DetectorProfile block.")]
Nodes = Annotated[int, Field(gt=0, description="Compute nodes (one distributor each).")]
Workers = Annotated[int, Field(gt=0, description="Counting processes per node.")]
Source = Annotated[Literal["simulated", "replay"], Field(description="Where the frames come from.")]
ReplayDir = Annotated[Optional[str], Field(description="Folder of raw v5 files, for source=replay.")]
Seed = Annotated[int, Field(description="Simulator seed.")]
OutputDir = Annotated[str, Field(description="Each session writes into output_dir/<session id>.")]
Counting = Annotated[bool, Field(description="Count electrons (off: move and assemble frames only).")]
Background = Annotated[float, Field(description="Background threshold, ADU after dark subtraction.")]
Xray = Annotated[float, Field(description="X-ray threshold, ADU.")]
NpyPath = Annotated[Optional[str], Field(description="Path to a .npy map of the frame's shape.")]
BackendName = Annotated[Literal["local", "sfapi"], Field(description="Where the nodes come from: this machine, or NERSC through the Superfacility API.")]
EtcdUrl = Annotated[Optional[str], Field(description="etcd endpoint; empty starts a private etcd for the session.")]
EtcdPrefix = Annotated[str, Field(description="etcd key prefix.")]
Seconds = Annotated[float, Field(gt=0, description="Seconds.")]
Sfapi = Annotated[Optional[SfapiOptions], Field(description="Superfacility API options, for backend=sfapi: saved blocks, or a key file and URL.")]
SessionId = Annotated[Optional[str], Field(description="Session id (generated if empty).")]


def resolve_profile(detector: str):
    """A built-in profile by name, else a saved DetectorProfile block of that name."""
    if detector in PROFILES:
        return get_profile(detector)
    from detstream.blocks import DetectorProfile

    try:
        return DetectorProfile.load(detector).to_profile()
    except ValueError:
        get_profile(detector)  # raises, listing the built-in names
        raise


def spec_from(p: dict):
    """The SessionSpec for a flow's parameters (validated before anything starts)."""
    return make_spec(
        scan_width=p["scan_width"], scan_height=p["scan_height"], profile=resolve_profile(p["detector"]),
        source=p["source"], replay_dir=p["replay_dir"], output_dir=p["output_dir"],
        session_id=p["session_id"],
        counting={"enabled": p["counting"], "background_threshold": p["background_threshold"],
                  "xray_threshold": p["xray_threshold"], "dark_reference": p["dark_reference"],
                  "gain": p["gain"]},
        seed=p["seed"], nodes=p["nodes"], workers_per_node=p["workers_per_node"],
        etcd_prefix=p["etcd_prefix"], register_timeout_s=p["register_timeout_s"],
        stall_timeout_s=p["stall_timeout_s"])


def make_backend(name: str, session_dir, sfapi=None):
    """The compute backend a flow asked for."""
    if name == "local":
        return LocalBackend(log_dir=session_dir / "logs")
    if name == "sfapi":
        from prefect import get_run_logger

        from .sfapi_backend import sfapi_backend

        return sfapi_backend(sfapi, logger=get_run_logger())
    raise ValueError(f"unknown backend {name!r}; known: local, sfapi")
