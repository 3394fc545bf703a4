"""The floor of a warm invoke in cape's design: what process hops cost with no work at all.

Usage: ``python benchmarks/hops_bench.py [--quick] [--json PATH]``

A warm invoke crosses three process hops and back (client → server → enclave → sandbox), where
the plain websocket echo that ``server_bench.py`` compares it with crosses one. This script
measures the bare cost of those hops: a chain of plain Python children, each forwarding
length-prefixed frames over Unix socket pairs with blocking ``recv_into``/``sendall`` (no
parsing, no cryptography, no event loop), the last one echoing. Figures (median round trip of
1 KiB and 1 MiB messages, the chains alternating call by call):

- three hops against one hop (the same kind of echo): the ratio is the least a three-process
  design can cost against a one-process echo, before any of cape's work;
- the cost of one extra hop (the difference, halved) beside the one-hop echo.

With the plain websocket echo's round trip *E* (TLS + websocket, in ``server_bench.py``) and
an extra hop's cost *h* from here, a warm invoke cannot be faster than about ``E + 2h``; the
report's README turns that into the floor of the "warm invoke <= 2x the echo" goal.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from _results import Results, Series

KIB = 1 << 10
MIB = 1 << 20
SIZES = ((KIB, "1 KiB"), (MIB, "1 MiB"))
PYTHON = os.path.realpath(sys.executable)

# argv: [upstream fd, downstream fd or -1]. Forwards each frame down and the answer back up;
# with no downstream it echoes. Frames are u32be(length) ‖ bytes, as cape's channels are.
CHILD = """
import socket, sys
up = socket.socket(fileno=int(sys.argv[1]))
down = socket.socket(fileno=int(sys.argv[2])) if int(sys.argv[2]) >= 0 else None
buf = bytearray(4 + (1 << 21))
view = memoryview(buf)
def frame(sock):
    got, need = 0, 4
    while got < need:
        k = sock.recv_into(view[got:need])
        if not k:
            sys.exit(0)
        got += k
        if need == 4 and got == 4:
            need = 4 + int.from_bytes(buf[:4], "big")
    return need
while True:
    n = frame(up)
    if down is None:
        up.sendall(view[:n])
        continue
    down.sendall(view[:n])
    up.sendall(view[: frame(down)])
"""


class Chain:
    """``hops`` children in a row; the first is connected to this process."""

    def __init__(self, hops: int) -> None:
        self.children: list[subprocess.Popen[bytes]] = []
        pairs = [socket.socketpair() for _ in range(hops)]
        for index in range(hops):
            up = pairs[index][1]
            down = pairs[index + 1][0] if index + 1 < hops else None
            fds = [up.fileno()] + ([down.fileno()] if down is not None else [])
            down_fd = str(down.fileno() if down is not None else -1)
            command = [PYTHON, "-I", "-S", "-c", CHILD, str(up.fileno()), down_fd]
            self.children.append(subprocess.Popen(command, pass_fds=fds))
        for index, (ours, theirs) in enumerate(pairs):
            theirs.close()
            if index > 0:
                ours.close()
        self.sock = pairs[0][0]
        self.buffer = bytearray(4 + 2 * MIB)

    def call(self, message: bytes) -> float:
        """Seconds for one round trip of ``message``."""
        start = time.perf_counter()
        self.sock.sendall(len(message).to_bytes(4, "big") + message)
        view = memoryview(self.buffer)
        got = 0
        need = 4 + len(message)
        while got < need:
            k = self.sock.recv_into(view[got:need])
            if not k:
                raise RuntimeError("a relay child exited")
            got += k
        elapsed = time.perf_counter() - start
        if view[4:need] != message:
            raise RuntimeError("the chain returned other bytes")
        return elapsed

    def close(self) -> None:
        self.sock.close()
        for child in self.children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def measure(repeats: int) -> dict[tuple[int, str], list[float]]:
    """Round trips (seconds) per (hops, size label), the chains alternating call by call."""
    chains = {hops: Chain(hops) for hops in (1, 3)}
    samples: dict[tuple[int, str], list[float]] = {}
    try:
        for size, label in SIZES:
            message = os.urandom(size)
            count = repeats if size <= KIB else max(5, repeats // 10)
            for chain in chains.values():
                chain.call(message)  # warm-up
            for _ in range(count):
                for hops, chain in chains.items():
                    samples.setdefault((hops, label), []).append(chain.call(message))
    finally:
        for chain in chains.values():
            chain.close()
    return samples


def record(samples: dict[tuple[int, str], list[float]], results: Results) -> list[str]:
    lines = ["process hops, bare (Unix socket pairs, length-prefixed, blocking I/O)", ""]
    for _size, label in SIZES:
        one = statistics.median(samples[(1, label)]) * 1e3
        three = statistics.median(samples[(3, label)]) * 1e3
        hop = (three - one) / 2
        lines.append(
            f"  {label:>6}: 1 hop {one * 1e3:8.1f} us, 3 hops {three * 1e3:8.1f} us "
            f"({three / one:.2f}x); one extra hop {hop * 1e3:.1f} us"
        )
        results.figure(
            "process hops",
            f"3-hop relay round trip, {label}, p50 (client → 2 relays → echo)",
            three,
            "ms",
            reference="1-hop echo round trip, p50",
            reference_value=one,
            higher_is_better=False,
            note="the least a client → server → enclave → sandbox chain costs against a "
            "one-process echo, before any parsing or cryptography",
        )
        results.figure(
            "process hops",
            f"one extra hop, {label}, p50 (half the 3-hop minus 1-hop difference)",
            hop,
            "ms",
            reference="1-hop echo round trip, p50",
            reference_value=one,
            higher_is_better=False,
        )
        for hops in (1, 3):
            results.series.append(
                Series(
                    "process hops",
                    f"{hops}-hop round trip, {label}",
                    "ms",
                    [s * 1e3 for s in samples[(hops, label)]],
                )
            )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="few repeats (CI smoke run)")
    parser.add_argument("--json", type=Path, default=None, help="also write Results JSON here")
    args = parser.parse_args(argv)
    results = Results(benchmark="hops", quick=bool(args.quick))
    start = time.perf_counter()
    samples = measure(100 if args.quick else 2000)
    for line in record(samples, results):
        print(line)
    print(f"  ({time.perf_counter() - start:.1f} s)")
    results.notes.append(
        "bare hops: plain Python children forwarding length-prefixed frames over Unix socket "
        "pairs with blocking I/O (no event loop, parsing or cryptography); cape's hops do more"
    )
    results.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
