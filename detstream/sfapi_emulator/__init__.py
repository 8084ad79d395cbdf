"""A local Superfacility API (SFAPI) emulator that the real ``sfapi_client`` can talk to.

It issues OAuth2 tokens for private-key JWT clients, reports machine status, runs submitted
batch scripts as local process groups with a Slurm-like environment and ``srun`` stand-in,
answers squeue/sacct queries, cancels jobs, and injects faults (outages, 429/5xx, token expiry,
"Job not found", jobs that never start) for tests and offline demos.

Its web stack (fastapi, uvicorn, cryptography, joserfc) is the ``emulator`` extra
(``pip install 'detstream[emulator]'``): the names below are imported on first use, so this
package imports without it and a missing dependency is named with the extra to install.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Distributions of the ``emulator`` extra, by the top-level module they install.
EXTRA_MODULES = frozenset({"fastapi", "starlette", "uvicorn", "cryptography", "joserfc"})

_EXPORTS = {
    "API_PREFIX": "app", "TOKEN_PATH": "app", "create_app": "app",
    "Job": "jobs", "JobRunner": "jobs", "SbatchError": "sbatch", "parse_sbatch_options": "sbatch",
    "ClientCredentials": "keys", "generate_client_credentials": "keys", "new_client_id": "keys",
    "EmulatorServer": "server", "AuthError": "state", "EmulatorState": "state",
}
__all__ = sorted(_EXPORTS, key=str.lower)

if TYPE_CHECKING:
    from .app import API_PREFIX, TOKEN_PATH, create_app
    from .jobs import Job, JobRunner
    from .keys import ClientCredentials, generate_client_credentials, new_client_id
    from .sbatch import SbatchError, parse_sbatch_options
    from .server import EmulatorServer
    from .state import AuthError, EmulatorState


def import_extra(module: str):
    """Import ``module``; if a dependency of the emulator extra is missing, say how to install it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        missing = (err.name or "").partition(".")[0]
        if missing not in EXTRA_MODULES:
            raise
        raise ModuleNotFoundError(f"the SFAPI emulator needs {missing}, which is not installed: "
                                  "pip install 'detstream[emulator]'", name=err.name) from err


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_extra(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
