"""Platform figures through a real ``cape serve`` process over TLS on loopback.

In one run, against one server subprocess (2 simulated enclaves) and, as the reference, a
plain websocket server on the same stack: a second subprocess running uvicorn with the same
settings (TLS with the same certificate files, ``ws="websockets-sansio"``, no per-message
deflate) and Starlette routes that echo binary frames (``/echo``) or count them (``/sink``),
driven by the same ``websockets`` client:

1. **deploy** of a 1 MiB and a 100 MiB bundle (zip of incompressible data + ``app.py``,
   stored uncompressed), sent as the SDK sends it (announced size, 1 MiB chunks) and as Cape's
   clients do (one binary frame): wall time beside a plain upload of the same bytes in the
   same frames, and the peak resident memory above idle of the server process and of the
   enclave process that took it (``VmHWM`` after resetting it through
   ``/proc/<pid>/clear_refs``), as multiples of the bundle size (goal: ≤ 1.2x, one copy);
2. **warm invoke** latency of an echo function (one attested session, many sequential invokes
   after a warm-up; 1 KiB, 64 KiB and 1 MiB inputs), with results sealed (the SDK default) and
   not, beside the plain echo of the same bytes (goal: p50 and p99 ≤ 2x the echo's), measured
   in alternating rounds so that background load hits both alike. Each row also gives the CPU
   time per call of the client, the server and the enclaves with their sandboxes (from
   ``/proc``), and the client's HPKE/base64/JSON work is timed alone, so the overhead can be
   placed;
3. the same warm invoke (1 KiB, 64 KiB) with **pycape 3.1.1** as the client: a subprocess in
   ``.venv-pycape`` connects once and times each ``cape.invoke`` itself (skipped, with a note,
   without that venv; ``bash scripts/setup.sh test`` makes it);
4. **throughput** with 1, 4, 16 and 64 concurrent clients (``--quick``: 1 and 4): completed
   runs per second, where a run is what ``cape run`` does (open a websocket, verify the
   attestation document, one sealed 1 KiB invoke, close), over the wall time from the first
   run's start to the last one's end; every client runs its runs back to back. Beside it, the
   same number of plain runs (connect, echo 1 KiB, close) at the same concurrency; failed runs
   are counted and shown (goal: 0 errors), and warnings the server logged meanwhile are shown.

Run: ``.venv/bin/python benchmarks/server_bench.py [--quick] [--json PATH] [--only SECTION]``
(needs root and bubblewrap, as simulated enclaves do; ``--quick`` is a seconds-long smoke run
with a 1 MiB bundle; ``--only invoke`` runs the warm-invoke section alone, e.g. for an A/B of
two source trees). Our SDK asks for results as binary frames (protocol.md "Result frames");
pycape's section measures Cape's JSON text form. ``--json`` also writes the figures, the raw
latency samples and the curves as a :class:`_results.Results` (benchmark ``server``).
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
import math
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import websockets
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from _results import Curve, Results, Series, timed
from cape.crypto import envelope, hpke
from cape.crypto.session_keys import AES_256_GCM, SessionKeys
from cape.host.pool import WAIT_FOR_ENCLAVE_S
from cape.sdk.flows import DEPLOY_CHUNK_BYTES, deploy, fetch_key, run_path
from cape.sdk.rest import RestClient
from cape.sdk.session import OPEN_TIMEOUT_S, Session, SessionOptions, ws_url

ECHO: Final = "def cape_handler(data):\n    return data\n"
READY_TIMEOUT_S: Final = 60.0
KIB: Final = 1024
MIB: Final = 1024 * 1024
ROOT: Final = Path(__file__).resolve().parents[1]
PYCAPE_PYTHON: Final = ROOT / ".venv-pycape" / "bin" / "python"
PYCAPE_TIMEOUT_S: Final = 300
INVOKE_GOAL: Final = 2.0  # warm invoke <= 2x the plain echo
MEMORY_GOAL: Final = 1.2  # deploy peak above idle <= 1.2x the bundle
RUN: Final = "connect, verify, one sealed 1 KiB invoke, close"
PLAIN_RUN: Final = "plain websocket run: connect, echo 1 KiB, close"
#: Clients per account in the throughput section (half the default per-account session limit).
CLIENTS_PER_ACCOUNT: Final = 16

# Runs in .venv-pycape (imports nothing of ours): pycape exactly as published, with our
# attestation root (``cape._root_cert``) and TLS trust from SSL_CERT_FILE, as
# tests/e2e/pycape_driver.py drives it. Input: JSON on stdin; output: seconds per invoke.
PYCAPE_DRIVER: Final = """
import json, os, pathlib, sys, time
from pycape import Cape

