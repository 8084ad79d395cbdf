"""Stand-in for Slurm's ``srun`` inside an emulated batch job: start one local process per task.

It runs as a plain script (the standard library and python-hostlist only, no relative import)
because the emulator puts a tiny ``srun`` wrapper that execs this file, with the emulator's own
interpreter, first on the job's PATH. Tasks are laid out over the job's fake
nodes in block order, each gets SLURM_PROCID / SLURM_NODEID / SLURM_LOCALID etc.; srun waits
for all of them and exits non-zero if any task failed, as the real one does.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import hostlist

# srun options that take a value when written as "-x VALUE" / "--opt VALUE".
_VALUE_SHORT = set("AcCdDeiJmnNopqtwxWGSTL")
_VALUE_LONG = {
    "account", "cpus-per-task", "constraint", "dependency", "chdir", "error", "input",
    "job-name", "distribution", "ntasks", "nodes", "output", "partition", "qos", "time",
    "nodelist", "exclude", "ntasks-per-node", "mem", "mem-per-cpu", "mem-per-gpu", "gpus",
    "gpus-per-node", "gpus-per-task", "gpus-per-socket", "cpu-bind", "cpu_bind", "mem-bind",
    "mpi", "export", "signal", "het-group", "network", "hint", "gres", "gpu-bind",
    "cpu-freq", "reservation", "wait", "begin", "comment", "tasks-per-node",
    "cores-per-socket", "sockets-per-node", "threads-per-core", "ntasks-per-core",
    "ntasks-per-socket", "ntasks-per-gpu", "licenses", "switches", "container",
}
# Long options that never take a value (so "--exclusive cmd" does not swallow "cmd").
_FLAG_LONG = {
    "exclusive", "overlap", "exact", "label", "unbuffered", "overcommit", "quiet", "verbose",
    "no-kill", "immediate", "kill-on-bad-exit", "oversubscribe", "spread-job", "whole", "pty", "disable-status",
}


class SrunUsageError(Exception):
    """Bad srun command line or a request the allocation cannot satisfy."""


def expand_nodelist(text: Optional[str]) -> List[str]:
    """Node names of a Slurm hostlist such as ``nid[001000-001002,001007],login01`` (python-hostlist's
    reading); none for Slurm's placeholders (``(null)``, ``None assigned``)."""
    text = (text or "").strip()
    if not text or text.startswith("(") or text in ("None assigned", "n/a"):
        return []
    return hostlist.expand_hostlist(text, allow_duplicates=True)


def compress_nodelist(names: List[str]) -> str:
    """The Slurm hostlist of ``names`` (the inverse of expand_nodelist): ``nid[001000-001002]``."""
    return hostlist.collect_hostlist(list(names))


def parse_args(argv: List[str]) -> Tuple[Dict[str, str], List[str]]:
    """Split an srun command line into ``{option: value}`` and the command to run."""
    opts: Dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if not eq and name in _VALUE_LONG and name not in _FLAG_LONG:
                if i + 1 >= len(argv):
                    raise SrunUsageError(f"option '--{name}' requires an argument")
                value = argv[i + 1]
                i += 1
            opts[name] = value if (eq or name in _VALUE_LONG) else "1"
        else:
            letter = arg[1]
            if letter in _VALUE_SHORT:
                value = arg[2:]
                if not value:
                    if i + 1 >= len(argv):
                        raise SrunUsageError(f"option requires an argument -- '{letter}'")
                    value = argv[i + 1]
                    i += 1
                opts[letter] = value
            else:
                for flag in arg[1:]:  # bundled flags such as -lu
                    opts[flag] = "1"
        i += 1
    return opts, argv[i:]


def _opt(opts: Dict[str, str], short: Optional[str], long: str) -> Optional[str]:
    if long in opts:
        return opts[long]
    if short is not None and short in opts:
        return opts[short]
    return None


