"""Cluster figures: PostgreSQL + S3 against SQLite + a directory, and nodes behind HAProxy.

In one run:

1. **storage cost on one node**: deploy (a 100 KiB bundle) and run (connect, verify the
   attestation, one sealed 1 KiB invoke, close) latency on a node storing into PostgreSQL and
   moto's S3 server (``scripts/cluster.sh up --nodes 1``, the node addressed directly), beside
   an embedded ``cape serve`` (SQLite and a blob directory), one enclave each, in alternating
   rounds so that background load hits both alike. Goal: run p50 with PostgreSQL + S3 ≤ 1.2x
   the embedded node's.
2. **through the load balancer**: runs per second and run p50/p99 with C concurrent clients
   through HAProxy in front of 1 node and of 3 nodes (``--quick``: 1 node only).

The runs' functions are deployed before timing; a run reads the function's row (and, the
first time on a node, its bundle) from the shared stores. The machine's cores are shared by
everything here (nodes, enclaves, PostgreSQL, the S3 server, HAProxy, the clients), so the
3-node figure shows contention on one machine, not a cluster's capacity.

Run: ``.venv/bin/python benchmarks/cluster_bench.py [--quick] [--json PATH]`` (root,
bubblewrap, Debian's postgresql and haproxy, ``bash scripts/setup.sh test`` for moto).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509

from _results import Curve, Results, Series
from cape.sdk.flows import Deployed, deploy, fetch_key, run_path
from cape.sdk.rest import RestClient
from cape.sdk.session import Session, SessionOptions

ROOT: Final = Path(__file__).resolve().parents[1]
CLUSTER_SH: Final = ROOT / "scripts" / "cluster.sh"
ECHO: Final = b"def cape_handler(data):\n    return data\n"
READY_TIMEOUT_S: Final = 120.0
RUN_GOAL: Final = 1.2
PASSWORD: Final = "correct horse battery"


@dataclass
class Target:
    """A URL with the CA and attestation root a client needs."""

    url: str
    ca_file: Path
    root_file: Path

    def options(self) -> SessionOptions:
        root = x509.load_pem_x509_certificate(self.root_file.read_bytes())
        return SessionOptions(
            root=root, ssl_context=ssl.create_default_context(cafile=str(self.ca_file))
        )


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def bundle(padding: int) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("app.py", ECHO)
        archive.writestr("pad.bin", secrets.token_bytes(padding))
    return buffer.getvalue()


class Embedded:
    """``cape serve`` with its defaults (SQLite, a blob directory) on a free port."""

    def __init__(self, base: Path) -> None:
        self.base = base
        base.mkdir(parents=True)
        log = (base / "serve.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from cape.cli.app import main; main()", "serve",
             "--data-dir", str(base / "data"), "--port", "0", "--enclaves", "1",
             "--signup-rate", "0"],
            stdout=subprocess.PIPE, stderr=log, text=True,
            env={**os.environ, "CAPE_CONFIG_DIR": str(base / "cli")},
        )  # fmt: skip
        log.close()
        assert self.process.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        url = ""
        while not url and time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError((base / "serve.log").read_text()[-2000:])
            url = line.removeprefix("Ready: ").strip() if line.startswith("Ready: ") else ""
        data = base / "data"
        self.target = Target(url, data / "tls" / "ca.pem", data / "attestation" / "root.pem")

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class LocalCluster:
    """``scripts/cluster.sh`` in its own state directory."""

    def __init__(self, base: Path, nodes: int) -> None:
        self.env = {**os.environ, "CAPE_CLUSTER_DIR": str(base / "cluster")}
        self.state = base / "cluster"
        out = self._sh("up", "--nodes", str(nodes), "--enclaves", "1")
        url = re.search(r"^Ready: (\S+)$", out, re.MULTILINE)
        if url is None:
            raise RuntimeError(out[-2000:])
        shared = self.state / "shared"
        self.balancer = Target(
            url.group(1), shared / "tls" / "ca.pem", shared / "attestation" / "root.pem"
        )
        port = re.search(r"^port = (\d+)$", (self.state / "node0" / "cape.toml").read_text(), re.M)
        assert port is not None
        self.node0 = Target(
            f"https://127.0.0.1:{port.group(1)}", self.balancer.ca_file, self.balancer.root_file
        )

    def _sh(self, *args: str) -> str:
        done = subprocess.run(
            ["bash", str(CLUSTER_SH), *args], capture_output=True, text=True, env=self.env,
            timeout=600,
        )  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"cluster.sh {args[0]}: {done.stderr[-2000:]}")
        return done.stdout

    def down(self) -> None:
        self._sh("down")


async def account(target: Target) -> tuple[str, Deployed]:
    """A fresh user and an echo function of theirs."""
    with RestClient(target.url, target.options().ssl_context) as rest:
        token = str(rest.signup(f"bench{secrets.token_hex(4)}", PASSWORD)["access_token"])
    key = await fetch_key(target.url, token, target.options())
    deployed = await deploy(target.url, token, target.options(), bundle(1024), name="echo", key=key)
    return token, deployed


async def one_run(target: Target, options: SessionOptions, token: str, function: str) -> float:
    start = time.perf_counter()
    session = await Session.open(target.url, run_path(function), token, options)
    try:
        payload = secrets.token_bytes(1024)
        assert await session.invoke(payload) == payload
    finally:
        await session.close()
    return time.perf_counter() - start


async def one_deploy(target: Target, options: SessionOptions, token: str, data: bytes) -> float:
    key = await fetch_key(target.url, token, options)
    start = time.perf_counter()
    await deploy(target.url, token, options, data, name=f"d{secrets.token_hex(3)}", key=key)
    return time.perf_counter() - start


async def storage_cost(
    embedded: Target, shared: Target, rounds: int, results: Results
) -> list[str]:
    targets = {"SQLite + directory": embedded, "PostgreSQL + S3": shared}
    setup = {name: await account(target) for name, target in targets.items()}
    options = {name: target.options() for name, target in targets.items()}
    runs: dict[str, list[float]] = {name: [] for name in targets}
    deploys: dict[str, list[float]] = {name: [] for name in targets}
    data = bundle(100 * 1024)
    for name, target in targets.items():  # warm: the first run reads the bundle
        await one_run(target, options[name], setup[name][0], setup[name][1].id)
    for _ in range(rounds):
        for name, target in targets.items():
            token, deployed = setup[name]
            runs[name].append(await one_run(target, options[name], token, deployed.id))
            deploys[name].append(await one_deploy(target, options[name], token, data))
    ms = {k: [s * 1000 for s in v] for k, v in runs.items()}
    dms = {k: [s * 1000 for s in v] for k, v in deploys.items()}
    ref, new = "SQLite + directory", "PostgreSQL + S3"
    ratio = statistics.median(ms[new]) / statistics.median(ms[ref])
    results.figure(
        "one node", "run p50, PostgreSQL + S3", statistics.median(ms[new]), "ms",
        reference=f"run p50, {ref}", reference_value=statistics.median(ms[ref]),
        higher_is_better=False, goal=f"<= {RUN_GOAL}x", goal_met=ratio <= RUN_GOAL,
    )  # fmt: skip
    results.figure(
        "one node", "deploy p50 (100 KiB), PostgreSQL + S3", statistics.median(dms[new]), "ms",
        reference=f"deploy p50, {ref}", reference_value=statistics.median(dms[ref]),
        higher_is_better=False,
    )  # fmt: skip
    lines = [f"one node, {rounds} alternating rounds      run p50  run p99  deploy p50 (ms)"]
    for name in targets:
        results.series.append(Series("one node", f"run, {name}", "ms", ms[name]))
        median = statistics.median(ms[name])
        lines.append(
            f"  {name:<34} {median:7.1f}  {p99(ms[name]):7.1f}  {statistics.median(dms[name]):9.1f}"
        )
    verdict = "met" if ratio <= RUN_GOAL else "NOT met"
    lines.append(f"  run p50 ratio {ratio:.2f}x (goal <= {RUN_GOAL}x: {verdict})")
    return lines


async def throughput(
    target: Target, clients: int, runs_each: int
) -> tuple[float, list[float], int]:
    token, deployed = await account(target)
    options = target.options()
    for _ in range(clients):  # warm every node's enclave for the function
        await one_run(target, options, token, deployed.id)
    samples: list[float] = []
    errors = 0

    async def client() -> None:
        nonlocal errors
        for _ in range(runs_each):
            try:
                samples.append(await one_run(target, options, token, deployed.id))
            except Exception:  # counted and shown
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
    return len(samples) / wall, [s * 1000 for s in samples], errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="few runs, 1 node (CI smoke run)")
    parser.add_argument("--json", type=Path, default=None, help="also write Results JSON here")
    args = parser.parse_args(argv)
    rounds, clients, runs_each = (3, 2, 2) if args.quick else (60, 16, 20)
    node_counts = (1,) if args.quick else (1, 3)
    results = Results(benchmark="cluster", quick=bool(args.quick))
    missing = [
        what
        for what, present in (
            ("root", os.geteuid() == 0),
            ("bubblewrap", shutil.which("bwrap") is not None),
            ("haproxy", shutil.which("haproxy") is not None),
            ("postgresql", any(Path("/usr/lib/postgresql").glob("*/bin/initdb"))),
        )
        if not present
    ]
    if missing:
        results.notes.append(f"skipped: needs {', '.join(missing)}")
        print(f"(skipped: needs {', '.join(missing)})", file=sys.stderr)
        results.write(args.json)
        return 0
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cape-cluster-bench-") as tmp:
        base = Path(tmp)
        base.chmod(0o711)  # PostgreSQL runs as its own user under it
        embedded = Embedded(base / "embedded")
        points: list[tuple[float, float]] = []
        lb_lines = [
            f"through HAProxy, {clients} clients x {runs_each} runs each",
            "  nodes   runs/s  p50 ms  p99 ms  errors",
        ]
        for nodes in node_counts:
            cluster = None
            try:
                cluster = LocalCluster(base / f"cluster{nodes}", nodes)
                if nodes == 1:  # its node, addressed directly, for the storage comparison
                    lines += asyncio.run(
                        storage_cost(embedded.target, cluster.node0, rounds, results)
                    )
                    embedded.stop()
                rate, ms, errors = asyncio.run(throughput(cluster.balancer, clients, runs_each))
            finally:
                embedded.stop()
                if cluster is not None:
                    cluster.down()
            median, tail = statistics.median(ms), p99(ms)
            points.append((nodes, rate))
            note = f"{clients} clients, p50 {median:.1f} ms, p99 {tail:.1f} ms, {errors} errors"
            results.figure("load balancer", f"runs/s, {nodes} node(s)", rate, "runs/s", note=note)
            results.series.append(Series("load balancer", f"run, {nodes} node(s)", "ms", ms))
            lb_lines.append(f"  {nodes:5d}   {rate:6.1f}  {median:6.1f}  {tail:6.1f}  {errors}")
        lines += lb_lines
        results.curves.append(Curve("load balancer", "runs/s by nodes", "nodes", "runs/s", points))
    results.notes.append(
        "one machine: nodes, enclaves, PostgreSQL, moto's S3 server, HAProxy and the clients "
        "share its cores"
    )
    print("\n".join(lines))
    results.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
