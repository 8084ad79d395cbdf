"""Prefect blocks for detstream (configuration and credentials), registered via prefect.collections."""

from .detector import DetectorProfile
from .etcd import EtcdCoordinator

__all__ = ["DetectorProfile", "EtcdCoordinator"]
