"""Profile a warm invoke in all three processes: client, ``cape serve`` and its enclaves.

Starts ``cape serve`` as ``server_bench.py`` does (2 simulated enclaves, TLS on loopback),
deploys the echo function, opens one sealed session and invokes it back to back with
``--size`` bytes for ``--seconds``, while ``py-spy record`` samples the server, every enclave
runtime and sandbox under it, and this client. Each profile is written as collapsed stacks
(``--format raw``) and summarised: the functions with the most samples, on top of the stack
("self") and anywhere on it ("total"), as percentages of the process's samples.

Run: ``.venv/bin/python benchmarks/invoke_profile.py --size 1024 --seconds 15 --out DIR``
(needs root, bubblewrap and ``py-spy``: ``.venv/bin/pip install py-spy``). Not part of
``run_all.py``: it prints profiles, not figures.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509

from cape.sdk.flows import deploy, fetch_key, run_path
from cape.sdk.session import Session, SessionOptions
from server_bench import ECHO, descendants, signup, start_cape, zip_bundle

TOP = 25


def summarise(path: Path, top: int = TOP) -> str:
    """The ``top`` functions by self and by total samples in a py-spy raw profile."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")[1:]  # the first is the process or thread
        samples += count
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    if not samples:
        return f"{path.name}: no samples"
    lines = [f"{path.name}: {samples} samples", "  self:"]
    lines += [f"    {n / samples:6.1%}  {f}" for f, n in own.most_common(top)]
    lines.append("  total:")
    lines += [f"    {n / samples:6.1%}  {f}" for f, n in total.most_common(top)]
    return "\n".join(lines)


async def drive(url: str, data_dir: Path, size: int, seconds: float, ready: Path) -> int:
    ssl_context = ssl.create_default_context(cafile=str(data_dir / "tls" / "ca.pem"))
    root = x509.load_pem_x509_certificate((data_dir / "attestation" / "root.pem").read_bytes())
    options = SessionOptions(root=root, ssl_context=ssl_context)
    token = await asyncio.to_thread(signup, url, ssl_context)
    key = await fetch_key(url, token, options)
    deployed = await deploy(
        url, token, options, zip_bundle({"app.py": ECHO.encode()}), name="echo", key=key
    )
    payload = os.urandom(size)
    calls = 0
    async with await Session.open(url, run_path(deployed.id), token, options) as session:
        for _ in range(20):
            assert await session.invoke(payload) == payload
        ready.touch()
        await asyncio.sleep(0.5)  # the profilers attach
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            assert await session.invoke(payload) == payload
            calls += 1
    return calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--native", action="store_true", help="py-spy --native")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cape-invoke-profile-") as tmp:
        base = Path(tmp)
        server = start_cape(base)
        recorders: list[tuple[Path, subprocess.Popen[bytes]]] = []
        try:
            ready = base / "ready"
            loop = asyncio.new_event_loop()
            task = loop.create_task(
                drive(server.url, base / "data", args.size, args.seconds, ready)
            )
            while not ready.exists():
                loop.run_until_complete(asyncio.sleep(0.05))
                if task.done():
                    task.result()
            targets = {"server": server.pid, "client": os.getpid()}
            for pid in descendants(server.pid):
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if b"cape.enclave.runtime" in argv and not argv[0].endswith(b"unshare"):
                    targets[f"enclave-{pid}"] = pid
                elif any(b"worker" in part for part in argv[:3]) and argv[0].endswith(b"python3"):
                    targets[f"sandbox-{pid}"] = pid
            for name, pid in targets.items():
                path = args.out / f"{name}.txt"
                command = [
                    py_spy,
                    "record",
                    "--format",
                    "raw",
                    "-r",
                    str(args.rate),
                    "-o",
                    str(path),
                ]
                command += ["-d", str(int(args.seconds)), "-p", str(pid), "--nonblocking"]
                if args.native:
                    command.append("--native")
                recorders.append((path, subprocess.Popen(command, stderr=subprocess.DEVNULL)))
            calls = loop.run_until_complete(task)
            print(f"{calls} invokes of {args.size} bytes in {args.seconds:.0f} s")
        finally:
            for _, recorder in recorders:
                recorder.wait(60)
            server.stop()
    for path, _ in recorders:
        if path.exists():
            print(summarise(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
