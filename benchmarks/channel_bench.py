"""The host's end of the enclave channel alone: CPU per relayed call (issue 16, t16q).

Usage: ``python benchmarks/channel_bench.py [--quick] [--json PATH]``.

This process is the host: a :class:`cape.host.launcher.EnclaveConnection` over a real Unix
socketpair, one session, sending an ``input`` frame and awaiting its ``result`` frame, back to
back, as the server relays a warm invoke. The other end is a plain peer process (blocking
``recv``/``send`` and ``cbor2``, no Cape code) that answers each input with a result of the same
bytes, so only the host's channel code differs between two runs of this script over two
sources. The reference, in the same process and rounds: the same round trip over the same kind
of socketpair and peer with a bare asyncio ``Protocol`` (a frame head and bytes, no CBOR, no
sessions) — what any relay of a frame across a process boundary costs in asyncio.

Figures: this process's CPU per call (``getrusage(RUSAGE_SELF)``, so other work on the shared
machine does not count) and the round trip's p50, for 1 KiB and 1 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from _results import Results
from cape.host.launcher import EnclaveConnection

KIB = 1 << 10
MIB = 1 << 20
HEADER = struct.Struct(">I")

# The peer: says "ready", reads frames, answers "input" with "result" (CBOR, as the runtime's
# frames), and
# raw frames (mode "raw") with the same bytes. Blocking I/O; the same in every run.
PEER = r"""
import socket, struct, sys
import cbor2
sock = socket.socket(fileno=int(sys.argv[1]))
raw = sys.argv[2] == "raw"
HEADER = struct.Struct(">I")
if not raw:
    ready = cbor2.dumps({"t": "ready", "sid": 0, "pcrs": {}})
    sock.sendall(HEADER.pack(len(ready)) + ready)
def exact(n):
    buf = bytearray(n); view = memoryview(buf); got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            sys.exit(0)
        got += k
    return buf
while True:
    (length,) = HEADER.unpack(exact(4))
    body = exact(length)
    if raw:
        sock.sendall(HEADER.pack(length) + body)
        continue
    message = cbor2.loads(body)
    if message.get("t") == "input":
        reply = cbor2.dumps({"t": "result", "sid": message["sid"], "data": message["data"],
                             "encrypted": True})
        sock.sendall(HEADER.pack(len(reply)) + reply)
"""


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peer(mode: str) -> tuple[socket.socket, subprocess.Popen[bytes]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    process = subprocess.Popen(
        [sys.executable, "-c", PEER, str(theirs.fileno()), mode], pass_fds=(theirs.fileno(),)
    )
    theirs.close()
    return ours, process


class _Raw(asyncio.Protocol):
    """The reference: a frame head and bytes, echoed; each reply completes a future."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= 4:
            (length,) = HEADER.unpack_from(self.buffer)
            if len(self.buffer) >= 4 + length and self.waiter is not None:
                body = bytes(self.buffer[4 : 4 + length])
                del self.buffer[: 4 + length]
                self.waiter.set_result(body)


@dataclass
class Way:
    """One way of making the round trip: ``run`` times ``count`` calls; ``close`` ends it."""

    run: Callable[[], Awaitable[tuple[float, float]]]
    close: Callable[[], Awaitable[None]]


async def _host_calls(size: int, count: int) -> Way:
    sock, process = _peer("cbor")
    connection = await EnclaveConnection.over(sock, kms=lambda m: {})
    await connection.start(None)  # the peer says "ready" first
    session = await connection.open_session("run", owner="bench", nonce=b"n")
    payload = os.urandom(size)

    async def run() -> tuple[float, float]:
        if process.poll() is not None:
            raise RuntimeError("the peer exited")
        times = []
        cpu = _cpu()
        for _ in range(count):
            start = time.perf_counter()
            await session.send({"t": "input", "data": payload})
            reply = await session.receive()
            times.append(time.perf_counter() - start)
            assert reply["data"] == payload
        return (_cpu() - cpu) / count, statistics.median(times)

    async def close() -> None:
        await connection.close()
        await asyncio.to_thread(process.wait, 10)

    return Way(run, close)


async def _raw_calls(size: int, count: int) -> Way:
    sock, process = _peer("raw")
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_accepted_socket(_Raw, sock)
    payload = HEADER.pack(size) + os.urandom(size)

    async def run() -> tuple[float, float]:
        times = []
        cpu = _cpu()
        for _ in range(count):
            start = time.perf_counter()
            protocol.waiter = loop.create_future()
            transport.write(payload)
            await protocol.waiter
            times.append(time.perf_counter() - start)
        return (_cpu() - cpu) / count, statistics.median(times)

    async def close() -> None:
        transport.close()
        await asyncio.to_thread(process.wait, 10)

    return Way(run, close)


async def measure(quick: bool) -> dict[tuple[str, str], tuple[list[float], list[float]]]:
    sizes = [(KIB, "1 KiB", 200 if quick else 3000), (MIB, "1 MiB", 5 if quick else 150)]
    rounds = 1 if quick else 5
    found: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    for size, label, count in sizes:
        ways = {
            "host channel": await _host_calls(size, count),
            "bare": await _raw_calls(size, count),
        }
        try:
            for way in ways.values():
                await way.run()  # warm-up
            for _ in range(rounds):
                for name, way in ways.items():
                    cpu, p50 = await way.run()
                    cpus, p50s = found.setdefault((name, label), ([], []))
                    cpus.append(cpu)
                    p50s.append(p50)
        finally:
            for way in ways.values():
                await way.close()
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    options = parser.parse_args(argv)
    results = Results("channel", quick=options.quick)
    found = asyncio.run(measure(options.quick))
    print("the host's end of the enclave channel: CPU of this process per call, and p50")
    for label in ("1 KiB", "1 MiB"):
        host_cpu, host_p50 = found[("host channel", label)]
        bare_cpu, bare_p50 = found[("bare", label)]
        cpu, ref = statistics.median(host_cpu), statistics.median(bare_cpu)
        print(
            f"  {label}: EnclaveConnection + HostSession {cpu * 1e6:8.1f} us "
            f"(rounds {', '.join(f'{c * 1e6:.0f}' for c in host_cpu)}), p50 "
            f"{statistics.median(host_p50) * 1e6:.0f} us; bare asyncio Protocol "
            f"{ref * 1e6:8.1f} us, p50 {statistics.median(bare_p50) * 1e6:.0f} us; "
            f"ratio {cpu / ref:.2f}x"
        )
        results.figure(
            "enclave channel",
            f"host channel CPU per relayed call, {label}",
            cpu * 1e3,
            "ms",
            reference="a bare asyncio Protocol's round trip of the same bytes, same peer",
            reference_value=ref * 1e3,
            higher_is_better=False,
            note="getrusage(RUSAGE_SELF) of the host side; the peer is a plain process",
        )
    if options.json is not None:
        results.write(options.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
