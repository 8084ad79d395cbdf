"""This process's peak resident memory, as the kernel counts it for this program only."""

from __future__ import annotations

import resource


def peak_rss_mib() -> float:
    """VmHWM from /proc/self/status, in MiB.

    Not ru_maxrss: after fork+exec Linux carries the launcher's high-water mark into the new
    program, so every service would report at least its parent's size.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
