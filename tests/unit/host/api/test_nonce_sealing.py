"""The nonce frame's ``sealing`` (ours, issue 16) as the server reads it: absent, or a suite the
enclave knows, with the client's response key; anything else is a protocol error before an
enclave is asked for anything. The server holds the names only (it imports no crypto)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from cape.crypto import session_keys
from cape.errors import FormatError
from cape.host.api.client_frames import SEALINGS, _nonce_frame

KEY = base64.b64encode(bytes(32)).decode()


def _frame(**fields: Any) -> str:
    return json.dumps({"message": {"nonce": base64.b64encode(b"n").decode(), **fields}})


def test_the_servers_names_are_the_enclaves_suites() -> None:
    assert set(SEALINGS) == set(session_keys.SEALINGS)


def test_a_request_is_passed_on_and_its_absence_is_none() -> None:
    assert _nonce_frame(_frame(response_key=KEY, sealing="aes-256-gcm")).sealing == "aes-256-gcm"
    assert _nonce_frame(_frame(response_key=KEY)).sealing is None


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"sealing": "AES-256-GCM", "response_key": KEY}, "'sealing' must be \"aes-256-gcm\""),
        ({"sealing": None, "response_key": KEY}, "'sealing' must be"),
        ({"sealing": ["aes-256-gcm"], "response_key": KEY}, "'sealing' must be"),
        ({"sealing": {}, "response_key": KEY}, "'sealing' must be"),
        ({"sealing": "aes-256-gcm"}, "'sealing' needs a 'response_key'"),
    ],
)
def test_a_bad_request_is_a_protocol_error(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(FormatError, match=match):
        _nonce_frame(_frame(**fields))
