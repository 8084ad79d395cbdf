"""Detector profiles: the geometry of a camera as data, so a new camera is a new profile, not new code."""

from __future__ import annotations

import sys
from functools import cached_property

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class DetectorProfile(BaseModel):
    """A detector whose frames arrive as equal horizontal strips (sectors), one per receiver.

    Sector ``s`` holds frame rows ``[s * sector_rows, (s + 1) * sector_rows)`` at full width,
    as the 4D Camera's receivers deliver them and as stempy assembles raw v5 files.
    """

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="Profile name, also the detector name used for the etcd lock.")
    frame_rows: int = Field(gt=0, description="Frame height in pixels.")
    frame_cols: int = Field(gt=0, description="Frame width in pixels.")
    sectors: int = Field(gt=0, description="Number of sectors (receivers) per frame.")
    dtype: str = Field(default="uint16", description="Pixel type on the wire, little endian.")
    frame_rate_hz: float = Field(default=0.0, ge=0, description="Nominal acquisition rate.")

    @model_validator(mode="after")
    def _sectors_divide_rows(self) -> "DetectorProfile":
        if self.frame_rows % self.sectors:
            raise ValueError(
                f"profile {self.name!r}: {self.sectors} sectors do not divide {self.frame_rows} rows"
            )
        return self

    @property
    def frame_shape(self) -> tuple[int, int]:
        return (self.frame_rows, self.frame_cols)

    @property
    def sector_rows(self) -> int:
        return self.frame_rows // self.sectors

    @property
    def sector_shape(self) -> tuple[int, int]:
        return (self.sector_rows, self.frame_cols)

    @cached_property
    def np_dtype(self) -> np.dtype:
        """Pixel dtype, little endian, spelled natively on little-endian hosts (stempy insists)."""
        dt = np.dtype(self.dtype)
        return dt if sys.byteorder == "little" else dt.newbyteorder("<")

    @property
    def sector_nbytes(self) -> int:
        return self.sector_rows * self.frame_cols * self.np_dtype.itemsize

    @property
    def frame_nbytes(self) -> int:
        return self.sector_nbytes * self.sectors

    def sector_slice(self, sector: int) -> slice:
        """Rows of the frame that sector ``sector`` covers."""
        return slice(sector * self.sector_rows, (sector + 1) * self.sector_rows)


NCEM_4D_CAMERA = DetectorProfile(
    name="4dcamera", frame_rows=576, frame_cols=576, sectors=4, frame_rate_hz=87_000.0
)
# A small geometry for quick checks and tests: same shape rules, 1/16 of the pixels.
SMALL_TEST_CAMERA = DetectorProfile(
    name="testcam", frame_rows=144, frame_cols=144, sectors=4, frame_rate_hz=10_000.0
)

PROFILES: dict[str, DetectorProfile] = {p.name: p for p in (NCEM_4D_CAMERA, SMALL_TEST_CAMERA)}


def get_profile(name: str) -> DetectorProfile:
    """Look up a built-in profile by name, with an error that lists the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ValueError(f"unknown detector profile {name!r}; known profiles: {known}") from None
