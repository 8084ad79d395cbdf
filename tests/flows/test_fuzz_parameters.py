"""Property test (hypothesis): random flow parameters never crash the orchestrator before it starts
anything; each bad one is refused by Prefect's validation (ParameterTypeError) or by the session
spec (ValueError naming it)."""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prefect.exceptions import ParameterTypeError

_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 70000), st.floats(allow_nan=True),
                    st.text(max_size=8), st.lists(st.integers(), max_size=2))
_NAMES = st.sampled_from(["scan_width", "scan_height", "detector", "nodes", "workers_per_node", "source",
                          "replay_dir", "seed", "counting", "background_threshold", "xray_threshold", "backend",
                          "etcd_prefix", "stall_timeout_s", "security", "session_id", "overwrite"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_NAMES, _VALUES, max_size=5))
def test_random_flow_parameters_are_accepted_or_refused_plainly(params):
    from detstream.flows import _params as P
    from detstream.flows import streaming_session

    try:
        checked = streaming_session.validate_parameters(params)
    except ParameterTypeError:
        event("refused by Prefect")
        return
    full = {**{name: p.default for name, p in P.SHARED.parameters.items()}, **checked}
    try:
        spec = P.spec_from(full, P.etcd_of(full))
    except ValueError as err:  # pydantic's ValidationError is one; a bad detector or replay dir too
        assert str(err)
        event("refused by the spec")
        return
    event("accepted")
    assert spec.scan_width > 0 and spec.security in ("auto", "curve", "none")
