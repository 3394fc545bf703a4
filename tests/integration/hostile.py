"""A hostile Cape server for client tests.

:class:`HostileServer` is a real TLS websocket server on 127.0.0.1 (a free port) that selects
the ``cape.runtime`` subprotocol and runs a *script* for every session. A script gets an
:class:`Enclave`: the connection, a simulated secure module and a per-session X25519 key, plus
helpers to behave like a correct enclave (:func:`honest`) or to deviate from one at any step.

In a sealed session (the client sent a response key) the honest enclave seals every reply on
the session's :class:`~cape.crypto.results.ResultChannel`: reply *n* to an input (a result or
a function error) is sealed with sequence number *n*, results with aad ``result`` and errors
with aad ``error`` (the error frame is ``{"error": SEALED_ERROR_TEXT, "sealed": …}``). When the
client asks for a suite (``"sealing": "aes-256-gcm"``, our SDK), the honest enclave confirms it
in ``user_data`` and its channel runs under that suite (:attr:`Enclave.sealing`).

Every frame the client sends after the server sent an attestation document is recorded in
:attr:`SessionRecord.after_document`, so a test can prove that a client which refused the
document sent nothing (no input, no bundle, no deploy info) afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import enum
import hashlib
import json
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

import websockets
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from cape._internal.timefile import utc_now
from cape.crypto import envelope, hpke, results
from cape.crypto.keys import public_key_der
from cape.crypto.results import SEALED_ERROR_TEXT, ResultChannel
from cape.crypto.session_keys import CHACHA20_POLY1305, SEALINGS, Sealing, SessionKeys
from cape.enclave.secure_module.simulated import (
    InstanceCredentials,
    SimulatedAuthority,
    SimulatedSecureModule,
)
from cape.platform.tls import TlsFiles

__all__ = [
    "FAIL_INPUT",
    "FAIL_TEXT",
    "FUNCTION_BUNDLE",
    "FUNCTION_CHECKSUM",
    "KEY_OWNER",
    "PCRS",
    "SUBPROTOCOL",
    "UNSET",
    "Enclave",
    "FunctionFailed",
    "HostileServer",
    "Pki",
    "Script",
    "SessionRecord",
    "b64",
    "client_ssl_context",
    "echo",
    "honest",
    "session_channel",
]

SUBPROTOCOL: Final = "cape.runtime"
#: How long the server waits for any client frame before it gives up on the session.
RECV_TIMEOUT_S: Final = 5.0
#: PCR0-15 of the simulated enclave (PCR0 non-zero: not a debug enclave).
PCRS: Final[dict[int, bytes]] = {
    i: hashlib.sha384(b"hostile-pcr%d" % i).digest() for i in range(16)
}
#: What a run session's function "is": its checksum goes into user_data.func_checksum.
FUNCTION_BUNDLE: Final = b"PK\x03\x04 a function bundle"
FUNCTION_CHECKSUM: Final = hashlib.sha256(FUNCTION_BUNDLE).hexdigest()
#: Whose Cape key the honest key route hands out (user_data.owner).
KEY_OWNER: Final = "alice"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


#: An input on which the honest function fails (a function error, not a protocol error).
FAIL_INPUT: Final = b"please fail"
#: The real message of that failure (what only the client may read in a sealed session).
FAIL_TEXT: Final = "function raised ValueError: asked to fail (secret detail 7f3a)"


class FunctionFailed(Exception):
    """Raised by a served function: the enclave answers with a function error."""


def echo(data: bytes) -> bytes:
    """The function the honest enclave runs (it fails on :data:`FAIL_INPUT`)."""
    if data == FAIL_INPUT:
        raise FunctionFailed(FAIL_TEXT)
    return b"echo:" + data


def session_channel(
    session_key: hpke.KeyPair, response_public: bytes, sealing: Sealing = CHACHA20_POLY1305
) -> ResultChannel:
    """The enclave side of a session's result channel."""
    return SessionKeys.for_enclave(session_key, response_public, sealing).results


def client_ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    """What a client uses: trust the server's local CA only."""
    return ssl.create_default_context(cafile=str(tls.ca_cert))


def _server_ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.server_cert, tls.server_key)
    return context


