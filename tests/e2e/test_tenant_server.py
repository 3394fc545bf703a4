"""A hostile tenant against a real ``cape serve`` over TLS: the server side of issue 18.

The attacker is another signed-up user with ordinary tools (a websocket library, a TLS
socket). While each attack runs, and after it, the victim's ordinary work must go on: a run,
a run on a ``cape:`` input (the enclave asks the key service), and a signup. Each test names
the finding it covers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from cape.crypto import envelope
from cape.errors import BusyError
from cape.sdk.flows import fetch_key
from tests.e2e.cli import error, signup
from tests.e2e.conftest import requires_enclaves
from tests.e2e.server import ServeProcess, User, run

pytestmark = requires_enclaves

ECHO = "def cape_handler(data):\n    return b'echo:' + data\n"
VICTIM_TIMEOUT_S = 90.0
"""Liveness only: a wedged server never answers; a loaded machine answers slowly."""


# --------------------------------------------------------------------------- helpers


class Victim:
    """A user with an echo function who checks that the server still serves them."""

    def __init__(self, server: ServeProcess) -> None:
        self.server = server
        self.user = User.signup(server, "victim")
        self.function = run(self.user.deploy(ECHO, name="echo")).id
        self.key = run(fetch_key(server.url, self.user.token, server.options()))

    async def check(self) -> None:
        """A plain run, a ``cape:`` run and a signup, each within the liveness bound."""
        plain = await asyncio.wait_for(self.user.run(self.function, b"plain"), VICTIM_TIMEOUT_S)
        assert plain == b"echo:plain"
        sealed = envelope.encrypt(b"sealed", self.key)
        assert sealed.startswith(b"cape:")
        opened = await asyncio.wait_for(self.user.run(self.function, sealed), VICTIM_TIMEOUT_S)
        assert opened == b"echo:sealed"
        newcomer = await asyncio.wait_for(
            asyncio.to_thread(User.signup, self.server, "newcomer"), VICTIM_TIMEOUT_S
        )
        assert newcomer.token


async def _session(server: ServeProcess, path: str, token: str) -> websockets.ClientConnection:
    return await websockets.connect(
        server.url.replace("https://", "wss://") + path,
        subprotocols=["cape.runtime", token],  # type: ignore[list-item]
        ssl=server.ssl_context(),
        max_size=None,
    )


async def _nonce(ws: websockets.ClientConnection) -> None:
    await ws.send(json.dumps({"message": {"nonce": base64.b64encode(b"n" * 16).decode()}}))
    json.loads(await ws.recv())  # the attestation document


async def _closed_with(ws: websockets.ClientConnection) -> tuple[int | None, list[Any]]:
    frames: list[Any] = []
    try:
        while True:
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
    except websockets.ConnectionClosed as exc:
        return (exc.rcvd.code if exc.rcvd else None), frames


class RawSocket:
    """A websocket spoken by hand over TLS, to send what libraries will not: a frame header
    that announces more bytes than follow."""

    def __init__(self, server: ServeProcess, path: str, token: str) -> None:
        host, port = server.url.removeprefix("https://").rsplit(":", 1)
        raw = socket.create_connection((host, int(port)), timeout=60)
        self.tls = server.ssl_context().wrap_socket(raw, server_hostname=host)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: cape.runtime, {token}\r\n\r\n"
        )
        self.tls.sendall(request.encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        assert head.split()[1] == b"101", head

    def _recv(self) -> bytes:
        data = self.tls.recv(65536)
        if not data:
            raise EOFError("the server closed the connection")
        return data

    def send_header(self, opcode: int, length: int, payload: bytes = b"") -> None:
        """A final frame announcing ``length`` bytes, followed by (masked) ``payload``."""
        mask = os.urandom(4)
        header = bytes([0x80 | opcode]) + (
            bytes([0x80 | length])
            if length < 126
            else bytes([0x80 | 126]) + struct.pack("!H", length)
            if length < 1 << 16
            else bytes([0x80 | 127]) + struct.pack("!Q", length)
        )
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.tls.sendall(header + mask + masked)

    def send_text(self, text: str) -> None:
        data = text.encode()
        self.send_header(0x1, len(data), data)

    def frame(self) -> tuple[int, bytes]:
        """The server's next frame: (opcode, payload)."""

        def take(n: int) -> bytes:
            while len(self.buffer) < n:
                self.buffer += self._recv()
            out, self.buffer = self.buffer[:n], self.buffer[n:]
            return out

        first, second = take(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", take(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", take(8))
        return first & 0x0F, take(length)

    def until_close(self) -> tuple[list[Any], int]:
        """The text frames before the server's close frame, and its close code."""
        texts: list[Any] = []
        while True:
            opcode, payload = self.frame()
            if opcode == 0x8:
                return texts, struct.unpack("!H", payload[:2])[0]
            if opcode == 0x1:
                texts.append(json.loads(payload))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.tls.close()


