"""Property tests (hypothesis): random and mutated input to the wire parsers, the raw v5 reader and
the session spec never crashes them; each gets its documented error."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from detstream import wire
from detstream.config import SessionSpec
from detstream.profile import SMALL_TEST_CAMERA
from detstream.services.validation import MessageValidator
from detstream.sources import ReplayError, Simulator, write_scan
from detstream.sources.rawv5 import ReplaySource
from detstream.wire import MalformedMessage

pytestmark = pytest.mark.unit
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROFILE = SMALL_TEST_CAMERA
PAYLOAD = np.zeros(PROFILE.sector_shape, np.uint16).tobytes()


def _valid_header(sector=1, x=2, y=3) -> bytes:
    return wire.data_header(sector, 1, 0, 4, 4, x, y, 0, 77)


@st.composite
def mutated(draw, original: bytes):
    """`original` with some bytes changed, cut short, or extended."""
    data = bytearray(original)
    for _ in range(draw(st.integers(0, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data) + 8))
    return bytes(data[:cut]) + draw(st.binary(max_size=max(0, cut - len(data))))


@FAST
@given(st.one_of(st.binary(max_size=64), mutated(_valid_header())))
def test_the_header_parser_returns_a_header_or_names_what_is_wrong(buf):
    try:
        header = wire.Header.unpack(buf)
    except MalformedMessage as err:
        assert err.reason in {"short_header", "unknown_version", "unknown_kind"}
        return
    assert header.pack() == buf


@FAST
@given(st.lists(st.one_of(st.binary(max_size=48), mutated(_valid_header()), st.just(PAYLOAD),
                          mutated(PAYLOAD[:64]) ), max_size=4))
def test_a_service_never_crashes_on_a_message_it_gets(parts):
    v = MessageValidator(PROFILE, 4, 4)
    v.expect_session(1, 77)
    reasons = {"wrong_part_count", "short_header", "unknown_version", "unknown_kind", "sector_out_of_range",
               "frame_outside_scan", "payload_size", "wrong_session", "wrong_scan"}
    rejected = []
    try:
        batch = v.check_batch(parts, rejected.append)
    except MalformedMessage as err:
        assert err.reason in reasons
        return
    assert {err.reason for err in rejected} <= reasons
    # What passes is this session's, inside the scan, with a payload of its own for each data block.
    assert all(h["session"] == 77 and h["scan_number"] == 1 for h in batch.headers)
    assert all(p < 16 for p in batch.positions.tolist())
    assert len(batch.payloads) == len(batch.headers)


@FAST
@given(st.lists(st.binary(max_size=40), min_size=0, max_size=3))
def test_the_control_parser_names_what_is_wrong(parts):
    try:
        msg = wire.parse_control(parts)
    except MalformedMessage as err:
        assert err.reason in {"wrong_part_count", "short_header", "unknown_version", "unknown_kind", "payload_size"}
        return
    assert msg.positions.dtype == np.dtype("<u4")


@pytest.fixture(scope="module")
def recorded_scan():
    folder = Path(tempfile.mkdtemp(prefix="detstream-fuzz-"))
    write_scan(Simulator(PROFILE, 3, 2, seed=1), folder, fsync=False)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sector=st.integers(0, PROFILE.sectors - 1), data=st.data())
def test_the_raw_v5_reader_reads_a_mutated_file_or_names_what_is_wrong(recorded_scan, sector, data):
    work = Path(tempfile.mkdtemp(prefix="detstream-fuzz-case-"))
    try:
        for f in recorded_scan.iterdir():
            shutil.copy(f, work / f.name)
        victim = sorted(work.iterdir())[sector]
        original = victim.read_bytes()
        # Mutations land mostly in the 16-byte record headers, where the reader's checks are.
        record = 16 + PROFILE.sector_nbytes
        head = bytearray(original)
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(original) // record - 1)) * record + data.draw(st.integers(0, 15))
            head[i] = data.draw(st.integers(0, 255))
        cut = data.draw(st.one_of(st.just(len(head)), st.integers(0, len(head))))
        victim.write_bytes(bytes(head[:cut]))
        try:
            source = ReplaySource(PROFILE, work)
        except ReplayError as err:
            assert str(err)
            return
        frames = sum(1 for _ in source.iter_sector(sector))
        assert frames == source.frames
    finally:
        shutil.rmtree(work, ignore_errors=True)


_SPEC_FIELDS = {
    "scan_width": st.one_of(st.integers(-5, 70000), st.text(max_size=5), st.none(), st.floats()),
    "scan_height": st.one_of(st.integers(-5, 70000), st.booleans()),
    "scan_number": st.one_of(st.integers(-3, 2**33), st.text(max_size=3)),
    "nodes": st.integers(-2, 5),
    "workers_per_node": st.one_of(st.integers(-2, 3), st.floats()),
    "etcd_prefix": st.text(max_size=8),
    "source": st.text(max_size=10) | st.sampled_from(["simulated", "replay"]),
    "security": st.text(max_size=6) | st.sampled_from(["auto", "curve", "none"]),
    "session_token": st.integers(-1, 2**33),
    "counting": st.fixed_dictionaries({}, optional={"background_threshold": st.floats(allow_nan=True),
                                                    "xray_threshold": st.floats(-10, 10)}),
    "send_hwm": st.integers(-1, 10),
}


@FAST
@given(st.fixed_dictionaries({}, optional=_SPEC_FIELDS))
def test_a_session_spec_is_valid_or_refused_naming_the_field(fields):
    try:
        spec = SessionSpec.model_validate(fields)
    except ValidationError as err:
        named = {str(e["loc"][0]) for e in err.errors() if e["loc"]}
        assert named <= set(fields) or not named, (named, fields)
        return
    assert spec.scan_width > 0 and spec.nodes > 0 and 0 <= spec.session_token < 2**32
    assert spec.security in ("auto", "curve", "none")
