"""Side-by-side comparison of the streaming and file-transfer workflows on the same scan."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional, Sequence

import h5py
import numpy as np

from .atomic import atomic_output

WORKFLOWS = ("streaming", "file-transfer")


def _stats(values: Sequence[float]) -> dict:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"n": 0}
    return {"n": len(vals), "median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "stdev": statistics.stdev(vals) if len(vals) > 1 else 0.0}


def summarize(runs: Sequence[dict]) -> dict:
    """Per workflow: time to counted result, throughput and per-stage timings, with their spread."""
    out: dict = {"workflows": {}, "runs": len(runs)}
    for wf in WORKFLOWS:
        mine = [r for r in runs if r["workflow"] == wf]
        stages = sorted({k for r in mine for k in r.get("timings", {})})
        out["workflows"][wf] = {
            "runs": len(mine),
            "time_to_result_s": _stats([r.get("time_to_result_s") for r in mine]),
            "throughput_gb_s": _stats([r.get("throughput_gb_s") for r in mine]),
            "stages_s": {s: _stats([r["timings"].get(s) for r in mine]) for s in stages},
        }
    s = out["workflows"]["streaming"]["time_to_result_s"]
    f = out["workflows"]["file-transfer"]["time_to_result_s"]
    out["speedup_median"] = f["median"] / s["median"] if s.get("median") and f.get("median") else None
    return out


def same_events(path_a: str | Path, path_b: str | Path) -> tuple[bool, Optional[str]]:
    """Whether two counted HDF5 files hold identical events at every scan position (and why not)."""
    with h5py.File(path_a, "r") as a, h5py.File(path_b, "r") as b:
        fa, fb = a["electron_events/frames"], b["electron_events/frames"]
        if fa.shape != fb.shape:
            return False, f"{fa.shape[0]} vs {fb.shape[0]} scan positions"
        block = 4096
        for start in range(0, fa.shape[0], block):
            for i, (x, y) in enumerate(zip(fa[start:start + block], fb[start:start + block])):
                if not np.array_equal(x, y):
                    return False, f"position {start + i} differs ({len(x)} vs {len(y)} events)"
    return True, None


def table_rows(report: dict) -> list[dict]:
    """One row per workflow and metric, for a Prefect table artifact."""
    rows = []
    for wf, data in report["workflows"].items():
        metrics = {"time_to_result_s": data["time_to_result_s"], "throughput_gb_s": data["throughput_gb_s"],
                   **{f"stage {k}": v for k, v in data["stages_s"].items()}}
        for name, st in metrics.items():
            if st.get("n"):
                rows.append({"workflow": wf, "metric": name, "median": round(st["median"], 3),
                             "min": round(st["min"], 3), "max": round(st["max"], 3),
                             "stdev": round(st["stdev"], 3), "runs": st["n"]})
    return rows


def markdown(report: dict, scan: str, identical: bool, why: Optional[str]) -> str:
    s = report["workflows"]["streaming"]["time_to_result_s"]
    f = report["workflows"]["file-transfer"]["time_to_result_s"]
    lines = [f"# Streaming vs file transfer, {scan} scan", "",
             "| workflow | runs | time to counted result, median (min–max) s | stdev s |",
             "|---|---|---|---|"]
    for wf, st in (("streaming", s), ("file-transfer", f)):
        if st.get("n"):
            lines.append(f"| {wf} | {st['n']} | {st['median']:.2f} ({st['min']:.2f}–{st['max']:.2f}) | {st['stdev']:.2f} |")
    if report.get("speedup_median"):
        lines += ["", f"**Streaming is {report['speedup_median']:.1f}× faster** (median time to counted result)."]
    lines += ["", "Outputs identical event for event: " + ("yes" if identical else f"**no** ({why})")]
    return "\n".join(lines)


def bar_chart(report: dict, path: str | Path, title: str) -> Path:
    """Median time to counted result and each stage per workflow, min–max as error bars (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    labels = ["time to result"]
    stages = sorted({k for wf in report["workflows"].values() for k in wf["stages_s"]})
    labels += stages
    width = 0.38
    for i, wf in enumerate(WORKFLOWS):
        data = report["workflows"][wf]
        stats = [data["time_to_result_s"]] + [data["stages_s"].get(k, {"n": 0}) for k in stages]
        med = [st.get("median", 0.0) for st in stats]
        lo = [st.get("median", 0.0) - st.get("min", 0.0) for st in stats]
        hi = [st.get("max", 0.0) - st.get("median", 0.0) for st in stats]
        xs = [x + (i - 0.5) * width for x in range(len(labels))]
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=wf)
    ax.set_xticks(range(len(labels)), [label.removesuffix("_s") for label in labels], rotation=30, ha="right")
    ax.set_ylabel("seconds (median, min–max)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_output(path, overwrite=True) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