class _Unset(enum.Enum):
    UNSET = enum.auto()


#: "Use the honest value" for :meth:`Enclave.document` arguments (``None`` means "leave out").
UNSET: Final = _Unset.UNSET


@dataclass(frozen=True)
class Pki:
    """A simulated attestation PKI: the root clients pin and one host's instance credentials."""

    authority: SimulatedAuthority
    credentials: InstanceCredentials

    @classmethod
    def generate(cls, common_name: str = "cape-simulated-root") -> Pki:
        now = utc_now()
        authority = SimulatedAuthority.generate(
            now=now - dt.timedelta(days=1), common_name=common_name
        )
        return cls(authority, authority.issue_instance(now - dt.timedelta(hours=1)))

    @property
    def root(self) -> x509.Certificate:
        return self.authority.root_certificate

    def module(
        self,
        *,
        clock: Callable[[], dt.datetime] | None = None,
        debug: bool = False,
        pcrs: dict[int, bytes] | None = None,
    ) -> SimulatedSecureModule:
        return SimulatedSecureModule(
            self.credentials, pcrs=PCRS if pcrs is None else pcrs, clock=clock, debug=debug
        )


@dataclass
class SessionRecord:
    """What the server saw of one session."""

    path: str
    start: dict[str, Any] | None = None
    """The client's first message (nonce, response_key), decoded from JSON."""
    documents: list[bytes] = field(default_factory=list)
    """Every attestation document the server sent (raw COSE bytes)."""
    frames: list[str | bytes] = field(default_factory=list)
    """Every frame the client sent, the nonce message first."""
    document_index: int | None = None
    """How many frames the client had sent when the first document went out."""
    opened: list[bytes] = field(default_factory=list)
    """Plaintexts the enclave opened with its attested key (bundle, inputs)."""
    sent: list[str] = field(default_factory=list)
    """Every frame sent through :meth:`Enclave.send_json`, the document first (what a host
    relays to the client; frames a script writes to ``ws`` directly are not recorded)."""
    close_code: int | None = None
    error: BaseException | None = None
    """An unexpected exception in the script (a bug in the test, not in the client)."""
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def document_sent(self) -> bool:
        return bool(self.documents)

    @property
    def after_document(self) -> list[str | bytes]:
        """Every frame the client sent after the first document went out."""
        return [] if self.document_index is None else self.frames[self.document_index :]

    @property
    def binary_frames(self) -> list[bytes]:
        return [frame for frame in self.frames if isinstance(frame, bytes)]


