"""The session folder's layout: the one place that knows where a session's files live.

Every other module asks a :class:`SessionDir` for a path instead of spelling out names, so
the layout can change in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SessionDir:
    """``<output_dir>/<session id>/`` and what goes in it."""

    root: Path

    @property
    def counts(self) -> Path:
        """The counted scan in stempy's layout."""
        return self.root / "counted.h5"

    @property
    def image(self) -> Path:
        """The virtual bright field, as a figure (colour bar, axes in scan positions)."""
        return self.root / "virtual_bright_field.png"

    @property
    def dark_field_image(self) -> Path:
        """The virtual annular dark field, as a figure."""
        return self.root / "virtual_dark_field.png"

    @property
    def pattern_image(self) -> Path:
        """The summed diffraction pattern, log scale."""
        return self.root / "summed_pattern.png"

    @property
    def live_image(self) -> Path:
        """Bright and dark field as the nodes count them, rewritten every few seconds while the scan streams."""
        return self.root / "live.png"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def spec(self) -> Path:
        """The session's spec, so a session whose orchestrator died can be salvaged from its folder."""
        return self.root / "spec.json"

    @property
    def dark_reference(self) -> Path:
        """The simulator's dark map, saved when a simulated session has none of its own."""
        return self.root / "dark_reference.npy"

    @property
    def node_env(self) -> Path:
        """NAME=VALUE secrets a batch job's nodes source (0600, removed when the session ends)."""
        return self.root / "node.env"

    @property
    def orchestrator_lock(self) -> Path:
        """Flocked by the orchestrator while the session runs: free once it has died (session/lock.py)."""
        return self.root / "orchestrator.lock"

    @property
    def parts(self) -> Path:
        return self.root / "parts"

    def part(self, node: str) -> Path:
        """Where node ``node`` (e.g. ``node-0``) writes its share of the counted scan."""
        return self.parts / f"{node}.h5"

    @property
    def services(self) -> Path:
        return self.root / "services"

    def report(self, role: str, name: str) -> Path:
        """A service's final report, e.g. ``services/distributor-node-0.json``."""
        return self.services / f"{role}-{name}.json"

    def reports(self, role: str) -> list[Path]:
        return sorted(self.services.glob(f"{role}-*.json"))

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log(self, role: str, name: str) -> Path:
        return self.logs / f"{role}-{name}.log"

    @property
    def acquired(self) -> Path:
        """File-transfer path: raw files as the acquisition side wrote them."""
        return self.root / "acquired"

    @property
    def transferred(self) -> Path:
        """File-transfer path: the raw files at the compute site, verified."""
        return self.root / "transferred"
