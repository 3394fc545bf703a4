"""The host ↔ enclave channel: length-prefixed CBOR messages (pure codec, no I/O).

Wire form of one frame: ``u32be(len(body)) ‖ body`` where ``body`` is a CBOR map with text
keys; ``"t"`` names the message type and ``"sid"`` the session it belongs to (0 for
channel-level messages). The same framing runs over a Unix socket in simulated mode and over
vsock on Nitro.

Message types (``→`` host to enclave, ``←`` enclave to host):

=================  ===  ==========================================================================
``configure``      →    first frame when the runtime was started with ``--kms-identity
                        channel`` (Nitro images): ``kms_identity`` or ``aws_kms`` (with
                        ``credentials``), measured into PCR16
``credentials``    →    renewed AWS credentials for an enclave calling AWS KMS itself
``provision``      →    simulated mode only: ``credentials`` for the simulated secure module
``ready``          ←    the runtime is serving: ``pcrs`` (index → bytes) it measured
``open``           →    new session: ``kind`` (run, deploy, test, key), ``owner``, ``nonce``,
                        optional ``response_key``; run also carries ``bundle`` (ciphertext)
``attestation``    ←    the session's attestation document: ``document``
``input``          →    one HPKE-sealed input (run, test): ``data``
``bundle``         →    deploy: ``data`` (``cape:`` + raw envelope), ``name``, ``public``,
                        or ``size`` instead of ``data`` when ``chunk`` frames follow;
                        test: ``data`` (HPKE-sealed zip)
``chunk``          →    the next ``data`` piece of a deploy bundle announced with ``size``
``result``         ←    ``data``, ``encrypted`` (sealed to the client's response key)
``deployed``       ←    ``checksum`` (hex), ``name``, ``owner``
``error``          ←    ``message``, ``fatal`` (ends the session when true), ``sealed`` (opt.)
``close``          ↔    end a session
``kms``            ←    a key-service call: ``rid``, ``op``, its arguments, ``challenge``
``kms_result``     →    ``rid``, ``result`` and ``sig`` (the key service's signature over
                        request and result), or ``error`` + ``kind``
=================  ===  ==========================================================================
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import cbor2

from cape.errors import FormatError, LimitExceededError
from cape.formats.cose import loads_cbor

__all__ = [
    "HEADER",
    "MAX_FRAME_BYTES",
    "FrameDecoder",
    "encode_frame",
    "encode_frame_parts",
    "parse_frame_body",
    "read_frame",
]

HEADER = struct.Struct(">I")
#: Large enough for a 1 GB bundle plus framing; anything larger is refused before buffering.
MAX_FRAME_BYTES = 1_100_000_000

MESSAGE_TYPES = frozenset(
    {
        "configure",
        "credentials",
        "provision",
        "ready",
        "open",
        "attestation",
        "input",
        "bundle",
        "need_bundle",
        "chunk",
        "result",
        "deployed",
        "error",
        "close",
        "kms",
        "kms_result",
    }
)


def encode_frame(message: Mapping[str, Any]) -> bytes:
    """Serialize one message (must have a known ``"t"``) with its length prefix."""
    if message.get("t") not in MESSAGE_TYPES:
        raise ValueError(f"unknown channel message type {message.get('t')!r}")
    body = cbor2.dumps(dict(message))
    if len(body) > MAX_FRAME_BYTES:
        raise LimitExceededError("channel frame size in bytes", MAX_FRAME_BYTES, len(body))
    return HEADER.pack(len(body)) + body


#: Byte strings at least this long are written by reference, not copied into the frame.
SPLICE_MIN_BYTES = 64 * 1024


def _bytes_head(length: int) -> bytes:
    """The CBOR head of a byte string of ``length`` bytes (major type 2)."""
    if length < 24:
        return bytes([0x40 + length])
    for marker, width in ((0x58, 1), (0x59, 2), (0x5A, 4), (0x5B, 8)):
        if length < 1 << (8 * width):
            return bytes([marker]) + length.to_bytes(width, "big")
    raise ValueError("byte string too long for CBOR")


def encode_frame_parts(message: Mapping[str, Any]) -> list[bytes]:
    """Like :func:`encode_frame`, but a large ``data`` or ``bundle`` value is not copied.

    Returns the pieces to write in order; their concatenation equals ``encode_frame(message)``
    up to the position of that field in the map (it is encoded last).
    """
    big = next(
        (
            k
            for k in ("data", "bundle")
            if isinstance(message.get(k), bytes) and len(message[k]) >= SPLICE_MIN_BYTES
        ),
        None,
    )
    if big is None:
        return [encode_frame(message)]
    if message.get("t") not in MESSAGE_TYPES:
        raise ValueError(f"unknown channel message type {message.get('t')!r}")
    value: bytes = message[big]
    rest = {k: v for k, v in message.items() if k != big}
    rest[big] = b""
    prefix = cbor2.dumps(rest)
    assert prefix.endswith(b"\x40")
    head = _bytes_head(len(value))
    length = len(prefix) - 1 + len(head) + len(value)
    if length > MAX_FRAME_BYTES:
        raise LimitExceededError("channel frame size in bytes", MAX_FRAME_BYTES, length)
    return [HEADER.pack(length) + prefix[:-1] + head, value]


def parse_frame_body(body: bytes) -> dict[str, Any]:
    """Decode and check one frame body: a map with text keys, a known type, an int ``sid``."""
    message = loads_cbor(body, "channel frame")
    if not isinstance(message, dict) or not all(isinstance(k, str) for k in message):
        raise FormatError("channel frame must be a CBOR map with text keys")
    if message.get("t") not in MESSAGE_TYPES:
        raise FormatError(f"channel frame has unknown type {message.get('t')!r}")
    sid = message.setdefault("sid", 0)
    if not isinstance(sid, int) or isinstance(sid, bool) or not 0 <= sid < 2**63:
        raise FormatError("channel frame 'sid' must be a non-negative integer")
    return message


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, iterate complete messages.

    Refuses a declared length over ``max_frame_bytes`` as soon as the header arrives, so a
    hostile peer cannot make the reader buffer without bound.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_frame_bytes

    def feed(self, data: bytes) -> Iterator[dict[str, Any]]:
        self._buffer += data
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if length > self._max:
                raise LimitExceededError("channel frame size in bytes", self._max, length)
            end = HEADER.size + length
            if len(self._buffer) < end:
                return
            body = bytes(self._buffer[HEADER.size : end])
            del self._buffer[:end]
            yield parse_frame_body(body)

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)


async def read_frame(
    reader: asyncio.StreamReader, max_frame_bytes: int = MAX_FRAME_BYTES
) -> dict[str, Any] | None:
    """Read one message from an asyncio stream; ``None`` at a clean end of stream.

    The only I/O in this module: both ends of the channel (host and enclave) share it, over
    whatever stream the caller opened.
    """
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise FormatError("channel closed in the middle of a frame header") from None
        return None
    (length,) = HEADER.unpack(header)
    if length > max_frame_bytes:
        raise LimitExceededError("channel frame size in bytes", max_frame_bytes, length)
    body: bytes
    try:
        if length <= SPLICE_MIN_BYTES:
            body = await reader.readexactly(length)
        else:
            # Fill one buffer in place (readexactly would hold the stream's buffer and two
            # copies of it at once), then freeze it.
            buffer = bytearray(length)
            view, filled = memoryview(buffer), 0
            while filled < length:
                chunk = await reader.read(min(length - filled, 1 << 20))
                if not chunk:
                    raise asyncio.IncompleteReadError(b"", length)
                view[filled : filled + len(chunk)] = chunk
                filled += len(chunk)
            view.release()
            body = bytes(buffer)
            del buffer
    except asyncio.IncompleteReadError:
        raise FormatError("channel closed in the middle of a frame") from None
    return parse_frame_body(body)