class Enclave:
    """One server-side session: the connection and what a (simulated) enclave holds."""

    def __init__(self, server: HostileServer, ws: ServerConnection, record: SessionRecord) -> None:
        self.server = server
        self.ws = ws
        self.record = record
        self.key = hpke.generate_keypair()
        """The session key the honest document attests (``public_key``)."""
        self.module = server.pki.module()
        self.nonce: bytes | None = None
        self.response_key: bytes | None = None
        self.channel: ResultChannel | None = None
        """The honest result channel (sealed sessions only), set by :meth:`read_start`."""
        self.sealing: Sealing = CHACHA20_POLY1305
        """The suite the client asked for (with a response key), set by :meth:`read_start`."""
        self.replies = 0
        """Replies to inputs sent on the channel so far: the next reply's sequence number."""

    # --- receiving -------------------------------------------------------------------------

    async def recv(self) -> str | bytes:
        frame = await asyncio.wait_for(self.ws.recv(), RECV_TIMEOUT_S)
        self.record.frames.append(frame)
        return frame

    async def recv_message(self) -> dict[str, Any]:
        frame = await self.recv()
        assert isinstance(frame, str), f"expected a text frame, got {frame!r:.80}"
        message = json.loads(frame)["message"]
        assert isinstance(message, dict)
        return message

    async def read_start(self) -> dict[str, Any]:
        """Read the client's ``{"message": {"nonce": …, "response_key": …}}``."""
        start = await self.recv_message()
        self.record.start = start
        self.nonce = base64.b64decode(start["nonce"], validate=True)
        key = start.get("response_key")
        self.response_key = base64.b64decode(key, validate=True) if key is not None else None
        if self.response_key is not None:
            self.sealing = SEALINGS.get(start.get("sealing") or "", CHACHA20_POLY1305)
            self.channel = session_channel(self.key, self.response_key, self.sealing)
        return start

    async def drain(self) -> None:
        """Record whatever the client still sends, until it closes."""
        while True:
            await self.recv()

    # --- documents -------------------------------------------------------------------------

    def honest_user_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        path = self.record.path
        if path.startswith("/v1/run/"):
            data["func_checksum"] = b64(hashlib.sha256(FUNCTION_BUNDLE).digest())
        if path == "/v1/key":
            assert self.server.rsa_key is not None, "a key session needs HostileServer(rsa_key=)"
            data["key"] = b64(public_key_der(self.server.rsa_key))
            data["owner"] = KEY_OWNER
        if self.response_key is not None:
            data["response_key_sha256"] = b64(hashlib.sha256(self.response_key).digest())
        if self.sealing is not CHACHA20_POLY1305:
            data["sealing"] = self.sealing.name
        return data

    def document(
        self,
        *,
        nonce: bytes | _Unset | None = UNSET,
        public_key: bytes | _Unset | None = UNSET,
        user_data: dict[str, Any] | bytes | _Unset | None = UNSET,
        module: SimulatedSecureModule | None = None,
    ) -> bytes:
        """A signed document; each field honest unless given (``None`` leaves it out)."""
        if isinstance(user_data, _Unset):
            user_data = self.honest_user_data()
        if isinstance(user_data, dict):
            user_data = json.dumps(user_data).encode()
        return (module or self.module).attestation(
            user_data=user_data,
            nonce=self.nonce if isinstance(nonce, _Unset) else nonce,
            public_key=self.key.public_bytes if isinstance(public_key, _Unset) else public_key,
        )

    async def send_document(self, document: bytes | None = None) -> bytes:
        """Send ``document`` (default: an honest one) as the attestation_doc message."""
        raw = self.document() if document is None else document
        if self.record.document_index is None:
            self.record.document_index = len(self.record.frames)
        self.record.documents.append(raw)
        await self.send_message({"type": "attestation_doc", "message": b64(raw)})
        return raw

    # --- sending ---------------------------------------------------------------------------

    async def send_message(self, message: object) -> None:
        await self.send_json({"message": message})

    async def send_json(self, frame: object) -> None:
        text = json.dumps(frame)
        self.record.sent.append(text)
        await self.ws.send(text)

    def next_sequence(self) -> int:
        """Take the next reply's sequence number."""
        sequence, self.replies = self.replies, self.replies + 1
        return sequence

    def seal(
        self, data: bytes, *, sequence: int | None = None, kind: bytes = results.RESULT
    ) -> bytes:
        """``data`` sealed on the honest channel as reply ``sequence`` (default: take the next)."""
        assert self.channel is not None, "sealing needs a session with a response key"
        return self.channel.seal(
            self.next_sequence() if sequence is None else sequence, data, kind=kind
        )

    def result(self, output: bytes) -> dict[str, Any]:
        """The honest function_result message for ``output`` (takes the next number)."""
        if self.channel is None:
            return {"type": "function_result", "message": b64(output)}
        return {"type": "function_result", "message": b64(self.seal(output)), "encrypted": True}

    def error(self, text: str) -> dict[str, Any]:
        """The honest function-error frame for ``text`` (takes the next number)."""
        if self.channel is None:
            return {"error": text}
        sealed = self.seal(text.encode(), kind=results.ERROR)
        return {"error": SEALED_ERROR_TEXT, "sealed": b64(sealed)}

    def reply(self, function: Callable[[bytes], bytes], data: bytes) -> dict[str, Any]:
        """The honest frame answering ``data``: a result message, or an error frame."""
        try:
            output = function(data)
        except FunctionFailed as exc:
            return self.error(str(exc))
        return {"message": self.result(output)}

    async def open_frame(self) -> bytes:
        """Receive one binary frame and open it with the attested session key."""
        frame = await self.recv()
        assert isinstance(frame, bytes), f"expected a binary frame, got {frame!r:.80}"
        plaintext = hpke.open(self.key, frame)
        self.record.opened.append(plaintext)
        return plaintext

    async def serve_inputs(self, function: Callable[[bytes], bytes] = echo) -> None:
        """Answer every input with the honest reply, until the client closes."""
        while True:
            data = await self.open_frame()
            await self.send_json(self.reply(function, data))

    async def deploy(self) -> None:
        """The honest deploy step: info, chunks of ``cape:`` envelope, reply, close."""
        info = await self.recv_message()
        size = int(info["bundle_size"])
        chunks: list[bytes] = []
        while sum(map(len, chunks)) < size:
            chunk = await self.recv()
            assert isinstance(chunk, bytes)
            chunks.append(chunk)
        assert self.server.rsa_key is not None, "a deploy session needs HostileServer(rsa_key=)"
        bundle = envelope.decrypt(b"".join(chunks), self.server.rsa_key)
        self.record.opened.append(bundle)
        reply = {
            "id": "A" * 22,
            "checksum": hashlib.sha256(bundle).hexdigest(),
            "name": info["function_name"],
        }
        await self.send_message(reply)
        await self.ws.close()


