"""`detstream run --etcd https://...` against an etcd with TLS, client certificates and auth on,
the login from the environment and a 0600 password file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from detstream.etcd.client import EtcdClient, add_user
from detstream.etcd_server import EmbeddedEtcd


@pytest.fixture(scope="module")
def secure_etcd():
    with EmbeddedEtcd(secure=True, unsafe_no_fsync=True) as etcd:
        yield etcd


def test_run_against_a_tls_etcd_with_auth(tmp_path, secure_etcd):
    with EtcdClient(secure_etcd.endpoint, **secure_etcd.root_login()) as root:
        add_user(root, "operator", "op-pw-123", role="operator", prefixes=["/detstream/"])
    password_file = tmp_path / "etcd-password"
    password_file.write_text("op-pw-123\n")
    password_file.chmod(0o600)
    tls = secure_etcd.tls_login()
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "DETSTREAM_ETCD_USERNAME": "operator", "DETSTREAM_ETCD_PASSWORD_FILE": str(password_file),
           "DETSTREAM_ETCD_CA_FILE": tls["ca_file"], "DETSTREAM_ETCD_CERT_FILE": tls["cert_file"],
           "DETSTREAM_ETCD_KEY_FILE": tls["key_file"]}
    env.pop("PREFECT_API_URL", None)
    env.pop("DETSTREAM_ETCD_PASSWORD", None)
    sid = "tls" + uuid.uuid4().hex[:8]
    out = tmp_path / "runs"
    done = subprocess.run(
        [sys.executable, "-m", "detstream.flows.cli", "run", "--etcd", secure_etcd.endpoint, "--session-id", sid,
         "--output", str(out), "--scan", "4x4", "--nodes", "1", "--detector", "testcam"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / sid / "summary.json").read_text())
    assert summary["state"] == "completed" and summary["frames_counted"] == 16

    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    wrong.chmod(0o600)
    refused = subprocess.run(
        [sys.executable, "-m", "detstream.flows.cli", "run", "--etcd", secure_etcd.endpoint, "--scan", "4x4"],
        env={**env, "DETSTREAM_ETCD_PASSWORD_FILE": str(wrong)}, cwd=tmp_path, capture_output=True, text=True,
        timeout=120)
    assert refused.returncode != 0
    said = " ".join((refused.stdout + refused.stderr).split())  # rich wraps long lines
    assert "rejected authentication as user 'operator'" in said
