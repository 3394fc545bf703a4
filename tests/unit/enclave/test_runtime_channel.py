"""The runtime's channel to the host (issue 16): a large result leaves in one ``send``; a bad
frame from the host stops the runtime with its error.

A real socketpair and asyncio's own transport, as the runtime uses them; the real runtime
process for the bad frames.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cape.formats.frames import HEADER, MAX_FRAME_BYTES, encode_frame, roomy_send_buffer

MIB = 1 << 20


def test_a_one_mib_result_goes_to_the_socket_without_the_transports_buffer() -> None:
    # With the default send buffer (≈208 KiB) Python's transport keeps ≈800 KiB of a 1 MiB
    # result in its own buffer, copying and moving it down per partial send.
    ours, host = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    async def scenario() -> int:
        roomy_send_buffer(ours)
        _, writer = await asyncio.open_connection(sock=ours)
        try:
            writer.write(b"h" * 9)  # a frame head, then the result by reference
            writer.write(bytes(MIB))
            return writer.transport.get_write_buffer_size()
        finally:
            writer.close()

    try:
        assert asyncio.run(scenario()) == 0  # nobody read yet: all of it sits in the socket
    finally:
        host.close()


def _runtime_given(tmp_path: Path, wire: bytes, *, close: bool) -> tuple[int, str]:
    """Start the real runtime on a socketpair, write ``wire`` (then close, or keep open);
    return its exit status and stderr once it ends (a hang fails the test)."""
    host, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = ["--fd", str(ours.fileno()), "--workdir", str(tmp_path / "work")]
    process = subprocess.Popen(
        [sys.executable, "-m", "cape.enclave.runtime", *channel, "--kms-identity", "00" * 32],
        pass_fds=(ours.fileno(),),
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    ours.close()
    try:
        host.sendall(wire)
        if close:
            host.shutdown(socket.SHUT_WR)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
        host.close()
    return process.returncode, err.decode()


@pytest.mark.parametrize(
    ("wire", "close", "why"),
    [
        (HEADER.pack(MAX_FRAME_BYTES + 1), False, "LimitExceededError"),
        (encode_frame({"t": "provision"})[:-1], True, "FormatError"),
        (HEADER.pack(3) + b"\xff\xff\xff", False, "FormatError"),
    ],
    ids=["oversized length", "closed mid-frame", "not CBOR"],
)
def test_a_bad_frame_from_the_host_stops_the_runtime_with_its_error_not_a_hang(
    tmp_path: Path, wire: bytes, close: bool, why: str
) -> None:
    # The channel stays open in two cases: the runtime must not wait for more bytes.
    status, err = _runtime_given(tmp_path, wire, close=close)
    assert status == 1
    assert f"the runtime stopped: {why}" in err
