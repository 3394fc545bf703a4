"""The runtime's channel to the host (issue 16): a large result leaves in one ``send``.

A real socketpair and asyncio's own transport, as the runtime uses them.
"""

from __future__ import annotations

import asyncio
import socket

from cape.enclave import runtime

MIB = 1 << 20


def test_a_one_mib_result_goes_to_the_socket_without_the_transports_buffer() -> None:
    # With the default send buffer (≈208 KiB) Python's transport keeps ≈800 KiB of a 1 MiB
    # result in its own buffer, copying and moving it down per partial send.
    ours, host = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    async def scenario() -> int:
        runtime._roomy_send_buffer(ours)
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
