"""Prefect blocks for detstream (configuration and credentials), registered via prefect.collections."""

from .detector import DetectorProfile
from .etcd import EtcdCoordinator
from .sfapi import NerscCompute, SfapiCredentials
from .slurm import SlurmCompute

__all__ = ["DetectorProfile", "EtcdCoordinator", "NerscCompute", "SfapiCredentials", "SlurmCompute"]
