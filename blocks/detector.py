"""DetectorProfile block: a detector's geometry saved in Prefect, so a new camera is a new block."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field

from detstream import profile as _profile

from . import _logos


class DetectorProfile(Block):
    """Frame size, sector layout and rate of a detector whose receivers each send one strip."""

    _block_type_name = "detstream Detector Profile"
    _block_type_slug = "detstream-detector-profile"
    _description = "Geometry of a detector streamed by detstream (frame size, sectors, pixel type)."
    _documentation_url = "https://github.com/OpenChemistry/stempy"  # the reader of this detector's raw format
    _logo_url = _logos.SETTINGS

    name: str = Field(default="4dcamera", description="Detector name; one session per detector at a time.")
    frame_rows: int = Field(default=576, gt=0, description="Frame height in pixels.")
    frame_cols: int = Field(default=576, gt=0, description="Frame width in pixels.")
    sectors: int = Field(default=4, gt=0, description="Receivers (horizontal strips) per frame.")
    dtype: str = Field(default="uint16", description="Pixel type.")
    frame_rate_hz: float = Field(default=87_000.0, ge=0, description="Nominal frame rate.")

    def to_profile(self) -> _profile.DetectorProfile:
        """The same geometry as the Prefect-free profile that sessions and services take."""
        return _profile.DetectorProfile(
            name=self.name, frame_rows=self.frame_rows, frame_cols=self.frame_cols,
            sectors=self.sectors, dtype=self.dtype, frame_rate_hz=self.frame_rate_hz)
