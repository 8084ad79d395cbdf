"""Counting speed: detstream.counting.Counter against stempy.image.electron_count_frame, one core.

Both count the same pool of realistic 576x576 frames in this process, after checking they
find the same events. Run: python benchmarks/bench_counting.py [--frames N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import numpy as np

FRAME_SHAPE = (576, 576)
DARK_LEVEL = 20.0          # ADU, mean of the dark reference
DARK_PATTERN_SIGMA = 1.0   # fixed pattern: pixel-to-pixel spread of the dark reference
READ_NOISE_SIGMA = 3.0     # frame-to-frame noise around the dark
ELECTRONS_PER_FRAME = 400  # Poisson mean; each spread over 3x3 pixels
ELECTRON_ADU = 200.0       # mean total ADU of one electron
XRAYS_PER_FRAME = 3
BACKGROUND_THRESHOLD = 12.0  # ~4 sigma of the read noise above the dark
XRAY_THRESHOLD = 2000.0


def make_pool(n: int, seed: int = 0, shape=FRAME_SHAPE):
    """n uint16 frames, their float32 dark reference and a float32 gain map, all seeded."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    dark = (DARK_LEVEL + rng.normal(0.0, DARK_PATTERN_SIGMA, shape)).astype(np.float32)
    gain = rng.uniform(0.9, 1.1, shape).astype(np.float32)
    spread = np.array([[1, 2, 1], [2, 6, 2], [1, 2, 1]], float) / 18.0
    frames = np.empty((n, rows, cols), np.uint16)
    for k in range(n):
        f = dark + rng.normal(0.0, READ_NOISE_SIGMA, shape)
        ne = rng.poisson(ELECTRONS_PER_FRAME)
        r, c = rng.integers(0, rows, ne), rng.integers(0, cols, ne)
        adu = rng.gamma(4.0, ELECTRON_ADU / 4.0, ne)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                rr, cc = r + dr, c + dc
                ok = (rr >= 0) & (rr < rows) & (cc >= 0) & (cc < cols)
                np.add.at(f, (rr[ok], cc[ok]), adu[ok] * spread[dr + 1, dc + 1])
        xr = rng.integers(0, rows * cols, XRAYS_PER_FRAME)
        f.flat[xr] += rng.uniform(3000, 20000, XRAYS_PER_FRAME)
        frames[k] = np.clip(np.rint(f), 0, 65535)
    return frames, dark, gain


@contextmanager
def one_core():
    """Pin this process to one CPU for the measurement (restored after), where the OS allows."""
    if not hasattr(os, "sched_setaffinity"):
        yield None
        return
    before = os.sched_getaffinity(0)
    cpu = max(before)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


def frames_per_second(count: Callable[[np.ndarray], object], frames: np.ndarray, n: int,
                      repeats: int) -> float:
    """Best of `repeats` timed passes over n frames cycled from the pool (one warm-up frame first)."""
    count(frames[0])
    pool = len(frames)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            count(frames[i % pool])
        best = min(best, time.perf_counter() - t0)
    return n / best


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the benchmark; print a summary and return the figures (for benchmarks/run_all.py)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=300, help="frames timed per pass (default 300)")
    p.add_argument("--pool", type=int, default=32, help="distinct frames generated (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes, best kept (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)

    import stempy
    import stempy.image as stempy_image

    from detstream.counting import Counter

    frames, dark, gain = make_pool(args.pool, args.seed)
    above = (frames.astype(np.int32) - dark.astype(np.uint16)) > BACKGROUND_THRESHOLD
    result: dict = {
        "benchmark": "counting",
        "frame_shape": list(FRAME_SHAPE),
        "frames": args.frames,
        "pool": args.pool,
        "repeats": args.repeats,
        "background_threshold": BACKGROUND_THRESHOLD,
        "xray_threshold": XRAY_THRESHOLD,
        "fraction_above_background": float(above.mean()),
        "stempy_version": getattr(stempy, "__version__", "unknown"),
        "numpy_version": np.__version__,
        "python": platform.python_version(),
        "modes": {},
    }
    with one_core() as cpu:
        result["cpu"] = cpu
        for mode, g in (("dark", None), ("dark+gain", gain)):
            def ref(f, g=g):
                out = stempy_image.electron_count_frame(
                    f, darkreference=dark, background_threshold=BACKGROUND_THRESHOLD,
                    xray_threshold=XRAY_THRESHOLD, gain=g)
                return out.data[0, 0]

            counter = Counter(FRAME_SHAPE, dark_reference=dark, gain=g,
                              background_threshold=BACKGROUND_THRESHOLD,
                              xray_threshold=XRAY_THRESHOLD)
            events = []
            for f in frames:
                ours, theirs = counter.count(f), np.asarray(ref(f))
                if not np.array_equal(ours, theirs):
                    raise SystemExit(f"{mode}: detstream and stempy disagree "
                                     f"({len(ours)} vs {len(theirs)} events); not timing")
                events.append(len(ours))
            stempy_fps = frames_per_second(ref, frames, args.frames, args.repeats)
            ours_fps = frames_per_second(counter.count, frames, args.frames, args.repeats)
            result["modes"][mode] = {
                "events_per_frame": float(np.mean(events)),
                "stempy_fps": stempy_fps,
                "detstream_fps": ours_fps,
                "ratio": ours_fps / stempy_fps,
            }
    primary = result["modes"]["dark"]
    result.update(stempy_fps=primary["stempy_fps"], detstream_fps=primary["detstream_fps"],
                  ratio=primary["ratio"])

    print(f"counting {FRAME_SHAPE[0]}x{FRAME_SHAPE[1]} frames, {args.frames} per pass, best of "
          f"{args.repeats}, cpu {cpu}; {100 * result['fraction_above_background']:.2f}% of pixels "
          f"above background")
    for mode, m in result["modes"].items():
        print(f"  {mode:10s} {m['events_per_frame']:6.0f} events/frame   stempy {m['stempy_fps']:8.0f} "
              f"frames/s   detstream {m['detstream_fps']:8.0f} frames/s   ratio {m['ratio']:5.1f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
