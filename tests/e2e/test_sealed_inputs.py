"""Sealed inputs through a real ``cape serve`` (ours, issue 16): the server passes our SDK's
request to the enclave, which confirms it in the attested document; run and test sessions then
carry inputs under the session's input key. A client that does not ask (Cape's clients,
pycape, our JavaScript and Java SDKs) gets no confirmation and seals with HPKE as before; a
bad request is a protocol error."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from cape.crypto import hpke
from cape.crypto.session_keys import SessionKeys
from cape.formats.attestation import parse_attestation
from cape.sdk import flows
from tests.e2e.conftest import requires_enclaves
from tests.e2e.server import ServeProcess, User, run
from tests.e2e.test_sessions import _raw_session, refused_nonce_frame
from tests.integration.harness import zip_app

pytestmark = requires_enclaves

ECHO = "def cape_handler(data):\n    return data\n"
ECHO_ZIP = zip_app(ECHO.encode())


def test_the_sdk_gets_sealed_inputs_in_run_and_test_sessions(server: ServeProcess) -> None:
    user = User.signup(server)
    deployed = run(user.deploy(ECHO))

    async def flow() -> tuple[dict[str, Any], bool, list[bytes]]:
        async with await user.session(deployed.id) as session:
            outputs = [await session.invoke(data) for data in (b"a", b"", b"c" * 70_000)]
            return session.user_data, session._inputs is not None, outputs

    user_data, sealed, outputs = run(flow())
    assert user_data["input_frames"] == "sealed" and sealed
    assert outputs == [b"a", b"", b"c" * 70_000]
    # test: the bundle is input 0 of the session, its inputs follow
    tested = run(flows.test(server.url, user.token, server.options(), ECHO_ZIP, [b"t"]))
    assert tested == [b"t"]


def test_a_client_that_does_not_ask_keeps_hpke_inputs(server: ServeProcess) -> None:
    """What our JavaScript and Java SDKs send: a response key, no ``input_frames``."""
    user = User.signup(server)
    path = f"/v1/run/{run(user.deploy(ECHO)).id}"
    response = hpke.generate_keypair()

    async def flow() -> tuple[dict[str, Any], bytes, bytes]:
        ws = await _raw_session(server, path, user.token)
        try:
            start = {
                "nonce": base64.b64encode(b"0123456789abcdef").decode(),
                "response_key": base64.b64encode(response.public_bytes).decode(),
            }
            await ws.send(json.dumps({"message": start}))
            message = json.loads(await ws.recv())["message"]
            document = parse_attestation(base64.b64decode(message["message"])).document
            assert document.public_key is not None and document.user_data is not None
            await ws.send(hpke.seal(document.public_key, b"hello"))
            reply = json.loads(await ws.recv())["message"]
            return json.loads(document.user_data), document.public_key, reply["message"]
        finally:
            await ws.close()

    user_data, session_key, sealed = run(flow())
    assert "input_frames" not in user_data
    channel = SessionKeys.for_client(response, session_key).results
    assert channel.open(0, base64.b64decode(sealed)) == b"hello"


@pytest.mark.parametrize(
    ("value", "with_key", "error"),
    [
        ("SEALED", True, '\'input_frames\' must be "hpke" or "sealed"'),
        ("sealed", False, "'input_frames': \"sealed\" needs a 'response_key'"),
    ],
)
def test_a_bad_input_frames_request_is_a_protocol_error(
    server: ServeProcess, value: object, with_key: bool, error: str
) -> None:
    """Checked in the nonce frame of every session kind (a key session: no deploy needed)."""
    user = User.signup(server)
    code, frames = refused_nonce_frame(server, user.token, "input_frames", value, with_key=with_key)
    assert code == 1008, frames
    assert frames == [{"error": error}]
