"""The enclave runtime's side of a warm call: on the event loop against through a thread.

Usage: ``python benchmarks/call_bench.py [--quick] [--json PATH]`` (needs bubblewrap, as
sandboxes do; without it it prints why and exits 0).

One echo sandbox (started as the runtime starts them, with an encryption-services socket) is
called from an asyncio event loop holding a calls-lane slot, in alternating rounds:

- **event loop** (what sessions do, issue 16): ``Lane.run_async`` → ``FunctionSandbox.call_async``,
  the channel written and read on the loop;
- **thread** (the reference: sessions before issue 16): ``Lane.run`` → ``FunctionSandbox.call``
  in the lane's thread, the result handed back to the loop.

Figures: this process's CPU per call (``getrusage(RUSAGE_SELF)``: every thread of the runtime
side, none of the sandbox's processes, so other work on the shared machine does not count) and
the round trip's p50, for 1 KiB and 1 MiB inputs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from _results import Results
from cape.enclave.lanes import Lane, LaneLimits
from cape.enclave.sandbox import FunctionSandbox, SandboxLimits, check_isolation
from cape.errors import SandboxError

KIB = 1 << 10
MIB = 1 << 20
ECHO = "def cape_handler(data):\n    return data\n"
WAYS = ("event loop", "thread")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(
    box: FunctionSandbox, sizes: Sequence[tuple[int, str, int]], rounds: int
) -> dict[tuple[str, str], tuple[list[float], list[float]]]:
    """Per (way, size label): (CPU seconds per call of each round, round trip seconds)."""
    lane = Lane("calls", LaneLimits(threads=4, per_party=4, queue_per_party=4, queue=4))
    ways: dict[str, Callable[[bytes], Awaitable[bytes]]] = {
        "event loop": lambda data: lane.run_async("bench", box.call_async, data),
        "thread": lambda data: lane.run("bench", box.call, data),
    }
    found: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    try:
        for size, label, count in sizes:
            payload = os.urandom(size)
            for call in ways.values():  # warm-up: the lane's thread exists, caches are warm
                for _ in range(3):
                    assert await call(payload) == payload
            for _ in range(rounds):
                for way, call in ways.items():
                    cpu, walls = found.setdefault((way, label), ([], []))
                    began = _cpu()
                    for _ in range(count):
                        start = time.perf_counter()
                        output = await call(payload)
                        walls.append(time.perf_counter() - start)
                        if len(output) != size:
                            raise RuntimeError("the echo returned other bytes")
                    cpu.append((_cpu() - began) / count)
    finally:
        lane.close()
    return found


def record(
    found: dict[tuple[str, str], tuple[list[float], list[float]]],
    sizes: Sequence[tuple[int, str, int]],
    results: Results,
) -> list[str]:
    lines = ["the runtime side of a warm call (CPU of this process per call; p50 round trip)"]
    for _size, label, _count in sizes:
        cpu = {way: statistics.median(found[(way, label)][0]) * 1e6 for way in WAYS}
        wall = {way: statistics.median(found[(way, label)][1]) * 1e6 for way in WAYS}
        lines.append(
            f"  {label:>6}: event loop {cpu['event loop']:7.1f} us CPU, p50 "
            f"{wall['event loop']:8.1f} us; thread {cpu['thread']:7.1f} us CPU, p50 "
            f"{wall['thread']:8.1f} us ({cpu['event loop'] / cpu['thread']:.2f}x CPU)"
        )
        results.figure(
            "warm call, runtime side",
            f"runtime CPU per warm call on the event loop, {label}",
            cpu["event loop"] / 1e3,
            "ms",
            reference="the same call through the calls lane's thread (before issue 16)",
            reference_value=cpu["thread"] / 1e3,
            higher_is_better=False,
            note="getrusage(RUSAGE_SELF): every thread of the calling process, no sandbox "
            "process; median of the rounds",
        )
        results.figure(
            "warm call, runtime side",
            f"warm call round trip on the event loop, {label}, p50",
            wall["event loop"] / 1e3,
            "ms",
            reference="the same call through the calls lane's thread, p50",
            reference_value=wall["thread"] / 1e3,
            higher_is_better=False,
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="few calls (CI smoke run)")
    parser.add_argument("--json", type=Path, default=None, help="also write Results JSON here")
    args = parser.parse_args(argv)
    results = Results(benchmark="call", quick=bool(args.quick))
    try:
        check_isolation()
    except SandboxError as exc:
        print(f"skipped: {exc}")
        results.notes.append(f"skipped: {exc}")
        results.write(args.json)
        return 0
    if args.quick:
        sizes, rounds = [(KIB, "1 KiB", 50), (MIB, "1 MiB", 5)], 2
    else:
        sizes, rounds = [(KIB, "1 KiB", 500), (MIB, "1 MiB", 40)], 6
    start = time.perf_counter()
    holder = Path(tempfile.mkdtemp(prefix="call-bench-"))
    try:
        holder.chmod(0o711)
        function = holder / "fn"
        function.mkdir()
        (function / "app.py").write_text(ECHO)
        limits = SandboxLimits(max_input_bytes=4 * MIB, max_output_bytes=4 * MIB)
        with FunctionSandbox.start(function, limits=limits, services=lambda op, data: data) as box:
            found = asyncio.run(measure(box, sizes, rounds))
    finally:
        shutil.rmtree(holder, ignore_errors=True)
    for line in record(found, sizes, results):
        print(line)
    print(f"  ({time.perf_counter() - start:.1f} s, {rounds} alternating rounds)")
    results.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