@contextlib.contextmanager
def _serve(tmp_path: Path, *args: str) -> Iterator[ServeProcess]:
    # Each test signs many users up from one address: lift the signup rate (tested elsewhere).
    server = ServeProcess(
        tmp_path / "data",
        tmp_path / "config",
        tmp_path / "logs",
        extra_args=["--signup-rate", "0", *args],
    ).start()
    try:
        yield server
    finally:
        server.kill()


# --------------------------------------------------------------------------- finding 1


def test_stalled_deploys_neither_wedge_the_host_nor_need_a_second_sigterm(
    tmp_path: Path,
) -> None:
    """Finding 1: ten deploys that announce a bundle and send one byte used to park every
    thread of the default executor, so cape: inputs, signups and a clean SIGTERM failed."""
    with _serve(tmp_path, "--limit", "frame_timeout_s=600") as server:
        victim = Victim(server)
        attackers = [User.signup(server, "stall") for _ in range(5)]

        async def attack_and_check() -> None:
            stalled: list[websockets.ClientConnection] = []
            try:
                for attacker in attackers:
                    for _ in range(2):  # each account's share of the deploy quota
                        ws = await _session(server, "/v1/deploy", attacker.token)
                        await _nonce(ws)
                        info = {"function_name": "stall", "bundle_size": 10_000_000}
                        await ws.send(json.dumps({"message": info}))
                        await ws.send(b"x")
                        stalled.append(ws)
                await asyncio.sleep(1)
                await victim.check()  # while the attack runs
                assert all(ws.state is websockets.protocol.State.OPEN for ws in stalled)
            finally:
                for ws in stalled:
                    await ws.close()
            await victim.check()  # and after it

        run(attack_and_check())
        assert server.process is not None
        server.process.send_signal(15)
        assert server.process.wait(60) == 0, server.stderr()[-2000:]
        assert not list((server.data_dir / "blobs" / ".tmp").iterdir())


# --------------------------------------------------------------------------- finding 4


@pytest.mark.parametrize(
    ("route", "after_nonce", "announced"),
    [
        ("/v1/key", False, 1 << 30),  # a nonce frame of 1 GiB
        ("/v1/key", False, 64 * 1024 + 1),  # one byte over the nonce limit
        ("/v1/deploy", True, 64 * 1024 + 1),  # a function-info frame over its limit
        ("run", True, (64 << 20) + 1),  # an input over the input limit
    ],
)
def test_oversized_frames_are_refused_from_their_header(
    server: ServeProcess, route: str, after_nonce: bool, announced: int
) -> None:
    """Finding 4: a frame announcing more than its route allows is refused, with an error
    frame and close 1009, before its payload arrives (it used to be read whole)."""
    victim = Victim(server)
    attacker = User.signup(server, "big")
    path = route
    if route == "run":
        path = f"/v1/run/{run(attacker.deploy(ECHO, name='mine')).id}"
    raw = RawSocket(server, path, attacker.token)
    try:
        if after_nonce:
            raw.send_text(json.dumps({"message": {"nonce": base64.b64encode(b"n").decode()}}))
            opcode, _ = raw.frame()  # the attestation document
            assert opcode == 0x1
        raw.send_header(0x2 if route == "run" else 0x1, announced, b"x" * 1000)
        texts, code = raw.until_close()  # no more bytes are sent: a waiting server hangs here
    finally:
        raw.close()
    assert code == 1009, texts
    assert "message too large" in texts[0]["error"] and str(announced) in texts[0]["error"]
    what = {"/v1/key": "nonce frame", "/v1/deploy": "function info frame", "run": "input"}
    assert f"{what[route]} size in bytes exceeds the limit of" in texts[0]["error"], texts
    run(victim.check())


# --------------------------------------------------------------------------- finding 7


@pytest.mark.parametrize(
    "frame",
    [
        '{"message": ' + "[" * 30_000 + "]" * 30_000 + "}",
        '{"message": {"nonce": "bm9uY2U=", "x": ' + "[" * 20 + "]" * 20 + "}}",
        '{"message": {"nonce": "bm9uY2U=", "nonce": "bm9uY2U="}}',
        '{"message": {"nonce": "bm9uY2U=", "x": NaN}}',
    ],
    ids=["30000-deep", "20-deep", "duplicate-key", "nan"],
)
def test_deep_or_loose_json_in_a_nonce_frame_is_a_clear_1008(
    server: ServeProcess, frame: str
) -> None:
    """Finding 7: a nonce frame under 64 KiB nested 30,000 deep gave "internal server error"
    and close 1011; session JSON is now strict (depth, duplicates, constants) with 1008."""
    assert len(frame) < 64 * 1024
    victim = Victim(server)
    attacker = User.signup(server, "deep")

    async def flow() -> tuple[int | None, list[Any]]:
        ws = await _session(server, "/v1/key", attacker.token)
        await ws.send(frame)
        return await _closed_with(ws)

    code, frames = run(flow())
    assert code == 1008, frames
    assert frames[0]["error"] != "internal server error"
    assert "JSON" in frames[0]["error"] or "nests" in frames[0]["error"]
    run(victim.check())


