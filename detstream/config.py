"""Session configuration as data: one validated model that the flow, the services and the CLI share."""

from __future__ import annotations

import os
import secrets
import uuid
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .profile import DetectorProfile, get_profile
from .session_dir import SessionDir

DEFAULT_PREFIX = "/detstream"

# A service's etcd login reaches it in these variables, never on its command line (ps shows argv).
ETCD_USERNAME_ENV = "DETSTREAM_ETCD_USERNAME"
ETCD_PASSWORD_ENV = "DETSTREAM_ETCD_PASSWORD"
ETCD_CA_FILE_ENV = "DETSTREAM_ETCD_CA_FILE"
ETCD_CERT_FILE_ENV = "DETSTREAM_ETCD_CERT_FILE"
ETCD_KEY_FILE_ENV = "DETSTREAM_ETCD_KEY_FILE"
#: A file holding the password (read when DETSTREAM_ETCD_PASSWORD is not set); must not be group/world readable.
ETCD_PASSWORD_FILE_ENV = "DETSTREAM_ETCD_PASSWORD_FILE"
ETCD_OUTAGE_BUDGET_ENV = "DETSTREAM_ETCD_OUTAGE_BUDGET_S"  # how long a service rides out an etcd outage
_LOGIN_ENV = {"username": ETCD_USERNAME_ENV, "password": ETCD_PASSWORD_ENV, "ca_file": ETCD_CA_FILE_ENV,
              "cert_file": ETCD_CERT_FILE_ENV, "key_file": ETCD_KEY_FILE_ENV}


def etcd_login_env(username: Optional[str] = None, password: Optional[str] = None, ca_file: Optional[str] = None,
                   outage_budget_s: Optional[float] = None, cert_file: Optional[str] = None,
                   key_file: Optional[str] = None) -> dict[str, str]:
    """The environment variables that hand this etcd login to a service the session starts."""
    given = {"username": username, "password": password, "ca_file": ca_file, "cert_file": cert_file,
             "key_file": key_file}
    env = {_LOGIN_ENV[k]: str(v) for k, v in given.items() if v is not None}
    if outage_budget_s is not None:
        env[ETCD_OUTAGE_BUDGET_ENV] = f"{outage_budget_s:g}"
    return env