def plan_tasks(opts: Dict[str, str], env: Dict[str, str]) -> Tuple[List[str], List[Tuple[int, int, int]]]:
    """Choose the step's nodes and lay tasks out on them: ``(step_nodes, [(procid, nodeid, localid)])``."""
    alloc = expand_nodelist(env.get("SLURM_JOB_NODELIST", "")) or ["localhost"]
    nodes_opt = _opt(opts, "N", "nodes")
    ntasks_opt = _opt(opts, "n", "ntasks")
    per_node_opt = opts.get("ntasks-per-node") or opts.get("tasks-per-node")
    try:
        n_nodes = int(nodes_opt.split("-")[0]) if nodes_opt else None
        ntasks = int(ntasks_opt) if ntasks_opt else None
        per_node = int(per_node_opt) if per_node_opt else None
    except ValueError as exc:
        raise SrunUsageError(f"invalid numeric value: {exc}") from None
    if n_nodes is None:
        n_nodes = min(ntasks, len(alloc)) if ntasks else len(alloc)
    if n_nodes < 1 or n_nodes > len(alloc):
        raise SrunUsageError(
            f"Only allocated {len(alloc)} nodes asked for {n_nodes}")
    if ntasks is None:
        ntasks = n_nodes * per_node if per_node else n_nodes
    if ntasks < n_nodes:
        raise SrunUsageError(f"Invalid: ntasks {ntasks} < nodes {n_nodes}")
    # Block distribution: the first (ntasks % nodes) nodes get one task more.
    base, extra = divmod(ntasks, n_nodes)
    layout: List[Tuple[int, int, int]] = []
    procid = 0
    for nodeid in range(n_nodes):
        for localid in range(base + (1 if nodeid < extra else 0)):
            layout.append((procid, nodeid, localid))
            procid += 1
    return alloc[:n_nodes], layout


def _next_step_id(env: Dict[str, str]) -> int:
    """Hand out job step ids 0, 1, 2... per job, shared by concurrent sruns via a locked file."""
    job_dir = env.get("SLURM_EMULATOR_JOB_DIR")
    if not job_dir:
        return 0
    path = Path(job_dir) / "step_counter"
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        text = fh.read().strip()
        step = int(text) if text else 0
        fh.seek(0)
        fh.truncate()
        fh.write(str(step + 1))
    return step


def main(argv: Optional[List[str]] = None) -> int:
    """Run the step; returns srun's exit code."""
    argv = sys.argv[1:] if argv is None else argv
    env = dict(os.environ)
    try:
        opts, command = parse_args(argv)
        if not command:
            raise SrunUsageError("No command given to execute.")
        step_nodes, layout = plan_tasks(opts, env)
    except SrunUsageError as exc:
        print(f"srun: error: {exc}", file=sys.stderr)
        return 1
    step_id = _next_step_id(env)
    cwd = _opt(opts, "D", "chdir")
    kill_on_bad_exit = _opt(opts, "K", "kill-on-bad-exit") not in (None, "0")
    step_env = {
        "SLURM_STEP_ID": str(step_id),
        "SLURM_STEPID": str(step_id),
        "SLURM_NTASKS": str(len(layout)),
        "SLURM_NPROCS": str(len(layout)),
        "SLURM_STEP_NUM_TASKS": str(len(layout)),
        "SLURM_STEP_NUM_NODES": str(len(step_nodes)),
        "SLURM_STEP_NODELIST": compress_nodelist(step_nodes),
        "SLURM_NNODES": str(len(step_nodes)),
        "SLURM_NODELIST": compress_nodelist(step_nodes),
    }
    procs: List[subprocess.Popen] = []

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)

    try:
        for procid, nodeid, localid in layout:
            task_env = dict(env)
            task_env.update(step_env)
            task_env.update({
                "SLURM_PROCID": str(procid),
                "SLURM_NODEID": str(nodeid),
                "SLURM_LOCALID": str(localid),
                "SLURMD_NODENAME": step_nodes[nodeid],
                "SLURM_TOPOLOGY_ADDR": step_nodes[nodeid],
            })
            procs.append(subprocess.Popen(command, env=task_env, cwd=cwd))
    except OSError as exc:
        print(f"srun: error: execve(): {command[0]}: {exc.strerror}", file=sys.stderr)
        forward(signal.SIGKILL, None)
        for p in procs:
            p.wait()
        return 2

    codes: List[Optional[int]] = [None] * len(procs)
    remaining = set(range(len(procs)))
    while remaining:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        for idx in list(remaining):
            if procs[idx].pid == pid:
                procs[idx].returncode = os.waitstatus_to_exitcode(status)
                codes[idx] = procs[idx].returncode
                remaining.discard(idx)
                if codes[idx] != 0:
                    print(f"srun: error: {step_nodes[layout[idx][1]]}: task {idx}: "
                          f"{'Exited with exit code ' + str(codes[idx]) if codes[idx] > 0 else 'Killed by signal ' + str(-codes[idx])}",
                          file=sys.stderr)
                    if kill_on_bad_exit:
                        forward(signal.SIGKILL, None)
    failed = [c for c in codes if c not in (0, None)]
    if not failed:
        return 0
    first = failed[0]
    return first if first > 0 else 128 - first


if __name__ == "__main__":
    sys.exit(main())
