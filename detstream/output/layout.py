"""stempy's HDF5 layout for counted data (what ``stempy.io.load_electron_counts`` and py4DSTEM
open), and ``write_counts``, which writes a whole scan's counts in it."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..atomic import io_error
from .frames import as_events, check_frame_shape, scan_size
from .hdf5 import counts_bound, h5_output
from .summary import jsonable

STEMPY_FORMAT_VERSION = 3
_VLEN_U32 = h5py.vlen_dtype(np.uint32)
WRITE_BLOCK = 4096  # scan positions per HDF5 write when writing a whole dataset


def vlen_block(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """``arrays`` as one 1-D vlen uint32 array, ready for a frames dataset."""
    # Built element by element: numpy would turn equal-length arrays into a 2-D array, which
    # h5py's __setitem__ then refuses to write into a 1-D vlen dataset.
    block = np.empty(len(arrays), dtype=_VLEN_U32)
    for i, a in enumerate(arrays):
        block[i] = a
    return block


def _write_vlen_slice(dset: h5py.Dataset, start: int, block: np.ndarray) -> None:
    dset.write_direct(block, dest_sel=np.s_[start : start + len(block)])


def write_vlen_points(dset: h5py.Dataset, points: np.ndarray, block: np.ndarray) -> None:
    """Write ``block[i]`` to element ``points[i]`` in any order, in one HDF5 call."""
    fspace = dset.id.get_space()
    fspace.select_elements(np.asarray(points, dtype=np.uint64).reshape(-1, 1))
    mspace = h5py.h5s.create_simple((len(block),))
    dset.id.write(mspace, fspace, block, mtype=h5py.h5t.py_create(_VLEN_U32))


def _attr_value(value: Any) -> Any:
    """A value HDF5 attributes can hold; anything else is stored as its JSON text."""
    if isinstance(value, (str, bytes, bool, int, float, np.generic)):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return value
    if isinstance(value, (list, tuple)) and value and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        return np.asarray(value)
    return json.dumps(jsonable(value))


def _save_attrs(group: h5py.Group, d: Mapping[str, Any]) -> None:
    """Store a dict as stempy does: attributes, with nested dicts as subgroups."""
    for k, v in d.items():
        if isinstance(v, Mapping):
            _save_attrs(group.require_group(str(k)), v)
        else:
            group.attrs[str(k)] = _attr_value(v)


def create_counts_layout(
    f: h5py.File,
    scan_width: int,
    scan_height: int,
    frame_shape: tuple[int, int],
    attrs: Mapping[str, Any] | None,
) -> h5py.Dataset:
    """Create stempy's groups, datasets and attributes; return the (unwritten) frames dataset.

    The layout (format version 3):

    * root attribute ``version`` = 3;
    * ``electron_events/frames``: 1-D vlen uint32, one entry per scan position, each the flat
      pixel indices (``row * frame_cols + col``) of that frame's events; attributes
      ``Nx`` = frame **rows**, ``Ny`` = frame **cols** (stempy reads ``frame_shape = (Nx, Ny)``
      and reshapes frames with it, so for a non-square detector Nx is the height);
    * ``electron_events/scan_positions``: int64 ``arange(width * height)``; attributes
      ``Nx`` = scan **width**, ``Ny`` = scan **height** (stempy reverses them into
      ``scan_shape = (height, width)``); position index = ``y * width + x``;
    * ``metadata`` group: user attributes (nested dicts become subgroups), loaded by stempy into
      ``SparseArray.metadata``.
    """
    n = int(scan_width) * int(scan_height)
    f.attrs["version"] = np.int64(STEMPY_FORMAT_VERSION)
    group = f.create_group("electron_events")
    positions = group.create_dataset("scan_positions", data=np.arange(n, dtype=np.int64))
    positions.attrs["Nx"] = np.int64(scan_width)
    positions.attrs["Ny"] = np.int64(scan_height)
    frames = group.create_dataset("frames", (n,), dtype=_VLEN_U32)
    frames.attrs["Nx"] = np.int64(frame_shape[0])
    frames.attrs["Ny"] = np.int64(frame_shape[1])
    _save_attrs(f.create_group("metadata"), attrs or {})
    return frames


def write_stem_images(f: h5py.File, images: np.ndarray, names: Sequence[str],
                      attrs: Mapping[str, Any] | None = None) -> h5py.Dataset:
    """stempy's ``stem/images``: a stack ``(n_images, scan_height, scan_width)`` of unsigned
    integer or floating-point images (one dtype for the stack: counts beside a centre of mass make
    it float64, which holds whole counts exactly) with attribute ``names`` (as
    ``stempy.io.save_stem_images`` writes it)."""
    images = np.asarray(images)
    if images.ndim != 3 or len(images) != len(names) or images.dtype.kind not in "uf":
        raise ValueError(f"stem images must be (n, height, width) unsigned ints or floats with n names, got "
                         f"{images.dtype} {images.shape} and {len(names)} names")
    dset = f.require_group("stem").create_dataset("images", data=images)
    dset.attrs["names"] = [str(n) for n in names]
    for k, v in (attrs or {}).items():
        dset.attrs[str(k)] = _attr_value(v)
    return dset


def write_summed_pattern(f: h5py.File, pattern: np.ndarray) -> h5py.Dataset:
    """``summed_pattern``: every counted frame's events added up, frame-shaped, uint64 (not part of
    stempy's layout; stempy's loader ignores it)."""
    dset = f.create_dataset("summed_pattern", data=np.asarray(pattern, np.uint64))
    dset.attrs["description"] = "sum of the counted events of every scan position, per detector pixel"
    return dset


def write_counts(
    path: str | os.PathLike,
    events_by_position: Sequence[np.ndarray],
    scan_width: int,
    scan_height: int,
    frame_shape: Sequence[int],
    attrs: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write counted data (one events array per position, index ``y * width + x``) as a stempy
    file; it appears under ``path`` only when complete. Returns the path."""
    frame_shape = check_frame_shape(frame_shape)
    n = scan_size(scan_width, scan_height)
    if len(events_by_position) != n:
        raise ValueError(
            f"{len(events_by_position)} event arrays for a {scan_width}x{scan_height} scan "
            f"({n} positions)"
        )
    n_pixels = frame_shape[0] * frame_shape[1]
    out = Path(path)
    bound = counts_bound(n, frame_shape, np.array([len(e) for e in events_by_position], np.int64),
                         len(json.dumps(jsonable(dict(attrs or {})))))
    with h5_output(out, overwrite=overwrite, reserve=bound, what="the counted data") as f:
        frames = create_counts_layout(f, scan_width, scan_height, frame_shape, attrs)
        for start in range(0, n, WRITE_BLOCK):
            stop = min(start + WRITE_BLOCK, n)
            block = vlen_block(
                [
                    as_events(events_by_position[i], n_pixels, f"scan position {i}")
                    for i in range(start, stop)
                ]
            )
            try:
                _write_vlen_slice(frames, start, block)
            except (OSError, RuntimeError) as e:
                raise io_error(e, out) from e
    return out

