"""The SFAPI backend's retry policy (tenacity): which errors are retried, how often, how long apart."""

from __future__ import annotations

import time

import httpx
import pytest
from pydantic import SecretStr

from detstream.backends.jobscript import NerscJobSettings
from detstream.backends.sfapi import SfapiAuthError, SfapiBackend, SfapiError, SfapiSettings, SfapiUnavailableError


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """Every sleep the retries ask for, recorded instead of slept."""
    asked: list[float] = []
    monkeypatch.setattr(time, "sleep", asked.append)
    return asked


@pytest.fixture
def backend() -> SfapiBackend:
    settings = SfapiSettings(client_id="c", private_key=SecretStr("never used"))
    return SfapiBackend(settings, NerscJobSettings(), poll_interval_s=1.0, max_backoff_s=3.0, transient_retries=3)


def failing(*codes: int):
    """A call that answers each HTTP status in ``codes`` in turn, then "ok"; ``.calls`` counts calls."""
    def call():
        call.calls += 1
        if call.calls <= len(codes):
            request = httpx.Request("GET", "https://api.example/x")
            raise httpx.HTTPStatusError("x", request=request, response=httpx.Response(codes[call.calls - 1], request=request))
        return "ok"
    call.calls = 0
    return call


def test_5xx_is_retried_with_doubling_capped_waits_then_unavailable(backend, sleeps):
    assert backend._call("reading", failing(500, 502)) == "ok"
    assert sleeps == [1.0, 2.0]
    sleeps.clear()
    call = failing(*[503] * 10)
    with pytest.raises(SfapiUnavailableError, match="SFAPI answered HTTP 503 while reading"):
        backend._call("reading", call)
    assert call.calls == 4 and sleeps == [1.0, 2.0, 3.0]


def test_a_submission_and_4xx_are_not_retried(backend, sleeps):
    call = failing(500)
    with pytest.raises(SfapiUnavailableError):
        backend._call("submitting", call, retry_transient=False)
    call = failing(404)
    with pytest.raises(SfapiError, match="HTTP 404"):
        backend._call("reading", call)
    assert call.calls == 1 and sleeps == []


def test_401_logs_in_again_once(backend, sleeps, monkeypatch):
    relogins = []
    monkeypatch.setattr(backend, "_reset_client", lambda: relogins.append(1))
    assert backend._call("reading", failing(401)) == "ok" and len(relogins) == 1
    with pytest.raises(SfapiAuthError, match=r"refused client id c \(HTTP 401\) while reading"):
        backend._call("reading", failing(401, 401))
    assert len(relogins) == 2 and not any(sleeps)


def test_job_not_found_is_asked_again_with_backoff_and_a_bound(backend, sleeps, monkeypatch):
    answers = [None, None, "info"]
    monkeypatch.setattr(backend, "_lookup", lambda jobid, machine: answers.pop(0))
    assert backend._lookup_new("1", "perlmutter", retries=5) == "info" and sleeps == [1.0, 2.0]
    sleeps.clear()
    monkeypatch.setattr(backend, "_lookup", lambda jobid, machine: None)
    assert backend._lookup_new("1", "perlmutter", retries=2) is None and sleeps == [1.0, 2.0]


def test_job_not_found_waits_never_pass_the_deadline(backend, sleeps, monkeypatch):
    monkeypatch.setattr(backend, "_lookup", lambda jobid, machine: None)
    assert backend._lookup_new("1", "perlmutter", retries=10, deadline=time.monotonic() + 0.5) is None
    assert sleeps and all(s <= 0.5 for s in sleeps)
