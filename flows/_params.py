"""Parameters shared by the session flows, and the spec and backend they make.

The types below are also what the Prefect UI renders as a deployment's run form. Two Prefect
details shape them: Prefect builds each parameter's schema field with an explicit
``description`` (from the docstring, else None), which hides the description of an Annotated
``Field``, so :func:`Doc` also puts it in ``json_schema_extra``, which Prefect merges; and a
union renders as a toggle labelled by each member's ``title``, so the members carry titles.
"""

from __future__ import annotations

import typing
from typing import Annotated, Literal, Union

from pydantic import Field, WithJsonSchema
from pydantic.fields import FieldInfo

from detstream.backends.local import LocalBackend
from detstream.profile import PROFILES, get_profile
from detstream.session import make_spec

from .sfapi_backend import SfapiOptions


def Doc(description: str, **constraints) -> FieldInfo:  # noqa: N802 (reads like Field)
    """A pydantic Field whose description reaches Prefect's parameter schema (the UI form)."""
    return Field(description=description, json_schema_extra={"description": description}, **constraints)


def _titled_none(title: str):
    """``None`` as a union member the form labels ``title`` (e.g. "generated", "private etcd")."""
    return Annotated[None, WithJsonSchema({"type": "null", "title": title})]


Positions = Annotated[int, Field(gt=0, le=65535, title="positions")]
ScanSide = Annotated[Union[Positions, _titled_none("from the replay files")], Doc(
    "Scan positions along this axis. For source=replay, 'from the replay files' reads it from the files.")]
# The detector: a built-in profile picked from a list, or the name of a saved DetectorProfile
# block typed in. Both arrive as a str; code may pass any name (resolve_profile looks it up).
BuiltinDetector = Annotated[Literal[tuple(PROFILES)], Field(title="built-in profile")]
SavedDetector = Annotated[str, Field(min_length=1, title="saved DetectorProfile block")]
Detector = Annotated[Union[BuiltinDetector, SavedDetector], Doc(
    f"Detector profile: a built-in one ({', '.join(PROFILES)}) or the name of a saved "
    "DetectorProfile block. One session per detector at a time.")]
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
Counting = Annotated[bool, Doc("Count electrons (off: move and assemble frames only).")]
Background = Annotated[float, Doc("Background threshold, ADU after dark subtraction.")]
Xray = Annotated[float, Doc("X-ray threshold, ADU.")]
NpyPath = Annotated[Union[Annotated[str, Field(title=".npy path")], _titled_none("none")], Doc(
    "Path to a .npy map of the frame's shape.")]
BackendName = Annotated[Literal["local", "sfapi"], Doc(
    "Where the nodes come from: this machine (local), or NERSC through the Superfacility API (sfapi).")]
EtcdUrl = Annotated[Union[Annotated[str, Field(title="URL")], _titled_none("private etcd")], Doc(
    "etcd endpoint, e.g. http://etcd.example.org:2379; 'private etcd' starts one for the session.")]
EtcdPrefix = Annotated[str, Doc("etcd key prefix.")]
Seconds = Annotated[float, Doc("Timeout in seconds.", gt=0)]
Sfapi = Annotated[Union[Annotated[SfapiOptions, Field(title="options")], _titled_none("none")], Doc(
    "Superfacility API options, for backend=sfapi: saved blocks, or a key file and URL.")]
Overwrite = Annotated[bool, Doc("Replace an existing output of the same session id.")]
SessionId = Annotated[Union[Annotated[str, Field(title="id")], _titled_none("generated")], Doc(
    "Session id (generated if empty).")]

# Clearer words for parameters whose shared type says little (Seconds), shown in the UI form.
_DESCRIPTIONS = {
    "reserve_timeout_s": "Seconds to wait for the nodes (a batch job to start, for backend=sfapi).",
    "register_timeout_s": "Seconds for every service to register in etcd once started.",
    "stall_timeout_s": "Seconds without a new frame, once data flows, before the session fails as stalled.",
}


def parameter_schema(flow):
    """Prefect's parameter schema for ``flow``, with a description on every parameter.

    Parameters declared in a flow's signature as ``Annotated[..., Field(description=...)]``
    (not through :func:`Doc`) lose that description in Prefect's schema; it is put back here,
    and the timeouts get words of their own. ``detstream deploy`` registers this schema.
    """
    from prefect.utilities.callables import parameter_schema as prefect_schema

    schema = prefect_schema(flow)
    hints = typing.get_type_hints(flow.fn, include_extras=True)
    for name, prop in schema.properties.items():
        if name in _DESCRIPTIONS:
            prop["description"] = _DESCRIPTIONS[name]
        elif not prop.get("description"):
            for meta in getattr(hints.get(name), "__metadata__", ()):
                if isinstance(meta, FieldInfo) and meta.description:
                    prop["description"] = meta.description
    return schema


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
