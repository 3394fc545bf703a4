"""Attested websocket sessions with a Cape server (protocol.md "Sessions").

Every session verifies before it sends anything secret: the attestation document must chain
to the pinned root, carry this session's nonce, match any pinned PCRs and function checksum,
and bind this client's response key (``user_data.response_key_sha256``) so that results come
back sealed to it. When the document also confirms ``input_frames: "sealed"`` (ours), inputs
go under the session's input key instead of one HPKE seal each (protocol.md "Sealed inputs").
Both sealed channels run under AES-256-GCM when the client's request for it is confirmed by the
document (``sealing``, ours; protocol.md "Sealing"), else under ChaCha20-Poly1305 (v1).
Anything else ends the session with a :class:`~cape.errors.CapeError`: the client fails closed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import functools
import hashlib
import hmac
import json
import os
import secrets
import ssl
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

import websockets
from cryptography import x509
from websockets.asyncio.client import ClientConnection
from websockets.proxy import get_proxy
from websockets.uri import parse_uri

from cape.crypto import hpke
from cape.crypto.results import ERROR, ResultChannel
from cape.crypto.session_keys import (
    AES_256_GCM,
    CHACHA20_POLY1305,
    SEALINGS,
    InputChannel,
    SessionKeys,
)
from cape.errors import (
    BusyError,
    CapeError,
    ChecksumMismatchError,
    FormatError,
    FunctionError,
    RequestRefusedError,
    TransportError,
    VerificationError,
)
from cape.formats.attestation import AttestationDocument
from cape.sdk.rest import refusal_text, refused, retry_after_seconds, retry_hint
from cape.verify.policy import AttestationPolicy
from cape.verify.verifier import VerificationCache, verify_attestation

__all__ = ["Session", "SessionOptions", "ws_url"]

_VERIFIED = VerificationCache(max_entries=256, documents=False)
"""Certificate chains this process has verified: every session to one enclave brings a fresh
document but the same chain, which is then not verified again while all its certificates are
valid (the document's signature, time, nonce and PCRs are checked every time)."""

SUBPROTOCOL: Final = "cape.runtime"
RESULT_PLAIN: Final = 0x00
RESULT_SEALED: Final = 0x01
"""The first byte of a binary result frame (protocol.md, "Result frames")."""
NONCE_BYTES: Final = 16
OPEN_TIMEOUT_S: Final = 30.0


PROXY_VARIABLES: Final = tuple(
    name
    for scheme in ("wss", "socks", "https", "no")
    for name in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY")
)
"""The environment variables websockets' choice of proxy for a ``wss://`` URL depends on."""


@functools.lru_cache(maxsize=64)
def _proxy_of(server: str, settings: tuple[str | None, ...]) -> str | None:
    return get_proxy(parse_uri(server))


def proxy_for(url: str) -> str | None:
    """The proxy for a ``wss://`` URL, as ``websockets.connect`` picks it by default (``None``:
    connect directly), remembered per server and values of :data:`PROXY_VARIABLES`. By default
    websockets decodes the whole environment on every connect, ≈15 % of a session's CPU in
    the client; a changed proxy variable still takes effect at the next session."""
    uri = parse_uri(url)  # the choice depends on the scheme, host and port only
    host = f"[{uri.host}]" if ":" in uri.host else uri.host  # an IPv6 address in brackets
    server = f"{'wss' if uri.secure else 'ws'}://{host}:{uri.port}/"
    return _proxy_of(server, tuple(os.environ.get(name) for name in PROXY_VARIABLES))


def ws_url(url: str, path: str) -> str:
    """``https://host`` + ``/v1/...`` → ``wss://host/v1/...`` (plain http is refused)."""
    if url.startswith("https://"):
        return "wss://" + url[len("https://") :].rstrip("/") + path
    if url.startswith("wss://"):
        return url.rstrip("/") + path
    raise FormatError(f"the server URL must use https://, not {url.split(':', 1)[0]}://")


@dataclass(frozen=True)
class SessionOptions:
    """How a session verifies: the pinned root, PCR allow-lists and an expected checksum."""

    root: x509.Certificate
    ssl_context: ssl.SSLContext
    pcrs: Mapping[int, Collection[bytes]] = field(default_factory=dict)
    function_checksum: str | None = None
    """Expected SHA-256 (hex) of the function's plaintext bundle (run sessions)."""
    seal_results: bool = True
    clock: Any = None
    """Returns the time documents are checked at (default: now, UTC)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


CLOSE_MEANINGS: Final = {
    1009: "a message was over the server's size limit",
    1013: "the server is busy; try again later",
}
"""How close codes that are not errors of ours read (refusals; docs/limits.md)."""
CLOSE_TRY_AGAIN_LATER: Final = 1013
BUSY_STATUSES: Final = frozenset({429, 503})
"""Upgrade refusals that mean "try again later" (docs/limits.md): a :class:`BusyError`."""


def _close_error(exc: websockets.ConnectionClosed) -> CapeError:
    frame = exc.rcvd
    if frame is not None and frame.code == 1000 and frame.reason == "idle timeout":
        return TransportError(
            "the session was closed after being idle; connect again", close_code=1000
        )
    if frame is not None and frame.code in CLOSE_MEANINGS:
        reason = f": {frame.reason}" if frame.reason else ""
        text = f"the server closed the session ({CLOSE_MEANINGS[frame.code]}){reason}"
        if frame.code == CLOSE_TRY_AGAIN_LATER:
            return BusyError(text)
        return TransportError(text, close_code=frame.code)
    if frame is not None and frame.reason:
        return TransportError(
            f"the server closed the session: {frame.reason}", close_code=frame.code
        )
    return TransportError("the server closed the session")


class Session:
    """One verified session. Use :meth:`open`; then :meth:`invoke`, :meth:`send_bundle` …"""

    def __init__(
        self,
        websocket: ClientConnection,
        document: AttestationDocument,
        user_data: dict[str, Any],
        channel: ResultChannel | None,
        *,
        binary_results: bool = False,
        inputs: InputChannel | None = None,
    ) -> None:
        self._ws = websocket
        self._binary_results = binary_results
        """The server confirmed results as binary frames (it may also still send text)."""
        self.document = document
        self.user_data = user_data
        self._channel = channel
        self._replies = 0
        """Replies received to inputs so far: the next sealed reply's sequence number."""
        self._inputs = inputs
        """The enclave confirmed sealed inputs: input *n* goes under this channel, not HPKE."""
        self._sent = 0
        """Inputs (and a test session's bundle) sent so far: the next one's sequence number."""

    @classmethod
    async def open(cls, url: str, path: str, token: str, options: SessionOptions) -> Session:
        """Connect, send a fresh nonce (and response key), verify the returned document."""
        try:
            address = ws_url(url, path)
            websocket = await websockets.connect(
                address,
                proxy=proxy_for(address),
                subprotocols=[SUBPROTOCOL, token],  # type: ignore[list-item]
                ssl=options.ssl_context,
                max_size=None,
                open_timeout=OPEN_TIMEOUT_S,
                compression=None,
            )
        except websockets.InvalidStatus as exc:
            raise _refusal(exc) from None
        except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
            raise TransportError(f"cannot reach the Cape server at {url}: {exc}") from None
        try:
            return await cls._attest(websocket, options)
        except BaseException:
            await websocket.close()
            raise

    @classmethod
    async def _attest(cls, websocket: ClientConnection, options: SessionOptions) -> Session:
        nonce = secrets.token_bytes(NONCE_BYTES)
        response_key = hpke.generate_keypair() if options.seal_results else None
        # Results as binary frames (ours): no base64 or JSON per result. A server that does
        # not know the field ignores it and answers in text, which receive_result reads too.
        start: dict[str, Any] = {"nonce": _b64(nonce), "result_frames": "binary"}
        if response_key is not None:
            # Sealed inputs (ours) ride on the response key's agreement; used only once the
            # enclave confirms them in the attested document.
            start["response_key"] = _b64(response_key.public_bytes)
            start["input_frames"] = "sealed"
            start["sealing"] = AES_256_GCM.name  # used only if the document confirms it
        try:
            await websocket.send(json.dumps({"message": start}))
        except websockets.ConnectionClosed as exc:
            raise _close_error(exc) from None
        message = await _receive_message(websocket)
        if message.get("type") not in (None, "attestation_doc"):
            raise FormatError(f"expected an attestation document, got {message.get('type')!r}")
        raw = _decode_b64(message.get("message"), "attestation document")
        now = options.clock() if options.clock is not None else dt.datetime.now(dt.UTC)
        document = verify_attestation(
            raw,
            root=options.root,
            now=now,
            policy=AttestationPolicy(nonce=nonce, pcrs=options.pcrs),
            cache=_VERIFIED,
        )
        user_data = _user_data(document)
        channel = inputs = None
        confirmed = user_data.get("input_frames", "hpke")
        if confirmed not in ("hpke", "sealed"):
            raise FormatError(f"the enclave attests unknown input frames {str(confirmed)[:40]!r}")
        sealing = user_data.get("sealing")
        if sealing is not None and (not isinstance(sealing, str) or sealing not in SEALINGS):
            raise FormatError(f"the enclave attests unknown sealing {str(sealing)[:40]!r}")
        if response_key is not None:
            if "response_key_sha256" not in user_data:
                raise VerificationError(
                    "the enclave did not bind this session's response key; refusing to continue"
                )
            bound = _decode_b64(user_data.get("response_key_sha256"), "response key binding")
            if not hmac.compare_digest(bound, hashlib.sha256(response_key.public_bytes).digest()):
                raise VerificationError(
                    "the enclave did not bind this session's response key; refusing to continue"
                )
            if document.public_key is None:
                raise VerificationError("the attestation document carries no session key")
            # The document says which suite the enclave seals under: AES-256-GCM when it
            # confirms the request, else ChaCha20-Poly1305 (v1: an older enclave, or a host that
            # dropped the request). Both are sound; a forged suite opens nothing.
            suite = AES_256_GCM if sealing == AES_256_GCM.name else CHACHA20_POLY1305
            keys = SessionKeys.for_client(response_key, document.public_key, suite)
            channel = keys.results
            inputs = keys.inputs if confirmed == "sealed" else None
        elif confirmed == "sealed":
            raise VerificationError("the enclave attests sealed inputs, but none were asked for")
        elif sealing is not None:
            raise VerificationError("the enclave attests a sealing, but none was asked for")
        if options.function_checksum is not None:
            if "func_checksum" not in user_data:
                raise ChecksumMismatchError(
                    "the enclave attests no function checksum, but one was pinned"
                )
            got = _decode_b64(user_data.get("func_checksum"), "function checksum").hex()
            want = options.function_checksum.lower()
            if not hmac.compare_digest(got, want):
                raise ChecksumMismatchError(
                    f"function checksum does not match: got {got}, want {want}"
                )
        binary = message.get("result_frames") == "binary"
        return cls(websocket, document, user_data, channel, binary_results=binary, inputs=inputs)

    async def invoke(self, data: bytes) -> bytes:
        """Send one input (sealed: see :meth:`send_sealed`); return the function's output."""
        if self.document.public_key is None:
            raise VerificationError("the attestation document carries no session key")
        await self.send_sealed(data)
        return await self.receive_result()

    async def receive_result(self) -> bytes:
        """The reply to the oldest input not yet answered (opened if it was sealed).

        In a sealed session every reply takes the next sequence number, so a reply the host
        dropped, replayed, reordered or made up does not open.
        """
        frame = await _receive_any(self._ws)
        sequence, self._replies = self._replies, self._replies + 1
        if isinstance(frame, bytes) and self._binary_results:
            return self._open_binary_result(sequence, frame)
        parsed = _parse_frame(frame)
        if parsed.get("error"):
            sealed = parsed.get("sealed")
            if self._channel is not None and isinstance(sealed, str):
                details = self._channel.open(
                    sequence, _decode_b64(sealed, "sealed error"), kind=ERROR
                )
                raise FunctionError(details.decode("utf-8", "replace"))
            raise _error_of(parsed)
        message = _message_of(parsed)
        if message.get("type") != "function_result":
            raise FormatError(f"expected a function result, got {message.get('type')!r}")
        output = _decode_b64(message.get("message"), "function result")
        if self._channel is None:
            return output
        if message.get("encrypted") is not True:
            raise VerificationError("the result came back unsealed although sealing was bound")
        return self._channel.open(sequence, output)

    def _open_binary_result(self, sequence: int, frame: bytes) -> bytes:
        """A binary result frame: its tag byte, then the output (sealed when bound)."""
        if not frame or frame[0] not in (RESULT_PLAIN, RESULT_SEALED):
            raise FormatError("the server sent a binary frame that is not a result")
        output = memoryview(frame)[1:]
        if self._channel is None:
            if frame[0] != RESULT_PLAIN:
                raise FormatError("the server sent a sealed result to a session without one")
            return bytes(output)
        if frame[0] != RESULT_SEALED:
            raise VerificationError("the result came back unsealed although sealing was bound")
        return self._channel.open(sequence, output)

    async def send_sealed(self, data: bytes) -> None:
        """One binary frame: ``data`` sealed as the session's next input (under its input key
        when the enclave confirmed sealed inputs), else HPKE-sealed to the document's key."""
        if self._inputs is not None:
            sequence, self._sent = self._sent, self._sent + 1
            await self._send(self._inputs.seal(sequence, data))
            return
        if self.document.public_key is None:
            raise VerificationError("the attestation document carries no session key")
        await self._send(hpke.seal(self.document.public_key, data))

    async def send_json(self, message: dict[str, Any]) -> None:
        await self._send(json.dumps({"message": message}))

    async def send_bytes(self, data: bytes | memoryview) -> None:
        await self._send(bytes(data) if isinstance(data, memoryview) else data)

    async def receive(self) -> dict[str, Any]:
        """The next ``{"message": …}`` (an ``{"error"}`` frame raises FunctionError)."""
        return await _receive_message(self._ws)

    async def _send(self, frame: str | bytes) -> None:
        try:
            await self._ws.send(frame)
        except websockets.ConnectionClosed as exc:
            raise _close_error(exc) from None

    async def close(self) -> None:
        await self._ws.close()

    async def wait_closed(self, timeout_s: float = 5.0) -> None:
        """Wait for the server to end the session (after a deploy or key session)."""
        try:
            await asyncio.wait_for(self._ws.wait_closed(), timeout_s)
        except TimeoutError:
            await self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _refusal(exc: websockets.InvalidStatus) -> RequestRefusedError | BusyError:
    """A refused upgrade: 429 and 503 ("try again later") are a :class:`BusyError` with the
    server's ``Retry-After``; any other status a :class:`RequestRefusedError`."""
    status = exc.response.status_code
    text = refusal_text(exc.response.body or b"") or ""
    message = f"the server refused the session ({status}): {text or 'no reason given'}"
    retry_after = exc.response.headers.get("Retry-After")
    error = refused(message, text, status, retry_after)
    if status not in BUSY_STATUSES:
        return error
    return BusyError(str(error), retry_after_s=_float(retry_after_seconds(retry_after)))


def _float(seconds: int | None) -> float | None:
    return None if seconds is None else float(seconds)


def _error_of(parsed: dict[str, Any]) -> CapeError:
    """An ``{"error"}`` frame: a :class:`BusyError` when the server marks it ``"busy"`` (it
    closes with 1013 next; ``"retry_after"`` in seconds if it knows), else the function's
    :class:`FunctionError` (the session goes on)."""
    text = str(parsed["error"])
    if parsed.get("busy") is True:
        seconds = retry_after_seconds(parsed.get("retry_after"))
        return BusyError(f"{text}{retry_hint(seconds)}", retry_after_s=_float(seconds))
    return FunctionError(text)


async def _receive_any(websocket: ClientConnection) -> str | bytes:
    try:
        return await websocket.recv()
    except websockets.ConnectionClosed as exc:
        raise _close_error(exc) from None


async def _receive_frame(websocket: ClientConnection) -> dict[str, Any]:
    return _parse_frame(await _receive_any(websocket))


def _parse_frame(frame: str | bytes) -> dict[str, Any]:
    if not isinstance(frame, str):
        raise FormatError("expected a text frame from the server")
    try:
        parsed = json.loads(frame)
    except (ValueError, RecursionError):
        raise FormatError("the server sent a frame that is not JSON") from None
    if not isinstance(parsed, dict):
        raise FormatError("the server sent a frame that is not a JSON object")
    return parsed


async def _receive_message(websocket: ClientConnection) -> dict[str, Any]:
    return _message_of(await _receive_frame(websocket))


def _message_of(parsed: dict[str, Any]) -> dict[str, Any]:
    if parsed.get("error"):
        raise _error_of(parsed)
    message = parsed.get("message")
    if not isinstance(message, dict):
        raise FormatError('expected {"message": {...}} from the server')
    return message


def _decode_b64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise FormatError(f"the {what} is missing")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"the {what} is not valid base64") from None


def _user_data(document: AttestationDocument) -> dict[str, Any]:
    if document.user_data is None:
        return {}
    try:
        parsed = json.loads(document.user_data)
    except (ValueError, RecursionError):
        raise FormatError("the document's user_data is not JSON") from None
    if not isinstance(parsed, dict):
        raise FormatError("the document's user_data is not a JSON object")
    return parsed
