"""A local Superfacility API (SFAPI) emulator that the real ``sfapi_client`` can talk to.

It issues OAuth2 tokens for private-key JWT clients, reports machine status, runs submitted
batch scripts as local process groups with a Slurm-like environment and ``srun`` stand-in (or
as real Slurm jobs), answers squeue/sacct queries, cancels jobs, and injects faults (outages,
429/5xx, token expiry, "Job not found", jobs that never start) for tests and offline demos.

It is part of the ``detstream-testing`` distribution (``emulator/``), whose dependencies are its
web stack (fastapi, uvicorn, cryptography, joserfc) and python-hostlist; it imports nothing of
``detstream``, the code it stands in for.
"""

from __future__ import annotations

from .app import API_PREFIX, TOKEN_PATH, create_app
from .jobs import Job, JobRunner
from .keys import ClientCredentials, generate_client_credentials, new_client_id
from .sbatch import SbatchError, parse_sbatch_options
from .server import EmulatorServer
from .state import AuthError, EmulatorState

__all__ = [
    "API_PREFIX", "AuthError", "ClientCredentials", "create_app", "EmulatorServer", "EmulatorState",
    "generate_client_credentials", "Job", "JobRunner", "new_client_id", "parse_sbatch_options",
    "SbatchError", "TOKEN_PATH",
]
