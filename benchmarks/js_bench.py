"""The JavaScript SDK's figures (js/, built with ``npm run build``), from Node:

1. **encrypt throughput** for 1 KiB to 256 MiB (``--quick``: up to 1 MiB): the SDK's ``cape:``
   envelope (``seal``: RSA-OAEP-4096 wrap of a fresh key + AES-256-GCM) and its
   ``cape-stream-v1`` encryption (1 MiB chunks), beside WebCrypto's raw AES-256-GCM of the same
   bytes in the same run, alternating round by round (goal: ≥ 0.8x raw for inputs ≥ 16 MiB);
2. **warm invoke** latency from Node (one attested session, sealed results, 1 KiB and 64 KiB
   inputs after a warm-up) beside the Python SDK's against the same ``cape serve`` process
   and function, in the same run.

Run: ``.venv/bin/python benchmarks/js_bench.py [--quick] [--json PATH]`` (part 2 needs root
and bubblewrap, as simulated enclaves do; it is skipped with a note otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _results import Results, timed
from cape.sdk.flows import deploy, fetch_key, run_path
from cape.sdk.rest import RestClient
from cape.sdk.session import Session, SessionOptions
from cape.verify.roots import load_root_certificate_file
from server_bench import start_cape, zip_bundle

HERE = Path(__file__).resolve().parent
JS_DIST = HERE.parent / "js" / "dist" / "index.js"
SIZES = [1 << 10, 64 << 10, 1 << 20, 16 << 20, 256 << 20]
QUICK_SIZES = [1 << 10, 64 << 10, 1 << 20]
ECHO = b"def cape_handler(x):\n    return x\n"


def node(args: list[str], env: dict[str, str] | None = None) -> object:
    done = subprocess.run(
        ["node", str(HERE / "js_bench.mjs"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
        timeout=3600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"node failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def size_label(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


def encrypt_section(results: Results, quick: bool) -> None:
    rows = node(["encrypt", *map(str, QUICK_SIZES if quick else SIZES)])
    assert isinstance(rows, list)
    print(f"{'size':>8} {'raw AES-GCM':>14} {'cape: seal':>14} {'stream':>14}  ratio seal/stream")
    for row in rows:
        size = row["size"]
        mb = size / (1 << 20)
        raw, seal, stream = mb / row["raw"], mb / row["seal"], mb / row["stream"]
        print(
            f"{size_label(size):>8} {raw:>10.1f} MB/s {seal:>9.1f} MB/s {stream:>9.1f} MB/s"
            f"  {seal / raw:.2f}x / {stream / raw:.2f}x"
        )
        large = size >= 16 << 20
        for name, value in (("cape: seal", seal), ("cape-stream-v1", stream)):
            results.figure(
                "js encryption",
                f"{name} {size_label(size)}",
                value,
                "MiB/s",
                reference="WebCrypto AES-256-GCM",
                reference_value=raw,
                goal=">= 0.8x raw" if large else None,
                goal_met=(value >= 0.8 * raw) if large else None,
            )


async def python_invokes(
    url: str, token: str, options: SessionOptions, function: str, repeats: int
) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    session = await Session.open(url, run_path(function), token, options)
    try:
        for size in (1024, 65536):
            data = bytes([7]) * size
            for _ in range(5):
                await session.invoke(data)
            out[size] = await timed(functools.partial(session.invoke, data), repeats)
    finally:
        await session.close()
    return out


def invoke_section(results: Results, quick: bool) -> None:
    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        results.notes.append("warm invoke skipped: simulated enclaves need root and bubblewrap")
        print("warm invoke: skipped (needs root and bubblewrap)")
        return
    repeats = 10 if quick else 200
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        server = start_cape(base)
        try:
            ca = base / "data" / "tls" / "ca.pem"
            root_pem = base / "data" / "attestation" / "root.pem"
            context = ssl.create_default_context(cafile=str(ca))
            with RestClient(server.url, context) as rest:
                token = rest.signup("jsbench", "correct horse battery")["access_token"]
            options = SessionOptions(root=load_root_certificate_file(root_pem), ssl_context=context)

            async def setup() -> str:
                key = await fetch_key(server.url, token, options)
                bundle = zip_bundle({"app.py": ECHO})
                return (await deploy(server.url, token, options, bundle, name="echo", key=key)).id

            function = asyncio.run(setup())
            python = asyncio.run(python_invokes(server.url, token, options, function, repeats))
            env = {
                "NODE_EXTRA_CA_CERTS": str(ca),
                "CAPE_URL": server.url,
                "CAPE_TOKEN": token,
                "CAPE_ROOT_PEM_FILE": str(root_pem),
                "CAPE_FUNCTION_ID": function,
                "CAPE_REPEATS": str(repeats),
            }
            js = node(["invoke"], env)
            assert isinstance(js, dict)
        finally:
            server.stop()
    for size in (1024, 65536):
        node_samples = [s * 1000 for s in js[str(size)]]
        py_samples = [s * 1000 for s in python[size]]
        for stat, pick in (("p50", statistics.median), ("p99", _p99)):
            value, reference = pick(node_samples), pick(py_samples)
            label = f"warm invoke {size_label(size)} {stat}"
            print(f"{label}: node {value:.2f} ms, python {reference:.2f} ms")
            results.figure(
                "js invoke",
                f"Node warm invoke {size_label(size)} {stat}",
                value,
                "ms",
                reference="Python SDK",
                reference_value=reference,
                higher_is_better=False,
            )


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes and counts")
    parser.add_argument("--json", type=Path, help="write the results here")
    options = parser.parse_args(argv)
    results = Results("js", options.quick)
    if shutil.which("node") is None or not JS_DIST.is_file():
        print(
            "Error: needs Node.js and the built SDK (cd js && npm ci && npm run build)",
            file=sys.stderr,
        )
        return 1
    encrypt_section(results, options.quick)
    invoke_section(results, options.quick)
    results.write(options.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
