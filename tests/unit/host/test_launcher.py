"""The host's reading of enclave frames (cape.host.launcher.expect)."""

from __future__ import annotations

import pytest

from cape.errors import CapeError
from cape.host.api.errors import close_code_for, status_for
from cape.host.errors import UnavailableError
from cape.host.launcher import expect


def test_a_busy_enclave_is_try_again_later_not_a_protocol_error() -> None:
    """An enclave whose bounded queue is full says ``busy``: the client gets 503/1013 (try
    again later), where any other fatal enclave error stays a plain refusal."""
    busy = {"t": "error", "message": "the enclave is busy (calls); try again later"}
    with pytest.raises(UnavailableError) as refused:
        expect({**busy, "busy": True}, "attestation")
    assert status_for(refused.value) == 503 and close_code_for(refused.value)[0] == 1013
    with pytest.raises(CapeError) as other:
        expect(busy, "attestation")
    assert not isinstance(other.value, UnavailableError)
    assert close_code_for(other.value)[0] == 1008


def test_the_expected_frame_passes() -> None:
    frame = {"t": "attestation", "document": b"doc"}
    assert expect(frame, "attestation") is frame
