"""Enclave figures on real processes: session set-up, cold session to first result with and
without the warm pool, warm invoke latency, and key-service release latency.

Run: ``.venv/bin/python benchmarks/enclave_bench.py [--quick]`` (needs root and bubblewrap, as
simulated enclaves do).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import os
import secrets
import statistics
import sys
import tempfile
import time
import zipfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from cape.crypto import envelope, hpke
from cape.crypto.cms import open_for_recipient
from cape.crypto.keys import load_rsa_public_key, public_key_der
from cape.enclave.secure_module.simulated import SimulatedSecureModule
from cape.host.launcher import EnclaveConnection, HostSession, expect
from cape.kms.base import Recipient
from cape.platform.local import LocalPlatform
from cape.verify.policy import AttestationPolicy
from cape.verify.verifier import verify_attestation

OWNER = "bench"
ECHO = b"def cape_handler(data):\n    return data\n"


def zip_app(source: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("echo/app.py", source)
    return buffer.getvalue()


def summary(name: str, samples: list[float], unit: str = "ms") -> str:
    scale = 1000.0 if unit == "ms" else 1_000_000.0
    values = sorted(v * scale for v in samples)
    p50 = statistics.median(values)
    p99 = values[min(len(values) - 1, round(0.99 * (len(values) - 1)))]
    return f"{name:<66} p50 {p50:9.2f} {unit}   p99 {p99:9.2f} {unit}   (n={len(values)})"


class Bench:
    def __init__(self, platform: LocalPlatform) -> None:
        self.platform = platform
        self.root = platform.authority.root_certificate

    async def open(
        self, enclave: EnclaveConnection, kind: str, **kwargs: Any
    ) -> tuple[HostSession, bytes]:
        nonce = secrets.token_bytes(16)
        session = await enclave.open_session(kind, owner=OWNER, nonce=nonce, **kwargs)
        document = expect(await session.receive(), "attestation")["document"]
        doc = verify_attestation(
            document,
            root=self.root,
            now=dt.datetime.now(dt.UTC),
            policy=AttestationPolicy(nonce=nonce),
        )
        assert doc.public_key is not None
        return session, doc.public_key

    async def invoke(self, session: HostSession, public_key: bytes, data: bytes) -> bytes:
        await session.send({"t": "input", "data": hpke.seal(public_key, data)})
        return bytes(expect(await session.receive(), "result")["data"])

    async def deploy(self, enclave: EnclaveConnection) -> bytes:
        public = load_rsa_public_key(self.platform.kms.get_public_key(OWNER))
        session, _ = await self.open(enclave, "deploy")
        ciphertext = envelope.encrypt(zip_app(ECHO), public)
        await session.send({"t": "bundle", "data": ciphertext, "name": "echo", "public": False})
        expect(await session.receive(), "deployed")
        return ciphertext


async def timed(action: Callable[[], Awaitable[object]], repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        await action()
        samples.append(time.perf_counter() - start)
    return samples


async def one_enclave(bench: Bench, *, warm: bool, repeats: int) -> list[str]:
    lines = []
    enclave = await bench.platform.launcher(runtime_args=[] if warm else ["--no-warm-pool"]).start()
    try:
        if not warm:

            async def key_session() -> None:
                session, _ = await bench.open(enclave, "key")
                await session.close()

            lines.append(
                summary("session set-up: key (document + key)", await timed(key_session, repeats))
            )
        ciphertext = await bench.deploy(enclave)

        async def cold() -> None:
            session, public_key = await bench.open(enclave, "run", bundle=ciphertext)
            await bench.invoke(session, public_key, b"x")
            await session.close()

        await cold()  # first use: fills the warm pool when enabled
        await asyncio.sleep(0.2)
        samples = []
        for _ in range(repeats):
            samples.extend(await timed(cold, 1))
            await asyncio.sleep(0.1)  # let the pool refill its spare, as between real sessions
        label = "with warm pool" if warm else "without warm pool (KMS + unpack + start)"
        lines.append(summary(f"cold session to first result, {label}", samples))
        if warm:
            session, public_key = await bench.open(enclave, "run", bundle=ciphertext)
            payload = os.urandom(1024)
            warm_samples = await timed(
                lambda: bench.invoke(session, public_key, payload), repeats * 20
            )
            await session.close()
            lines.append(summary("warm invoke, 1 KiB echo (HPKE + sandbox)", warm_samples, "us"))
    finally:
        await enclave.close()
    return lines


async def enclave_figures(bench: Bench, repeats: int) -> list[str]:
    return [
        *await one_enclave(bench, warm=False, repeats=repeats),
        *await one_enclave(bench, warm=True, repeats=repeats),
    ]


def kms_figures(platform: LocalPlatform, repeats: int) -> list[str]:
    module = SimulatedSecureModule(
        platform.authority.issue_instance(dt.datetime.now(dt.UTC)), pcrs=None
    )
    recipient_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    spki = public_key_der(recipient_key)
    public = load_rsa_public_key(platform.kms.get_public_key(OWNER))
    blob = envelope.wrap_key(os.urandom(32), public)

    samples_release, samples_full = [], []
    for _ in range(repeats):
        document = module.attestation(public_key=spki, nonce=os.urandom(16))
        start = time.perf_counter()
        cms = platform.kms.decrypt(OWNER, blob, recipient=Recipient(attestation_document=document))
        samples_release.append(time.perf_counter() - start)
        start = time.perf_counter()
        document = module.attestation(public_key=spki, nonce=os.urandom(16))
        cms = platform.kms.decrypt(OWNER, blob, recipient=Recipient(attestation_document=document))
        open_for_recipient(cms, recipient_key)
        samples_full.append(time.perf_counter() - start)
    return [
        summary("key service decrypt (verify doc + RSA-4096 + CMS)", samples_release),
        summary("  + enclave side (fresh document, open CMS)", samples_full),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 30
    if os.geteuid() != 0:
        print("enclave benchmark skipped: simulated enclaves need root", file=sys.stderr)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        platform = LocalPlatform(Path(tmp), master_key=os.urandom(32))
        try:
            platform.kms.get_or_create_key(OWNER)
            lines = kms_figures(platform, repeats)
            lines += asyncio.run(enclave_figures(Bench(platform), repeats))
        finally:
            platform.close()
    print("enclave (simulated mode, real processes)")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
