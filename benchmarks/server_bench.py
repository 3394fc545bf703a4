"""Platform figures through a real ``cape serve`` process over TLS on loopback.

In one run, against one server subprocess (2 simulated enclaves):

1. warm invoke latency of an echo function (one attested session, many sequential invokes
   after a warm-up; 1 KiB, 64 KiB and 1 MiB inputs), with results sealed (the SDK default) and
   not, beside a plain websocket echo on the same stack without enclave or HPKE: a second
   subprocess running uvicorn with the same settings (TLS with the same certificate files,
   ``ws="websockets-sansio"``, no per-message deflate) and a Starlette ``WebSocketRoute`` that
   echoes binary frames, driven by the same ``websockets`` client. Each row also gives the CPU
   time per call of the client, the server and the enclaves with their sandboxes (from
   ``/proc``), and the client's HPKE/base64/JSON work is timed alone, so the overhead can be
   placed;
2. sessions per second with 16 concurrent clients (each: open an attested session, one
   invoke, close), the error count, and the CPU each session costs per process kind;
3. a 100 MiB deploy (zip of incompressible data + ``app.py``, stored uncompressed), sent as
   the SDK sends it (announced size, 1 MiB chunks) and as Cape's clients do (one binary
   frame): wall time, and the peak resident memory above idle of the server process and of
   the enclave process that took it (``VmHWM`` after resetting it through
   ``/proc/<pid>/clear_refs``), as multiples of the bundle size.

Run: ``.venv/bin/python benchmarks/server_bench.py [--quick]`` (needs root and bubblewrap, as
simulated enclaves do; ``--quick`` is a seconds-long smoke run with a 1 MiB bundle).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import gc
import hashlib
import io
import json
import logging
import os
import platform
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import websockets
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from cape.crypto import envelope, hpke
from cape.crypto.results import ResultChannel
from cape.sdk.flows import deploy, fetch_key, run_path
from cape.sdk.rest import RestClient
from cape.sdk.session import Session, SessionOptions, ws_url

ECHO: Final = "def cape_handler(data):\n    return data\n"
READY_TIMEOUT_S: Final = 60.0
CONCURRENT_CLIENTS: Final = 16
KIB: Final = 1024
MIB: Final = 1024 * 1024


@dataclass(frozen=True)
class Options:
    quick: bool
    invokes: int  # timed invokes at 1 KiB (fewer for the larger sizes)
    warmup: int
    sessions_per_client: int
    bundle_bytes: int


# --------------------------------------------------------------------------- formatting


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(name: str, samples: list[float], unit: str = "ms") -> str:
    scale = 1000.0 if unit == "ms" else 1_000_000.0
    values = [v * scale for v in samples]
    p50, p99 = statistics.median(values), percentile(values, 0.99)
    return f"  {name:<56} p50 {p50:9.1f} {unit}   p99 {p99:9.1f} {unit}   (n={len(values)})"


def size_label(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.machine()


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


# --------------------------------------------------------------------------- processes


class Child:
    """A subprocess that prints ``Ready: URL`` when it serves; output kept in files."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        self.url = self._wait_ready()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            for line in self.stdout_path.read_text(errors="replace").splitlines():
                if line.startswith("Ready: "):
                    return line.removeprefix("Ready: ").strip()
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready:\n{self.stderr()[-3000:]}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_cape(base: Path) -> Child:
    env = {**os.environ, "CAPE_CONFIG_DIR": str(base / "config")}
    argv = [sys.executable, "-c", "from cape.cli.app import main; main()", "serve"]
    argv += ["--data-dir", str(base / "data"), "--port", "0", "--enclaves", "2"]
    return Child("cape-serve", argv, base, env)


def start_plain_echo(base: Path) -> Child:
    argv = [sys.executable, str(Path(__file__).resolve()), "--echo-server", str(base / "data")]
    return Child("plain-echo", argv, base, dict(os.environ))


