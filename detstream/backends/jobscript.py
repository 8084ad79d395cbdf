"""Batch scripts for NERSC: one ``detstream distributor`` per node of a Slurm job, from settings.

``NerscJobSettings`` is the job half of the SFAPI backend's configuration (the Prefect block
``NerscCompute`` holds one); ``render_job_script`` turns it into the script SFAPI submits.
Values that end up in ``#SBATCH`` lines are checked against a safe character set (sbatch has no
quoting rules worth trusting); everything in the script body is shell-quoted.
"""

from __future__ import annotations

import re
import shlex
from typing import Literal, Optional

from pydantic import BaseModel, Field, field_validator, model_validator

from ..config import DEFAULT_PREFIX
from .base import NodeLaunch, ReservationError

#: Streaming sessions are capped at two hours (as the production gateway did).
MAX_WALLTIME_MINUTES = 120

# Characters allowed in a value written into an #SBATCH line: no blanks, quotes, '#', '$' or
# newlines, so sbatch (and the emulator's shlex-based parser) read exactly one word.
_SBATCH_VALUE = re.compile(r"[A-Za-z0-9_.,:=+@%/&|()\[\]-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_JOB_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")

# Node commands that listen for the aggregator, so take --bind-host / --advertise-host.
LISTENING_SERVICES = frozenset({"distributor"})

NODE_HOSTNAME = "$(hostname)"
"""Shown for ``advertise_host=None``: each node advertises its own host name."""


