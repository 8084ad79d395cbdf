"""SlurmCompute: the batch job a session asks any Slurm cluster for directly (no Superfacility API)."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field

from detstream.backends.slurm import SlurmJobSettings, SlurmSettings

from . import _logos


class SlurmCompute(Block):
    """Where Slurm is (SLURM_CONF, its commands, a shared folder) and the job that runs one distributor per node."""

    _block_type_name = "detstream Slurm Compute"
    _block_type_slug = "detstream-slurm-compute"
    _description = ("A Slurm cluster reached with sbatch/squeue/scancel from where the flow runs, and the batch "
                    "job (QOS, constraint, partition, account, walltime, software environment) that runs one "
                    "detstream distributor per node; the node count comes from the session.")
    _documentation_url = "https://slurm.schedmd.com/sbatch.html"
    _logo_url = _logos.SETTINGS

    cluster: SlurmSettings = Field(default_factory=SlurmSettings, title="Cluster",
                                   description="SLURM_CONF, where Slurm's commands are, and a folder the nodes read.")
    job: SlurmJobSettings = Field(default_factory=SlurmJobSettings, title="Job settings",
                                  description="Slurm options and node environment of the session's batch job.")

    def settings(self) -> SlurmSettings:
        """How to reach the cluster (what SlurmBackend takes)."""
        return self.cluster

    def job_settings(self) -> SlurmJobSettings:
        return self.job