def plain_echo_server(data_dir: Path) -> None:
    """The baseline: uvicorn as ``cape serve`` configures it, echoing binary frames."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is not None:
                await websocket.send_bytes(data)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    config = uvicorn.Config(
        Starlette(routes=[WebSocketRoute("/echo", echo)]),
        host="127.0.0.1",
        port=0,
        ssl_certfile=str(data_dir / "tls" / "server.pem"),
        ssl_keyfile=str(data_dir / "tls" / "server.key"),
        ws="websockets-sansio",
        ws_max_size=1_000_000_000 + (1 << 20),
        ws_per_message_deflate=False,
        lifespan="off",
        log_config=None,
        log_level="info",
        server_header=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)

    async def run() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                await task
                raise RuntimeError("the echo server did not start")
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        print(f"Ready: https://127.0.0.1:{port}", flush=True)
        await task

    asyncio.run(run())


# --------------------------------------------------------------------------- /proc


def proc_status(pid: int) -> dict[str, int]:
    """``VmRSS``, ``VmHWM`` … of a process, in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key.startswith("Vm") and rest.strip().endswith("kB"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak(pid: int) -> None:
    """Reset ``VmHWM`` to the current RSS (``clear_refs`` 5; root or the process owner)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rpartition(")")[2].split()[1])
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        found += children
        frontier += children
    return found


def tree_cpu_seconds(root: int, *, include_root: bool = True) -> float:
    """CPU time of a process tree: live processes plus the children they have reaped."""
    ticks = 0
    for pid in ([root] if include_root else []) + descendants(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        ticks += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def enclave_pids(server_pid: int) -> list[int]:
    """The ``cape.enclave.runtime`` processes under the server (not ``unshare`` wrappers)."""
    pids = []
    for pid in descendants(server_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"cape.enclave.runtime" in argv and not argv[0].endswith(b"unshare"):
            pids.append(pid)
    return sorted(pids)


# --------------------------------------------------------------------------- client side


@dataclass
class Client:
    url: str
    echo_url: str
    token: str
    options: SessionOptions
    server_pid: int
    echo_pid: int
    function: str = ""

    async def session(self, *, seal_results: bool = True) -> Session:
        options = dataclasses.replace(self.options, seal_results=seal_results)
        return await Session.open(self.url, run_path(self.function), self.token, options)


def signup(url: str, ssl_context: ssl.SSLContext) -> str:
    with RestClient(url, ssl_context) as rest:
        token: str = rest.signup("bench", "correct horse battery")["access_token"]
    return token


def zip_bundle(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


async def timed(action: Callable[[], Awaitable[object]], repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        await action()
        samples.append(time.perf_counter() - start)
    return samples


def client_crypto(payload: bytes, repeats: int) -> list[float]:
    """What the SDK itself does per invoke: HPKE-seal the input; parse, decode, open the result."""
    enclave_key, response_key = hpke.generate_keypair(), hpke.generate_keypair()
    channel = ResultChannel.derive(
        response_key.private_key,  # type: ignore[arg-type]
        enclave_key.public_bytes,
        session_public=enclave_key.public_bytes,
        response_public=response_key.public_bytes,
    )
    sealed_result = channel.seal(0, payload)
    frame = json.dumps(
        {
            "message": {
                "type": "function_result",
                "message": base64.b64encode(sealed_result).decode(),
            }
        }
    )
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        hpke.seal(enclave_key.public_bytes, payload)
        message = json.loads(frame)["message"]
        channel.open(0, base64.b64decode(message["message"], validate=True))
        samples.append(time.perf_counter() - start)
    return samples


def cpu_seconds(pids: list[int]) -> float:
    """CPU time used so far by the threads of ``pids`` (``schedstat``, nanosecond resolution)."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total / 1e9


async def measured(
    action: Callable[[], Awaitable[object]], repeats: int, groups: dict[str, list[int]]
) -> tuple[list[float], dict[str, float]]:
    """Latency samples, and CPU seconds per call of this process and of each group of pids."""
    before = {name: cpu_seconds(pids) for name, pids in groups.items()}
    client_before = time.process_time()
    samples = await timed(action, repeats)
    cpu = {name: (cpu_seconds(pids) - before[name]) / repeats for name, pids in groups.items()}
    cpu["client"] = (time.process_time() - client_before) / repeats
    return samples, cpu


def cpu_line(cpu: dict[str, float]) -> str:
    parts = ", ".join(f"{name} {seconds * 1e6:.0f}" for name, seconds in cpu.items())
    return f"      CPU us per call: {parts}"


async def latency_section(client: Client, options: Options) -> list[str]:
    lines = [
        "warm invoke latency: one connection, sequential calls, client in this process; CPU is",
        "per call, from /proc (server = the cape serve or plain echo process)",
    ]
    sizes = [(KIB, options.invokes), (64 * KIB, options.invokes // 4)]
    sizes.append((MIB, max(3, options.invokes // 20)))
    ratios: dict[int, float] = {}
    sealed = await client.session()
    unsealed = await client.session(seal_results=False)
    echo = await websockets.connect(
        ws_url(client.echo_url, "/echo"),
        ssl=client.options.ssl_context,
        max_size=None,
        compression=None,
    )
    await asyncio.sleep(0.3)  # let the warm pool start its spare sandboxes before measuring
    cape_groups = {"server": [client.server_pid], "enclaves+sandboxes": []}
    plain_groups = {"server": [client.echo_pid]}
    try:
        for size, repeats in sizes:
            payload = os.urandom(size)

            async def invoke(payload: bytes = payload) -> None:
                assert await sealed.invoke(payload) == payload

            async def invoke_unsealed(payload: bytes = payload) -> None:
                assert await unsealed.invoke(payload) == payload

            async def plain(payload: bytes = payload) -> None:
                await echo.send(payload)
                assert await echo.recv() == payload

            for action in (invoke, invoke_unsealed, plain):
                await timed(action, options.warmup)
            cape_groups["enclaves+sandboxes"] = descendants(client.server_pid)
            cape_samples, cape_cpu = await measured(invoke, repeats, cape_groups)
            unsealed_samples, unsealed_cpu = await measured(invoke_unsealed, repeats, cape_groups)
            plain_samples, plain_cpu = await measured(plain, repeats, plain_groups)
            ratios[size] = statistics.median(cape_samples) / statistics.median(plain_samples)
            label = size_label(size)
            lines += [
                summary(f"{label} cape invoke (SDK default: result sealed)", cape_samples, "us"),
                cpu_line(cape_cpu),
                summary(f"{label} cape invoke, result not sealed", unsealed_samples, "us"),
                cpu_line(unsealed_cpu),
                summary(f"{label} plain websocket echo (same uvicorn + TLS)", plain_samples, "us"),
                cpu_line(plain_cpu),
                summary(
                    f"{label} client HPKE seal + open, base64, JSON (alone)",
                    client_crypto(payload, repeats),
                    "us",
                ),
                f"  {label} ratio: sealed invoke / plain echo (p50)  {ratios[size]:.2f}x",
            ]
    finally:
        for closing in (sealed, unsealed):
            await closing.close()
        await echo.close()
    lines.append(
        f"  goal: warm 1 KiB invoke <= 2x plain echo: {met(ratios[KIB] <= 2.0)} "
        f"({ratios[KIB]:.2f}x)"
    )
    return lines


async def sessions_section(client: Client, options: Options) -> list[str]:
    payload = os.urandom(KIB)
    samples: list[float] = []
    errors: list[str] = []

    async def one_client() -> None:
        for _ in range(options.sessions_per_client):
            start = time.perf_counter()
            try:
                session = await client.session()
                try:
                    assert await session.invoke(payload) == payload
                finally:
                    await session.close()
            except Exception as exc:  # counted and shown, not fatal to the benchmark
                errors.append(f"{type(exc).__name__}: {exc}"[:160])
            else:
                samples.append(time.perf_counter() - start)

    enclaves = enclave_pids(client.server_pid)
    server_before = cpu_seconds([client.server_pid])
    own_before = cpu_seconds(enclaves)
    tree_before = tree_cpu_seconds(client.server_pid, include_root=False)
    client_before = time.process_time()
    began = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(CONCURRENT_CLIENTS)))
    wall = time.perf_counter() - began
    own = cpu_seconds(enclaves) - own_before
    cpu = {
        "server": cpu_seconds([client.server_pid]) - server_before,
        "enclave runtimes": own,
        "sandboxes (start + call)": tree_cpu_seconds(client.server_pid, include_root=False)
        - tree_before
        - own,
        "client": time.process_time() - client_before,
    }
    total = CONCURRENT_CLIENTS * options.sessions_per_client
    lines = [
        f"sessions, {CONCURRENT_CLIENTS} concurrent clients (open attested session, one 1 KiB "
        "invoke, close)",
        f"  {total} sessions in {wall:.2f} s: {len(samples) / wall:.1f} sessions/s, "
        f"{len(errors)} error(s)",
    ]
    if samples:
        lines.append(summary("per session (connect, verify, invoke, close)", samples))
        parts = ", ".join(f"{name} {seconds / total * 1e3:.1f}" for name, seconds in cpu.items())
        lines.append(f"      CPU ms per session: {parts}")
    for text in sorted(set(errors))[:5]:
        lines.append(f"  error: {text}")
    return lines


async def deploy_one_frame(
    client: Client, bundle: bytes, key: RSAPublicKey, name: str
) -> dict[str, Any]:
    """A deploy as Cape's own clients send it: the function info, then one binary frame."""
    ciphertext = envelope.encrypt(bundle, key)
    session = await Session.open(client.url, "/v1/deploy", client.token, client.options)
    try:
        await session.send_json({"function_name": name, "public": False})
        await session.send_bytes(ciphertext)
        del ciphertext
        return await session.receive()
    finally:
        await session.wait_closed()


async def deploy_section(client: Client, server: Child, options: Options) -> list[str]:
    bundle = zip_bundle({"app.py": ECHO.encode(), "data.bin": os.urandom(options.bundle_bytes)})
    key = await fetch_key(client.url, client.token, client.options)
    enclaves = enclave_pids(server.pid)
    checksum = hashlib.sha256(bundle).hexdigest()

    async def chunked() -> str:
        deployed = await deploy(
            client.url, client.token, client.options, bundle, name="big", key=key
        )
        return deployed.checksum

    async def one_frame() -> str:
        return str((await deploy_one_frame(client, bundle, key, "big1"))["checksum"])

    mb = len(bundle) / MIB
    lines = [
        f"deploy of a {mb:.1f} MiB bundle (stored zip of random data + app.py), peak resident",
        "memory above idle (VmHWM after clear_refs) as a multiple of the bundle, and what stays",
        f"  {'client sends':<26}{'wall':>8}{'server peak':>20}{'enclave peak':>20}"
        f"{'retained srv/encl':>22}",
    ]
    multiples: dict[str, tuple[float, float]] = {}
    for label, action in (
        ("chunks (SDK, 1 MiB)", chunked),
        ("one frame (Cape clients)", one_frame),
    ):
        gc.collect()
        await asyncio.sleep(0.3)  # let earlier sessions settle
        pids = [server.pid, *enclaves]
        idle = {}
        for pid in pids:
            reset_peak(pid)
            idle[pid] = proc_status(pid)["VmRSS"]
        start = time.perf_counter()
        assert await action() == checksum
        wall = time.perf_counter() - start
        await asyncio.sleep(0.3)
        status = {pid: proc_status(pid) for pid in pids}
        peak = {pid: status[pid]["VmHWM"] - idle[pid] for pid in pids}
        busiest = max(enclaves, key=lambda pid: peak[pid])  # the enclave that took the deploy
        kept = [(status[pid]["VmRSS"] - idle[pid]) / MIB for pid in (server.pid, busiest)]
        multiples[label] = (peak[server.pid] / len(bundle), peak[busiest] / len(bundle))
        server_x, enclave_x = multiples[label]
        lines.append(
            f"  {label:<26}{wall:>6.2f} s"
            f"{peak[server.pid] / MIB:>9.1f} MiB {server_x:4.2f}x"
            f"{peak[busiest] / MIB:>9.1f} MiB {enclave_x:4.2f}x"
            f"{kept[0]:>10.1f} /{kept[1]:>5.1f} MiB"
        )
    server_x, enclave_x = multiples["chunks (SDK, 1 MiB)"]
    lines.append(
        f"  goal (SDK deploy): peak above idle <= 1.2x bundle: server {met(server_x <= 1.2)} "
        f"({server_x:.2f}x), enclave {met(enclave_x <= 1.2)} ({enclave_x:.2f}x)"
    )
    return lines


async def run_all(server: Child, echo: Child, base: Path, options: Options) -> list[str]:
    data_dir = base / "data"
    ssl_context = ssl.create_default_context(cafile=str(data_dir / "tls" / "ca.pem"))
    root = x509.load_pem_x509_certificate((data_dir / "attestation" / "root.pem").read_bytes())
    session_options = SessionOptions(root=root, ssl_context=ssl_context)
    token = await asyncio.to_thread(signup, server.url, ssl_context)
    client = Client(server.url, echo.url, token, session_options, server.pid, echo.pid)
    key = await fetch_key(server.url, token, session_options)
    deployed = await deploy(
        server.url,
        token,
        session_options,
        zip_bundle({"app.py": ECHO.encode()}),
        name="echo",
        key=key,
    )
    client.function = deployed.id
    lines = await latency_section(client, options)
    lines += [""] + await sessions_section(client, options)
    lines += [""] + await deploy_section(client, server, options)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny counts, 1 MiB bundle")
    parser.add_argument("--echo-server", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_server is not None:
        plain_echo_server(args.echo_server)
        return 0
    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        print(
            "server benchmark skipped: simulated enclaves need root and bubblewrap", file=sys.stderr
        )
        return 0
    options = (
        Options(quick=True, invokes=20, warmup=3, sessions_per_client=1, bundle_bytes=MIB)
        if args.quick
        else Options(
            quick=False, invokes=1000, warmup=100, sessions_per_client=20, bundle_bytes=100 * MIB
        )
    )
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="cape-server-bench-") as tmp:
        base = Path(tmp)
        server = start_cape(base)
        try:
            echo = start_plain_echo(base)
            try:
                lines = asyncio.run(run_all(server, echo, base, options))
            finally:
                echo.stop()
        except BaseException:
            print(server.stderr()[-3000:], file=sys.stderr)
            raise
        finally:
            server.stop()
    print(f"cape serve (simulated mode, 2 enclaves), TLS on loopback{' (quick)' * options.quick}")
    print(
        f"machine: {os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}, "
        f"1-min load average {load:.1f} before the run"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