def _check_sbatch_value(what: str, value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    if not _SBATCH_VALUE.fullmatch(value):
        raise ValueError(f"{what} {value!r} has characters not allowed in an #SBATCH line "
                         "(use letters, digits and _.,:=+@%/&|()[]-)")
    return value


class NerscJobSettings(BaseModel):
    """How a streaming session's batch job is requested and how each node starts ``detstream``.

    The node count comes from the session. ``detstream`` is started, in this order of setup, after
    ``module load`` of each of ``modules``, ``conda activate conda_env`` if given, and inside
    ``image`` (with ``container``: shifter or podman-hpc) if given; ``command`` is the argv that
    runs detstream there (``[sys.executable, "-m", "detstream"]`` for the local emulator).
    """

    machine: str = Field(default="perlmutter", description="NERSC compute system.")
    account: Optional[str] = Field(default=None, description="NERSC project to charge (-A), e.g. m1234.")
    qos: str = Field(default="realtime", description="Slurm QOS (-q); streaming uses realtime.")
    constraint: str = Field(default="cpu", description="Node type (-C): cpu or gpu.")
    walltime_minutes: int = Field(default=30, ge=1,
                                  description=f"Walltime (-t), at most {MAX_WALLTIME_MINUTES} minutes.")
    reservation: Optional[str] = Field(default=None, description="Slurm reservation (--reservation), if any.")
    job_name_prefix: str = Field(default="detstream", description="Job name is <prefix>-<session id>.")
    exclusive: bool = Field(default=True, description="Whole nodes (--exclusive).")
    modules: list[str] = Field(default_factory=list, description="`module load` each of these first.")
    conda_env: Optional[str] = Field(default=None, description="`conda activate` this environment (name or path).")
    image: Optional[str] = Field(default=None, description="Container image that has detstream installed.")
    container: Literal["shifter", "podman-hpc"] = Field(
        default="shifter", description="Container runtime for `image`.")
    command: list[str] = Field(default_factory=lambda: ["detstream"],
                               description="The command that runs detstream on a node.")
    env: dict[str, str] = Field(default_factory=dict,
                                description="Environment variables exported in the job (plain text: no secrets).")
    extra_sbatch: list[str] = Field(default_factory=list,
                                    description="More #SBATCH options, e.g. '--mail-type=END'.")
    srun_options: list[str] = Field(default_factory=list, description="More srun options, e.g. '--cpu-bind=none'.")
    output: Optional[str] = Field(default=None, description="Slurm output file pattern (-o), e.g. detstream-%j.out.")
    bind_host: str = Field(default="0.0.0.0", description="Interface each distributor listens on.")
    advertise_host: Optional[str] = Field(
        default=None, description="Host name distributors advertise; empty: each node's $(hostname).")

    @field_validator("walltime_minutes")
    @classmethod
    def _walltime_cap(cls, v: int) -> int:
        if v > MAX_WALLTIME_MINUTES:
            raise ValueError(f"walltime of {v} minutes exceeds the {MAX_WALLTIME_MINUTES}-minute "
                             "cap for streaming sessions")
        return v

    @field_validator("machine", "qos", "constraint")
    @classmethod
    def _required_sbatch_word(cls, v: str, info) -> str:
        if not v:
            raise ValueError(f"{info.field_name} must not be empty")
        return _check_sbatch_value(info.field_name, v)

    @field_validator("account", "reservation", "output")
    @classmethod
    def _optional_sbatch_word(cls, v: Optional[str], info) -> Optional[str]:
        return _check_sbatch_value(info.field_name, v or None)

    @field_validator("job_name_prefix")
    @classmethod
    def _job_name(cls, v: str) -> str:
        if not v or _JOB_NAME_UNSAFE.search(v):
            raise ValueError(f"job_name_prefix {v!r} must be letters, digits, '_', '.' or '-'")
        return v

    @field_validator("extra_sbatch")
    @classmethod
    def _extra_lines(cls, lines: list[str]) -> list[str]:
        out = []
        for line in lines:
            text = line.strip()
            if text.startswith("#SBATCH"):
                text = text[len("#SBATCH"):].strip()
            if not text or "\n" in text or "\r" in text or not text.startswith("-"):
                raise ValueError(f"extra #SBATCH line {line!r} must be one option starting with '-'")
            words = text.split()
            if len(words) > 2 or (len(words) == 2 and "=" in words[0]):
                raise ValueError(f"extra #SBATCH line {line!r} must be one option and at most one "
                                 "value without blanks")
            for word in words:
                _check_sbatch_value("extra #SBATCH option", word)
            out.append(text)
        return out

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"environment variable name {name!r} is not a valid shell name")
        return env

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str]) -> list[str]:
        if not v or not v[0]:
            raise ValueError("command must name the program that runs detstream, e.g. ['detstream']")
        return v

    @field_validator("bind_host")
    @classmethod
    def _bind(cls, v: str) -> str:
        if not v:
            raise ValueError("bind_host must not be empty (0.0.0.0 on a compute node)")
        return v

    @model_validator(mode="after")
    def _one_environment(self) -> "NerscJobSettings":
        if self.image and self.conda_env:
            raise ValueError("give either a container image or a conda environment, not both")
        _check_sbatch_value("image", self.image or None)
        for what, values in [("modules", self.modules), ("conda_env", [self.conda_env or ""]),
                             ("command", self.command), ("env", self.env.values()),
                             ("srun_options", self.srun_options), ("bind_host", [self.bind_host]),
                             ("advertise_host", [self.advertise_host or ""])]:
            if any("\0" in v for v in values):  # a NUL cannot be passed to a program
                raise ValueError(f"{what} contains a NUL character")
        return self

    def job_name(self, session_id: str) -> str:
        """``<prefix>-<session id>``, with characters Slurm job names should not carry replaced."""
        return f"{self.job_name_prefix}-{_JOB_NAME_UNSAFE.sub('_', session_id)}"[:128]


