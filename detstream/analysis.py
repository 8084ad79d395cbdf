"""The hand-off to py4DSTEM: a session's counted result as a ``py4DSTEM.DataCube``.

py4DSTEM has no reader for stempy's sparse layout, so :func:`open_datacube` makes the dense
cube itself, binning the detector on the way: with ``bin`` > 1 only the binned cube is ever
allocated. py4DSTEM (the ``analysis`` extra) is imported only here, only when called.

    import detstream.analysis as dsa
    dc = dsa.open_datacube("runs/<session id>", bin=4)
    bf = dc.get_virtual_image(mode="circle", geometry=dsa.py4dstem_geometry(dc)["bright_field"])
    dpc = dsa.dpc("runs/<session id>").reconstruct()  # DPC from the nodes' centre of mass
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import h5py
import numpy as np

from .output.virtual import COM_NAMES, IMAGE_NAMES, VirtualDetectors

# py4DSTEM's masks leave out pixels exactly on their edge (r < R, r > R_inner); ours keep them
# (r <= R). Radii widened by this relative amount select the same pixels in py4DSTEM.
_EDGE = 1e-9
_POSITIONS_PER_BLOCK = 256


def counted_file(path: str | os.PathLike) -> Path:
    """counted.h5 of a session folder, or ``path`` itself if it is a file."""
    from .session_dir import SessionDir

    p = Path(path)
    f = p if p.is_file() else SessionDir(p).counts
    if not f.is_file():
        raise FileNotFoundError(f"no counted result at {f} (give a session folder or its counted.h5)")
    return f


def _shapes(f: h5py.File, path: Path) -> tuple[tuple[int, int], tuple[int, int]]:
    try:
        frames, positions = f["electron_events/frames"], f["electron_events/scan_positions"]
        frame = (int(frames.attrs["Nx"]), int(frames.attrs["Ny"]))
        scan = (int(positions.attrs["Ny"]), int(positions.attrs["Nx"]))  # (height, width)
    except KeyError as err:
        raise ValueError(f"{path} is not in stempy's counted layout (missing {err})") from None
    return scan, frame


def binned_counts(path: str | os.PathLike, bin: int = 1, dtype: Any = np.uint16) -> np.ndarray:
    """The counted scan as a dense ``(scan_height, scan_width, rows // bin, cols // bin)`` array of
    events per (binned) detector pixel; edge rows and columns that do not fill a bin are dropped,
    as py4DSTEM's ``bin_Q`` does. Built a block of positions at a time, binned as it is filled."""
    b = int(bin)
    if b < 1:
        raise ValueError(f"bin must be a positive integer, got {bin!r}")
    path = counted_file(path)
    with h5py.File(path, "r") as f:
        (height, width), (rows, cols) = _shapes(f, path)
        brows, bcols = rows // b, cols // b
        if brows == 0 or bcols == 0:
            raise ValueError(f"bin {b} is larger than the {rows}x{cols} frame")
        nb = brows * bcols
        n = height * width
        out = np.zeros((n, nb), dtype=dtype)
        frames = f["electron_events/frames"]
        for start in range(0, n, _POSITIONS_PER_BLOCK):
            block = frames[start: start + _POSITIONS_PER_BLOCK]
            lengths = np.fromiter((len(e) for e in block), np.int64, len(block))
            flat = np.concatenate(list(block)).astype(np.int64) if lengths.sum() else np.zeros(0, np.int64)
            r, c = np.divmod(flat, cols)
            keep = (r < brows * b) & (c < bcols * b)
            which = np.repeat(np.arange(len(block)), lengths)[keep]
            idx = (start + which) * nb + (r[keep] // b) * bcols + c[keep] // b
            np.add.at(out.reshape(-1), idx, 1)  # in place: no temporary the size of the block
    return out.reshape(height, width, brows, bcols)


def stored_detectors(path: str | os.PathLike) -> Optional[VirtualDetectors]:
    """The virtual detectors the session's ``stem/images`` were made with, if it has them."""
    with h5py.File(counted_file(path), "r") as f:
        if "stem/images" not in f:
            return None
        a = f["stem/images"].attrs
        return VirtualDetectors.from_dict({k: a[k] for k in ("center", "bf_radius", "adf_inner", "adf_outer")})


def stem_images(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The session's ``stem/images`` by name: {"bright_field": ..., "annular_dark_field": ...,
    "com_x": ..., "com_y": ...} (the centre of mass in detector pixels from the disk centre, x
    along frame columns, y along frame rows)."""
    with h5py.File(counted_file(path), "r") as f:
        images = f["stem/images"]
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in images.attrs["names"]]
        return {name: images[i] for i, name in enumerate(names)}


def py4dstem_geometry(detectors: Any, bin: int = 1) -> dict[str, tuple]:
    """``get_virtual_image`` geometries (modes "circle" and "annular") that select the same pixels
    as detstream's detectors, on a detector binned ``bin`` x ``bin``. ``detectors`` is a
    VirtualDetectors, or a DataCube from :func:`open_datacube` (its own detectors and bin)."""
    if not isinstance(detectors, VirtualDetectors):
        md = detectors.metadata["detstream"]
        bin, detectors = int(md["bin"]), VirtualDetectors.from_dict(md["virtual_detectors"])
    b = float(bin)
    # A binned pixel i covers pixels b*i .. b*i + b - 1: its centre is at b*i + (b - 1) / 2.
    qx, qy = ((detectors.center[k] - (b - 1) / 2) / b for k in (0, 1))
    return {
        IMAGE_NAMES[0]: ((qx, qy), detectors.bf_radius / b * (1 + _EDGE)),
        IMAGE_NAMES[1]: ((qx, qy), (detectors.adf_inner / b * (1 - _EDGE), detectors.adf_outer / b * (1 + _EDGE))),
    }


def py4dstem_com(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The session's centre of mass in py4DSTEM's terms, ``(com_qx, com_qy)``: py4DSTEM's Qx is the
    detector's first axis (frame rows, our ``com_y``), Qy its second (frame columns, ``com_x``)."""
    images = stem_images(path)
    missing = [n for n in COM_NAMES if n not in images]
    if missing:
        raise ValueError(f"{counted_file(path)} has no centre of mass in stem/images (missing {missing})")
    return images["com_y"], images["com_x"]


def dpc(session: str | os.PathLike, energy: float = 300e3, **preprocess: Any):
    """A py4DSTEM DPC reconstruction of the session fed with the centre of mass the nodes took from
    the counted events (``force_com_measured``; no dense cube is built), preprocessed and ready for
    ``.reconstruct()``. ``preprocess`` goes to ``DPC.preprocess`` (defaults here: no plots, the scan
    and detector axes taken as aligned; pass ``force_com_rotation=None`` to let py4DSTEM fit them)."""
    try:
        from py4DSTEM.process.phase import DPC
    except ImportError as err:
        raise ImportError("dpc needs py4DSTEM: pip install 'detstream[analysis]'") from err

    options = {"plot_center_of_mass": False, "plot_rotation": False, "force_com_rotation": 0.0,
               "force_com_transpose": False, **preprocess}
    reconstruction = DPC(energy=energy, verbose=False)
    return reconstruction.preprocess(force_com_measured=py4dstem_com(session), **options)


def open_datacube(session: str | os.PathLike, bin: int = 1, dtype: Any = np.uint16):
    """A session's counted result (its folder, or counted.h5) as a ``py4DSTEM.DataCube`` of
    events per detector pixel, the detector binned ``bin`` x ``bin`` on the way.

    Calibration: real space in scan positions (R pixel size 1), diffraction space in detector
    pixels (Q pixel size ``bin``); metadata "detstream" holds the file, scan and frame shapes,
    the bin, and the virtual detectors of ``stem/images`` (see :func:`py4dstem_geometry`).
    """
    try:
        import py4DSTEM
        from emdfile import Metadata
    except ImportError as err:
        raise ImportError("open_datacube needs py4DSTEM: pip install 'detstream[analysis]'") from err

    path = counted_file(session)
    data = binned_counts(path, bin, dtype)
    with h5py.File(path, "r") as f:
        scan, frame = _shapes(f, path)
    dc = py4DSTEM.DataCube(data=data, name=path.parent.name, calibration=py4DSTEM.Calibration())
    dc.calibration.set_R_pixel_size(1)
    dc.calibration.set_R_pixel_units("pixels")
    dc.calibration.set_Q_pixel_size(int(bin))
    dc.calibration.set_Q_pixel_units("pixels")
    md = Metadata(name="detstream")
    md["file"] = str(path)
    md["scan_shape"] = scan
    md["frame_shape"] = frame
    md["bin"] = int(bin)
    detectors = stored_detectors(path)
    if detectors is not None:
        md["virtual_detectors"] = detectors.as_dict()
    dc.metadata = md
    return dc