# --------------------------------------------------------------------------- finding 2


def _pat(user: User, **body: Any) -> dict[str, Any]:
    created: dict[str, Any] = user.api("POST", "/v1/token", {"name": secrets.token_hex(3), **body})
    return created


@pytest.mark.parametrize("how", ["token deleted", "function deleted", "token expired"])
def test_revocation_ends_open_sessions_within_one_call(server: ServeProcess, how: str) -> None:
    """Finding 2: a run session opened before its token was deleted (or expired, or its
    function deleted) kept running calls; now the next call gets the reason and the close."""
    owner = User.signup(server, "owner")
    function = run(owner.deploy(ECHO, name="revocable")).id
    token = _pat(owner, expiry=8 if how == "token expired" else None)

    async def flow() -> tuple[int | None, list[Any]]:
        session = await owner.session(function, token=token["token"], seal_results=False)
        try:
            assert await session.invoke(b"first") == b"echo:first"
            if how == "token deleted":
                await asyncio.to_thread(owner.api, "DELETE", f"/v1/token/{token['id']}")
            elif how == "function deleted":
                await asyncio.to_thread(owner.api, "DELETE", f"/v1/functions/{function}")
            else:
                await asyncio.sleep(10)  # past the expiry (whole seconds)
            await session.send_sealed(b"second")
            return await _closed_with(session._ws)
        finally:
            await session.close()

    code, frames = run(flow())
    expected = {
        "token deleted": "token revoked",
        "function deleted": "function deleted",
        "token expired": "token is expired",
    }[how]
    assert code == 1008 and frames == [{"error": expected}], (code, frames)


# --------------------------------------------------------------------------- quotas and deadlines


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """A server with small limits, so that quotas and deadlines are reached quickly."""
    with _serve(
        tmp_path_factory.mktemp("tight"),
        *("--limit", "sessions_per_user=3"),
        *("--limit", "bundle_bytes_in_flight_per_user=100000"),
        *("--limit", "frame_timeout_s=3"),
        *("--limit", "header_timeout_s=3"),
        *("--limit", "body_timeout_s=3"),
    ) as server:
        yield server


def test_session_quota_refuses_with_429_and_leaves_others_alone(
    tight: ServeProcess, tmp_path: Path
) -> None:
    """Quotas: a tenant holding its sessions gets 429 with Retry-After for one more, which
    the SDK raises as a BusyError with the server's retry hint and the CLI shows as one line;
    other tenants are unaffected."""
    victim = Victim(tight)
    account = signup(tight, tmp_path / "hog")
    attacker = User(tight, account.username, account.token)
    function = run(attacker.deploy(ECHO, name="hog")).id

    async def flow() -> None:
        held = [await attacker.session(function) for _ in range(3)]
        try:
            with pytest.raises(BusyError) as refused:
                await attacker.session(function)
            text = str(refused.value)
            assert "\n" not in text and "(429)" in text, text
            assert "too many sessions" in text and "limit 3" in text, text
            assert refused.value.retry_after_s is not None and refused.value.retry_after_s >= 1
            assert f"try again in {int(refused.value.retry_after_s)} s" in text, text
            cli = await asyncio.to_thread(account, "run", function, "one more")
            error(cli, "the server refused the session (429)", "limit 3", "try again in")
            await victim.check()
        finally:
            for session in held:
                await session.close()
        assert await attacker.run(function, b"again") == b"echo:again"

    run(flow())


