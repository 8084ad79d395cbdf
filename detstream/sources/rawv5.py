"""The camera's raw v5 files: write them (record a scan), read them back (replay) and validate them.

One file per sector, ``data_scan<10 digits>_module<N>.data``, holding records of a 16-byte
header ``<IIHHHH`` (scan_number, frame_number, scan_width, scan_height, x, y) followed by the
sector block (``sector_rows x frame_cols`` uint16, little endian). This is what
``stempy.io.reader(files, version=FileVersion.VERSION5)`` reads; stempy places a block at scan
position ``y * scan_width + x`` and ignores frame_number, so x/y must be right.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import struct
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Union

import numpy as np

from ..errors import DetstreamError
from ..profile import DetectorProfile
from ..storage import fsync_dir

RAW_HEADER = struct.Struct("<IIHHHH")
RAW_HEADER_SIZE = RAW_HEADER.size  # 16
HEADER_DTYPE = np.dtype(
    [("scan_number", "<u4"), ("frame_number", "<u4"), ("scan_width", "<u2"),
     ("scan_height", "<u2"), ("x", "<u2"), ("y", "<u2")]
)
assert HEADER_DTYPE.itemsize == RAW_HEADER_SIZE

FILE_RE = re.compile(r"^data_scan(\d{10})_module(\d+)\.data$")

Block = Union[np.ndarray, memoryview, bytes]


class SectorMeta(NamedTuple):
    """The raw v5 header of one sector block: the camera's own fields, in file order."""

    scan_number: int
    frame_number: int
    scan_width: int
    scan_height: int
    x: int
    y: int

    @property
    def position(self) -> int:
        """Scan position index, row-major: ``y * scan_width + x`` (what stempy uses)."""
        return self.y * self.scan_width + self.x

    def pack(self) -> bytes:
        return RAW_HEADER.pack(*self)

    @classmethod
    def unpack(cls, buf, offset: int = 0) -> "SectorMeta":
        return cls._make(RAW_HEADER.unpack_from(buf, offset))


class ReplayError(DetstreamError, ValueError):
    """A recorded scan that cannot be replayed; the message names the directory or file and why."""


def file_name(scan_number: int, sector: int) -> str:
    """The raw v5 file name for one sector (module) of one scan."""
    return f"data_scan{scan_number:010d}_module{sector}.data"


def pixel_dtype(profile: DetectorProfile) -> np.dtype:
    """The profile's little-endian pixel type, spelled natively where the host is little endian.

    ``profile.np_dtype`` carries an explicit '<' byte order, which pybind11-based readers such as
    stempy.image.electron_count_frame reject ("must be a 2D array of the correct type").
    """
    return np.dtype(profile.np_dtype.str)


def record_size(profile: DetectorProfile) -> int:
    """Bytes per record on disk: header plus one sector block."""
    return RAW_HEADER_SIZE + profile.sector_nbytes


