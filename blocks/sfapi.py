"""SFAPI blocks: the NERSC Superfacility API client credentials, and how a session's batch job looks."""

from __future__ import annotations

from typing import Literal, Optional

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from detstream.backends.jobscript import MAX_WALLTIME_MINUTES, NerscJobSettings
from detstream.backends.sfapi import SFAPI_BASE_URL, SFAPI_TOKEN_URL, SfapiSettings


class SfapiCredentials(Block):
    """An SFAPI client (id + private key) that may submit and cancel jobs at NERSC."""

    _block_type_name = "detstream SFAPI Credentials"
    _block_type_slug = "detstream-sfapi-credentials"
    _description = ("NERSC Superfacility API client id and private key (inline, or the path of an "
                    "sfapi_client key file with mode 600) used to reserve compute nodes.")
    _documentation_url = "https://docs.nersc.gov/services/sfapi/"

    client_id: Optional[str] = Field(
        default=None, description="SFAPI client id from Iris; read from the key file's first line if empty.")
    private_key: Optional[SecretStr] = Field(
        default=None, description="The client's PEM private key (or JWK JSON). Leave empty to use key_file.")
    key_file: Optional[str] = Field(
        default=None, description="Path of an sfapi_client key file (client id, then PEM), mode 600, "
                                  "on the machine where the flow runs.")
    api_base_url: str = Field(default=SFAPI_BASE_URL, description="SFAPI base URL.")
    token_url: str = Field(default=SFAPI_TOKEN_URL, description="OAuth2 token endpoint.")

    def settings(self) -> SfapiSettings:
        """The same credentials as detstream's plain settings (what SfapiBackend takes)."""
        return SfapiSettings(client_id=self.client_id, private_key=self.private_key, key_file=self.key_file,
                             api_base_url=self.api_base_url, token_url=self.token_url)

    def get_client(self, **kwargs):
        """A new synchronous ``sfapi_client.Client``; use it as a context manager."""
        return self.settings().client(**kwargs)

    def get_async_client(self, **kwargs):
        """A new ``sfapi_client.AsyncClient``; use it as an async context manager."""
        return self.settings().async_client(**kwargs)


class NerscCompute(Block):
    """The batch job a streaming session asks NERSC for, and how detstream starts on each node."""

    _block_type_name = "detstream NERSC Compute"
    _block_type_slug = "detstream-nersc-compute"
    _description = ("Machine, QOS, account, walltime and software environment of the Slurm job that "
                    "runs one detstream distributor per node; the node count comes from the session.")
    _documentation_url = "https://docs.nersc.gov/jobs/policy/"

    machine: str = Field(default="perlmutter", description="NERSC compute system.")
    account: Optional[str] = Field(default=None, description="NERSC project to charge (-A), e.g. m1234.")
    qos: str = Field(default="realtime", description="Slurm QOS (-q); streaming uses realtime.")
    constraint: str = Field(default="cpu", description="Node type (-C): cpu or gpu.")
    walltime_minutes: int = Field(default=30, ge=1, le=MAX_WALLTIME_MINUTES,
                                  description=f"Walltime (-t), at most {MAX_WALLTIME_MINUTES} minutes.")
    reservation: Optional[str] = Field(default=None, description="Slurm reservation (--reservation), if any.")
    job_name_prefix: str = Field(default="detstream", description="Job name is <prefix>-<session id>.")
    exclusive: bool = Field(default=True, description="Whole nodes (--exclusive).")
    modules: list[str] = Field(default_factory=list, description="`module load` each of these first.")
    conda_env: Optional[str] = Field(default=None, description="`conda activate` this environment (name or path).")
    image: Optional[str] = Field(default=None, description="Container image that has detstream installed.")
    container: Literal["shifter", "podman-hpc"] = Field(default="shifter",
                                                         description="Container runtime for `image`.")
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

    def job_settings(self) -> NerscJobSettings:
        """Validated job settings for SfapiBackend / render_job_script (raises ValueError if inconsistent)."""
        return NerscJobSettings(**{name: getattr(self, name) for name in NerscJobSettings.model_fields})
