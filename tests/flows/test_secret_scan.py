"""Issue 11's secret scan: a session with every secret set (etcd password, CURVE secret keys, the
SFAPI private key) leaves none of them in logs, summary.json, services/*.json, Prefect artifacts,
rendered job scripts, etcd values or any process's command line."""

from __future__ import annotations

import secrets
import sys
import uuid
from pathlib import Path

import psutil
import pytest
from pydantic import SecretStr

from detstream.coordination import Coordinator
from detstream.etcd.client import EtcdClient, add_user
from detstream.etcd_server import EmbeddedEtcd
from detstream_testing.sfapi_emulator import EmulatorServer

pytestmark = pytest.mark.usefixtures("prefect_harness", "no_stray_services")


def _text_files(root: Path):
    for path in root.rglob("*"):
        if path.is_file():
            yield path, path.read_bytes().decode("utf-8", "replace")


def test_no_secret_leaks_anywhere(tmp_path):
    from prefect.client.orchestration import get_client

    from detstream import progress
    from detstream.backends.jobscript import NerscJobSettings
    from detstream.blocks import EtcdCoordinator, NerscCompute, SfapiCredentials
    from detstream.flows import streaming_session

    password = "etcd-" + secrets.token_urlsafe(16)
    prefix, sid = f"/t{uuid.uuid4().hex[:10]}", "sec" + uuid.uuid4().hex[:8]
    cmdlines: set[str] = set()
    curve: set[str] = set()
    node_env_modes: set[int] = set()

    def look(_):
        node_env = tmp_path / "runs" / sid / "node.env"
        if node_env.exists():
            node_env_modes.add(node_env.stat().st_mode & 0o777)
        for p in psutil.process_iter(["cmdline"]):
            cmdlines.add(" ".join(p.info["cmdline"] or []))
            try:  # this session's services only: another suite on the machine has keys of its own
                if sid in " ".join(p.info["cmdline"] or []):
                    curve.update(v for k, v in p.environ().items() if k.startswith("DETSTREAM_CURVE_SECRET_"))
            except (psutil.Error, OSError):
                pass

    with EmbeddedEtcd(secure=True, unsafe_no_fsync=True) as etcd, \
            EmulatorServer(workdir=tmp_path / "slurm", kill_grace=2.0) as emu:
        with EtcdClient(etcd.endpoint, **etcd.root_login()) as root:
            add_user(root, "operator", password, role="operator", prefixes=[prefix + "/"])
        key_file = emu.credentials.write_key_file(tmp_path / "sfapi-key.pem")
        pem_lines = [line for line in key_file.read_text().splitlines() if line and not line.startswith("-----")]
        private_key = max(pem_lines[1:], key=len)  # a line of the key's body (the first line is the client id)
        tls = etcd.tls_login()
        block = EtcdCoordinator(endpoints=[etcd.endpoint], prefix=prefix, username="operator",
                                password=SecretStr(password), **tls)
        progress.LISTENERS.append(look)
        try:
            summary = streaming_session(
                etcd=block, backend="sfapi", security="curve", session_id=sid, scan_width=4, scan_height=4,
                detector="testcam", output_dir=str(tmp_path / "runs"), stall_timeout_s=20.0,
                reserve_timeout_s=60.0,
                sfapi_credentials=SfapiCredentials(key_file=str(key_file), api_base_url=emu.api_base_url,
                                                   token_url=emu.token_url),
                nersc_compute=NerscCompute(job=NerscJobSettings(
                    command=[sys.executable, "-m", "detstream"], bind_host="127.0.0.1",
                    advertise_host="127.0.0.1", walltime_minutes=10)))
        finally:
            progress.LISTENERS.remove(look)
        assert summary["state"] == "completed"
        with Coordinator(etcd.endpoint, prefix=prefix, **etcd.root_login()) as coord:
            etcd_values = coord.dump("/")
        assert not (tmp_path / "runs" / sid / "node.env").exists(), "the nodes' 0600 secrets file outlived the session"

    with get_client(sync_client=True) as client:
        artifacts = [str(a.data) + str(a.description) for a in client.read_artifacts()]
    assert len(curve) == 3, f"the services' CURVE secret keys were not seen ({len(curve)})"
    assert node_env_modes == {0o600}, "the nodes' secrets file was not seen, or others could read it"
    wanted = {"etcd password": [password], "CURVE secret key": sorted(curve), "SFAPI private key": [private_key]}
    places = {f"file {p}": text for p, text in _text_files(tmp_path) if p != key_file}
    places |= {f"etcd key {k}": v for k, v in etcd_values.items()}
    places |= {f"artifact {i}": a for i, a in enumerate(artifacts)}
    places |= {f"command line {i}": c for i, c in enumerate(cmdlines)}
    assert any("slurm_script" in where for where in places), "no rendered job script was scanned"
    found = [(what, where) for what, values in wanted.items() for value in values
             for where, text in places.items() if value in text]
    assert found == []