class SectorFileWriter:
    """Append records to one sector's raw v5 file as data arrives; ``close`` makes it durable.

    ``evict`` drops the written pages from the page cache after the fsync, so a later read
    comes from the disk as it would on another machine; it implies the fsync (the kernel
    will not drop dirty pages).
    """

    def __init__(self, profile: DetectorProfile, directory: Union[str, Path], scan_number: int,
                 sector: int, *, fsync: bool = True, evict: bool = False, overwrite: bool = False):
        if not 0 <= sector < profile.sectors:
            raise ValueError(f"sector {sector} out of range for profile {profile.name!r} "
                             f"({profile.sectors} sectors)")
        self.profile = profile
        self.sector = sector
        self.scan_number = scan_number
        self.path = Path(directory) / file_name(scan_number, sector)
        self.fsync = fsync or evict
        self.evict = evict
        self.records = 0
        self._dtype = pixel_dtype(profile)
        self._nbytes = profile.sector_nbytes
        self._file = open(self.path, "wb" if overwrite else "xb")

    def write(self, meta: SectorMeta, block: Block) -> None:
        """Append one record; the block must be exactly one sector (shape or byte count)."""
        if isinstance(block, np.ndarray):
            if block.shape != self.profile.sector_shape:
                raise ValueError(f"{self.path}: block shape {block.shape}, expected "
                                 f"{self.profile.sector_shape}")
            block = np.ascontiguousarray(block, dtype=self._dtype)
        n = memoryview(block).nbytes
        if n != self._nbytes:
            raise ValueError(f"{self.path}: block is {n} bytes, expected {self._nbytes}")
        self._file.write(RAW_HEADER.pack(*meta))
        self._file.write(block)
        self.records += 1

    def close(self) -> Path:
        """Flush, fsync (and evict) if asked, close; returns the file path. Idempotent."""
        f = self._file
        if f is None:
            return self.path
        self._file = None
        try:
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
            if self.evict:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            f.close()
        if self.fsync:
            fsync_dir(self.path.parent)
        return self.path

    def __enter__(self) -> "SectorFileWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_scan(source, directory: Union[str, Path], fsync: bool = True, evict: bool = False,
               *, overwrite: bool = False) -> list[Path]:
    """Record every sector of ``source`` (a FrameSource) as raw v5 files; returns paths by sector."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for sector in range(source.profile.sectors):
        with SectorFileWriter(source.profile, directory, source.scan_number, sector,
                              fsync=fsync, evict=evict, overwrite=overwrite) as w:
            for meta, block in source.iter_sector(sector):
                w.write(meta, block)
        paths.append(w.path)
    return paths


class _SectorFile(NamedTuple):
    path: Path
    size: int
    records: int
    positions: np.ndarray  # uint32, scan position of each record, in file order


class ReplaySource:
    """A FrameSource over a directory of recorded raw v5 files, validated up front.

    Everything is checked at construction, before any process starts: the files exist, are
    regular and readable, hold whole records, agree on scan number and size, and each holds
    every scan position exactly once. Iteration streams one record at a time.
    """

    def __init__(self, profile: DetectorProfile, directory: Union[str, Path],
                 scan_number: Optional[int] = None):
        self._profile = profile
        self.directory = Path(directory)
        self._record = record_size(profile)
        paths = self._find_files(scan_number)
        self._files: list[_SectorFile] = []
        self._meta: Optional[tuple[int, int, int, Path]] = None  # scan, width, height, first file
        for path in paths:
            self._files.append(self._check_file(path))
        self._inverse: dict[int, np.ndarray] = {}

    # -- validation ---------------------------------------------------------------------------

    def _find_files(self, scan_number: Optional[int]) -> list[Path]:
        d = self.directory
        if not d.is_dir():
            raise ReplayError(f"replay directory {d} does not exist or is not a directory")
        try:
            names = os.listdir(d)
        except OSError as e:
            raise ReplayError(f"replay directory {d} cannot be listed: {e}") from None
        found: dict[int, dict[int, Path]] = {}
        for name in names:
            m = FILE_RE.match(name)
            if m:
                found.setdefault(int(m.group(1)), {})[int(m.group(2))] = d / name
        if not found:
            raise ReplayError(f"replay directory {d} holds no raw v5 files "
                              f"(data_scan<10 digits>_module<N>.data)")
        if scan_number is None:
            if len(found) > 1:
                raise ReplayError(f"replay directory {d} holds several scans "
                                  f"({', '.join(map(str, sorted(found)))}); choose one")
            scan_number = next(iter(found))
        elif scan_number not in found:
            raise ReplayError(f"replay directory {d} holds no files for scan {scan_number} "
                              f"(found scans {', '.join(map(str, sorted(found)))})")
        modules = found[scan_number]
        sectors = self._profile.sectors
        extra = sorted(m for m in modules if m >= sectors)
        if extra:
            raise ReplayError(f"{modules[extra[0]]}: module {extra[0]} does not exist in profile "
                              f"{self._profile.name!r} ({sectors} sectors)")
        missing = [s for s in range(sectors) if s not in modules]
        if missing:
            names = ", ".join(str(d / file_name(scan_number, s)) for s in missing)
            raise ReplayError(f"replay of scan {scan_number} is missing module file(s): {names}")
        return [modules[s] for s in range(sectors)]

    def _check_file(self, path: Path) -> _SectorFile:
        try:
            st = os.stat(path)  # follows symlinks; a dangling one fails here
        except OSError as e:
            raise ReplayError(f"{path}: cannot be read: {e.strerror or e}") from None
        if not stat.S_ISREG(st.st_mode):
            # Never open FIFOs, devices or directories: open() could block or mislead.
            raise ReplayError(f"{path}: cannot be read: not a regular file")
        size = st.st_size
        rec = self._record
        if size == 0:
            raise ReplayError(f"{path}: empty file, no records")
        if size % rec:
            whole = size // rec
            raise ReplayError(f"{path}: truncated record at byte offset {whole * rec} "
                              f"(file is {size} bytes, records are {rec} bytes; "
                              f"{whole} whole record(s))")
        n = size // rec
        try:
            with open(path, "rb") as f:
                headers = _read_headers(f.fileno(), n, rec)
        except OSError as e:
            raise ReplayError(f"{path}: cannot be read: {e.strerror or e}") from None
        return _SectorFile(path, size, n, self._check_headers(path, headers))

    def _check_headers(self, path: Path, h: np.ndarray) -> np.ndarray:
        rec = self._record
        first = (int(h["scan_number"][0]), int(h["scan_width"][0]), int(h["scan_height"][0]))
        if self._meta is None:
            self._meta = (*first, path)
        scan, width, height, ref = self._meta

        def where(i: int) -> str:
            return f"record {i} (byte offset {i * rec})"

        for field, want in (("scan_number", scan), ("scan_width", width), ("scan_height", height)):
            bad = np.flatnonzero(h[field] != want)
            if bad.size:
                i = int(bad[0])
                what = "scan number" if field == "scan_number" else "scan size"
                raise ReplayError(
                    f"{path}: {what} disagrees at {where(i)}: "
                    f"{field}={int(h[field][i])}, but {ref.name} record 0 has {field}={want}"
                )
        if width == 0 or height == 0:
            raise ReplayError(f"{path}: scan size {width}x{height} is empty")
        for field, limit in (("x", width), ("y", height)):
            bad = np.flatnonzero(h[field] >= limit)
            if bad.size:
                i = int(bad[0])
                raise ReplayError(f"{path}: {field}={int(h[field][i])} at {where(i)} is outside "
                                  f"the {width}x{height} scan")
        positions = h["y"].astype(np.uint32) * np.uint32(width) + h["x"].astype(np.uint32)
        frames = width * height
        counts = np.bincount(positions, minlength=frames)
        dup = np.flatnonzero(counts > 1)
        if dup.size:
            p = int(dup[0])
            recs = np.flatnonzero(positions == p)[:2]
            raise ReplayError(f"{path}: scan position {p} (x={p % width}, y={p // width}) appears "
                              f"more than once: {where(int(recs[0]))} and {where(int(recs[1]))}")
        if len(positions) != frames:
            missing = np.flatnonzero(counts == 0)
            raise ReplayError(f"{path}: holds {len(positions)} of the {frames} positions of the "
                              f"{width}x{height} scan; first missing position {int(missing[0])}")
        return positions

    # -- FrameSource ----------------------------------------------------------------------------

    @property
    def profile(self) -> DetectorProfile:
        return self._profile

    @property
    def scan_number(self) -> int:
        return self._meta[0]

    @property
    def scan_width(self) -> int:
        return self._meta[1]

    @property
    def scan_height(self) -> int:
        return self._meta[2]

    @property
    def frames(self) -> int:
        return self.scan_width * self.scan_height

    @property
    def files(self) -> list[Path]:
        """The validated files, indexed by sector."""
        return [f.path for f in self._files]

    def _sector_file(self, sector: int) -> _SectorFile:
        if not 0 <= sector < self._profile.sectors:
            raise ValueError(f"sector {sector} out of range (profile has {self._profile.sectors})")
        return self._files[sector]

    def _open_checked(self, sf: _SectorFile):
        """Open a validated file again, refusing it if it changed size since validation."""
        try:
            f = open(sf.path, "rb", buffering=0)
        except OSError as e:
            raise ReplayError(f"{sf.path}: cannot be read: {e.strerror or e}") from None
        size = os.fstat(f.fileno()).st_size
        if size != sf.size:
            f.close()
            raise ReplayError(f"{sf.path}: changed since validation ({sf.size} -> {size} bytes)")
        return f

    def iter_sector(self, sector: int) -> Iterator[tuple[SectorMeta, np.ndarray]]:
        """Stream ``sector``'s records in file (acquisition) order.

        Each block is a fresh array (header and block are read together into one buffer), so a
        consumer may keep or send it zero-copy while iteration goes on.
        """
        sf = self._sector_file(sector)  # check the sector now, not at the first next()
        return self._stream(sf)

    def _stream(self, sf: _SectorFile) -> Iterator[tuple[SectorMeta, np.ndarray]]:
        rec = self._record
        shape = self._profile.sector_shape
        dtype = pixel_dtype(self._profile)
        with self._open_checked(sf) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            for i in range(sf.records):
                buf = np.empty(rec, dtype=np.uint8)
                got = f.readinto(buf)
                if got != rec:
                    raise ReplayError(f"{sf.path}: short read at byte offset {i * rec} "
                                      f"({got} of {rec} bytes); file changed while replaying")
                meta = SectorMeta._make(RAW_HEADER.unpack_from(buf, 0))
                yield meta, buf[RAW_HEADER_SIZE:].view(dtype).reshape(shape)

    def frame(self, position: int) -> np.ndarray:
        """Assemble the whole frame recorded at scan ``position`` (reads one record per sector)."""
        if not 0 <= position < self.frames:
            raise IndexError(f"position {position} outside scan of {self.frames} frames")
        p = self._profile
        dtype = pixel_dtype(p)
        out = np.empty(p.frame_shape, dtype=dtype)
        for s, sf in enumerate(self._files):
            inv = self._inverse.get(s)
            if inv is None:
                inv = np.empty(self.frames, dtype=np.int64)
                inv[sf.positions] = np.arange(sf.records)
                self._inverse[s] = inv
            offset = int(inv[position]) * self._record + RAW_HEADER_SIZE
            with self._open_checked(sf) as f:
                data = os.pread(f.fileno(), p.sector_nbytes, offset)
            if len(data) != p.sector_nbytes:
                raise ReplayError(f"{sf.path}: short read at byte offset {offset}")
            out[p.sector_slice(s)] = np.frombuffer(data, dtype=dtype).reshape(p.sector_shape)
        return out

    def __repr__(self) -> str:
        if self._meta is None:  # validation did not get far enough
            return f"ReplaySource({self._profile.name!r}, {str(self.directory)!r})"
        return (f"ReplaySource({self._profile.name!r}, {str(self.directory)!r}, scan "
                f"{self.scan_number}, {self.scan_width}x{self.scan_height})")


def _read_headers(fd: int, n: int, rec: int) -> np.ndarray:
    """Read the header of every record without reading the blocks (random-access, no readahead)."""
    mm = mmap.mmap(fd, n * rec, access=mmap.ACCESS_READ)
    try:
        if hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_RANDOM)
        view = np.ndarray(shape=(n,), dtype=HEADER_DTYPE, buffer=mm, strides=(rec,))
        headers = view.copy()
        del view
    finally:
        mm.close()
    return headers