args = json.load(sys.stdin)
cape = Cape(url=args["url"])
cape._root_cert = pathlib.Path(args["root_pem"]).read_bytes()
samples = {}
started = time.perf_counter()
cape.connect(args["function"], args["token"])
connect_s = time.perf_counter() - started
try:
    for size, warmup, repeats in args["sizes"]:
        payload = os.urandom(size)
        for _ in range(warmup):
            assert cape.invoke(payload) == payload
        timed = []
        for _ in range(repeats):
            start = time.perf_counter()
            result = cape.invoke(payload)
            timed.append(time.perf_counter() - start)
            assert result == payload
        samples[str(size)] = timed
finally:
    cape.close()
json.dump({"connect_s": connect_s, "samples": samples}, sys.stdout)
"""


@dataclass(frozen=True)
class Options:
    quick: bool
    invokes: int  # timed invokes at 1 KiB (fewer for the larger sizes)
    warmup: int
    rounds: int  # the timed invokes come in this many alternating rounds (cape, plain, …)
    clients: tuple[int, ...]  # concurrency levels of the throughput section
    runs_per_level: int  # at least this many runs per level, spread over its clients
    min_runs_per_client: int
    bundle_sizes: tuple[int, ...]
    pycape_invokes: int


QUICK: Final = Options(
    quick=True,
    invokes=20,
    warmup=3,
    rounds=1,
    clients=(1, 4),
    runs_per_level=8,
    min_runs_per_client=2,
    bundle_sizes=(MIB,),
    pycape_invokes=20,
)
FULL: Final = Options(
    quick=False,
    invokes=1000,
    warmup=100,
    rounds=5,
    clients=(1, 4, 16, 64),
    runs_per_level=320,
    min_runs_per_client=3,
    bundle_sizes=(MIB, 100 * MIB),
    pycape_invokes=1000,
)


# --------------------------------------------------------------------------- formatting


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def p50(values: list[float]) -> float:
    return statistics.median(values)


def p99(values: list[float]) -> float:
    return percentile(values, 0.99)


def summary(name: str, samples: list[float], unit: str = "ms") -> str:
    scale = 1000.0 if unit == "ms" else 1_000_000.0
    values = [v * scale for v in samples]
    return (
        f"  {name:<56} p50 {p50(values):9.1f} {unit}   p99 {p99(values):9.1f} {unit}"
        f"   (n={len(values)})"
    )


def size_label(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


def ms(samples: list[float]) -> list[float]:
    return [value * 1000.0 for value in samples]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.machine()


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over ``seconds`` (``/proc/stat``): other work, before a run."""

    def sample() -> tuple[int, int]:
        fields = [int(value) for value in Path("/proc/stat").read_text().split()[1:9]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    total, idle = sample()
    time.sleep(seconds)
    total_after, idle_after = sample()
    return 1.0 - (idle_after - idle) / max(1, total_after - total)


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

    def stderr_size(self) -> int:
        return self.stderr_path.stat().st_size

    def stderr_since(self, offset: int) -> str:
        with self.stderr_path.open("rb") as file:
            file.seek(offset)
            return file.read().decode(errors="replace")

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
    """The reference: uvicorn as ``cape serve`` configures it; ``/echo`` and ``/sink``."""
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

    async def sink(websocket: WebSocket) -> None:
        """Counts binary frames' bytes; a text frame ``done`` gets the count back."""
        await websocket.accept()
        received = 0
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is not None:
                received += len(data)
            elif message.get("text") == "done":
                await websocket.send_text(str(received))
                received = 0

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    config = uvicorn.Config(
        Starlette(routes=[WebSocketRoute("/echo", echo), WebSocketRoute("/sink", sink)]),
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


# --------------------------------------------------------------------------- client side


@dataclass
class Client:
    url: str
    echo_url: str
    token: str
    options: SessionOptions
    server: Child
    echo: Child
    data_dir: Path
    function: str = ""

    async def session(self, *, seal_results: bool = True) -> Session:
        options = dataclasses.replace(self.options, seal_results=seal_results)
        return await Session.open(self.url, run_path(self.function), self.token, options)

    async def plain(self, path: str) -> websockets.ClientConnection:
        return await websockets.connect(
            ws_url(self.echo_url, path),
            ssl=self.options.ssl_context,
            max_size=None,
            compression=None,
        )


def signup(url: str, ssl_context: ssl.SSLContext, name: str = "bench") -> str:
    with RestClient(url, ssl_context) as rest:
        token: str = rest.signup(name, "correct horse battery")["access_token"]
    return token


def zip_bundle(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def client_crypto(payload: bytes, repeats: int, *, sealed_inputs: bool = False) -> list[float]:
    """What the SDK itself does per invoke: seal the input (HPKE, or as a sealed input, ours);
    parse, decode, open the result (its sealed channels under AES-256-GCM, as the SDK asks)."""
    enclave_key, response_key = hpke.generate_keypair(), hpke.generate_keypair()
    keys = SessionKeys.for_client(response_key, enclave_key.public_bytes, AES_256_GCM)
    channel = keys.results
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
        if sealed_inputs:
            keys.inputs.seal(0, payload)
        else:
            hpke.seal(enclave_key.public_bytes, payload)
        message = json.loads(frame)["message"]
        channel.open(0, base64.b64decode(message["message"], validate=True))
        samples.append(time.perf_counter() - start)
    return samples


@dataclass
class Meter:
    """Latency samples of one action, and the CPU it cost per process group, over rounds."""

    action: Callable[[], Awaitable[object]]
    groups: dict[str, list[int]]
    samples: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)

    async def run(self, repeats: int) -> None:
        before = {name: cpu_seconds(pids) for name, pids in self.groups.items()}
        client_before = time.process_time()
        self.samples += await timed(self.action, repeats)
        for name, pids in self.groups.items():
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu_seconds(pids) - before[name]
        self.cpu["client"] = self.cpu.get("client", 0.0) + time.process_time() - client_before

    def cpu_line(self) -> str:
        parts = ", ".join(
            f"{name} {seconds / len(self.samples) * 1e6:.0f}" for name, seconds in self.cpu.items()
        )
        return f"      CPU us per call: {parts}"


@dataclass
class Invokes:
    """What the warm invoke section measured, for the pycape section's reference."""

    ours: dict[int, list[float]] = field(default_factory=dict)
    plain: dict[int, list[float]] = field(default_factory=dict)


def invoke_figures(
    results: Results,
    who: str,
    label: str,
    samples: list[float],
    plain: list[float],
    *,
    goal: bool,
    note: str | None = None,
) -> list[float]:
    """p50 and p99 figures beside the plain echo's; returns the two ratios."""
    ratios = []
    for name, stat in (("p50", p50), ("p99", p99)):
        value, reference = stat(samples) * 1000, stat(plain) * 1000
        ratios.append(value / reference)
        results.figure(
            "warm invoke",
            f"{who} warm invoke {name}, {label}",
            value,
            "ms",
            reference=f"plain websocket echo {name}",
            reference_value=reference,
            higher_is_better=False,
            goal=f"<= {INVOKE_GOAL:g}x plain echo" if goal else None,
            goal_met=value <= INVOKE_GOAL * reference if goal else None,
            note=note,
        )
    return ratios


async def latency_section(client: Client, options: Options, results: Results) -> Invokes:
    print(
        "warm invoke latency: one connection, sequential calls, client in this process, in "
        f"{options.rounds} alternating round(s); CPU is per call, from /proc (server = the cape "
        "serve or plain echo process)"
    )
    sizes = [(KIB, options.invokes), (64 * KIB, options.invokes // 4)]
    sizes.append((MIB, max(3, options.invokes // 10)))
    measured = Invokes()
    goals: list[tuple[str, float, float]] = []
    sealed = await client.session()
    unsealed = await client.session(seal_results=False)
    echo = await client.plain("/echo")
    await asyncio.sleep(0.3)  # let the warm pool start its spare sandboxes before measuring
    cape_groups = {"server": [client.server.pid], "enclaves+sandboxes": []}
    plain_groups = {"server": [client.echo.pid]}
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

            warmup = max(2, options.warmup * repeats // options.invokes)
            for action in (invoke, invoke_unsealed, plain):
                await timed(action, warmup)
            cape_groups["enclaves+sandboxes"] = descendants(client.server.pid)
            meters = [
                Meter(invoke, cape_groups),
                Meter(invoke_unsealed, cape_groups),
                Meter(plain, plain_groups),
            ]
            rounds = min(options.rounds, repeats)
            for index in range(rounds):
                share = repeats * (index + 1) // rounds - repeats * index // rounds
                for meter in meters:
                    await meter.run(share)
            ours, not_sealed, reference = (meter.samples for meter in meters)
            measured.ours[size], measured.plain[size] = ours, reference
            label = size_label(size)
            ratio_p50, ratio_p99 = invoke_figures(
                results, "cape", label, ours, reference, goal=True
            )
            goals.append((label, ratio_p50, ratio_p99))
            for who, samples in (("cape (SDK, sealed)", ours), ("plain websocket echo", reference)):
                results.series.append(Series(f"warm invoke, {label}", who, "ms", ms(samples)))
            print(
                "\n".join(
                    [
                        summary(f"{label} cape invoke (SDK default: result sealed)", ours, "us"),
                        meters[0].cpu_line(),
                        summary(f"{label} cape invoke, result not sealed", not_sealed, "us"),
                        meters[1].cpu_line(),
                        summary(
                            f"{label} plain websocket echo (same uvicorn + TLS)", reference, "us"
                        ),
                        meters[2].cpu_line(),
                        summary(
                            f"{label} client HPKE seal + open, base64, JSON (alone)",
                            client_crypto(payload, min(repeats, 200)),
                            "us",
                        ),
                        summary(
                            f"{label} client sealed input + open, base64, JSON (alone)",
                            client_crypto(payload, min(repeats, 200), sealed_inputs=True),
                            "us",
                        ),
                        f"  {label} sealed invoke / plain echo: p50 {ratio_p50:.2f}x, "
                        f"p99 {ratio_p99:.2f}x",
                    ]
                ),
                flush=True,
            )
    finally:
        for closing in (sealed, unsealed):
            await closing.close()
        await echo.close()
    for label, ratio_p50, ratio_p99 in goals:
        print(
            f"  goal: warm {label} invoke <= {INVOKE_GOAL:g}x plain echo: "
            f"p50 {met(ratio_p50 <= INVOKE_GOAL)} ({ratio_p50:.2f}x), "
            f"p99 {met(ratio_p99 <= INVOKE_GOAL)} ({ratio_p99:.2f}x)"
        )
    return measured


async def pycape_section(
    client: Client, options: Options, measured: Invokes, results: Results
) -> None:
    print("warm invoke with pycape 3.1.1 as the client (a subprocess in .venv-pycape)")
    if not PYCAPE_PYTHON.exists():
        note = f"pycape figures skipped: {PYCAPE_PYTHON} is missing (bash scripts/setup.sh test)"
        print(f"  {note}")
        results.notes.append(note)
        return
    sizes = [(KIB, options.pycape_invokes), (64 * KIB, options.pycape_invokes // 4)]
    args = {
        "url": client.url,
        "token": client.token,
        "function": client.function,
        "root_pem": str(client.data_dir / "attestation" / "root.pem"),
        "sizes": [
            [size, max(2, options.warmup * repeats // options.invokes), repeats]
            for size, repeats in sizes
        ],
    }
    with tempfile.TemporaryDirectory(prefix="cape-bench-pycape-") as home:
        ca_file = str(client.data_dir / "tls" / "ca.pem")
        env = {  # nothing inherited: no CAPE_DEV_DISABLE_SSL, no real HOME or config
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": home,
            "XDG_CONFIG_HOME": str(Path(home) / ".config"),
            "SSL_CERT_FILE": ca_file,
            "REQUESTS_CA_BUNDLE": ca_file,
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        done = await asyncio.to_thread(
            subprocess.run,
            [str(PYCAPE_PYTHON), "-c", PYCAPE_DRIVER],
            input=json.dumps(args),
            capture_output=True,
            text=True,
            env=env,
            cwd=home,
            timeout=PYCAPE_TIMEOUT_S,
            check=False,
        )
    if done.returncode != 0:
        note = f"pycape run FAILED (exit {done.returncode}): {done.stderr.strip()[-500:]}"
        print(f"  {note}", file=sys.stderr)
        results.notes.append(note)
        return
    output = json.loads(done.stdout)
    print(f"  pycape connect (attested session set-up): {output['connect_s'] * 1000:.1f} ms")
    for size, _ in sizes:
        samples: list[float] = output["samples"][str(size)]
        label, plain, ours = size_label(size), measured.plain[size], measured.ours[size]
        sdk = f"cape's SDK: p50 {p50(ours) * 1000:.3g} ms, p99 {p99(ours) * 1000:.3g} ms"
        ratio_p50, ratio_p99 = invoke_figures(
            results, "pycape 3.1.1", label, samples, plain, goal=False, note=sdk
        )
        results.series.append(Series(f"warm invoke, {label}", "pycape 3.1.1", "ms", ms(samples)))
        print(summary(f"{label} pycape invoke (timed in the subprocess)", samples, "us"))
        print(
            f"  {label} pycape invoke / plain echo: p50 {ratio_p50:.2f}x, p99 {ratio_p99:.2f}x; "
            f"/ cape SDK invoke p50 {p50(samples) / p50(ours):.2f}x"
        )


@dataclass
class Level:
    """One concurrency level: every client does ``per_client`` runs back to back."""

    clients: int
    per_client: int
    wall: float = 0.0
    samples: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def attempted(self) -> int:
        return self.clients * self.per_client

    @property
    def rate(self) -> float:
        return len(self.samples) / self.wall


async def load(level: Level, run: Callable[[int], Awaitable[None]]) -> Level:
    """``level.clients`` clients, client ``i`` calling ``run(i)`` back to back."""

    async def one_client(index: int) -> None:
        for _ in range(level.per_client):
            start = time.perf_counter()
            try:
                await run(index)
            except Exception as exc:  # counted and shown, not fatal to the benchmark
                level.errors.append(f"{type(exc).__name__}: {exc}"[:200])
            else:
                level.samples.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(one_client(index) for index in range(level.clients)))
    level.wall = time.perf_counter() - began
    return level


def server_warnings(text: str) -> list[str]:
    keys = ("WARNING", "ERROR", "CRITICAL", "Traceback")
    return [line for line in text.splitlines() if any(key in line for key in keys)]


async def throughput_section(client: Client, options: Options, results: Results) -> None:
    print(f"throughput: completed runs per second (a run: {RUN}, as `cape run` does), each of")
    print(f"N clients ({CLIENTS_PER_ACCOUNT} per account) doing its runs back to back; beside it")
    print("the same plain runs (connect, echo 1 KiB, close) at the same concurrency; CPU is per")
    print("completed run")
    payload = os.urandom(KIB)

    # Clients come from several accounts, CLIENTS_PER_ACCOUNT each, each account running its
    # own echo function: one account's 64 sessions would measure the per-account admission
    # and the enclave's per-caller call lanes (which refuse a caller's sessions beyond their
    # share with 429 or "the enclave is busy"), not throughput. Limits stay as shipped.
    tenants = [client]
    for number in range(2, math.ceil(max(options.clients) / CLIENTS_PER_ACCOUNT) + 1):
        token = await asyncio.to_thread(
            signup, client.url, client.options.ssl_context, f"bench{number}"
        )
        tenant = dataclasses.replace(client, token=token)
        tenant_key = await fetch_key(tenant.url, token, tenant.options)
        bundle = zip_bundle({"app.py": ECHO.encode()})
        deployed = await deploy(
            tenant.url, token, tenant.options, bundle, name="echo", key=tenant_key
        )
        tenants.append(dataclasses.replace(tenant, function=deployed.id))

    async def cape_run(index: int) -> None:
        session = await tenants[index // CLIENTS_PER_ACCOUNT].session()
        try:
            assert await session.invoke(payload) == payload
        finally:
            await session.close()

    async def plain_run(index: int) -> None:
        websocket = await client.plain("/echo")
        try:
            await websocket.send(payload)
            assert await websocket.recv() == payload
        finally:
            await websocket.close()

    await load(Level(2, 2), cape_run)  # warm-up
    reference = "throughput, plain websocket reference"  # own plots: 10-50x the scale
    curves = {
        key: Curve(group, name, "concurrent clients", y_label, [])
        for key, group, name, y_label in (
            ("rate", "throughput", f"cape run ({RUN})", "completed runs/s"),
            ("p50", "throughput", "cape run p50", "run latency (ms)"),
            ("p99", "throughput", "cape run p99", "run latency (ms)"),
            ("plain rate", reference, PLAIN_RUN, "completed runs/s"),
            ("plain p50", reference, "plain websocket run p50", "run latency (ms)"),
        )
    }
    row = f"  {'clients':>7} {'runs':>6} {'wall s':>7} {'runs/s':>8} {'plain/s':>8} {'ratio':>6}"
    print(
        row + f" {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'encl. %':>7}   "
        "CPU ms per run"
    )
    troubles: list[str] = []
    slowest = 0.0
    for clients in options.clients:
        per_client = max(options.min_runs_per_client, math.ceil(options.runs_per_level / clients))
        gc.collect()
        await asyncio.sleep(0.3)  # let the previous level's sessions and sandboxes wind down
        log_offset = client.server.stderr_size()
        server_pid = client.server.pid
        enclaves = enclave_pids(server_pid)
        server_before, own_before = cpu_seconds([server_pid]), cpu_seconds(enclaves)
        tree_before = tree_cpu_seconds(server_pid, include_root=False)
        per_enclave = [tree_cpu_seconds(pid) for pid in enclaves]
        client_before = time.process_time()
        ours = await load(Level(clients, per_client), cape_run)
        per_enclave = [
            tree_cpu_seconds(pid) - b for pid, b in zip(enclaves, per_enclave, strict=True)
        ]
        own = cpu_seconds(enclaves) - own_before
        cpu = {
            "server": cpu_seconds([server_pid]) - server_before,
            "enclave runtimes": own,
            "sandboxes": tree_cpu_seconds(server_pid, include_root=False) - tree_before - own,
            "client": time.process_time() - client_before,
        }
        warnings = server_warnings(client.server.stderr_since(log_offset))
        plain_before = cpu_seconds([client.echo.pid]), time.process_time()
        plain = await load(Level(clients, per_client), plain_run)
        plain_cpu = (
            cpu_seconds([client.echo.pid]) - plain_before[0],
            time.process_time() - plain_before[1],
        )
        done = max(1, len(ours.samples))
        cpu_text = ", ".join(f"{name} {seconds / done * 1e3:.1f}" for name, seconds in cpu.items())
        plain_done = max(1, len(plain.samples))
        cpu_text += " (plain run: server {:.1f}, client {:.1f})".format(
            *(seconds / plain_done * 1e3 for seconds in plain_cpu)
        )
        split = "/".join(f"{100 * x / max(sum(per_enclave), 1e-9):.0f}" for x in per_enclave)
        latency = ms(ours.samples) or [math.nan]
        print(
            f"  {clients:>7} {ours.attempted:>6} {ours.wall:>7.2f} {ours.rate:>8.1f} "
            f"{plain.rate:>8.1f} {ours.rate / plain.rate:>6.3f} {len(ours.errors):>6} "
            f"{p50(latency):>8.1f} {p99(latency):>8.1f} {max(latency):>8.1f} {split:>7}   "
            f"{cpu_text}",
            flush=True,
        )
        slowest = max(slowest, max(latency))
        results.figure(
            "throughput",
            f"completed runs/s, {clients} concurrent client{'s' * (clients > 1)}",
            ours.rate,
            "runs/s",
            reference=f"plain websocket runs/s, {clients} client{'s' * (clients > 1)}",
            reference_value=plain.rate,
            note=(
                f"{len(ours.samples)}/{ours.attempted} runs; p50 {p50(latency):.0f} ms; "
                f"enclaves' share of enclave + sandbox CPU {split} %"
            ),
        )
        results.figure(
            "throughput",
            f"errors, {clients} concurrent client{'s' * (clients > 1)}",
            len(ours.errors),
            "errors",
            reference="runs attempted",
            reference_value=ours.attempted,
            higher_is_better=False,
            goal="0 errors",
            goal_met=not ours.errors,
            note=ours.errors[0] if ours.errors else None,
        )
        if ours.samples:
            results.series.append(
                Series(
                    "run latency",
                    f"cape run, {clients} client{'s' * (clients > 1)}",
                    "ms",
                    ms(ours.samples),
                )
            )
        for key, value in (
            ("rate", ours.rate),
            ("plain rate", plain.rate),
            ("p50", p50(latency)),
            ("p99", p99(latency)),
            ("plain p50", p50(ms(plain.samples) or [math.nan])),
        ):
            if not math.isnan(value):
                curves[key].points.append((float(clients), value))
        for kind, errors in (("cape", ours.errors), ("plain", plain.errors)):
            for text in sorted(set(errors))[:5]:
                troubles.append(f"{clients} clients, {kind} error (x{errors.count(text)}): {text}")
        for line in warnings[:5]:
            troubles.append(f"{clients} clients, server log: {line[:200]}")
        if len(warnings) > 5:
            troubles.append(f"{clients} clients, server log: … {len(warnings) - 5} more")
    results.curves += curves.values()
    results.notes.append(
        f"throughput: a run is {RUN} (what `cape run` does); runs/s = completed runs / wall time "
        "of the level, each client doing its runs back to back; the load generator shares the "
        "machine's CPUs with the server and the enclaves"
    )
    for line in troubles:
        print(f"  {line}")
        results.notes.append(f"throughput: {line}")
    if not troubles:
        print("  no errors, and no warnings in the server's log")
    margin = (
        f"the slowest run took {slowest / 1000:.1f} s (the SDK gives the websocket opening "
        f"{OPEN_TIMEOUT_S:.0f} s, the server waits up to {WAIT_FOR_ENCLAVE_S:.0f} s for a live "
        "enclave)"
    )
    print(f"  {margin}; encl. % = each enclave's share of the enclave and sandbox CPU")
    results.notes.append(f"throughput: {margin}")
    total_errors = sum(int(f.value) for f in results.figures if f.name.startswith("errors, "))
    print(f"  goal: 0 errors under load: {met(total_errors == 0)} ({total_errors})")


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


async def plain_upload(client: Client, data: bytes, frame_bytes: int) -> float:
    """Seconds to connect, send ``data`` in frames of ``frame_bytes``, get the count, close."""
    start = time.perf_counter()
    websocket = await client.plain("/sink")
    try:
        for offset in range(0, len(data), frame_bytes):
            await websocket.send(data[offset : offset + frame_bytes])
        await websocket.send("done")
        assert int(await websocket.recv()) == len(data)
    finally:
        await websocket.close()
    return time.perf_counter() - start


async def deploy_section(client: Client, options: Options, results: Results) -> None:
    key = await fetch_key(client.url, client.token, client.options)
    server_pid = client.server.pid
    enclaves = enclave_pids(server_pid)
    print(
        "deploy (stored zip of random data + app.py): wall time beside a plain upload of the same "
        "bytes in the same\nframes (connect, send, acknowledge, close; no encryption), and peak "
        "resident memory above idle\n(VmHWM after clear_refs) as a multiple of the bundle, the "
        "plain server's peak for the upload, and\nwhat stays"
    )
    print(
        f"  {'bundle':>8} {'client sends':<26}{'wall':>8}{'plain':>8}{'server peak':>20}"
        f"{'enclave peak':>20}{'plain peak':>12}{'retained srv/encl':>22}"
    )
    verdicts: list[str] = []
    for size in options.bundle_sizes:
        bundle = zip_bundle({"app.py": ECHO.encode(), "data.bin": os.urandom(size)})
        checksum = hashlib.sha256(bundle).hexdigest()
        label = size_label(size)
        mib = len(bundle) / MIB

        async def chunked(bundle: bytes = bundle, size: int = size) -> str:
            deployed = await deploy(
                client.url, client.token, client.options, bundle, name=f"chunks{size}", key=key
            )
            return deployed.checksum

        async def one_frame(bundle: bytes = bundle, size: int = size) -> str:
            return str((await deploy_one_frame(client, bundle, key, f"frame{size}"))["checksum"])

        for mode, action, frame_bytes in (
            ("chunks (SDK, 1 MiB)", chunked, DEPLOY_CHUNK_BYTES),
            ("one frame (Cape clients)", one_frame, len(bundle)),
        ):
            echo_pid = client.echo.pid
            reset_peak(echo_pid)
            echo_idle = proc_status(echo_pid)["VmRSS"]
            reference = await plain_upload(client, bundle, frame_bytes)
            plain_peak = (proc_status(echo_pid)["VmHWM"] - echo_idle) / MIB
            gc.collect()
            await asyncio.sleep(0.3)  # let earlier sessions settle
            pids = [server_pid, *enclaves]
            idle = {}
            for pid in pids:
                reset_peak(pid)
                idle[pid] = proc_status(pid)["VmRSS"]
            start = time.perf_counter()
            assert await action() == checksum
            wall = time.perf_counter() - start
            await asyncio.sleep(0.3)
            status = {pid: proc_status(pid) for pid in pids}
            peak = {pid: (status[pid]["VmHWM"] - idle[pid]) / MIB for pid in pids}
            busiest = max(enclaves, key=lambda pid: peak[pid])  # the enclave that took the deploy
            kept = [(status[pid]["VmRSS"] - idle[pid]) / MIB for pid in (server_pid, busiest)]
            server_x, enclave_x = peak[server_pid] / mib, peak[busiest] / mib
            print(
                f"  {label:>8} {mode:<26}{wall:>6.2f} s{reference:>6.2f} s"
                f"{peak[server_pid]:>9.1f} MiB {server_x:4.2f}x"
                f"{peak[busiest]:>9.1f} MiB {enclave_x:4.2f}x"
                f"{plain_peak:>8.1f} MiB"
                f"{kept[0]:>10.1f} /{kept[1]:>5.1f} MiB",
                flush=True,
            )
            name = f"deploy {label}, {mode}"
            results.figure(
                "deploy",
                f"{name}: wall",
                wall,
                "s",
                reference="plain websocket upload of the same bytes",
                reference_value=reference,
                higher_is_better=False,
            )
            for who, value, multiple in (
                ("server", peak[server_pid], server_x),
                ("enclave", peak[busiest], enclave_x),
            ):
                results.figure(
                    "deploy",
                    f"{name}: {who} peak memory above idle",
                    value,
                    "MiB",
                    reference="bundle size",
                    reference_value=mib,
                    higher_is_better=False,
                    goal=f"<= {MEMORY_GOAL:g}x one bundle copy",
                    goal_met=multiple <= MEMORY_GOAL,
                    note=f"{value - mib:+.1f} MiB beside one copy"
                    + (
                        f"; plain websocket server: {plain_peak:.1f} MiB" if who == "server" else ""
                    ),
                )
            verdicts.append(
                f"  goal ({label}, {mode}): peak above idle <= {MEMORY_GOAL:g}x bundle: "
                f"server {met(server_x <= MEMORY_GOAL)} ({server_x:.2f}x), "
                f"enclave {met(enclave_x <= MEMORY_GOAL)} ({enclave_x:.2f}x)"
            )
        del bundle
    print("\n".join(verdicts))


SECTIONS: Final = ("deploy", "invoke", "pycape", "throughput")


async def run_all(
    server: Child, echo: Child, base: Path, options: Options, only: frozenset[str] | None = None
) -> Results:
    results = Results("server", options.quick)
    data_dir = base / "data"
    ssl_context = ssl.create_default_context(cafile=str(data_dir / "tls" / "ca.pem"))
    root = x509.load_pem_x509_certificate((data_dir / "attestation" / "root.pem").read_bytes())
    session_options = SessionOptions(root=root, ssl_context=ssl_context)
    token = await asyncio.to_thread(signup, server.url, ssl_context)
    client = Client(server.url, echo.url, token, session_options, server, echo, data_dir)
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
    durations: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        durations[name], clock = time.monotonic() - clock, time.monotonic()
        print(flush=True)

    wanted = frozenset(SECTIONS) if only is None else only
    # Deploys first: their memory peaks are cleanest before the load has grown the heaps.
    if "deploy" in wanted:
        await deploy_section(client, options, results)
        lap("deploy")
    if wanted & {"invoke", "pycape"}:  # pycape's reference is the invoke section's echo
        measured = await latency_section(client, options, results)
        lap("warm invoke")
    if "pycape" in wanted:
        await pycape_section(client, options, measured, results)
        lap("pycape")
    if "throughput" in wanted:
        await throughput_section(client, options, results)
        lap("throughput")
    text = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in durations.items())
    print(f"section durations: {text}")
    results.notes.append(f"section durations: {text}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny counts, 1 MiB bundle")
    parser.add_argument("--json", type=Path, help="also write the results here (JSON)")
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        help="run only this section (repeatable; pycape implies invoke); default: all",
    )
    parser.add_argument("--echo-server", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_server is not None:
        plain_echo_server(args.echo_server)
        return 0
    options = QUICK if args.quick else FULL
    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        reason = "server benchmark skipped: simulated enclaves need root and bubblewrap"
        print(reason, file=sys.stderr)
        Results("server", options.quick, notes=[reason]).write(args.json)
        return 0
    load_before, busy_before = os.getloadavg()[0], cpu_busy()
    began = time.monotonic()
    print(f"cape serve (simulated mode, 2 enclaves), TLS on loopback{' (quick)' * options.quick}")
    print(
        f"machine: {os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}, "
        f"1-min load average {load_before:.1f} before the run, CPUs {busy_before:.0%} busy in "
        "the second before it\n",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="cape-server-bench-") as tmp:
        base = Path(tmp)
        server = start_cape(base)
        try:
            echo = start_plain_echo(base)
            try:
                only = frozenset(args.only) if args.only else None
                results = asyncio.run(run_all(server, echo, base, options, only))
            finally:
                echo.stop()
        except BaseException:
            print(server.stderr()[-3000:], file=sys.stderr)
            raise
        finally:
            server.stop()
    elapsed = time.monotonic() - began
    cpus = os.cpu_count() or 1
    if busy_before > 0.25:
        busy = (
            f"the machine was busy ({busy_before:.0%} of {cpus} CPUs in the second before the "
            "run): other work shared the CPUs, so the figures, p99 above all, include "
            "interference"
        )
        print(busy)
        results.notes.append(busy)
    results.notes.append(
        f"machine: {cpus} CPUs, {busy_before:.0%} busy in the second before the run; 1-min "
        f"load average {load_before:.1f} before the run, "
        f"{os.getloadavg()[0]:.1f} after; {elapsed:.0f} s in all; cape serve with 2 simulated "
        "enclaves, client, server and reference server on the same machine"
    )
    print(f"total {elapsed:.1f} s; 1-min load average {os.getloadavg()[0]:.1f} after the run")
    results.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