def etcd_login_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Coordinator keyword arguments from those variables (what a started service and the CLI read).

    The password comes from DETSTREAM_ETCD_PASSWORD, else from the file DETSTREAM_ETCD_PASSWORD_FILE names.
    """
    login: dict[str, Any] = {"username": environ.get(ETCD_USERNAME_ENV), "password": environ.get(ETCD_PASSWORD_ENV),
                             "ca_file": environ.get(ETCD_CA_FILE_ENV)}
    if login["password"] is None and environ.get(ETCD_PASSWORD_FILE_ENV):
        from .secretfiles import read_secret_file

        login["password"] = read_secret_file(environ[ETCD_PASSWORD_FILE_ENV], "etcd password")
    for key in ("cert_file", "key_file"):
        if environ.get(_LOGIN_ENV[key]):
            login[key] = environ[_LOGIN_ENV[key]]
    if environ.get(ETCD_OUTAGE_BUDGET_ENV):
        login["outage_budget_s"] = float(environ[ETCD_OUTAGE_BUDGET_ENV])
    return login


def check_prefix(prefix: str) -> str:
    """An etcd key prefix as every key is built under it: starts with '/', does not end with one."""
    if not prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError(f"etcd prefix {prefix!r} must start with '/' and not end with '/'")
    return prefix


#: A scan side in positions: the wire header carries it as a 16-bit number.
MAX_SCAN_SIDE = 65535


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


class VirtualImaging(BaseModel):
    """The virtual bright-field disk and dark-field ring, and the live images the nodes publish."""

    model_config = ConfigDict(frozen=True)

    live: bool = Field(default=True, description="Nodes publish per-position bright and dark field "
                       "while they count, for the live image.")
    center: Optional[tuple[float, float]] = Field(
        default=None, description="Bright-field disk centre (row, col) in frame pixels; none: found "
        "from the summed pattern (live: of the first frames; final: of the whole scan).")
    bf_radius: Optional[float] = Field(default=None, gt=0, description="Bright-field disk radius, pixels.")
    adf_inner: Optional[float] = Field(default=None, ge=0, description="Dark-field ring inner radius, "
                                       "pixels; none: 1.5 bright-field radii.")
    adf_outer: Optional[float] = Field(default=None, gt=0, description="Dark-field ring outer radius, "
                                       "pixels; none: half the frame's shorter side.")
    find_frames: int = Field(default=256, gt=0, description="Frames a node sums to find the disk "
                             "for the live images when the centre and radius are not given.")
    publish_s: float = Field(default=1.0, gt=0, description="How often a node publishes its live images.")
    redraw_s: float = Field(default=2.0, gt=0, description="How often the session redraws live.png "
                            "(and the live artifact) from what the nodes published.")

    @model_validator(mode="after")
    def _disk_given_whole(self) -> "VirtualImaging":
        if (self.center is None) != (self.bf_radius is None):
            raise ValueError("give the bright-field disk's center and bf_radius together, or neither")
        if self.adf_inner is not None and self.adf_outer is not None and self.adf_outer < self.adf_inner:
            raise ValueError(f"adf_outer ({self.adf_outer}) must not be below adf_inner ({self.adf_inner})")
        return self


class SessionSpec(BaseModel):
    """Everything a streaming or file-transfer session needs; stored at sessions/<sid>/spec."""

    model_config = ConfigDict(frozen=True)

    session_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    detector_profile: DetectorProfile = Field(default_factory=lambda: get_profile("4dcamera"),
                                              description="Detector geometry; its name is the lock's detector.")
    scan_width: int = Field(default=32, gt=0, le=MAX_SCAN_SIDE)
    scan_height: int = Field(default=32, gt=0, le=MAX_SCAN_SIDE)
    scan_number: int = Field(default=1, ge=0)
    source: Literal["simulated", "replay"] = "simulated"
    replay_dir: Optional[Path] = None
    seed: int = Field(default=0, description="Simulator seed.")
    nodes: int = Field(default=2, gt=0)
    workers_per_node: int = Field(default=1, gt=0)
    output_dir: Path = Path("runs")
    counting: CountingParams = CountingParams()
    virtual: VirtualImaging = VirtualImaging()
    etcd_prefix: str = DEFAULT_PREFIX
    register_timeout_s: float = Field(default=60.0, gt=0, description="Wait for services to register.")
    stall_timeout_s: float = Field(default=60.0, gt=0, description="No progress for this long ends the scan; "
                                   "a node that heartbeats but acknowledges none of the work it holds for "
                                   "this long is fenced as stalled (never the last live node).")
    send_hwm: int = Field(default=64, gt=0, description="ZeroMQ high-water mark, in sector blocks "
                          "(queues hold send_hwm // batch_blocks batches, at least 2).")
    batch_blocks: int = Field(default=64, gt=0, le=1024, description="Sector blocks per producer "
                              "message, all of positions owned by one node (benchmarks/bench_dataplane.py "
                              "chose the default: the smallest batch at a raw hop's GB/s per core).")
    frame_rate_hz: Optional[float] = Field(default=None, gt=0, description="Producers send at this many "
                                           "frames per second, as the camera acquires (the 4D Camera: "
                                           "87,000); none: as fast as the data plane takes them.")
    aggregators: int = Field(default=1, gt=0, description="Aggregator shards, each routing a share of the "
                             "sectors to every node (needs acks: the windows keep the shards in step).")
    counting_mode: Literal["threads", "processes"] = Field(
        default="threads", description="Count in the distributor's own threads (numba releases the GIL; "
        "no task or result messages) or in worker processes fed batched tasks through shared memory. "
        "Threads cost less CPU per frame (benchmarks/RESULTS.md); processes isolate a crashing kernel.")
    transport: Literal["auto", "tcp", "ipc"] = Field(
        default="auto", description="How services reach one another: ipc:// sockets (same host only) "
        "or tcp://. auto: the backend decides (local: ipc; cluster backends: tcp).")
    acks: bool = Field(default=True, description="Acknowledged delivery: nodes acknowledge durable "
                       "frames, the aggregator re-routes a lost node's unacknowledged frames. Off: "
                       "fire-and-forget, kept for comparison.")
    window_frames: Optional[int] = Field(default=None, gt=0, description="Frames the aggregator keeps "
                                         "sent but unacknowledged; a full window stops its reads. "
                                         "Default: 2 x segment_frames per node.")
    segment_frames: int = Field(default=256, gt=0, description="A node commits (and acknowledges) its "
                                "part segment every this many counted frames...")
    segment_seconds: float = Field(default=0.5, gt=0, description="...or this long after the segment's "
                                   "first frame, whichever comes first.")
    node_timeout_s: float = Field(default=10.0, gt=0, description="A node that holds unacknowledged frames "
                                  "and sends nothing at all (no heartbeat, no ACK) for this long is lost "
                                  "as unreachable (never the last live node).")
    session_token: int = Field(default_factory=lambda: secrets.randbits(32), ge=0, lt=2**32,
                               description="Carried by every message of the session (with the scan number), "
                               "so that another session's messages are told apart and rejected.")
    security: Literal["auto", "curve", "none"] = Field(
        default="auto", description="CURVE on the ZeroMQ hops: auto = on wherever a socket listens beyond "
        "loopback or ipc; curve = always; none = never (asked for by name).")

    @field_validator("etcd_prefix")
    @classmethod
    def _prefix_shape(cls, v: str) -> str:
        return check_prefix(v)

    @model_validator(mode="after")
    def _shards_fit(self) -> "SessionSpec":
        if self.aggregators > self.detector_profile.sectors:
            raise ValueError(f"{self.aggregators} aggregators for {self.detector_profile.sectors} sectors: "
                             "each shard routes at least one sector")
        if self.aggregators > 1 and not self.acks:
            raise ValueError("aggregators > 1 needs acks: the shards' windows keep the sectors in step")
        return self

    def shard_sectors(self, shard: int) -> list[int]:
        """The sectors aggregator shard ``shard`` routes (contiguous shares, as even as they go)."""
        return [s for s in range(self.detector_profile.sectors) if self.shard_of(s) == shard]

    def shard_of(self, sector: int) -> int:
        """The aggregator shard that routes ``sector``."""
        return sector * self.aggregators // self.detector_profile.sectors

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
    def delivery_window(self) -> int:
        """The aggregator's window in frames: room for every node to fill a segment twice over."""
        return self.window_frames or 2 * self.segment_frames * self.nodes

    @property
    def hwm_messages(self) -> int:
        """The ZeroMQ high-water mark in messages: send_hwm blocks in batches, at least 2."""
        return max(2, self.send_hwm // self.batch_blocks)

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
