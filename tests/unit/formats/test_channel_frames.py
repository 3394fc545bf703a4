"""The channel's frames read by :class:`cape.formats.frames.FrameProtocol` (issue 16).

Both ends of the host ↔ enclave channel parse frames in the protocol's ``buffer_updated`` and
hand each to its session at once. These tests drive the protocol as asyncio's transports do
(``get_buffer`` then ``buffer_updated``, any split of the bytes), and over a real socketpair
with asyncio's own transport; the host's :class:`~cape.host.launcher.EnclaveConnection` over a
real socketpair checks that its sessions get end-of-stream however the channel ends.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterable
from typing import Any

import cbor2
import pytest

from cape.errors import FormatError, LimitExceededError, TransportError
from cape.formats.frames import (
    HEADER,
    SPLICE_MIN_BYTES,
    FrameProtocol,
    encode_frame,
    encode_frame_parts,
)
from cape.host.launcher import EnclaveConnection


class Sink:
    """What a protocol handed on: frames (with the bytes received) and how it ended."""

    def __init__(self, max_frame_bytes: int = 1 << 30) -> None:
        self.frames: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self.ends: list[Exception | None] = []
        self.protocol = FrameProtocol(self.on_frame, self.on_end, max_frame_bytes=max_frame_bytes)
        self.protocol.transport = _Transport()

    def on_frame(self, message: dict[str, Any], frame: memoryview) -> None:
        self.frames.append(message)
        self.raw.append(bytes(frame))

    def on_end(self, exc: Exception | None) -> None:
        self.ends.append(exc)

    def feed(self, pieces: Iterable[bytes]) -> None:
        """Each piece as one read: copied into ``get_buffer``'s view, maybe over several."""
        for piece in pieces:
            offset = 0
            while offset < len(piece):
                view = self.protocol.get_buffer(-1)
                n = min(len(view), len(piece) - offset)
                assert n > 0, "get_buffer gave no room"
                view[:n] = piece[offset : offset + n]
                self.protocol.buffer_updated(n)
                offset += n


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def _messages() -> list[dict[str, Any]]:
    return [
        {"t": "input", "sid": 1, "data": b"x" * 1024},
        {"t": "result", "sid": 2, "data": bytes(range(256)) * (SPLICE_MIN_BYTES // 256 + 3)},
        {"t": "close", "sid": 1},
        {"t": "result", "sid": 3, "data": b"s" * 70_000},  # in the first large one's buffer
        {"t": "ready", "sid": 0, "pcrs": {0: b"\x01" * 48}},
        {"t": "result", "sid": 4, "data": os.urandom(300_000)},  # a larger buffer
    ]


def _wire(messages: list[dict[str, Any]]) -> bytes:
    return b"".join(b"".join(encode_frame_parts(m)) for m in messages)


def test_frames_split_at_every_byte_boundary_arrive_whole_and_in_order() -> None:
    small = [{"t": "input", "sid": 3, "data": b"ab"}, {"t": "close", "sid": 3}]
    wire = _wire(small)
    for cut in range(len(wire) + 1):
        sink = Sink()
        sink.feed([wire[:cut], wire[cut:]])
        assert sink.frames == small, cut
        assert sink.raw == [encode_frame(m) for m in small]
        assert sink.ends == []
    sink = Sink()
    sink.feed(bytes([b]) for b in wire)  # one byte per read
    assert sink.frames == small


@pytest.mark.parametrize("read", [7, 4093, 70_001])
def test_a_long_run_of_small_frames_in_odd_reads_reuses_the_buffer_intact(read: int) -> None:
    # Reads that always end inside a frame fill the protocol's buffer: the unparsed tail is
    # moved down to make room, and no byte may be lost or repeated doing so.
    messages = [{"t": "input", "sid": i, "data": bytes([i % 251]) * 1000} for i in range(600)]
    wire = _wire(messages)
    sink = Sink()
    sink.feed(wire[i : i + read] for i in range(0, len(wire), read))
    assert sink.frames == messages
    assert sink.raw == [encode_frame(m) for m in messages]


def test_a_large_frame_is_read_in_place_across_any_split() -> None:
    messages = _messages()
    wire = _wire(messages)
    big_start = len(_wire(messages[:1]))
    cuts = [1, 3, 4, 5, big_start - 1, big_start, big_start + 2, big_start + 4, big_start + 5]
    cuts += [big_start + 70_000, len(wire) - 7, len(wire) - 1]
    for cut in cuts:
        sink = Sink()
        sink.feed([wire[:cut], wire[cut:]])
        assert sink.frames == messages, cut
    sink = Sink()
    sink.feed(wire[i : i + 4093] for i in range(0, len(wire), 4093))
    assert sink.frames == messages


def test_the_large_frame_gets_a_buffer_of_its_own_length() -> None:
    message = {"t": "result", "sid": 2, "data": b"y" * (1 << 20)}
    head, body = encode_frame_parts(message)
    sink = Sink()
    sink.feed([head])
    assert len(sink.protocol.get_buffer(-1)) == len(body)  # exactly the rest of the frame
    sink.feed([body])
    assert sink.frames == [message]


def test_an_oversized_length_is_refused_from_its_header_and_ends_the_channel() -> None:
    sink = Sink(max_frame_bytes=1000)
    sink.feed([HEADER.pack(1001)])
    assert len(sink.ends) == 1 and isinstance(sink.ends[0], LimitExceededError)
    assert sink.protocol.transport is not None and sink.protocol.transport.is_closing()
    sink.feed([encode_frame({"t": "close", "sid": 1})])  # nothing more is handed on
    assert sink.frames == [] and len(sink.ends) == 1


def test_a_malformed_body_ends_the_channel_with_a_format_error() -> None:
    for body in (b"\xff\xff", b"\xa1\x61t\x63bad", b"\x80"):
        sink = Sink()
        sink.feed([HEADER.pack(len(body)) + body + encode_frame({"t": "close", "sid": 1})])
        assert sink.frames == []
        assert len(sink.ends) == 1 and isinstance(sink.ends[0], FormatError), body


@pytest.mark.parametrize("keep", [0, 2, 4, 9, 70_000])
def test_an_end_of_stream_is_clean_only_between_frames(keep: int) -> None:
    first = {"t": "input", "sid": 1, "data": b"z"}
    second = {"t": "result", "sid": 1, "data": b"q" * 100_000}
    sink = Sink()
    sink.feed([encode_frame(first) + _wire([second])[:keep]])
    sink.protocol.eof_received()
    sink.protocol.connection_lost(None)
    assert sink.frames == [first]
    assert len(sink.ends) == 1
    if keep == 0:
        assert sink.ends == [None]
    else:
        assert isinstance(sink.ends[0], FormatError)


def test_over_a_real_socket_frames_arrive_and_writers_drain() -> None:
    messages = _messages() * 3
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    async def scenario() -> Sink:
        loop = asyncio.get_running_loop()
        sink, ended = Sink(), loop.create_future()

        def on_end(exc: Exception | None) -> None:
            sink.on_end(exc)
            ended.set_result(None)

        sink.protocol = FrameProtocol(sink.on_frame, on_end)
        transport, _ = await loop.connect_accepted_socket(lambda: sink.protocol, ours)
        theirs.setblocking(False)
        await loop.sock_sendall(theirs, _wire(messages))
        theirs.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(ended, 30)
        with pytest.raises(ConnectionError):
            await sink.protocol.drain()
        transport.close()
        return sink

    try:
        sink = asyncio.run(scenario())
    finally:
        theirs.close()
    assert sink.frames == messages and sink.ends == [None]


def test_host_sessions_get_end_of_stream_when_the_enclave_channel_is_cut_mid_frame() -> None:
    host_end, enclave_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    async def scenario() -> tuple[list[dict[str, Any]], list[str], bool]:
        connection = await EnclaveConnection.over(host_end, kms=lambda m: {})
        enclave_end.setblocking(False)
        loop = asyncio.get_running_loop()
        ready = encode_frame({"t": "ready", "pcrs": {}})
        await loop.sock_sendall(enclave_end, ready)
        await asyncio.wait_for(connection.start(None), 30)
        one = await connection.open_session("run", owner="o", nonce=b"n")
        two = await connection.open_session("run", owner="o", nonce=b"n")
        result = {"t": "result", "sid": one.sid, "data": b"r" * 200_000}
        wire = b"".join(encode_frame_parts(result))
        await loop.sock_sendall(enclave_end, encode_frame({"t": "attestation", "sid": 1}))
        await loop.sock_sendall(enclave_end, wire[:-10])  # then the enclave is gone
        enclave_end.close()
        got = [await asyncio.wait_for(one.receive(), 30)]
        errors = []
        for session in (one, two, one):
            with pytest.raises(TransportError) as gone:
                await asyncio.wait_for(session.receive(), 30)
            errors.append(str(gone.value))
        await asyncio.wait_for(connection.wait_closed(), 30)
        alive = connection.alive
        await connection.close()
        return got, errors, alive

    got, errors, alive = asyncio.run(scenario())
    assert got == [{"t": "attestation", "sid": 1}]
    assert errors == ["the enclave is gone"] * 3
    assert not alive


def test_a_session_frame_waits_for_a_receive_that_was_cancelled() -> None:
    host_end, enclave_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    async def scenario() -> dict[str, Any]:
        connection = await EnclaveConnection.over(host_end, kms=lambda m: {})
        enclave_end.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(enclave_end, encode_frame({"t": "ready", "pcrs": {}}))
        await asyncio.wait_for(connection.start(None), 30)
        session = await connection.open_session("run", owner="o", nonce=b"n")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(session.receive(), 0.05)
        await loop.sock_sendall(enclave_end, encode_frame({"t": "attestation", "sid": 1}))
        message = await asyncio.wait_for(session.receive(), 30)
        await connection.close()
        return message

    try:
        assert asyncio.run(scenario()) == {"t": "attestation", "sid": 1}
    finally:
        enclave_end.close()


def test_a_large_frame_is_decoded_in_place_as_strictly_as_a_small_one() -> None:
    big = b"b" * (SPLICE_MIN_BYTES + 10)
    key, value = cbor2.dumps("t"), cbor2.dumps("result")
    duplicate = b"\xa3" + key + value + cbor2.dumps("data") + cbor2.dumps(big) + key + value
    trailing = cbor2.dumps({"t": "result", "data": big}) + b"\x00"
    indefinite = b"\xbf" + key + value + cbor2.dumps("data") + cbor2.dumps(big) + b"\xff"
    for body in (duplicate, trailing, indefinite):
        sink = Sink()
        sink.feed([HEADER.pack(len(body)) + body])
        assert sink.frames == []
        assert len(sink.ends) == 1 and isinstance(sink.ends[0], FormatError)
    good = cbor2.dumps({"t": "result", "sid": 5, "data": big})
    sink = Sink()
    sink.feed([HEADER.pack(len(good)) + good])
    assert sink.frames == [{"t": "result", "sid": 5, "data": big}]
    assert type(sink.frames[0]["data"]) is bytes