def test_bundle_bytes_in_flight_over_quota_are_refused(tight: ServeProcess) -> None:
    """Quotas: a deploy announcing more bundle bytes than the tenant may still have in flight
    gets an error frame and close 1013 (try later), one larger than it may ever have 1008;
    both before any bundle byte is sent, and the tenant's deploy in flight goes on. Our SDK
    raises the first as a BusyError (the frame says ``"busy"``), not a function error."""
    attacker = User.signup(tight, "bulky")

    async def announce(size: int) -> websockets.ClientConnection:
        ws = await _session(tight, "/v1/deploy", attacker.token)
        await _nonce(ws)
        await ws.send(json.dumps({"message": {"function_name": "bulky", "bundle_size": size}}))
        return ws

    async def flow() -> list[tuple[int | None, list[Any]]]:
        first = await announce(60_000)

        async def trickle() -> None:  # a byte a second: within the 3 s chunk deadline
            while True:
                await first.send(b"x")
                await asyncio.sleep(1)

        trickling = asyncio.ensure_future(trickle())
        try:
            later = await _closed_with(await announce(60_000))
            never = await _closed_with(await announce(200_000))
            with pytest.raises(BusyError, match="bundle bytes in flight") as busy:
                await attacker.deploy(
                    ECHO.encode() + b"#" + os.urandom(60_000).hex().encode(), name="more"
                )
            assert "\n" not in str(busy.value)
            assert first.state is websockets.protocol.State.OPEN
        finally:
            trickling.cancel()
            await first.close()
        return [later, never]

    (later_code, later), (never_code, never) = run(flow())
    assert later_code == 1013 and "bundle bytes in flight" in later[0]["error"], later
    assert later[0]["busy"] is True and later[0]["retry_after"] >= 1, later
    assert "wait for one to finish" in later[0]["error"]
    assert never_code == 1008 and "limit of 100000" in never[0]["error"], never


def test_client_paced_waits_have_deadlines(tight: ServeProcess) -> None:
    """Deadlines: a deploy that stops between chunks, a request body that stops, and a
    request head that never ends are each cut off (3 s here), never waited for. The three
    stall at once (each deadline is its own connection's), so the test waits 3 s, not 9."""
    attacker = User.signup(tight, "slow")
    host, port = tight.url.removeprefix("https://").rsplit(":", 1)
    context = tight.ssl_context()

    async def stalled_deploy() -> tuple[int | None, list[Any]]:
        ws = await _session(tight, "/v1/deploy", attacker.token)
        await _nonce(ws)
        await ws.send(json.dumps({"message": {"function_name": "slow", "bundle_size": 100}}))
        await ws.send(b"x")
        return await _closed_with(ws)

    def exchange(data: bytes) -> bytes:
        with (
            socket.create_connection((host, int(port)), timeout=60) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.sendall(data)
            received = b""
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                while chunk := tls.recv(65536):
                    received += chunk
            return received

    async def all_three() -> tuple[tuple[int | None, list[Any]], bytes, bytes]:
        deploy, body, head = await asyncio.gather(
            stalled_deploy(),
            asyncio.to_thread(
                exchange,
                f"POST /v1/login HTTP/1.1\r\nHost: {host}\r\n"
                "Content-Type: application/json\r\n"
                'Content-Length: 100\r\n\r\n{"user'.encode(),
            ),
            asyncio.to_thread(exchange, f"GET /v1/runtime HTTP/1.1\r\nHost: {host}\r\n".encode()),
        )
        return deploy, body, head

    started = time.monotonic()
    (code, frames), body, head = run(all_three())
    assert code == 1008 and "no message within 3 s" in frames[0]["error"], frames
    assert body.startswith(b"HTTP/1.1 408"), body[:200]
    assert b"did not arrive within 3 s" in body
    assert head == b""  # closed without a response: the head never ended
    assert time.monotonic() - started < 60


def test_a_client_that_stops_reading_does_not_keep_its_sessions(tight: ServeProcess) -> None:
    """Deadlines: a client that stops reading its results (so that they back up in the
    server's buffers) used to hold its session, and the enclave session behind it, until the
    keep-alive ping gave up on it (40 s or more); now each send waits at most the frame
    deadline (3 s here) for the client to take the previous replies, and the session ends."""
    victim = Victim(tight)
    attacker = User.signup(tight, "deaf")
    function = run(attacker.deploy(ECHO, name="deaf")).id

    async def flow() -> None:
        held = [await attacker.session(function) for _ in range(2)]  # idle, within quota
        deaf = await attacker.session(function)  # the last session of its quota
        deaf._ws.transport.pause_reading()  # reads nothing from now on

        async def flood() -> None:
            # Results of 16 MiB fill the socket buffers and then the server's, until the
            # server waits to send one; from then on these sends block too (cancelled below).
            for _ in range(6):
                await deaf.send_sealed(b"r" * (16 << 20))

        opened = time.monotonic()
        flooding = asyncio.ensure_future(flood())
        try:
            # The slot is free once the deaf session ended. The keep-alive cannot end it
            # before its ping (20 s after the session opened) went 20 s unanswered, so a
            # bound of 25 s from the open tells the two apart; the deadline needs 3 s after
            # the enclave echoed a few results (a few seconds even on a loaded machine).
            fresh = None
            while fresh is None:
                try:
                    fresh = await attacker.session(function)
                except BusyError:
                    assert time.monotonic() - opened < 25, "the unread session is still held"
                    await asyncio.sleep(0.5)
            assert await fresh.invoke(b"again") == b"echo:again"
            await fresh.close()
            await victim.check()
        finally:
            flooding.cancel()
            deaf._ws.transport.abort()
            for session in held:
                await session.close()

    run(flow())
