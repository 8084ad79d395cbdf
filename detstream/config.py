"""Session configuration as data: one validated model that the flow, the services and the CLI share."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .profile import DetectorProfile, get_profile
from .session_dir import SessionDir

DEFAULT_PREFIX = "/detstream"


def check_prefix(prefix: str) -> str:
    """An etcd key prefix as every key is built under it: starts with '/', does not end with one."""
    if not prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError(f"etcd prefix {prefix!r} must start with '/' and not end with '/'")
    return prefix


class CountingParams(BaseModel):
    """Electron-counting parameters, as stempy.image.electron_count_frame takes them."""

    model_config = ConfigDict(frozen=True)

    enabled: bool = Field(default=True, description="Count electrons; off streams and assembles only.")
    background_threshold: float = Field(default=12.0, description="Pixels at or below this (after dark) are zeroed.")
    xray_threshold: float = Field(default=2000.0, description="Pixels at or above this are zeroed.")
    dark_reference: Optional[Path] = Field(default=None, description=".npy dark reference (frame shape).")
    gain: Optional[Path] = Field(default=None, description=".npy gain map (frame shape).")

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> "CountingParams":
        if self.xray_threshold <= self.background_threshold:
            raise ValueError(
                f"xray_threshold ({self.xray_threshold}) must be above background_threshold "
                f"({self.background_threshold})"
            )
        return self


class SessionSpec(BaseModel):
    """Everything a streaming or file-transfer session needs; stored at sessions/<sid>/spec."""

    model_config = ConfigDict(frozen=True)

    session_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    detector_profile: DetectorProfile = Field(default_factory=lambda: get_profile("4dcamera"),
                                              description="Detector geometry; its name is the lock's detector.")
    scan_width: int = Field(default=32, gt=0, le=65535)
    scan_height: int = Field(default=32, gt=0, le=65535)
    scan_number: int = Field(default=1, ge=0)
    source: Literal["simulated", "replay"] = "simulated"
    replay_dir: Optional[Path] = None
    seed: int = Field(default=0, description="Simulator seed.")
    nodes: int = Field(default=2, gt=0)
    workers_per_node: int = Field(default=1, gt=0)
    output_dir: Path = Path("runs")
    counting: CountingParams = CountingParams()
    etcd_prefix: str = DEFAULT_PREFIX
    register_timeout_s: float = Field(default=60.0, gt=0, description="Wait for services to register.")
    stall_timeout_s: float = Field(default=60.0, gt=0, description="No progress for this long ends the scan.")
    send_hwm: int = Field(default=64, gt=0, description="ZeroMQ high-water mark, in messages.")

    @field_validator("etcd_prefix")
    @classmethod
    def _prefix_shape(cls, v: str) -> str:
        return check_prefix(v)

    @model_validator(mode="after")
    def _replay_has_dir(self) -> "SessionSpec":
        if self.source == "replay" and self.replay_dir is None:
            raise ValueError("source 'replay' needs replay_dir")
        return self

    @property
    def profile(self) -> DetectorProfile:
        return self.detector_profile

    @property
    def detector(self) -> str:
        return self.detector_profile.name

    @property
    def frames_expected(self) -> int:
        return self.scan_width * self.scan_height

    @property
    def session_dir(self) -> Path:
        return self.output_dir / self.session_id

    @property
    def paths(self) -> SessionDir:
        """The session folder's layout (the one owner of its file names)."""
        return SessionDir(self.session_dir)
