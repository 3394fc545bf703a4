"""Result frames through a real ``cape serve`` (issue 16): a client that asks for binary
results (our SDK) gets them, confirmed in the attestation_doc message; a client that does not
(Cape's clients, pycape) gets Cape's JSON text; a bad request for the form, and inputs over
their limit in a binary session, get the typed error."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest

from cape.crypto import hpke
from cape.crypto.results import ResultChannel
from cape.crypto.session_keys import SessionKeys
from cape.formats.attestation import parse_attestation
from tests.e2e.conftest import requires_enclaves
from tests.e2e.server import ServeProcess, User, run
from tests.e2e.test_sessions import _closed_with, _raw_session
from tests.e2e.test_tenant_server import RawSocket

pytestmark = requires_enclaves

ECHO_OR_FAIL = (
    "def cape_handler(data):\n"
    "    if data == b'fail':\n"
    "        raise ValueError('asked to fail')\n"
    "    return data\n"
)


def _start(*, binary: bool | None, response_key: bytes | None = None) -> str:
    message: dict[str, Any] = {"nonce": base64.b64encode(b"0123456789abcdef").decode()}
    if binary is not None:
        message["result_frames"] = "binary" if binary else "text"
    if response_key is not None:
        message["response_key"] = base64.b64encode(response_key).decode()
    return json.dumps({"message": message})


async def _call(
    server: ServeProcess, path: str, token: str, *, binary: bool | None, sealed: bool
) -> tuple[dict[str, Any], str | bytes, ResultChannel | None]:
    """One session, one input: the attestation_doc message, the raw reply, the channel."""
    response_key = hpke.generate_keypair() if sealed else None
    ws = await _raw_session(server, path, token)
    try:
        public = None if response_key is None else response_key.public_bytes
        await ws.send(_start(binary=binary, response_key=public))
        message = json.loads(await ws.recv())["message"]
        document = parse_attestation(base64.b64decode(message["message"])).document
        assert document.public_key is not None
        await ws.send(hpke.seal(document.public_key, b"hello"))
        reply = await ws.recv()
    finally:
        await ws.close()
    channel = (
        None
        if response_key is None
        else SessionKeys.for_client(response_key, document.public_key).results
    )
    return message, reply, channel


def test_binary_results_when_asked_and_capes_text_form_otherwise(server: ServeProcess) -> None:
    user = User.signup(server)
    path = f"/v1/run/{run(user.deploy(ECHO_OR_FAIL)).id}"

    # our SDK's form, sealed: confirmed, then tag 0x01 + the result sealed as reply 0
    message, reply, channel = run(_call(server, path, user.token, binary=True, sealed=True))
    assert message["result_frames"] == "binary"
    assert isinstance(reply, bytes) and reply[:1] == b"\x01" and channel is not None
    assert channel.open(0, reply[1:]) == b"hello"

    # unsealed: tag 0x00 + the output as is
    message, reply, _ = run(_call(server, path, user.token, binary=True, sealed=False))
    assert message["result_frames"] == "binary" and reply == b"\x00hello"

    # Cape's clients (pycape sends no such field) and an explicit "text": JSON, as before
    for binary in (None, False):
        message, reply, _ = run(_call(server, path, user.token, binary=binary, sealed=False))
        assert "result_frames" not in message
        assert isinstance(reply, str)
        assert json.loads(reply) == {
            "message": {"type": "function_result", "message": base64.b64encode(b"hello").decode()}
        }


def test_the_sdk_asks_for_binary_results_and_gets_them(server: ServeProcess) -> None:
    user = User.signup(server)
    deployed = run(user.deploy(ECHO_OR_FAIL))

    async def flow() -> tuple[list[bytes], list[type]]:
        async with await user.session(deployed.id) as session:
            kinds: list[type] = []
            receive = session._ws.recv

            async def recording(*args: Any, **kwargs: Any) -> Any:
                frame = await receive(*args, **kwargs)
                kinds.append(type(frame))
                return frame

            session._ws.recv = recording  # type: ignore[method-assign]
            outputs = [await session.invoke(data) for data in (b"a", b"b" * 70_000)]
            return outputs, kinds

    outputs, kinds = run(flow())
    assert outputs == [b"a", b"b" * 70_000]
    assert kinds == [bytes, bytes]


def test_function_errors_stay_text_and_the_session_goes_on(server: ServeProcess) -> None:
    user = User.signup(server)
    path = f"/v1/run/{run(user.deploy(ECHO_OR_FAIL)).id}"

    async def flow() -> list[str | bytes]:
        ws = await _raw_session(server, path, user.token)
        try:
            await ws.send(_start(binary=True))
            message = json.loads(await ws.recv())["message"]
            key = parse_attestation(base64.b64decode(message["message"])).document.public_key
            assert key is not None
            replies = []
            for data in (b"ok", b"fail", b"again"):
                await ws.send(hpke.seal(key, data))
                replies.append(await ws.recv())
            return replies
        finally:
            await ws.close()

    first, failed, again = run(flow())
    assert first == b"\x00ok" and again == b"\x00again"
    assert isinstance(failed, str) and "asked to fail" in json.loads(failed)["error"]


@pytest.mark.parametrize("value", ["xml", "BINARY", True, 1, ["binary"], None])
def test_a_bad_result_frames_value_is_a_format_error(server: ServeProcess, value: object) -> None:
    """Checked in the nonce frame of every session kind (a key session: no deploy needed)."""
    user = User.signup(server)
    path = "/v1/key"
    start = {"nonce": base64.b64encode(b"n").decode(), "result_frames": value}

    async def flow() -> tuple[int | None, list[Any]]:
        ws = await _raw_session(server, path, user.token)
        await ws.send(json.dumps({"message": start}))
        try:  # a server that ignored the value would wait for an input: fail, do not hang
            return await asyncio.wait_for(_closed_with(ws), 30)
        finally:
            await ws.close()

    code, frames = run(flow())
    assert code == 1008, frames
    assert frames == [{"error": '\'result_frames\' must be "text" or "binary"'}]


def test_an_oversized_input_in_a_binary_session_is_refused_from_its_header(
    server: ServeProcess,
) -> None:
    user = User.signup(server)
    path = f"/v1/run/{run(user.deploy(ECHO_OR_FAIL)).id}"
    raw = RawSocket(server, path, user.token)
    try:
        raw.send_text(_start(binary=True))
        opcode, payload = raw.frame()
        assert opcode == 0x1 and json.loads(payload)["message"]["result_frames"] == "binary"
        announced = (64 << 20) + 1  # one byte over the default input limit
        raw.send_header(0x2, announced, b"x" * 1000)
        texts, code = raw.until_close()  # no more bytes are sent: a waiting server hangs here
    finally:
        raw.close()
    assert code == 1009, texts
    assert f"input size in bytes exceeds the limit of {64 << 20}" in texts[0]["error"], texts