Script = Callable[[Enclave], Awaitable[None]]


async def honest(enclave: Enclave) -> None:
    """A correct enclave for every session kind (run, test, deploy, key)."""
    await enclave.read_start()
    await enclave.send_document()
    path = enclave.record.path
    if path == "/v1/key":
        await enclave.ws.close()
    elif path == "/v1/deploy":
        await enclave.deploy()
    else:
        if path == "/v1/test":
            await enclave.open_frame()  # the bundle
        await enclave.serve_inputs()


class HostileServer:
    """``async with HostileServer(tls, pki, script) as server:`` … ``server.url``."""

    def __init__(
        self,
        tls: TlsFiles,
        pki: Pki,
        script: Script = honest,
        *,
        rsa_key: RSAPrivateKey | None = None,
        refuse: tuple[int, str] | None = None,
        retry_after: str | None = None,
        subprotocol: str = SUBPROTOCOL,
    ) -> None:
        self.tls = tls
        self.pki = pki
        self.script = script
        self.rsa_key = rsa_key
        self.sessions: list[SessionRecord] = []
        self._refuse = refuse
        self._retry_after = retry_after
        """The refusal's ``Retry-After`` header, if any."""
        self._subprotocol = subprotocol
        self._server: Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"https://127.0.0.1:{port}"

    async def __aenter__(self) -> Self:
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            ssl=_server_ssl_context(self.tls),
            process_request=self._process_request,
            select_subprotocol=self._select_subprotocol,
            compression=None,
            max_size=None,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def finished(self, count: int = 1, timeout_s: float = 5.0) -> list[SessionRecord]:
        """Wait until ``count`` sessions have ended server-side; re-raise a script failure."""

        async def settled() -> None:
            while len(self.sessions) < count:
                await asyncio.sleep(0.01)
            for record in self.sessions:
                await record.done.wait()

        await asyncio.wait_for(settled(), timeout_s)
        for record in self.sessions:
            if record.error is not None:
                raise AssertionError(f"server script failed: {record.error!r}") from record.error
        return self.sessions

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if self._refuse is None:
            return None
        status, body = self._refuse
        response = connection.respond(status, body)
        if self._retry_after is not None:
            response.headers["Retry-After"] = self._retry_after
        return response

    def _select_subprotocol(
        self, connection: ServerConnection, subprotocols: Sequence[Subprotocol]
    ) -> Subprotocol | None:
        """``cape.runtime`` when offered (never the token); a hostile choice if configured."""
        if self._subprotocol == SUBPROTOCOL and SUBPROTOCOL not in subprotocols:
            return None
        return Subprotocol(self._subprotocol)

    async def _handle(self, ws: ServerConnection) -> None:
        record = SessionRecord(path=ws.request.path if ws.request is not None else "")
        self.sessions.append(record)
        enclave = Enclave(self, ws, record)
        try:
            await self.script(enclave)
            await enclave.drain()
        except websockets.ConnectionClosed:
            pass
        except Exception as exc:  # the script's own bug: surfaced by finished()
            record.error = exc
            await ws.close(1011, "test server script failed")
        finally:
            record.close_code = ws.close_code
            record.done.set()
