"""The websocket protocol's edges over real TLS: handshakes, bad frames, keys, restarts, drain."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import websockets
from cryptography import x509

from cape.crypto import hpke
from cape.errors import FunctionError, RequestRefusedError, TransportError
from cape.formats.attestation import parse_attestation
from cape.verify.verifier import verify_archived_attestation
from tests.e2e.server import ServeProcess, User, run

ECHO = "def cape_handler(data):\n    return data\n"
SLOW = "import time\ndef cape_handler(data):\n    time.sleep(1.5)\n    return b'slow:' + data\n"


def _raw_upgrade(
    server: ServeProcess, path: str, headers: list[tuple[str, str]]
) -> tuple[int, dict[str, str], bytes]:
    """Send an HTTP/1.1 upgrade by hand (to control header lines); return status, headers, body."""
    host, port = server.url.removeprefix("https://").rsplit(":", 1)
    context = server.ssl_context()
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
            "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in headers),
        ]
        tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode().split("\r\n")
        parsed = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        if int(status_line.split()[1]) != 101:
            length = int(parsed.get("content-length", "0"))
            while len(body) < length:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                body += chunk
        return int(status_line.split()[1]), parsed, body


def test_token_as_two_header_lines_or_one_and_never_echoed(server: ServeProcess) -> None:
    user = User.signup(server)
    for headers in (
        [("Sec-WebSocket-Protocol", "cape.runtime"), ("Sec-WebSocket-Protocol", user.token)],
        [("Sec-WebSocket-Protocol", f"cape.runtime, {user.token}")],
    ):
        status, response, _ = _raw_upgrade(server, "/v1/key", headers)
        assert status == 101
        assert response["sec-websocket-protocol"] == "cape.runtime"
        assert user.token not in json.dumps(response)


def test_refused_upgrades_answer_with_status_and_json(server: ServeProcess) -> None:
    user = User.signup(server)
    cases = [
        ([], 401),
        ([("Sec-WebSocket-Protocol", "cape.runtime")], 401),
        ([("Sec-WebSocket-Protocol", "cape.runtime, garbage.token.here")], 401),
    ]
    for headers, expected in cases:
        status, _, body = _raw_upgrade(server, "/v1/deploy", headers)
        assert status == expected
        assert isinstance(json.loads(body)["error"], str)
    status, _, body = _raw_upgrade(
        server,
        "/v1/run/nobody/nothing",
        [("Sec-WebSocket-Protocol", f"cape.runtime, {user.token}")],
    )
    assert status == 404 and json.loads(body) == {"error": "no such function"}


async def _raw_session(server: ServeProcess, path: str, token: str) -> websockets.ClientConnection:
    return await websockets.connect(
        server.url.replace("https://", "wss://") + path,
        subprotocols=["cape.runtime", token],  # type: ignore[list-item]
        ssl=server.ssl_context(),
        max_size=None,
    )


async def _closed_with(ws: websockets.ClientConnection) -> tuple[int | None, list[Any]]:
    frames: list[Any] = []
    try:
        while True:
            frames.append(json.loads(await ws.recv()))
    except websockets.ConnectionClosed as exc:
        return (exc.rcvd.code if exc.rcvd else None), frames


def refused_nonce_frame(
    server: ServeProcess, token: str, field: str, value: object, *, with_key: bool
) -> tuple[int | None, list[Any]]:
    """A key session (no deploy needed) whose nonce frame carries ``field: value`` (and a
    response key ``with_key``): the close code and the frames before it. A server that ignored
    the value would answer with a document: the wait fails rather than hangs."""
    start: dict[str, Any] = {"nonce": base64.b64encode(b"n").decode(), field: value}
    if with_key:
        start["response_key"] = base64.b64encode(hpke.generate_keypair().public_bytes).decode()

    async def flow() -> tuple[int | None, list[Any]]:
        ws = await _raw_session(server, "/v1/key", token)
        await ws.send(json.dumps({"message": start}))
        try:
            return await asyncio.wait_for(_closed_with(ws), 30)
        finally:
            await ws.close()

    return run(flow())


@pytest.mark.parametrize(
    "first_frame",
    [
        "not json",
        json.dumps({"nonce": "AAAA"}),
        json.dumps({"message": {}}),
        json.dumps({"message": {"nonce": "***"}}),
        json.dumps({"message": {"nonce": base64.b64encode(b"x" * 1025).decode()}}),
        b"binary instead of the nonce",
    ],
)
def test_bad_nonce_frames_get_an_error_and_close_1008(
    server: ServeProcess, first_frame: str | bytes
) -> None:
    user = User.signup(server)

    async def flow() -> tuple[int | None, list[Any]]:
        ws = await _raw_session(server, "/v1/key", user.token)
        await ws.send(first_frame)
        return await _closed_with(ws)

    code, frames = run(flow())
    assert code == 1008
    assert len(frames) == 1 and set(frames[0]) == {"error"}


def test_text_frame_where_an_input_belongs_ends_the_session(server: ServeProcess) -> None:
    user = User.signup(server)
    deployed = run(user.deploy(ECHO))

    async def flow() -> tuple[int | None, list[Any]]:
        ws = await _raw_session(server, f"/v1/run/{deployed.id}", user.token)
        nonce = base64.b64encode(b"1234567890123456").decode()
        await ws.send(json.dumps({"message": {"nonce": nonce}}))
        document = json.loads(await ws.recv())["message"]
        assert document["type"] == "attestation_doc"
        await ws.send(json.dumps({"message": "hello"}))
        return await _closed_with(ws)

    code, frames = run(flow())
    assert code == 1008 and "binary frame" in frames[0]["error"]


def test_input_that_does_not_open_is_a_protocol_error(server: ServeProcess) -> None:
    user = User.signup(server)
    deployed = run(user.deploy(ECHO))

    async def flow() -> tuple[int | None, list[Any]]:
        ws = await _raw_session(server, f"/v1/run/{deployed.id}", user.token)
        await ws.send(json.dumps({"message": {"nonce": base64.b64encode(b"n").decode()}}))
        await ws.recv()
        await ws.send(os.urandom(100))
        return await _closed_with(ws)

    code, frames = run(flow())
    assert code == 1008 and frames and "error" in frames[0]


def test_deploy_with_a_bad_name_or_plain_bundle_is_refused(server: ServeProcess) -> None:
    user = User.signup(server)

    async def flow(info: dict[str, Any], bundle: bytes) -> tuple[int | None, list[Any]]:
        ws = await _raw_session(server, "/v1/deploy", user.token)
        await ws.send(json.dumps({"message": {"nonce": base64.b64encode(b"n").decode()}}))
        await ws.recv()
        await ws.send(json.dumps({"message": info}))
        if info.get("function_name") == "fine":
            await ws.send(bundle)
        return await _closed_with(ws)

    code, frames = run(flow({"function_name": "../etc"}, b""))
    assert code == 1008 and "function name" in frames[0]["error"]
    code, frames = run(flow({"function_name": "fine"}, b"PK\x03\x04 a plain zip"))
    assert code == 1008 and "cape:" in frames[0]["error"]
    with server.rest(user.token) as rest:
        assert rest.request("GET", "/v1/functions") == []


def test_stored_key_document_verifies_at_its_leaf_not_before(server: ServeProcess) -> None:
    user = User.signup(server)
    with server.rest() as rest:
        body = rest.request("GET", f"/v1/user/{user.username}/key")
        with pytest.raises(RequestRefusedError) as missing:
            rest.request("GET", "/v1/user/nobody-here/key")
    assert missing.value.status == 404
    raw = base64.b64decode(body["attestation_document"])
    document = verify_archived_attestation(raw, root=server.root)
    assert document.user_data is not None
    stored_key = json.loads(document.user_data)["key"]

    async def live_key() -> bytes:
        from cape.sdk.session import Session

        session = await Session.open(server.url, "/v1/key", user.token, server.options())
        await session.wait_closed()
        return base64.b64decode(session.user_data["key"])

    assert base64.b64decode(stored_key) == run(live_key())
    # pycape and the Go CLI check the chain as of the leaf's notBefore (the pycape test runs
    # that); the document was signed inside the leaf's validity.
    leaf = x509.load_der_x509_certificate(parse_attestation(raw).document.certificate)
    assert leaf.not_valid_before_utc <= document.issued_at < leaf.not_valid_after_utc


def _runtime_pids(server_pid: int) -> list[int]:
    """The enclave runtime processes started by this server (its descendants)."""
    parents: dict[int, int] = {}
    commands: dict[int, list[bytes]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found = []
    for pid, command in commands.items():
        ancestor = parents.get(pid)
        while ancestor not in (None, 0, 1, server_pid):
            ancestor = parents.get(ancestor)
        if ancestor == server_pid and b"cape.enclave.runtime" in command:
            found.append(pid)
    return found


def _alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def test_a_dead_enclave_fails_its_session_and_the_pool_heals(tmp_path: Path) -> None:
    server = ServeProcess(
        tmp_path / "data", tmp_path / "cfg", tmp_path / "logs", enclaves=1
    ).start()
    try:
        user = User.signup(server)
        deployed = run(user.deploy(ECHO))

        async def flow() -> None:
            session = await user.session(deployed.id)
            assert await session.invoke(b"alive") == b"alive"
            assert server.process is not None
            for pid in _runtime_pids(server.process.pid):
                os.kill(pid, signal.SIGKILL)
            with pytest.raises((TransportError, FunctionError)):
                await session.invoke(b"dead")
            await session.close()

        run(flow())
        deadline = time.monotonic() + 30
        while True:
            try:
                assert run(user.run(deployed.id, b"healed")) == b"healed"
                break
            except (TransportError, FunctionError, RequestRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        assert server.stop() == 0


def test_restart_reuses_ca_root_and_functions(tmp_path: Path) -> None:
    server = ServeProcess(
        tmp_path / "data", tmp_path / "cfg", tmp_path / "logs", enclaves=1
    ).start()
    ca, root = server.ca_file.read_bytes(), server.root
    try:
        user = User.signup(server)
        deployed = run(user.deploy(ECHO))
    finally:
        assert server.stop() == 0
    record = json.loads((tmp_path / "cfg" / "serve.json").read_text())
    assert record["url"] == server.url and Path(record["ca_file"]) == server.ca_file.resolve()
    assert (tmp_path / "cfg" / "serve.json").stat().st_mode & 0o777 == 0o600
    again = ServeProcess(tmp_path / "data", tmp_path / "cfg", tmp_path / "logs", enclaves=1).start()
    try:
        assert again.ca_file.read_bytes() == ca and again.root == root
        user.server = again  # same account and token, new process and port
        assert (
            run(user.run(deployed.id, b"still here", function_checksum=deployed.checksum))
            == b"still here"
        )
    finally:
        assert again.stop() == 0
    assert "Root fingerprint:  sha256:" in again.stdout() and "SIMULATED MODE" in again.stdout()


def test_sigterm_lets_a_call_finish_and_tells_idle_sessions(tmp_path: Path) -> None:
    server = ServeProcess(
        tmp_path / "data", tmp_path / "cfg", tmp_path / "logs", enclaves=1
    ).start()
    user = User.signup(server)
    slow = run(user.deploy(SLOW, "slow"))
    echo = run(user.deploy(ECHO, "echo"))
    assert server.process is not None

    enclaves: list[int] = []

    async def flow() -> tuple[bytes, str]:
        assert server.process is not None
        enclaves.extend(_runtime_pids(server.process.pid))
        busy = await user.session(slow.id)
        idle = await user.session(echo.id)
        call = asyncio.ensure_future(busy.invoke(b"x"))
        await asyncio.sleep(0.3)
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        result = await call
        with pytest.raises(FunctionError) as told:
            await idle.receive()
        await busy.close()
        await idle.close()
        return result, str(told.value)

    result, told = run(flow())
    assert result == b"slow:x"
    assert "shutting down" in told
    assert server.process.wait(60) == 0, server.stderr()[-3000:]
    assert enclaves and not _alive(enclaves)


def test_http_is_refused_by_the_client_and_tls_is_required(server: ServeProcess) -> None:
    from cape.errors import FormatError
    from cape.sdk.session import ws_url

    with pytest.raises(FormatError):
        ws_url(server.url.replace("https://", "http://"), "/v1/key")
    host, port = server.url.removeprefix("https://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(b"GET /v1/attestation/root HTTP/1.1\r\nHost: x\r\n\r\n")
        raw.settimeout(5)
        try:
            answer = raw.recv(100)
        except (ConnectionResetError, TimeoutError):
            answer = b""
    assert not answer.startswith(b"HTTP/1.1 200")


def test_large_bundle_in_chunks_and_cape_style_single_frame(server: ServeProcess) -> None:
    from cape.crypto import envelope
    from cape.crypto.keys import load_rsa_public_key
    from cape.sdk.flows import DEPLOY_CHUNK_BYTES, deploy, fetch_key
    from tests.e2e.server import zip_app

    user = User.signup(server)
    source = "def cape_handler(data):\n    return open('payload.bin', 'rb').read()[:8] + data\n"
    payload = os.urandom(3 * DEPLOY_CHUNK_BYTES + 12345)
    bundle = zip_app(source, {"payload.bin": payload})

    async def chunked() -> str:
        key = await fetch_key(server.url, user.token, server.options())
        deployed = await deploy(
            server.url, user.token, server.options(), bundle, name="big", key=key
        )
        return deployed.id

    function_id = run(chunked())
    assert run(user.run(function_id, b"!")) == payload[:8] + b"!"

    async def single_frame() -> dict[str, Any]:
        # What Cape's Go CLI sends: the function info, then the whole bundle in one frame.
        der = await fetch_key(server.url, user.token, server.options())
        ws = await _raw_session(server, "/v1/deploy", user.token)
        await ws.send(json.dumps({"message": {"nonce": base64.b64encode(b"n").decode()}}))
        await ws.recv()
        await ws.send(json.dumps({"message": {"function_name": "single", "public": False}}))
        await ws.send(envelope.encrypt(bundle, der))
        reply: dict[str, Any] = json.loads(await ws.recv())["message"]
        await ws.close()
        return reply

    reply = run(single_frame())
    assert run(user.run(reply["id"], b"?")) == payload[:8] + b"?"
    del load_rsa_public_key


@pytest.mark.parametrize(
    ("size", "pieces", "expected", "close_code"),
    [
        ("12", [], "bundle_size", 1008),
        (0, [], "bundle_size", 1008),
        (10**12, [], "bundle size", 1008),
        # refused from the frame's header, before its bytes are read: "message too large"
        (10, [b"x" * 11], "exceeds limit of 10 bytes", 1009),
        (10, [b"x" * 4, "text"], "binary frame", 1008),
        (10, [b"x" * 10], "cape:", 1008),
    ],
)
def test_bad_chunked_deploys_are_refused_and_leave_nothing(
    server: ServeProcess,
    size: object,
    pieces: list[bytes | str],
    expected: str,
    close_code: int,
) -> None:
    user = User.signup(server)

    async def flow() -> tuple[int | None, list[Any]]:
        ws = await _raw_session(server, "/v1/deploy", user.token)
        await ws.send(json.dumps({"message": {"nonce": base64.b64encode(b"n").decode()}}))
        await ws.recv()
        info = {"function_name": "chunky", "public": False, "bundle_size": size}
        await ws.send(json.dumps({"message": info}))
        for piece in pieces:
            await ws.send(piece)
        return await _closed_with(ws)

    code, frames = run(flow())
    assert code == close_code and expected in frames[0]["error"], frames
    assert user.api("GET", "/v1/functions") == []
    blobs = server.data_dir / "blobs"
    leftovers = [p for p in blobs.rglob("*") if p.is_file()]
    listed = sum(
        len(User(server, "", "").api("GET", "/v1/functions", token=user.token)) for _ in [0]
    )
    assert listed == 0 and all(p.parent.name != ".tmp" for p in leftovers)
