"""The listening socket ``cape serve`` (and ``cape kms serve``) hands uvicorn: connections
accepted on it get ``TCP_NODELAY`` from asyncio, as those of ``loop.create_server(host, port)``
do. Without it Nagle's algorithm held a small TLS record written right after another until the
client's delayed ACK (≈ 40 ms, twice per session: benchmarks/README.md, issue 16)."""

from __future__ import annotations

import asyncio
import socket

from cape.platform.uvicorn_server import _listen


def test_accepted_connections_get_tcp_nodelay() -> None:
    async def accept_one() -> int:
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[int] = loop.create_future()

        class Record(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        listener = _listen("127.0.0.1", 0)
        port = listener.getsockname()[1]
        # uvicorn serves pre-made sockets exactly so: loop.create_server(sock=...)
        server = await loop.create_server(Record, sock=listener)
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            nodelay = await asyncio.wait_for(accepted, 5)
            writer.close()
            return nodelay
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(accept_one()) != 0


def test_the_listener_names_tcp() -> None:
    listener = _listen("127.0.0.1", 0)
    try:
        assert listener.proto == socket.IPPROTO_TCP
        assert listener.type == socket.SOCK_STREAM
    finally:
        listener.close()
