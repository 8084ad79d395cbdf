"""HDF5 writers never meet a full disk inside HDF5: they reserve their file's upper bound first
(a DiskFull naming the file, the bytes needed and the bytes free when it does not fit), give back
what they did not use, and a file HDF5 cannot close never crashes its process."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from detstream.output.hdf5 import DiskFull, counts_bound
from detstream.output.merge import merge_parts
from detstream.output.parts import PartWriter, part_bound, read_part
from disks import mounted_tmpfs

NAMED = re.compile(r"not enough space to write (\S+): .* needs about [\d.]+ MiB \(([\d,]+) bytes\) "
                   r"and [\d.]+ MiB \(([\d,]+) bytes\) are free")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MiB tmpfs; unmounted at the end, also on failure. As root a mount failure fails."""
    with mounted_tmpfs(tmp_path / "disk", "4m") as mnt:
        yield mnt


def _free(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(mnt, leave: int) -> None:
    with open(mnt / "filler", "ab") as f:
        try:
            while (room := _free(mnt) - leave) > 0:
                f.write(b"\0" * room)
                f.flush()
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise


def _run(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=timeout)


def _parts(tmp_path, rng, lam: float, n: int, shape, nodes: int = 2):
    paths, counts = [], []
    for k in range(nodes):
        with PartWriter(tmp_path / f"p{k}.h5", shape) as w:
            for pos in range(k, n, nodes):
                e = rng.choice(shape[0] * shape[1], size=min(shape[0] * shape[1], rng.poisson(lam)),
                               replace=False).astype(np.uint32)
                counts.append(e.size)
                w.add(pos, e)
        paths.append(tmp_path / f"p{k}.h5")
    return paths, np.array(counts)


@pytest.mark.parametrize("lam, n, shape", [(0.3, 4096, (64, 64)), (40, 2048, (144, 144)),
                                           (450, 600, (144, 144)), (1200, 200, (576, 576))])
def test_the_bounds_hold_what_the_writers_write_and_the_rest_is_given_back(tmp_path, lam, n, shape):
    """Each file is no bigger than its bound (small frames share heap collections, large ones
    take their own), and after the writer's close the file holds no block past its end."""
    rng = np.random.default_rng(int(lam * 10))
    paths, counts = _parts(tmp_path, rng, lam, n, shape)
    for p in paths:
        part = read_part(p)
        size = p.stat().st_size
        assert size <= part_bound(len(part.positions), part.n_events, shape, 64)
        assert p.stat().st_blocks * 512 <= size + (64 << 10), "the reservation was not given back"
    out = tmp_path / "counted.h5"
    merge_parts(paths, out, n, 1, shape)
    bound = counts_bound(n, shape, counts)
    assert out.stat().st_size <= bound
    assert out.stat().st_blocks * 512 <= out.stat().st_size + (64 << 10)
    assert bound <= 2 * out.stat().st_size + (4 << 20), "a bound so loose it refuses disks that fit"


def test_a_part_on_a_full_disk_is_a_disk_full_naming_it_and_leaves_nothing(tiny_disk):
    """The writer reserved its first bound; it grows past what the disk has left: DiskFull names
    the part, the bytes needed and free, before HDF5 wrote a byte of it, and no temp file stays."""
    _fill(tiny_disk, 3 << 20)
    path = tiny_disk / "part.h5"
    w = PartWriter(path, (32, 32), flush_every=64)
    _fill(tiny_disk, 0)
    with pytest.raises(DiskFull) as info:
        for pos in range(200_000):
            w.add(pos, np.arange(pos % 64, dtype=np.uint32))
    m = NAMED.search(str(info.value))
    assert m and m.group(1) == str(path), str(info.value)
    assert info.value.errno == errno.ENOSPC and info.value.needed > info.value.free
    assert sorted(os.listdir(tiny_disk)) == ["filler"]


def test_a_merge_on_a_full_disk_is_a_disk_full_naming_counted_h5(tmp_path, tiny_disk):
    rng = np.random.default_rng(1)
    paths, _ = _parts(tmp_path, rng, 30, 4096, (64, 64))
    _fill(tiny_disk, 64 << 10)
    out = tiny_disk / "counted.h5"
    with pytest.raises(DiskFull, match=re.escape(str(out))) as info:
        merge_parts(paths, out, 64, 64, (64, 64))
    assert NAMED.search(str(info.value))
    assert sorted(os.listdir(tiny_disk)) == ["filler"]


def test_hdf5_failing_to_close_ends_the_process_with_exit_1_not_a_crash(tiny_disk):
    """What crashed `make test`: HDF5 meets ENOSPC flushing a file at close. Without a
    reservation (a plain h5_output) the close fails; the file is never touched again and the
    process ends with exit 1 and the error named, where it used to end with SIGSEGV."""
    script = f"""
        import errno, os, sys
        import numpy as np
        from detstream.output.hdf5 import h5_output
        path = {str(tiny_disk / "c.h5")!r}
        try:
            with h5_output(path, overwrite=False) as f:
                d = f.create_dataset("x", (0,), maxshape=(None,), dtype=np.uint32, chunks=(1 << 16,))
                try:
                    with open({str(tiny_disk / "filler")!r}, "wb") as g:
                        g.write(b"\\0" * (8 << 20))
                except OSError:
                    pass
                for i in range(20):
                    d.resize(((i + 1) * 1000,))
                    d[i * 1000:] = i
        except OSError as e:
            print("OSError", e.errno, e, flush=True)
            import gc; gc.collect()
            sys.exit(0)
        sys.exit("no error raised")
        """
    for _ in range(3):  # the crash was a use-after-free: not every run showed it
        (tiny_disk / "filler").unlink(missing_ok=True)
        done = _run(script)
        assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
        assert done.stdout.startswith(f"OSError {errno.ENOSPC}") and str(tiny_disk / "c.h5") in done.stdout
        assert "HDF5 could not close" in done.stderr


def test_detstream_merge_writes_its_result_or_its_error_as_json(tmp_path, tiny_disk):
    """The core command the orchestrator runs: the result file on success, the named error (exit
    1) on a full disk."""
    from detstream.config import SessionSpec  # noqa: F401  (the spec the command reads)

    rng = np.random.default_rng(2)
    paths, _ = _parts(tmp_path, rng, 10, 256, (144, 144))
    spec_json = _session_folder(tmp_path / "runs", "m1", paths)
    done = subprocess.run([sys.executable, "-m", "detstream", "merge", str(tmp_path / "runs" / "m1")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "runs" / "m1" / "merge.json").read_text())
    assert result["ok"] and result["hdf5"] == str(tmp_path / "runs" / "m1" / "counted.h5")
    assert result["missing"] == [] and result["total_events"] > 0
    with h5py.File(result["hdf5"], "r") as f:
        assert f["electron_events/frames"].shape == (256,)

    full = tiny_disk / "runs"
    _session_folder(full, "m2", paths, spec_json)
    _fill(tiny_disk, 32 << 10)
    out = tmp_path / "m2.json"
    done = subprocess.run([sys.executable, "-m", "detstream", "merge", str(full / "m2"), "--result", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    err = json.loads(out.read_text())["error"]
    assert err["type"] == "DiskFull" and err["errno"] == errno.ENOSPC and err["needed"] > err["free"]
    assert NAMED.search(err["message"]).group(1) == str(full / "m2" / "counted.h5")


def _session_folder(output_dir, sid: str, parts, spec_json: str | None = None) -> str:
    """A session folder as a session leaves it: spec.json and its nodes' parts."""
    import shutil

    from detstream.config import SessionSpec

    root = output_dir / sid
    (root / "parts").mkdir(parents=True)
    for i, p in enumerate(parts):
        shutil.copyfile(p, root / "parts" / f"node-{i}.h5")
    if spec_json is None:
        from detstream.profile import get_profile

        spec = SessionSpec(session_id=sid, detector_profile=get_profile("testcam"), scan_width=16,
                           scan_height=16, nodes=2, output_dir=output_dir)
    else:
        spec = SessionSpec.model_validate_json(spec_json).model_copy(
            update={"session_id": sid, "output_dir": output_dir})
    text = spec.model_dump_json()
    (root / "spec.json").write_text(text)
    return text


def test_a_merge_that_crashes_is_a_clear_error_and_this_process_lives_on(tmp_path, monkeypatch):
    """The merge's process killed by SIGSEGV (as HDF5 did): collect() raises MergeFailed naming
    the signal and the kept parts; the orchestrator (this test) is untouched."""
    from detstream import results
    from detstream.processes import ManagedProcess

    rng = np.random.default_rng(3)
    paths, _ = _parts(tmp_path, rng, 10, 256, (144, 144))
    text = _session_folder(tmp_path / "runs", "m3", paths)
    spec = results.SessionSpec.model_validate_json(text)
    started = []
    original = ManagedProcess.start

    def start_then_crash(self):
        original(self)
        started.append(self)
        os.kill(self.pid, signal.SIGSEGV)  # before it has done anything: deterministic
        return self

    monkeypatch.setattr(ManagedProcess, "start", start_then_crash)
    with pytest.raises(results.MergeFailed, match=r"killed by signal SIGSEGV.*parts are kept") as info:
        results.run_merge(spec)
    assert started and started[0].proc.returncode == -signal.SIGSEGV
    assert str(spec.paths.counts) in str(info.value)
    assert not spec.paths.counts.exists()
