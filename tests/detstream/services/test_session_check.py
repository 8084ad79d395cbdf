"""Every message names its session (token) and scan: another session's is rejected with a reason."""

from __future__ import annotations

import numpy as np
import pytest

from detstream import wire
from detstream.profile import SMALL_TEST_CAMERA
from detstream.services.validation import MessageValidator
from detstream.wire import MalformedMessage

pytestmark = pytest.mark.unit

PAYLOAD = np.zeros(SMALL_TEST_CAMERA.sector_shape, np.uint16).tobytes()


def _check(v: MessageValidator, parts) -> wire.Header:
    """One block's message through the batch check: its header, or why it was rejected."""
    rejected = []
    batch = v.check_batch(parts, rejected.append)
    if rejected:
        raise rejected[0]
    return wire.Header.unpack(wire.pack_headers(batch.headers))


def _validator() -> MessageValidator:
    v = MessageValidator(SMALL_TEST_CAMERA, 4, 4)
    v.expect_session(scan_number=3, token=0xC0FFEE)
    return v


def test_this_sessions_messages_pass():
    header = _check(_validator(), [wire.data_header(1, 3, 9, 4, 4, 2, 3, 0, 0xC0FFEE), PAYLOAD])
    assert (header.session, header.scan_number, header.position) == (0xC0FFEE, 3, 14)
    assert _check(_validator(), [wire.end_header(1, 3, 4, 4, 16, 0xC0FFEE), b""]).kind is wire.Kind.END


@pytest.mark.parametrize("parts, reason", [
    ([wire.data_header(1, 3, 9, 4, 4, 2, 3, 0, 0xBAD), PAYLOAD], "wrong_session"),
    ([wire.data_header(1, 3, 9, 4, 4, 2, 3, 0), PAYLOAD], "wrong_session"),
    ([wire.data_header(1, 4, 9, 4, 4, 2, 3, 0, 0xC0FFEE), PAYLOAD], "wrong_scan"),
    ([wire.end_header(1, 3, 4, 4, 16, 0xBAD), b""], "wrong_session"),
    ([wire.fin_header(2, 4, 4, 16, session=0xC0FFEE), b""], "wrong_scan"),
])
def test_another_sessions_or_scans_message_is_rejected_with_its_reason(parts, reason):
    with pytest.raises(MalformedMessage) as caught:
        _check(_validator(), parts)
    assert caught.value.reason == reason


def test_without_an_expected_session_nothing_is_checked():
    v = MessageValidator(SMALL_TEST_CAMERA, 4, 4)
    assert _check(v, [wire.data_header(0, 77, 0, 4, 4, 0, 0, 0, 123), PAYLOAD]).session == 123


def test_a_second_copy_that_differs_is_a_conflict_an_equal_one_a_repeat():
    from detstream.services.validation import SectorCopies

    copies = SectorCopies(positions=16, sectors=4)
    real = np.arange(len(PAYLOAD) // 2, dtype=np.uint16).tobytes()
    forged = np.full(len(PAYLOAD) // 2, 9000, np.uint16).tobytes()
    copies.first(5, 2, real)
    assert copies.second(5, 2, real).reason == "duplicate_sector"  # its frame already assembled
    assert copies.second(5, 2, bytes(real), first=real).reason == "duplicate_sector"  # still held
    assert copies.conflicted == set()
    assert copies.second(5, 2, forged).reason == "conflicting_sector"
    copies.first(7, 0, forged)
    assert copies.second(7, 0, real, first=forged).reason == "conflicting_sector"
    assert copies.conflicted == {5, 7}
