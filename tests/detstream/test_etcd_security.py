"""The private etcd locked down: TLS with this run's certificates, auth, one user per session."""

from __future__ import annotations

import os
import stat

import pytest

from detstream.config import etcd_login_from_env
from detstream.coordination import Coordinator
from detstream.etcd import CoordinationError
from detstream.etcd.errors import AuthenticationError
from detstream.etcd_server import EmbeddedEtcd

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def secure_etcd():
    with EmbeddedEtcd(secure=True, unsafe_no_fsync=True) as etcd:
        yield etcd


def test_the_session_user_reads_and_writes_its_own_keys_and_lock_only(secure_etcd):
    with Coordinator(secure_etcd.endpoint, **secure_etcd.root_login()) as root:
        root.put_spec("other", {"secret": "theirs"})
    with Coordinator(secure_etcd.endpoint, **secure_etcd.session_login("/detstream", "mine", "4dcamera")) as mine:
        mine.put_spec("mine", {"a": 1})
        assert mine.get_spec("mine") == {"a": 1}
        with mine.lease(5) as lease:
            mine.lock_detector("4dcamera", "mine", lease)
            assert mine.lock_holder("4dcamera") == "mine"
            assert mine.unlock_detector("4dcamera", "mine")
        with pytest.raises(CoordinationError, match="permission denied.*session-mine.*lacks permission"):
            mine.get_spec("other")
        with pytest.raises(CoordinationError, match="permission denied"):
            mine.sessions()
        with pytest.raises(CoordinationError, match="permission denied"):
            mine.put_spec("other", {"forged": True})


def test_clear_refusals_wrong_password_missing_ca_no_client_certificate_no_login(secure_etcd):
    login = secure_etcd.session_login("/detstream", "s2", "4dcamera")
    with pytest.raises(AuthenticationError, match="rejected authentication as user 'session-s2'.*invalid user"):
        Coordinator(secure_etcd.endpoint, **{**login, "password": "wrong"})
    without_ca = {k: v for k, v in login.items() if k != "ca_file"}
    with pytest.raises(CoordinationError, match="not signed by a CA this client trusts.*CA_FILE"):
        Coordinator(secure_etcd.endpoint, **without_ca)
    without_cert = {k: v for k, v in login.items() if k not in ("cert_file", "key_file")}
    with pytest.raises(CoordinationError, match="asks for a client certificate"):
        Coordinator(secure_etcd.endpoint, **without_cert)
    anonymous = {k: v for k, v in login.items() if k not in ("username", "password")}
    with pytest.raises(AuthenticationError, match="requires a username and password"):
        Coordinator(secure_etcd.endpoint, **anonymous).get_spec("s2")
    with pytest.raises(CoordinationError, match="CA file .* does not exist"):
        Coordinator(secure_etcd.endpoint, **{**login, "ca_file": "/nonexistent/ca.pem"})


def test_the_certificates_live_in_a_private_directory(secure_etcd):
    tls = secure_etcd.tls_login()
    directory = os.path.dirname(tls["ca_file"])
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tls["key_file"]).st_mode) == 0o600
    assert secure_etcd.endpoint.startswith("https://")


def test_the_password_comes_from_a_private_file_never_a_readable_one(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    env = {"DETSTREAM_ETCD_USERNAME": "u", "DETSTREAM_ETCD_PASSWORD_FILE": str(secret)}
    assert etcd_login_from_env(env)["password"] == "s3cret"
    secret.chmod(0o644)
    with pytest.raises(ValueError, match="may be read by others.*chmod 600"):
        etcd_login_from_env(env)


def test_a_restarted_private_etcd_is_locked_down_again():
    etcd = EmbeddedEtcd(secure=True, unsafe_no_fsync=True)
    try:
        etcd.start()
        etcd.stop()
        etcd.start()  # a fresh, empty etcd on the same endpoint: auth is enabled anew
        with pytest.raises(AuthenticationError, match="requires a username and password"):
            Coordinator(etcd.endpoint, **etcd.tls_login()).get_spec("x")
        with Coordinator(etcd.endpoint, **etcd.session_login("/detstream", "x", "4dcamera")) as coord:
            coord.put_spec("x", {"ok": True})
            assert coord.get_spec("x") == {"ok": True}
    finally:
        etcd.stop()


def test_a_private_session_hands_its_services_the_session_user_never_root():
    from detstream.config import etcd_login_from_env
    from detstream.session import coordination

    context = coordination(None, "/detstream", ("s9", "4dcamera"))
    with context as (endpoint, orchestrator):
        assert endpoint.startswith("https://") and orchestrator.etcd.username == "root"
        orchestrator.put_spec("someone-else", {"theirs": 1})
        env = context.service_env
        assert env["DETSTREAM_ETCD_USERNAME"] == "session-s9"
        assert {"DETSTREAM_ETCD_CA_FILE", "DETSTREAM_ETCD_CERT_FILE", "DETSTREAM_ETCD_KEY_FILE"} <= set(env)
        with Coordinator(endpoint, prefix="/detstream", **etcd_login_from_env(env)) as service:
            service.put_spec("s9", {"mine": 1})
            with pytest.raises(CoordinationError, match="permission denied"):
                service.get_spec("someone-else")
