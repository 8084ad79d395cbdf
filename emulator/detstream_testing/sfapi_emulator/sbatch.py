"""sbatch's reading of a batch script: the leading ``#SBATCH`` options, and what Perlmutter's sbatch refuses.

Apart from the job runner so a script is judged, as sbatch would, before anything runs.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Dict, List, Optional

__all__ = ["BatchOptions", "SbatchError", "parse_sbatch_options", "parse_time_limit"]

# Perlmutter's QOSes and node features, so a script that would be rejected there is rejected here.
PERLMUTTER_QOS = {"regular", "debug", "shared", "realtime", "preempt", "overrun", "interactive",
                  "premium", "shared_interactive", "jupyter", "regular_0", "regular_1"}
PERLMUTTER_FEATURES = {"cpu", "gpu", "hbm40g", "hbm80g"}

_SHORT_OPTS = {"N": "nodes", "t": "time", "J": "job-name", "q": "qos", "C": "constraint",
               "A": "account", "o": "output", "e": "error", "n": "ntasks", "D": "chdir",
               "p": "partition", "c": "cpus-per-task", "d": "dependency", "G": "gpus",
               "L": "licenses", "S": "core-spec", "w": "nodelist", "x": "exclude", "a": "array",
               "b": "begin", "i": "input", "M": "clusters", "m": "distribution"}
_LONG_WITH_VALUE = set(_SHORT_OPTS.values()) | {
    "ntasks-per-node", "mail-type", "mail-user", "signal", "gpus-per-node", "gpus-per-task",
    "mem", "mem-per-cpu", "mem-per-gpu", "reservation", "comment", "image", "module",
    "time-min", "gpu-bind", "cpu-bind", "export", "wckey", "tasks-per-node", "gres", "hint",
    "open-mode", "nice", "priority", "switches", "deadline", "cpus-per-gpu",
}


class SbatchError(ValueError):
    """sbatch refused the script; the message is what sbatch would print."""


@dataclass
class BatchOptions:
    """The ``#SBATCH`` settings of one script that the emulator acts on (others are kept in ``extra``)."""

    nodes: int = 1
    time_limit: Optional[float] = None  # seconds; None = not given
    job_name: str = "sfapi_job"
    qos: str = "regular"
    constraint: Optional[str] = None
    account: Optional[str] = None
    exclusive: bool = False
    ntasks: Optional[int] = None
    ntasks_per_node: Optional[int] = None
    output: Optional[str] = None
    error: Optional[str] = None
    chdir: Optional[str] = None
    partition: Optional[str] = None
    extra: Dict[str, str] = field(default_factory=dict)


def parse_time_limit(text: str) -> Optional[float]:
    """Slurm ``--time`` value to seconds (None for UNLIMITED); seconds are honoured exactly."""
    t = text.strip()
    if t.upper() in ("UNLIMITED", "INFINITE", "-1"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", t)
    if not m:
        raise SbatchError("sbatch: error: Invalid --time specification")
    days, a, b, c = m.groups()
    if days is not None:  # days-hours[:minutes[:seconds]]
        secs = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # hours:minutes:seconds
        secs = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # minutes:seconds
        secs = int(a) * 60 + int(b)
    else:  # minutes
        secs = int(a) * 60
    if secs <= 0:
        raise SbatchError("sbatch: error: Invalid --time specification")
    return float(secs)


def _sbatch_tokens(script: str) -> List[str]:
    """Option words of the leading ``#SBATCH`` block (sbatch stops at the first command line)."""
    words: List[str] = []
    for line in script.splitlines()[1:]:
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("#"):
            break
        m = re.match(r"#SBATCH\s+(.*)", stripped)
        if m:
            try:
                words.extend(shlex.split(m.group(1), comments=True))
            except ValueError:
                raise SbatchError(f"sbatch: error: cannot parse directive: {stripped}") from None
    return words


def parse_sbatch_options(script: str) -> BatchOptions:
    """Parse the script's ``#SBATCH`` directives; raises SbatchError where sbatch would refuse."""
    if not script.startswith("#!"):
        raise SbatchError("sbatch: error: This does not look like a batch script.  The first line "
                          "must start with #! followed by the path to an interpreter.")
    raw: Dict[str, str] = {}
    words = _sbatch_tokens(script)
    i = 0
    while i < len(words):
        w = words[i]
        if w.startswith("--"):
            name, eq, value = w[2:].partition("=")
            if not eq and name in _LONG_WITH_VALUE:
                if i + 1 >= len(words):
                    raise SbatchError(f"sbatch: error: option '--{name}' requires an argument")
                value, i = words[i + 1], i + 1
            elif not eq:
                value = ""
        elif w.startswith("-") and len(w) >= 2:
            letter = w[1]
            name = _SHORT_OPTS.get(letter, letter)
            value = w[2:]
            if letter in _SHORT_OPTS and not value:
                if i + 1 >= len(words):
                    raise SbatchError(f"sbatch: error: option requires an argument -- '{letter}'")
                value, i = words[i + 1], i + 1
        else:
            raise SbatchError(f"sbatch: error: unrecognized directive word: {w}")
        raw[name] = value
        i += 1

    opts = BatchOptions()
    try:
        if "nodes" in raw:
            opts.nodes = int(raw.pop("nodes").split("-")[0])
        if "ntasks" in raw:
            opts.ntasks = int(raw.pop("ntasks"))
        if "ntasks-per-node" in raw:
            opts.ntasks_per_node = int(raw.pop("ntasks-per-node"))
    except ValueError:
        raise SbatchError("sbatch: error: Invalid numeric value") from None
    if opts.nodes < 1:
        raise SbatchError("sbatch: error: Invalid node count specification")
    if "time" in raw:
        opts.time_limit = parse_time_limit(raw.pop("time"))
    opts.job_name = raw.pop("job-name", opts.job_name) or opts.job_name
    opts.qos = raw.pop("qos", opts.qos)
    opts.constraint = raw.pop("constraint", None) or None
    opts.account = raw.pop("account", None) or None
    opts.exclusive = "exclusive" in raw
    raw.pop("exclusive", None)
    opts.output = raw.pop("output", None)
    opts.error = raw.pop("error", None)
    opts.chdir = raw.pop("chdir", None)
    opts.partition = raw.pop("partition", None)
    opts.extra = raw
    return opts


def _check_perlmutter(opts: BatchOptions) -> None:
    """Refuse what Perlmutter's sbatch refuses: no ``-C cpu|gpu``, unknown feature or QOS."""
    if not opts.constraint:
        raise SbatchError("sbatch: error: No architecture specified, cannot estimate job costs.\n"
                          "sbatch: error: Batch job submission failed: Unspecified error")
    features = set(re.split(r"[&|,]", opts.constraint.replace("(", "").replace(")", "")))
    if not features <= PERLMUTTER_FEATURES:
        raise SbatchError("sbatch: error: Batch job submission failed: Invalid feature specification")
    if opts.qos not in PERLMUTTER_QOS:
        raise SbatchError("sbatch: error: Batch job submission failed: Invalid qos specification")
