"""The host ↔ enclave channel: length-prefixed CBOR messages, and both ends' reading of them.

The codec is pure; :class:`FrameProtocol` is the one reader, an asyncio protocol the host and
the enclave runtime each attach to their end of the channel (issue 16).

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
import collections
import contextlib
import os
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cbor2

from cape.errors import FormatError, LimitExceededError
from cape.formats.cose import loads_cbor

__all__ = [
    "HEADER",
    "MAX_FRAME_BYTES",
    "FrameProtocol",
    "encode_frame",
    "encode_frame_parts",
    "parse_frame_body",
    "roomy_send_buffer",
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


def parse_frame_body(body: bytes | memoryview) -> dict[str, Any]:
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


#: Bytes the protocol's own buffer holds: room for many small frames per ``recv``. A frame whose
#: body is larger than :data:`SPLICE_MIN_BYTES` is read into a buffer of its own length instead.
READ_BUFFER_BYTES = 256 * 1024

#: The largest slice :meth:`FrameProtocol.write` hands the transport before draining.
WRITE_SLICE_BYTES = 1 << 20

#: A large frame's buffer up to this size is kept and reused for the next large frame (no
#: allocation, zero-filling and page faults per 1 MiB call); larger ones are freed after use.
SPARE_MAX_BYTES = 16 << 20

OnFrame = Callable[[dict[str, Any], memoryview], None]
"""Called with each parsed message and the frame's bytes as received (head and body; valid
only during the call: for a tap)."""

OnEnd = Callable[[Exception | None], None]
"""Called once when the channel ends: ``None`` at a clean end between frames, else why (a
malformed, oversized or cut frame, or the connection's error)."""


class FrameProtocol(asyncio.BufferedProtocol):
    """Both ends' reading of the channel as an :class:`asyncio.BufferedProtocol` (issue 16).

    Each complete frame is parsed in :meth:`buffer_updated` and handed to ``on_frame`` at once,
    in order (no reader task, no ``StreamReader``, no queue between them). Small frames are read
    into one reused buffer, many per ``recv``; a frame whose body exceeds
    :data:`SPLICE_MIN_BYTES` is read straight into a buffer of its announced length (the kernel's
    copy is the only one before parsing). A declared length over ``max_frame_bytes``, a body
    that does not parse and an end of stream inside a frame each end the channel with that
    error (``on_end``) and close the transport, never a hang. Writers get :meth:`drain` (the
    transport's flow control), so a large payload is written in slices without a second copy
    buffered.
    """

    def __init__(
        self, on_frame: OnFrame, on_end: OnEnd, *, max_frame_bytes: int = MAX_FRAME_BYTES
    ) -> None:
        self._on_frame = on_frame
        self._on_end: OnEnd | None = on_end
        self._max = max_frame_bytes
        self._buffer = bytearray(READ_BUFFER_BYTES)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0  # unparsed bytes: self._buffer[self._start : self._end]
        self._big: memoryview | None = None  # a large frame's head and body, being filled
        self._spare: bytearray | None = None  # the last large frame's buffer, for reuse
        self._filled = 0
        self.transport: asyncio.Transport | None = None
        self._paused = False
        self._drainers: collections.deque[asyncio.Future[None]] = collections.deque()
        self._lost: Exception | None = None
        self._closed = False

    # -- reading

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big is not None:
            return self._big[self._filled :]
        if self._start and len(self._buffer) - self._end < READ_BUFFER_BYTES // 2:
            # Little room left after a partial frame: move the unparsed bytes down.
            pending = self._end - self._start
            self._buffer[:pending] = self._buffer[self._start : self._end]
            self._start, self._end = 0, pending
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._closed:
            return
        try:
            if self._big is not None:
                self._filled += nbytes
                if self._filled < len(self._big):
                    return
                big, self._big = self._big, None
                self._deliver(big[HEADER.size :], big)
            else:
                self._end += nbytes
            self._parse()
        except Exception as exc:  # a bad frame, or an error of on_frame
            self._fail(exc)

    def _parse(self) -> None:
        while not self._closed and self._end - self._start >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer, self._start)
            if length > self._max:
                raise LimitExceededError("channel frame size in bytes", self._max, length)
            end = self._start + HEADER.size + length
            if length > SPLICE_MIN_BYTES:  # its own buffer, filled in place from here on
                big = self._large_buffer(HEADER.size + length)
                have = min(self._end, end) - self._start
                big[:have] = self._buffer[self._start : self._start + have]
                self._start += have
                if have < len(big):
                    self._big, self._filled = big, have
                    break
                self._deliver(big[HEADER.size :], big)
                continue
            if end > self._end:
                break
            frame = self._view[self._start : end]
            self._start = end
            self._deliver(frame[HEADER.size :], frame)
        if self._start == self._end:
            self._start = self._end = 0

    def _large_buffer(self, size: int) -> memoryview:
        if self._spare is not None and len(self._spare) >= size:
            return memoryview(self._spare)[:size]
        buffer = bytearray(size)
        if size <= SPARE_MAX_BYTES:
            self._spare = buffer
        return memoryview(buffer)

    def _deliver(self, body: memoryview, frame: memoryview) -> None:
        # A large body is decoded in place (its byte strings are the only copies); a small one
        # is copied out of the reused buffer first, which is cheaper for a few small fields.
        message = parse_frame_body(body if len(body) > SPLICE_MIN_BYTES else bytes(body))
        self._on_frame(message, frame)

    def eof_received(self) -> bool:
        if self._big is not None or self._end > self._start:
            self._fail(FormatError("channel closed in the middle of a frame"))
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc if exc is not None else ConnectionResetError("the channel closed")
        self._paused = False
        while self._drainers:
            waiter = self._drainers.popleft()
            if not waiter.done():
                waiter.set_exception(self._lost)
        self._end_once(exc)

    def _fail(self, exc: Exception) -> None:
        self._end_once(exc)
        if self.transport is not None:
            self.transport.close()

    def _end_once(self, exc: Exception | None) -> None:
        self._closed = True
        self._big = None
        callback, self._on_end = self._on_end, None
        if callback is not None:
            callback(exc)

    # -- writing (flow control)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        while self._drainers:
            waiter = self._drainers.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def write(self, parts: Sequence[bytes], slice_bytes: int = WRITE_SLICE_BYTES) -> None:
        """Write one frame's parts (:func:`encode_frame_parts`) by reference, in slices of at
        most ``slice_bytes`` with a :meth:`drain` after each, so that the transport never
        buffers a second copy of a large payload (a bundle); :class:`ConnectionError` once the
        channel is closed or lost. Callers serialise whole frames (a lock)."""
        for part in parts:
            view = memoryview(part)
            for start in range(0, len(view), slice_bytes):
                transport = self.transport
                if transport is None or transport.is_closing():
                    raise ConnectionResetError("the channel is closed")
                transport.write(view[start : start + slice_bytes])
                await self.drain()

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark again;
        :class:`ConnectionError` once the channel is closed or lost."""
        if self._lost is not None:
            raise self._lost
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the channel is closed")
        if not self._paused:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._drainers.append(waiter)
        await waiter


#: A channel end's send buffer: room for a large frame in one ``send`` (see roomy_send_buffer).
CHANNEL_SEND_BUFFER = 4 << 20


def roomy_send_buffer(sock: socket.socket) -> None:
    """Let one large frame leave in a single ``send`` (issue 16, the 1 MiB call), at either end.

    With the default ``SO_SNDBUF`` (≈208 KiB) a 1 MiB frame fills the socket after a fifth:
    Python 3.11's transport then copies the rest into its ``bytearray`` buffer and moves that
    buffer down after each partial send, ≈0.2 to 1 ms of CPU per 1 MiB frame on this machine
    against ≈0.1 ms with a 4 MiB buffer (measured alone). Root may exceed ``wmem_max``;
    where the socket refuses (a vsock, say) the default stays.
    """
    force = getattr(socket, "SO_SNDBUFFORCE", None)
    option = force if force is not None and os.geteuid() == 0 else socket.SO_SNDBUF
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, option, CHANNEL_SEND_BUFFER)
