"""Where services listen: ipc:// in the session's private socket folder when they share a host,
tcp:// on an interface when they do not. The endpoint a service registers in etcd says which."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Optional

#: sun_path is 108 bytes on Linux, the terminating NUL included.
MAX_IPC_PATH = 107


def runtime_root() -> Path:
    """This user's detstream runtime folder: $XDG_RUNTIME_DIR (else the temp dir)/detstream-<uid>."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"detstream-{os.getuid()}"


def _private_dir(path: Path) -> Path:
    """Create ``path`` mode 0700, or check that an existing one is ours and 0700."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        st = path.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
            raise PermissionError(f"{path} must be a folder of uid {os.getuid()} with mode 0700 "
                                  f"(it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})") from None
    return path


def session_socket_dir(session_id: str, create: bool = True) -> Path:
    """The session's ipc socket folder (0700), under the user's runtime folder (0700)."""
    path = runtime_root() / session_id
    if create:
        _private_dir(runtime_root())
        _private_dir(path)
    return path


def remove_session_sockets(session_id: str) -> None:
    """Remove the session's socket folder (its services unlink their own sockets; this is the rest)."""
    shutil.rmtree(session_socket_dir(session_id, create=False), ignore_errors=True)


def bind_base(transport: str, session_id: str, bind_host: str) -> str:
    """What a service binds under: ``ipc://<socket folder>`` or ``tcp://<bind_host>:*``."""
    if transport == "ipc":
        return f"ipc://{session_socket_dir(session_id)}"
    return f"tcp://{bind_host}:*"


def bind_address(base: str, name: str) -> str:
    """One socket's address under ``base``: tcp binds any free port, ipc a file named ``name``."""
    if not base.startswith("ipc://"):
        return base
    address = f"{base}/{name}"
    if len(address) - len("ipc://") > MAX_IPC_PATH:
        raise ValueError(f"ipc socket path {address[len('ipc://'):]!r} is longer than {MAX_IPC_PATH} "
                         "bytes; set XDG_RUNTIME_DIR (or TMPDIR) to a shorter folder")
    return address


def advertise(endpoint: str, bind_host: str, advertise_host: Optional[str]) -> str:
    """The endpoint as others reach it: for tcp the bound host replaced by the advertised one."""
    if advertise_host and endpoint.startswith("tcp://"):
        return endpoint.replace(bind_host, advertise_host, 1)
    return endpoint