def _walltime(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def _q(words) -> str:
    return " ".join(shlex.quote(str(w)) for w in words)


def render_job_script(job: NerscJobSettings, nodes: int, launch: NodeLaunch) -> str:
    """The batch script that runs ``detstream <launch.service>`` once per node with srun.

    The node index is SLURM_PROCID inside the command; a distributor also gets
    ``--bind-host``/``--advertise-host`` from the settings.
    """
    if nodes < 1:
        raise ValueError(f"a job needs at least one node, not {nodes}")
    header = [
        "#!/bin/bash",
        f"#SBATCH -N {nodes}",
    ]
    if job.qos:
        header.append(f"#SBATCH -q {job.qos}")
    if job.constraint:
        header.append(f"#SBATCH -C {job.constraint}")
    if getattr(job, "partition", None):
        header.append(f"#SBATCH -p {job.partition}")
    header += [f"#SBATCH -t {_walltime(job.walltime_minutes)}", f"#SBATCH -J {job.job_name(launch.session_id)}"]
    if job.account:
        header.append(f"#SBATCH -A {job.account}")
    if job.exclusive:
        header.append("#SBATCH --exclusive")
    if job.reservation:
        header.append(f"#SBATCH --reservation={job.reservation}")
    if job.output:
        header.append(f"#SBATCH -o {job.output}")
    if job.image and job.container == "shifter":
        header.append(f"#SBATCH --image={_check_sbatch_value('image', job.image)}")
    header += [f"#SBATCH {line}" for line in job.extra_sbatch]

    body = [
        f"# detstream session {_JOB_NAME_UNSAFE.sub('_', launch.session_id)}: "
        f"one {_JOB_NAME_UNSAFE.sub('_', launch.service)} per node, node index = SLURM_PROCID",
        "set -e",
    ]
    body += [f"module load {shlex.quote(m)}" for m in job.modules]
    if job.conda_env:
        body += ['eval "$(conda shell.bash hook)"', f"conda activate {shlex.quote(job.conda_env)}"]
    body += [f"export {name}={shlex.quote(value)}" for name, value in job.env.items()]

    srun = ["srun", "-N", str(nodes), "--ntasks-per-node=1", *job.srun_options]
    if job.image and job.container == "shifter":
        srun.append("shifter")
    elif job.image:
        srun += ["podman-hpc", "run", "--rm", "--network", "host"]
        for name in ["SLURM_PROCID", "SLURM_NODEID", "SLURM_JOB_ID", *job.env]:
            srun += ["-e", name]
        srun.append(job.image)
    line = f"{_q(srun)} {_q([*job.command, *launch.argv()])}"
    if launch.service in LISTENING_SERVICES:
        advertise = shlex.quote(job.advertise_host) if job.advertise_host else f'"{NODE_HOSTNAME}"'
        line += f" --bind-host {shlex.quote(job.bind_host)} --advertise-host {advertise}"
    body.append(line)
    return "\n".join(header + body) + "\n"


def batch_script(job: NerscJobSettings, nodes: int, launch: NodeLaunch) -> str:
    """``render_job_script`` for a backend's reserve: what cannot be rendered is a ReservationError."""
    if nodes < 1:
        raise ReservationError(f"cannot reserve {nodes} nodes")
    try:
        return render_job_script(job, nodes, launch)
    except ValueError as err:
        raise ReservationError(f"cannot write the batch script: {err}") from None


def render_for_cli(*, session_id: str, etcd_endpoint: str, etcd_prefix: str = DEFAULT_PREFIX,
                   nodes: int = 1, service: str = "distributor", env: Optional[list[str]] = None,
                   **job_fields) -> str:
    """``detstream render-job``: build the settings from plain arguments and render the script.

    ``service`` is the node command (distributor, or count-files for the file path); ``env``
    takes ``NAME=VALUE`` strings; other keyword arguments are NerscJobSettings fields (None
    values keep their defaults). Raises ValueError with a readable message.
    """
    fields = {k: v for k, v in job_fields.items() if v is not None}
    if env:
        pairs = {}
        for item in env:
            name, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"--env {item!r} is not NAME=VALUE")
            pairs[name] = value
        fields["env"] = {**fields.get("env", {}), **pairs}
    from pydantic import ValidationError

    try:
        job = NerscJobSettings(**fields)
    except ValidationError as err:
        raise ValueError("; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}"
                                   for e in err.errors())) from None
    launch = NodeLaunch(service=service, session_id=session_id, etcd_endpoint=etcd_endpoint,
                        etcd_prefix=etcd_prefix)
    return render_job_script(job, nodes, launch)
