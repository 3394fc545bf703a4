"""Sealing through a real ``cape serve`` (ours, issue 16): the server passes our SDK's
``"sealing": "aes-256-gcm"`` to the enclave with the open frame of every session kind, the
enclave confirms it in the attested document, and both sealed channels then run under
AES-256-GCM. A client that does not ask (Cape's clients, pycape, our JavaScript and Java SDKs)
gets no confirmation and ChaCha20-Poly1305 as before; a bad request is a protocol error."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from cape.crypto import hpke
from cape.crypto.session_keys import AES_256_GCM, SessionKeys
from cape.formats.attestation import parse_attestation
from cape.sdk import flows
from tests.e2e.conftest import requires_enclaves
from tests.e2e.server import ServeProcess, User, run
from tests.e2e.test_sessions import _raw_session, refused_nonce_frame
from tests.integration.harness import zip_app

pytestmark = requires_enclaves

ECHO = "def cape_handler(data):\n    return data\n"


def test_the_sdk_gets_aes_sealing_in_every_session_kind(server: ServeProcess) -> None:
    user = User.signup(server)
    deployed = run(user.deploy(ECHO))  # a key and a deploy session, each confirmed
    big = bytes(range(256)) * 4096

    async def flow() -> tuple[dict[str, Any], list[bytes]]:
        async with await user.session(deployed.id) as session:
            outputs = [await session.invoke(data) for data in (b"a", b"", big)]
            return session.user_data, outputs

    user_data, outputs = run(flow())
    assert user_data["sealing"] == "aes-256-gcm" and user_data["input_frames"] == "sealed"
    assert outputs == [b"a", b"", big]
    tested = run(
        flows.test(server.url, user.token, server.options(), zip_app(ECHO.encode()), [b"t"])
    )
    assert tested == [b"t"]


def test_an_aes_session_through_the_server_with_the_v2_keys(server: ServeProcess) -> None:
    """The wire form by hand: the server relays the request and the sealed frames untouched."""
    user = User.signup(server)
    path = f"/v1/run/{run(user.deploy(ECHO)).id}"
    response = hpke.generate_keypair()

    async def flow() -> tuple[dict[str, Any], bytes]:
        ws = await _raw_session(server, path, user.token)
        try:
            start = {
                "nonce": base64.b64encode(b"0123456789abcdef").decode(),
                "response_key": base64.b64encode(response.public_bytes).decode(),
                "input_frames": "sealed",
                "sealing": "aes-256-gcm",
                "result_frames": "binary",
            }
            await ws.send(json.dumps({"message": start}))
            message = json.loads(await ws.recv())["message"]
            document = parse_attestation(base64.b64decode(message["message"])).document
            assert document.public_key is not None and document.user_data is not None
            keys = SessionKeys.for_client(response, document.public_key, AES_256_GCM)
            await ws.send(keys.inputs.seal(0, b"hello"))
            reply = await ws.recv()
            assert isinstance(reply, bytes) and reply[:1] == b"\x01"
            return json.loads(document.user_data), keys.results.open(0, reply[1:])
        finally:
            await ws.close()

    user_data, output = run(flow())
    assert user_data["sealing"] == "aes-256-gcm"
    assert output == b"hello"


@pytest.mark.parametrize(
    ("value", "with_key", "error"),
    [
        ("AES-256-GCM", True, "'sealing' must be \"aes-256-gcm\""),
        ("chacha20-poly1305", True, "'sealing' must be \"aes-256-gcm\""),
        (None, True, "'sealing' must be \"aes-256-gcm\""),
        (["aes-256-gcm"], True, "'sealing' must be \"aes-256-gcm\""),
        ("aes-256-gcm", False, "'sealing' needs a 'response_key'"),
    ],
)
def test_a_bad_sealing_request_is_a_protocol_error(
    server: ServeProcess, value: object, with_key: bool, error: str
) -> None:
    """Checked in the nonce frame of every session kind (a key session: no deploy needed)."""
    user = User.signup(server)
    code, frames = refused_nonce_frame(server, user.token, "sealing", value, with_key=with_key)
    assert code == 1008, frames
    assert frames == [{"error": error}]
