"""The run summary as JSON, and the conversion to plain JSON values (numpy scalars and arrays,
paths, sets) that the summary, part metadata and HDF5 attributes share."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_atomically
from .disk import DiskEstimate


def jsonable(obj: Any) -> Any:
    """Plain JSON types from numpy scalars/arrays, paths, sets, dataclass-free containers;
    non-finite floats become None so the output is strict JSON."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [jsonable(v) for v in items]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (str, int)) or obj is None:
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    if isinstance(obj, (DiskEstimate,)):
        return {"center": list(obj.center), "radius": obj.radius}
    raise TypeError(f"cannot store {type(obj).__name__} in JSON: {obj!r}")


def write_summary(
    path: str | os.PathLike, summary: Mapping[str, Any], *, overwrite: bool = True
) -> Path:
    """Write a run summary as indented JSON (numpy values converted), atomically."""
    text = json.dumps(jsonable(summary), indent=2, sort_keys=False, allow_nan=False) + "\n"
    return write_atomically(path, text, overwrite=overwrite)
