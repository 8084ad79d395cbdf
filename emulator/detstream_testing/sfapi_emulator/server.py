"""Run the SFAPI emulator on a loopback port in a background thread (tests, offline demos)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import Optional, Union

import uvicorn

from .app import API_PREFIX, TOKEN_PATH, create_app
from .keys import ClientCredentials, generate_client_credentials
from .state import EmulatorState

log = logging.getLogger(__name__)


class EmulatorServer:
    """Context manager: an SFAPI emulator on a free 127.0.0.1 port, served by uvicorn in a thread.

    On exit it stops the server and kills every job process group it started (``slurm``, a
    ``SlurmSettings``: it runs jobs on that Slurm cluster instead, and cancels them on exit). ``credentials``
    (generated when not given) is registered as a client; pass extra ones to ``register``.

        with EmulatorServer(workdir=tmp_path) as emu:
            client = Client(emu.client_id, emu.credentials.private_key_pem,
                            api_base_url=emu.api_base_url, token_url=emu.token_url)
            emu.app_state.inject_http_errors(503, count=2)
    """

    def __init__(self, workdir: Union[str, Path, None] = None, *,
                 credentials: Optional[ClientCredentials] = None, host: str = "127.0.0.1",
                 port: int = 0, token_lifetime: float = 600.0, kill_grace: float = 2.0,
                 user: Optional[str] = None, check_perlmutter_options: bool = True,
                 log_level: str = "warning", startup_timeout: float = 20.0, slurm=None):
        self.credentials = credentials or generate_client_credentials()
        self.app_state = EmulatorState(workdir, token_lifetime=token_lifetime, kill_grace=kill_grace,
                                       user=user, check_perlmutter_options=check_perlmutter_options,
                                       slurm=slurm)
        self.app_state.register_client(self.credentials.client_id, self.credentials.public_key_pem)
        self.app = create_app(self.app_state)
        self.host = host
        self._port = port
        self._log_level = log_level
        self._startup_timeout = startup_timeout
        self._server: Optional[uvicorn.Server] = None
        self._thread: Optional[threading.Thread] = None
        self._sock: Optional[socket.socket] = None

    @property
    def client_id(self) -> str:
        return self.credentials.client_id

    @property
    def port(self) -> int:
        if self._sock is None:
            raise RuntimeError("emulator not started")
        return self._sock.getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_base_url(self) -> str:
        """What to pass as ``Client(api_base_url=...)``."""
        return self.base_url + API_PREFIX

    @property
    def token_url(self) -> str:
        """What to pass as ``Client(token_url=...)``."""
        return self.base_url + TOKEN_PATH

    @property
    def admin_url(self) -> str:
        return self.base_url + "/_emulator"

    def register(self, credentials: ClientCredentials) -> None:
        """Accept another client (e.g. a second key pair)."""
        self.app_state.register_client(credentials.client_id, credentials.public_key_pem)

    def start(self) -> "EmulatorServer":
        """Bind the port, start uvicorn, and return once it accepts connections."""
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((self.host, self._port))
        self._sock.set_inheritable(False)
        self.app.state.token_url = self.token_url
        config = uvicorn.Config(self.app, log_level=self._log_level, access_log=False,
                                lifespan="on", timeout_graceful_shutdown=3)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="sfapi-emulator", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("SFAPI emulator failed to start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop uvicorn and kill every job process group (idempotent)."""
        try:
            if self._server is not None:
                self._server.should_exit = True
            if self._thread is not None:
                self._thread.join(15)
                if self._thread.is_alive():
                    log.warning("SFAPI emulator thread did not stop in time")
        finally:
            self.app_state.shutdown()
            if self._sock is not None:
                self._sock.close()

    def __enter__(self) -> "EmulatorServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
