"""A local Superfacility API (SFAPI) emulator that the real ``sfapi_client`` can talk to.

It issues OAuth2 tokens for private-key JWT clients, reports machine status, runs submitted
batch scripts as local process groups with a Slurm-like environment and ``srun`` stand-in,
answers squeue/sacct queries, cancels jobs, and injects faults (outages, 429/5xx, token expiry,
"Job not found", jobs that never start) for tests and offline demos.
"""

from .app import API_PREFIX, TOKEN_PATH, create_app
from .jobs import Job, JobRunner, SbatchError, parse_sbatch_options
from .keys import ClientCredentials, generate_client_credentials, new_client_id
from .server import EmulatorServer
from .state import AuthError, EmulatorState

__all__ = [
    "API_PREFIX", "TOKEN_PATH", "AuthError", "ClientCredentials", "EmulatorServer", "EmulatorState",
    "Job", "JobRunner", "SbatchError", "create_app", "generate_client_credentials", "new_client_id",
    "parse_sbatch_options",
]
