"""detstream.analysis: a session's counted result opened as a py4DSTEM DataCube, binned on the
way, with the virtual images py4DSTEM draws equal to detstream's own."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import detstream.analysis as dsa
from detstream.output import PartWriter, merge_parts, write_counts
from detstream.session_dir import SessionDir

# Unmarked tests here are unit tests (tests/conftest.py); the whole-pipeline one is e2e.

WIDTH, HEIGHT, FRAME = 12, 10, (72, 80)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """A session folder whose counted.h5 two nodes' parts were merged into (disk found by the merge)."""
    root = tmp_path_factory.mktemp("runs") / "sess-1"
    root.mkdir()
    rng = np.random.default_rng(5)
    rr, cc = np.divmod(np.arange(FRAME[0] * FRAME[1]), FRAME[1])
    inside = np.flatnonzero((rr - 33.3) ** 2 + (cc - 41.6) ** 2 <= 9.5 ** 2)
    events = []
    for _ in range(WIDTH * HEIGHT):
        bf = rng.choice(inside, int(rng.integers(20, 80)), replace=False)
        out = rng.integers(0, FRAME[0] * FRAME[1], int(rng.integers(0, 30)))
        events.append(np.unique(np.concatenate([bf, out])).astype(np.uint32))
    parts = []
    for k in range(2):
        path = root / f"node-{k}.h5"
        with PartWriter(path, FRAME) as w:
            for p in range(k, WIDTH * HEIGHT, 2):
                w.add(p, events[p])
        parts.append(path)
    merge_parts(parts, SessionDir(root).counts, WIDTH, HEIGHT, FRAME)
    return root


@pytest.mark.e2e  # a whole multi-process pipeline: not in make test-fast
def test_py4dstem_opens_the_result_and_its_virtual_images_equal_detstreams(session):
    dc = dsa.open_datacube(session)
    assert dc.data.shape == (HEIGHT, WIDTH, *FRAME)
    assert dc.calibration.get_R_pixel_size() == 1 and dc.calibration.get_Q_pixel_size() == 1
    md = dc.metadata["detstream"]
    assert tuple(md["scan_shape"]) == (HEIGHT, WIDTH) and tuple(md["frame_shape"]) == FRAME
    ours = dsa.stem_images(session)
    geometry = dsa.py4dstem_geometry(dc)
    bf = dc.get_virtual_image(mode="circle", geometry=geometry["bright_field"], name="bf")
    adf = dc.get_virtual_image(mode="annular", geometry=geometry["annular_dark_field"], name="adf")
    np.testing.assert_array_equal(bf.data, ours["bright_field"])
    np.testing.assert_array_equal(adf.data, ours["annular_dark_field"])
    assert ours["bright_field"].sum() > 0 and ours["annular_dark_field"].sum() > 0


def test_binned_on_the_way_equals_py4dstems_own_binning(session):
    full = dsa.open_datacube(session)
    full.bin_Q(4)
    binned = dsa.open_datacube(session / "counted.h5", bin=4)
    assert binned.data.shape == (HEIGHT, WIDTH, FRAME[0] // 4, FRAME[1] // 4)
    np.testing.assert_array_equal(binned.data, full.data)
    assert binned.calibration.get_Q_pixel_size() == 4 and binned.metadata["detstream"]["bin"] == 4
    # The binned bright field is the unbinned one up to the disk's edge pixels.
    bf4 = binned.get_virtual_image(mode="circle", geometry=dsa.py4dstem_geometry(binned)["bright_field"],
                                   name="bf4")
    ours = dsa.stem_images(session)["bright_field"]
    assert np.corrcoef(bf4.data.ravel(), ours.ravel())[0, 1] > 0.9


def test_binning_never_allocates_the_full_dense_cube(tmp_path):
    side, frame = 40, (144, 144)
    rng = np.random.default_rng(2)
    events = [np.unique(rng.integers(0, frame[0] * frame[1], 200)).astype(np.uint32)
              for _ in range(side * side)]
    path = write_counts(tmp_path / "counted.h5", events, side, side, frame)
    full_bytes = side * side * frame[0] * frame[1] * 2  # the unbinned uint16 cube: 66 MB
    tracemalloc.start()
    try:
        cube = dsa.binned_counts(path, bin=4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert cube.nbytes == full_bytes // 16 and int(cube.sum()) == sum(len(e) for e in events)
    assert peak < full_bytes / 6, (peak, full_bytes)  # the binned cube (1/16) and a block of events


def test_bad_input_is_named(tmp_path, session):
    with pytest.raises(FileNotFoundError, match="no counted result"):
        dsa.open_datacube(tmp_path)
    with pytest.raises(ValueError, match="bin must be a positive integer"):
        dsa.binned_counts(session, bin=0)
    with pytest.raises(ValueError, match="larger than"):
        dsa.binned_counts(session, bin=100)


def test_the_core_does_not_load_py4dstem():
    code = "import sys, detstream.analysis, detstream.output; print('py4DSTEM' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


@pytest.mark.e2e  # py4DSTEM's DPC on the dense cube
def test_py4dstems_dpc_takes_our_centre_of_mass_and_measures_the_same_on_the_dense_cube(session):
    """The hand-off's DPC is fed the nodes' centre of mass (no dense cube); py4DSTEM's own DPC on
    the dense cube measures the same centre of mass, up to the disk centre we measure from."""
    import warnings

    from py4DSTEM.process.phase import DPC

    ours = dsa.stem_images(session)
    center = dsa.stored_detectors(session).center
    fed = dsa.dpc(session)
    # py4DSTEM keeps them as float32; its Qx is the detector's rows.
    np.testing.assert_allclose(np.asarray(fed._com_measured_x), ours["com_y"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(fed._com_measured_y), ours["com_x"], rtol=1e-6, atol=1e-6)
    phase = fed.reconstruct(max_iter=8, progress_bar=False).object_phase
    assert phase.shape == (HEIGHT, WIDTH) and np.all(np.isfinite(phase)) and np.ptp(phase) > 0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = DPC(datacube=dsa.open_datacube(session), energy=300e3, verbose=False).preprocess(
            plot_center_of_mass=False, plot_rotation=False, force_com_rotation=0.0, force_com_transpose=False)
    np.testing.assert_allclose(np.asarray(dense._com_measured_x), ours["com_y"] + center[0], atol=1e-3)
    np.testing.assert_allclose(np.asarray(dense._com_measured_y), ours["com_x"] + center[1], atol=1e-3)
    assert np.ptp(ours["com_x"]) > 0.5 and np.ptp(ours["com_y"]) > 0.5
