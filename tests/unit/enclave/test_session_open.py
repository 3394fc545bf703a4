"""A session's ``open`` frame from the host, as the enclave checks it before anything else:
``input_frames`` (ours, issue 16) is "hpke" or "sealed", and sealed inputs need the client's
response key and a session that has inputs (run, test); anything else is a fatal protocol
error, so a host cannot make the enclave attest sealed inputs no client key backs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cape.crypto import hpke
from cape.enclave.session import Inbox, run_session


def _open(**fields: Any) -> dict[str, Any]:
    message = {"sid": 7, "kind": "run", "owner": "alice", "nonce": b"n", **fields}
    sent: list[dict[str, Any]] = []

    async def send(reply: dict[str, Any]) -> None:
        sent.append(reply)

    async def main() -> None:
        # Nothing past the check is reached: no module, key client or config is needed.
        await run_session(
            message,
            module=None,  # type: ignore[arg-type]
            keys=None,  # type: ignore[arg-type]
            config=None,  # type: ignore[arg-type]
            send=send,
            inbox=Inbox(),
        )

    asyncio.run(main())
    assert len(sent) == 1
    return sent[0]


RESPONSE_KEY = hpke.generate_keypair().public_bytes


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"input_frames": "SEALED", "response_key": RESPONSE_KEY}, "'input_frames' must be"),
        ({"input_frames": 1, "response_key": RESPONSE_KEY}, "'input_frames' must be"),
        ({"input_frames": None}, "'input_frames' must be"),
        ({"input_frames": "sealed"}, "need a response key"),
        ({"input_frames": "sealed", "kind": "key", "response_key": RESPONSE_KEY}, "run or test"),
        ({"input_frames": "sealed", "kind": "deploy", "response_key": RESPONSE_KEY}, "run or test"),
    ],
)
def test_bad_input_frames_are_a_fatal_protocol_error(fields: dict[str, Any], match: str) -> None:
    reply = _open(**fields)
    assert reply["t"] == "error" and reply["fatal"] and reply["sid"] == 7
    assert match in reply["message"]


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"sealing": "AES-256-GCM", "response_key": RESPONSE_KEY}, "'sealing' must be"),
        ({"sealing": "chacha20-poly1305", "response_key": RESPONSE_KEY}, "'sealing' must be"),
        ({"sealing": 1, "response_key": RESPONSE_KEY}, "'sealing' must be"),
        ({"sealing": None, "response_key": RESPONSE_KEY}, "'sealing' must be"),
        ({"sealing": ["aes-256-gcm"], "response_key": RESPONSE_KEY}, "'sealing' must be"),
        ({"sealing": "aes-256-gcm"}, "'sealing' needs a response key"),
        ({"sealing": "aes-256-gcm", "kind": "key"}, "'sealing' needs a response key"),
    ],
)
def test_bad_sealing_is_a_fatal_protocol_error(fields: dict[str, Any], match: str) -> None:
    """``sealing`` (ours): absent (ChaCha20-Poly1305) or "aes-256-gcm" with a response key, so
    the enclave never attests a suite no client key backs."""
    reply = _open(**fields)
    assert reply["t"] == "error" and reply["fatal"] and reply["sid"] == 7
    assert match in reply["message"]
