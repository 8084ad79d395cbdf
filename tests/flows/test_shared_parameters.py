"""The session flows' parameters, declared once in flows/_params.py: what Prefect's schema, form and
validation see, and how the etcd parameters combine."""

from __future__ import annotations

import inspect

import pytest

pytestmark = pytest.mark.unit


def _names(fl) -> list[str]:
    return list(inspect.signature(fl).parameters)


def test_both_session_flows_take_the_shared_parameters_and_their_own():
    from detstream.flows import _params as P
    from detstream.flows import compare_workflows, file_transfer_session, streaming_session

    shared = list(P.SHARED.parameters)
    assert [n for n in _names(streaming_session) if n in shared] == shared
    assert [n for n in _names(file_transfer_session) if n in shared] == shared
    assert set(_names(streaming_session)) - set(shared) == {"fallback", "fallback_backend", "aggregators"}
    assert _names(streaming_session).index("fallback") == shared.index("backend") + 1
    assert _names(file_transfer_session)[len(shared):] == ["keep_raw_files", "fallback_reason", "fell_back_from"]
    compared = inspect.signature(compare_workflows).parameters
    assert [n for n in compared if n in shared] == [n for n in shared if n in compared]
    assert (compared["scan_width"].default, compared["output_dir"].default) == (64, "runs/compare")


def test_prefect_reads_the_declared_signature():
    """Prefect's own schema (what `prefect deploy` registers) and its validation honour it."""
    from prefect.exceptions import ParameterTypeError
    from prefect.utilities.callables import parameter_schema

    from detstream.flows import streaming_session

    props = parameter_schema(streaming_session).properties
    assert list(props) == _names(streaming_session)
    assert props["nodes"]["description"] == "Compute nodes (one distributor each)."
    params = streaming_session.validate_parameters({"nodes": 3})
    assert params["nodes"] == 3 and params["scan_width"] == 32 and params["fallback"] == "none"
    with pytest.raises(ParameterTypeError, match="nodes"):
        streaming_session.validate_parameters({"nodes": 0})
    with pytest.raises(TypeError):
        streaming_session(no_such_parameter=1)


def test_the_form_stays_flat():
    """Every parameter is a value, a choice, or a saved block picked by name: no nested object form."""
    from detstream.flows import _params as P
    from detstream.flows import compare_workflows, file_transfer_session, streaming_session

    for fl in (streaming_session, file_transfer_session, compare_workflows):
        schema = P.parameter_schema(fl)
        for name, prop in schema.properties.items():
            for member in prop.get("anyOf", [prop]):
                assert member.get("type") != "object", (fl.name, name)
                if "$ref" in member:
                    block = schema.definitions[member["$ref"].rsplit("/", 1)[1]]
                    assert block["block_type_slug"].startswith("detstream-"), (fl.name, name)


def test_a_misspelt_shared_parameter_is_refused():
    from detstream.flows import _params as P

    with pytest.raises(TypeError, match="scan_widht"):
        P.shared_parameters(scan_widht=3)


def test_etcd_is_a_block_an_url_or_private():
    from detstream.blocks import EtcdCoordinator
    from detstream.flows import _params as P

    saved = EtcdCoordinator(endpoints=["http://etcd.example:2379"], prefix="/site")
    assert P.etcd_of({"etcd": saved, "etcd_url": None, "etcd_prefix": "/ignored"}) is saved
    by_url = P.etcd_of({"etcd": None, "etcd_url": "http://127.0.0.1:2379", "etcd_prefix": "/t"})
    assert (by_url.endpoints, by_url.prefix, by_url.service_env()) == (["http://127.0.0.1:2379"], "/t", {})
    assert P.etcd_of({"etcd": None, "etcd_url": None, "etcd_prefix": "/t"}).endpoints == []
    with pytest.raises(ValueError, match="not both"):
        P.etcd_of({"etcd": saved, "etcd_url": "http://127.0.0.1:2379"})
    private = EtcdCoordinator(prefix="/p")
    assert P.running_etcd(private, "http://127.0.0.1:5").endpoints == ["http://127.0.0.1:5"]
    assert P.running_etcd(saved, "http://other:1") is saved


def test_the_etcd_login_goes_to_services_by_environment():
    from pydantic import SecretStr

    from detstream.blocks import EtcdCoordinator
    from detstream.config import etcd_login_from_env

    etcd = EtcdCoordinator(endpoints=["https://etcd:2379"], username="alice", password=SecretStr("pw"),
                           ca_file="/ca.pem", outage_budget_s=7.5)
    env = etcd.service_env()
    assert env == {"DETSTREAM_ETCD_USERNAME": "alice", "DETSTREAM_ETCD_PASSWORD": "pw",
                   "DETSTREAM_ETCD_CA_FILE": "/ca.pem", "DETSTREAM_ETCD_OUTAGE_BUDGET_S": "7.5"}
    assert etcd_login_from_env(env) == {"username": "alice", "password": "pw", "ca_file": "/ca.pem",
                                        "outage_budget_s": 7.5}
    # A private etcd: no login to hand on, only how long to ride out its outages.
    private = EtcdCoordinator(username="alice", password=SecretStr("pw"), outage_budget_s=4).service_env()
    assert private == {"DETSTREAM_ETCD_OUTAGE_BUDGET_S": "4"}


def test_the_server_accepts_a_saved_block_by_reference():
    """What the form sends for a picked block, checked as the server checks it (enforce_parameter_schema)."""
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    from detstream.flows import _params as P
    from detstream.flows import streaming_session

    schema = P.parameter_schema(streaming_session).model_dump_for_openapi()
    ref = {"$ref": {"block_document_id": "13afa51b-f2cc-48b4-bae3-2f2b5aae8461"}}
    for name in ("detector", "etcd", "sfapi_credentials", "nersc_compute", "slurm_compute"):
        validate({name: ref}, schema, raise_on_error=True, preprocess=True, ignore_required=True)
    from detstream.blocks import EtcdCoordinator

    whole = EtcdCoordinator(endpoints=["http://etcd:2379"]).model_dump(mode="json")
    validate({"etcd": whole, "detector": "testcam"}, schema, raise_on_error=True, preprocess=True,
             ignore_required=True)
    with pytest.raises(ValidationError):
        validate({"detector": "no-such-camera"}, schema, raise_on_error=True, preprocess=True, ignore_required=True)
