"""Enclave figures on real processes: key-service release latency, session set-up, cold session
to first result with and without the warm pool (echo and the ONNX example), warm invoke latency.

Run: ``.venv/bin/python benchmarks/enclave_bench.py [--quick] [--onnx] [--json PATH]`` (needs
root and bubblewrap, as simulated enclaves do; without them it prints why and exits 0).

Every figure stands beside a reference measured in the same run:

- *key service*: release latency (``decrypt``: verify the document, RSA-4096 unwrap, CMS for the
  enclave) against the RSA-4096 OAEP unwrap alone (its note gives verification and CMS sealing
  alone); the enclave side (fresh document, release, open the CMS) against the release.
- *session set-up*: open a session on the enclave channel → attestation document received and
  verified (the host-to-enclave part of "connect"; ``server_bench.py`` adds TLS and the
  websocket), for a key session and for a run session of echo with and without the warm pool,
  against producing one document alone (in this process).
- *cold start*: open a run session → first result of one call, with the warm pool (a sandbox
  pre-started per function, see ``cape.enclave.warm``: our "template process") against without
  it (key-service unwrap + unpack + sandbox start per session), for echo and for
  ``examples/image-classification`` (onnxruntime + numpy vendored, 256-byte input, JSON
  output); pool-less echo against its sandbox started and called in this process; and echo
  padded to the ONNX bundle's size against echo (runs name the stored ciphertext by SHA-256,
  as the server sends them, so a warm session carries no bundle whatever its size). The ONNX
  bundle (~41 MB) is built with pip from ``.wheelhouse`` only (``bash scripts/setup.sh test``
  fills it; about 6 s, outside every figure); without onnxruntime there its figures are
  skipped. ``--quick`` skips them too unless ``--onnx`` is given.
- *invoke*: a warm 1 KiB echo through channel, HPKE and sandbox against a bare call round trip
  on a sandbox started in this process; a warm ONNX call against that echo.

``--json PATH`` also writes the figures and the raw samples (``benchmarks/_results.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import secrets
import shutil
import statistics
import struct
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from _results import Results, Series, timed
from cape.crypto import envelope, hpke
from cape.crypto.cms import open_for_recipient, seal_for_recipient
from cape.crypto.keyanswers import IDENTITY_PCR, identity_measurement
from cape.crypto.keys import generate_cape_key, load_rsa_public_key, public_key_der
from cape.enclave.measure import measure_runtime, simulated_pcrs
from cape.enclave.sandbox import FunctionSandbox
from cape.enclave.secure_module.simulated import SimulatedSecureModule
from cape.errors import CapeError
from cape.host.launcher import EnclaveConnection, HostSession, expect
from cape.kms.base import Recipient
from cape.platform.local import LocalPlatform
from cape.verify.policy import AttestationPolicy
from cape.verify.verifier import VerificationCache, verify_attestation

OWNER = "bench"
SETUP_GOAL = 1.3
"""Issue 16: session set-up ≤ 1.3x producing + verifying the document alone."""
RELEASE_GOAL = 1.5
"""Issue 16: a data-key release ≤ 1.5x the RSA-4096 OAEP unwrap alone."""
ECHO = b"def cape_handler(data):\n    return data\n"
REPO = Path(__file__).resolve().parent.parent
ONNX_EXAMPLE = REPO / "examples" / "image-classification"
WHEELHOUSE = REPO / ".wheelhouse"
#: The ONNX example's input: an 8x8 "digit", 64 little-endian float32 values from 0 to 16.
ONNX_INPUT = struct.pack("<64f", *(float((i * 7) % 17) for i in range(64)))
COLD_GOAL_MS = 50.0

MS = 1000.0


def zip_app(source: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("echo/app.py", source)
    return buffer.getvalue()


def padded_zip(source: bytes, size: int) -> bytes:
    """``source`` as app.py beside incompressible padding: a zip of about ``size`` bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("app.py", source)
        archive.writestr("padding.bin", os.urandom(max(0, size - 200)))
    return buffer.getvalue()


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def summary(name: str, samples: list[float], unit: str = "ms") -> str:
    scale = 1.0 if unit == "ms" else 1000.0  # samples are in ms
    values = [v * scale for v in samples]
    return (
        f"{name:<70} p50 {p50(values):9.2f} {unit}   p99 {p99(values):9.2f} {unit}"
        f"   (n={len(values)})"
    )


@dataclass
class Samples:
    """Every latency of the run, in milliseconds, by name."""

    by_name: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.by_name.setdefault(name, []).append(seconds * MS)

    def extend(self, name: str, seconds: list[float]) -> None:
        for value in seconds:
            self.add(name, value)

    def get(self, name: str) -> list[float]:
        return self.by_name.get(name, [])


@dataclass(frozen=True)
class App:
    """A deployed function: its stored ciphertext and the input of a call."""

    name: str
    ciphertext: bytes
    payload: bytes
    check: Callable[[bytes], None]


class Bench:
    def __init__(self, platform: LocalPlatform) -> None:
        self.platform = platform
        self.verified = VerificationCache()
        self.root = platform.authority.root_certificate
        self._digests: dict[bytes, bytes] = {}

    async def open(
        self, enclave: EnclaveConnection, kind: str, *, bundle: bytes | None = None
    ) -> tuple[HostSession, bytes]:
        """Open a session and verify its attestation document (the session set-up).

        Runs go as the server sends them: the stored ciphertext named by its SHA-256 (known
        to the server after a function's first run), the bytes only if the enclave asks.
        """
        nonce = secrets.token_bytes(16)
        digest = None
        if bundle is not None:
            digest = self._digests.get(bundle) or hashlib.sha256(bundle).digest()
            self._digests[bundle] = digest  # the server too keeps each blob's digest
        session = await enclave.open_session(kind, owner=OWNER, nonce=nonce, bundle_sha256=digest)
        frame = await session.receive()
        if frame["t"] == "need_bundle":
            await session.send({"t": "bundle", "data": bundle})
            frame = await session.receive()
        document = expect(frame, "attestation")["document"]
        doc = verify_attestation(
            document,
            root=self.root,
            now=dt.datetime.now(dt.UTC),
            policy=AttestationPolicy(nonce=nonce),
            cache=self.verified,  # as the SDK does: the enclave's chain is verified once
        )
        assert doc.public_key is not None
        return session, doc.public_key

    async def invoke(self, session: HostSession, public_key: bytes, data: bytes) -> bytes:
        await session.send({"t": "input", "data": hpke.seal(public_key, data)})
        return bytes(expect(await session.receive(), "result")["data"])

    async def deploy(self, enclave: EnclaveConnection, name: str, zipped: bytes) -> bytes:
        public = load_rsa_public_key(self.platform.kms.get_public_key(OWNER))
        session, _ = await self.open(enclave, "deploy")
        ciphertext = envelope.encrypt(zipped, public)
        await session.send({"t": "bundle", "data": ciphertext, "name": name, "public": False})
        expect(await session.receive(), "deployed")
        await session.close()
        return ciphertext

    async def cold(self, enclave: EnclaveConnection, app: App) -> tuple[float, float]:
        """One run session: (open → verified document, open → first result), in seconds."""
        start = time.perf_counter()
        session, public_key = await self.open(enclave, "run", bundle=app.ciphertext)
        ready = time.perf_counter()
        output = await self.invoke(session, public_key, app.payload)
        done = time.perf_counter()
        app.check(output)
        await session.close()
        return ready - start, done - start


def check_echo(payload: bytes) -> Callable[[bytes], None]:
    def check(output: bytes) -> None:
        if output != payload:
            raise RuntimeError("echo returned something else")

    return check


def check_onnx(output: bytes) -> None:
    top = json.loads(output)["top3"]
    if len(top) != 3:
        raise RuntimeError(f"unexpected ONNX output {output[:200]!r}")


async def cold_series(
    bench: Bench,
    enclave: EnclaveConnection,
    app: App,
    *,
    warm: bool,
    repeats: int,
    gap: float,
    samples: Samples,
) -> None:
    """Cold sessions of ``app``; with the pool, the first (which fills it) is not counted."""
    pool = "warm pool" if warm else "no warm pool"
    if warm:
        await bench.cold(enclave, app)
        await asyncio.sleep(gap)
    for _ in range(repeats):
        setup, total = await bench.cold(enclave, app)
        samples.add(f"{app.name} set-up, {pool}", setup)
        samples.add(f"{app.name} cold start, {pool}", total)
        # Between sessions, as between real ones: lets the pool start its next spare.
        await asyncio.sleep(gap)


async def one_enclave(
    bench: Bench,
    apps: dict[str, bytes],
    *,
    warm: bool,
    repeats: int,
    onnx_repeats: int,
    samples: Samples,
) -> None:
    enclave = await bench.platform.launcher(runtime_args=[] if warm else ["--no-warm-pool"]).start()
    try:
        if not warm:

            async def key_session() -> None:
                session, _ = await bench.open(enclave, "key")
                await session.close()

            samples.extend("key session set-up", await timed(key_session, repeats))
        payload = os.urandom(1024)
        echo = App(
            "echo", await bench.deploy(enclave, "echo", apps["echo"]), b"x", check_echo(b"x")
        )
        await cold_series(
            bench, enclave, echo, warm=warm, repeats=repeats, gap=0.15, samples=samples
        )
        if warm:
            session, public_key = await bench.open(enclave, "run", bundle=echo.ciphertext)
            samples.extend(
                "warm invoke, 1 KiB echo",
                await timed(lambda: bench.invoke(session, public_key, payload), repeats * 20),
            )
            await session.close()
        if "onnx" in apps:
            onnx = App(
                "onnx", await bench.deploy(enclave, "onnx", apps["onnx"]), ONNX_INPUT, check_onnx
            )
            # With the pool, wait for the spare (copy + sandbox start + import onnxruntime)
            # between sessions: a little over one pool-less cold start, measured first.
            no_pool = samples.get("onnx cold start, no warm pool")
            gap = min(5.0, 0.3 + 1.3 * p50(no_pool) / MS) if warm and no_pool else 0.1
            await cold_series(
                bench, enclave, onnx, warm=warm, repeats=onnx_repeats, gap=gap, samples=samples
            )
            if warm:
                session, public_key = await bench.open(enclave, "run", bundle=onnx.ciphertext)
                samples.extend(
                    "warm invoke, ONNX (256 B in, JSON out)",
                    await timed(lambda: bench.invoke(session, public_key, ONNX_INPUT), repeats * 5),
                )
                await session.close()
        if warm and "echo-padded" in apps:
            # Echo in a bundle as large as the ONNX one: with runs named by hash, a warm
            # session no longer carries the bundle, so this should cost about what echo does.
            padded = App(
                "echo-padded",
                await bench.deploy(enclave, "echo-padded", apps["echo-padded"]),
                b"x",
                check_echo(b"x"),
            )
            await cold_series(
                bench, enclave, padded, warm=True, repeats=onnx_repeats, gap=0.6, samples=samples
            )
    finally:
        await enclave.close()


def platform_runtime_module(platform: LocalPlatform) -> SimulatedSecureModule:
    """A secure module reporting what the platform's own runtime reports: its signed image's
    PCR8 (what new keys' signer policy allows) and, as the runtime measures it, trust in the
    platform's key service (PCR16)."""
    credentials = platform.authority.issue_instance(dt.datetime.now(dt.UTC))
    pcrs = simulated_pcrs(
        measure_runtime(),
        instance_id=credentials.instance_id,
        image_signature=platform.image_signature,
    )
    module = SimulatedSecureModule(credentials, pcrs=pcrs)
    module.extend_pcr(IDENTITY_PCR, identity_measurement(platform.identity.public_bytes))
    module.lock_pcr(IDENTITY_PCR)
    return module


def kms_samples(platform: LocalPlatform, repeats: int, samples: Samples) -> None:
    module = platform_runtime_module(platform)
    recipient_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    spki = public_key_der(recipient_key)
    public = load_rsa_public_key(platform.kms.get_public_key(OWNER))
    blob = envelope.wrap_key(os.urandom(32), public)
    # The reference: the same RSA-4096 OAEP unwrap on a key of the same kind, nothing else.
    alone_key = generate_cape_key()
    alone_blob = envelope.wrap_key(os.urandom(32), alone_key.public_key())
    envelope.unwrap_key(alone_blob, alone_key)  # first use (blinding set-up) not counted

    for _ in range(repeats):
        start = time.perf_counter()
        envelope.unwrap_key(alone_blob, alone_key)
        samples.add("RSA-4096 unwrap alone", time.perf_counter() - start)
        start = time.perf_counter()
        seal_for_recipient(os.urandom(32), spki)
        samples.add("CMS sealing alone", time.perf_counter() - start)
        document = module.attestation(public_key=spki, nonce=os.urandom(16))
        start = time.perf_counter()
        cms = platform.kms.decrypt(OWNER, blob, recipient=Recipient(attestation_document=document))
        samples.add("key release", time.perf_counter() - start)
        # The same document again: what each further release of one session document costs.
        start = time.perf_counter()
        platform.kms.decrypt(OWNER, blob, recipient=Recipient(attestation_document=document))
        samples.add("key release, document already verified", time.perf_counter() - start)
        start = time.perf_counter()
        document = module.attestation(public_key=spki, nonce=os.urandom(16))
        cms = platform.kms.decrypt(OWNER, blob, recipient=Recipient(attestation_document=document))
        open_for_recipient(cms, recipient_key)
        samples.add("key release, enclave side", time.perf_counter() - start)


def document_samples(platform: LocalPlatform, repeats: int, samples: Samples) -> None:
    """Producing one run-session document alone, and verifying it alone (in this process)."""
    module = platform_runtime_module(platform)
    root = platform.authority.root_certificate
    user_data = json.dumps({"func_checksum": "x" * 43}).encode()
    for _ in range(repeats):
        nonce = os.urandom(16)
        start = time.perf_counter()
        document = module.attestation(
            nonce=nonce, public_key=hpke.generate_keypair().public_bytes, user_data=user_data
        )
        samples.add("document generation alone", time.perf_counter() - start)
        start = time.perf_counter()
        verify_attestation(
            document, root=root, now=dt.datetime.now(dt.UTC), policy=AttestationPolicy(nonce=nonce)
        )
        samples.add("document verification alone", time.perf_counter() - start)


def sandbox_samples(repeats: int, samples: Samples) -> None:
    """References without the enclave: echo's sandbox started and called in this process."""
    root = Path(tempfile.mkdtemp(prefix="cape-enclave-bench-"))
    try:
        root.chmod(0o711)
        function = root / "echo"
        function.mkdir(mode=0o711)
        function.chmod(0o711)
        (function / "app.py").write_bytes(ECHO)
        for _ in range(repeats):
            start = time.perf_counter()
            with FunctionSandbox.start(function) as box:
                box.call(b"x")
            samples.add("sandbox start + first call alone", time.perf_counter() - start)
        payload = os.urandom(1024)
        with FunctionSandbox.start(function) as box:
            box.call(payload)
            for _ in range(repeats * 20):
                start = time.perf_counter()
                box.call(payload)
                samples.add("sandbox call alone, 1 KiB", time.perf_counter() - start)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def wheelhouse_only() -> Iterator[None]:
    """pip installs from the local wheelhouse only, for the duration."""
    saved = {name: os.environ.get(name) for name in ("PIP_NO_INDEX", "PIP_FIND_LINKS")}
    os.environ["PIP_NO_INDEX"] = "1"
    os.environ["PIP_FIND_LINKS"] = str(WHEELHOUSE)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def build_onnx(notes: list[str]) -> bytes | None:
    """The image-classification bundle (vendored, from the wheelhouse), or None with a note."""
    from cape.sdk.bundle import RuntimeTarget, build_bundle

    missing = [w for w in ("onnxruntime", "numpy") if not any(WHEELHOUSE.glob(f"{w}-*.whl"))]
    if missing:
        notes.append(
            f"ONNX figures skipped: no {' or '.join(missing)} wheel in .wheelhouse "
            "(bash scripts/setup.sh test fills it)"
        )
        return None
    with tempfile.TemporaryDirectory(prefix="cape-bench-vendor-") as cache, wheelhouse_only():
        start = time.perf_counter()
        try:
            bundle = build_bundle(
                ONNX_EXAMPLE, vendor=True, target=RuntimeTarget.local(), cache_dir=Path(cache)
            )
        except CapeError as exc:
            notes.append(f"ONNX figures skipped: the bundle did not build ({exc})")
            return None
        elapsed = time.perf_counter() - start
    notes.append(
        f"ONNX bundle: {len(bundle.data) / 1e6:.1f} MB, {bundle.files} files "
        f"({', '.join(bundle.vendored)}), built in {elapsed:.1f} s (not part of any figure); "
        "run sessions name the stored ciphertext by SHA-256, as the server does; the bytes travel "
        "only to an enclave that does not hold the function"
    )
    return bundle.data


def figures(results: Results, samples: Samples) -> None:
    """Fill ``results.figures`` from the samples (p50 against p50; absent samples: no figure)."""
    s = samples.get

    def figure(
        group: str, name: str, key: str, reference: str, ref_key: str, **kwargs: Any
    ) -> None:
        if not s(key) or not s(ref_key):
            return
        results.figure(
            group,
            name,
            p50(s(key)),
            "ms",
            reference=reference,
            reference_value=p50(s(ref_key)),
            higher_is_better=False,
            **kwargs,
        )

    # key service
    figure(
        "key service",
        "data-key release latency, p50 (the enclave's document reused: policy checks + "
        "RSA-4096 unwrap + CMS)",
        "key release, document already verified",
        "RSA-4096 OAEP unwrap alone, p50",
        "RSA-4096 unwrap alone",
        note="an enclave sends one document for 30 s of releases; the key service caches its "
        "verification while its certificates are valid and checks age, PCRs and debug mode on "
        "every request",
        goal=f"<= {RELEASE_GOAL:g}x the unwrap alone",
        goal_met=bool(s("key release, document already verified") and s("RSA-4096 unwrap alone"))
        and p50(s("key release, document already verified"))
        <= RELEASE_GOAL * p50(s("RSA-4096 unwrap alone")),
    )
    figure(
        "key service",
        "data-key release latency, p50 (a fresh document: its signature + RSA-4096 unwrap + CMS)",
        "key release",
        "RSA-4096 OAEP unwrap alone, p50",
        "RSA-4096 unwrap alone",
        note=(
            "the first release of each 30 s; the enclave's chain is verified once and cached; "
            "full verification alone (uncached) "
            f"≈ {p50(s('document verification alone')):.2f} ms, "
            f"CMS sealing for the enclave ≈ {p50(s('CMS sealing alone')):.2f} ms"
        )
        if s("document verification alone") and s("CMS sealing alone")
        else None,
    )
    figure(
        "key service",
        "data-key release, enclave side, p50 (fresh document + release + open CMS)",
        "key release, enclave side",
        "release alone, p50",
        "key release",
    )
    # session set-up
    ref = ("document generation alone, p50 (in this process)", "document generation alone")
    figure(
        "session set-up",
        "echo run session, warm pool: open → verified document, p50",
        "echo set-up, warm pool",
        *ref,
        note=f"of which verification alone ≈ {p50(s('document verification alone')):.2f} ms"
        if s("document verification alone")
        else None,
    )
    generation, verification = s("document generation alone"), s("document verification alone")
    if s("echo set-up, warm pool") and generation and verification:
        alone = p50(generation) + p50(verification)
        value = p50(s("echo set-up, warm pool"))
        results.figure(
            "session set-up",
            "echo run session, warm pool: open → verified document, p50 (against the sum)",
            value,
            "ms",
            reference="document generation + verification alone, sum of p50s (this process)",
            reference_value=alone,
            higher_is_better=False,
            goal=f"<= {SETUP_GOAL:g}x generation + verification",
            goal_met=value <= SETUP_GOAL * alone,
        )
    figure(
        "session set-up",
        "echo run session, no warm pool: open → verified document, p50",
        "echo set-up, no warm pool",
        *ref,
        note="includes the key-service unwrap, unpacking and the sandbox start",
    )
    figure(
        "session set-up",
        "key session: open → verified document + key, p50",
        "key session set-up",
        *ref,
    )
    # cold start
    figure(
        "cold start",
        "echo: cold session → first result, warm pool, p50",
        "echo cold start, warm pool",
        "same without the warm pool, p50",
        "echo cold start, no warm pool",
        goal=f"≤ {COLD_GOAL_MS:g} ms with the template (warm pool)",
        goal_met=bool(s("echo cold start, warm pool"))
        and p50(s("echo cold start, warm pool")) <= COLD_GOAL_MS,
    )
    figure(
        "cold start",
        "echo: cold session → first result, no warm pool, p50",
        "echo cold start, no warm pool",
        "sandbox start + first call alone, p50 (in this process)",
        "sandbox start + first call alone",
    )
    figure(
        "cold start",
        "ONNX example: cold session → first result, warm pool, p50",
        "onnx cold start, warm pool",
        "same without the warm pool, p50",
        "onnx cold start, no warm pool",
    )
    figure(
        "cold start",
        "echo padded to the ONNX bundle's size: cold session → first result, warm pool, p50",
        "echo-padded cold start, warm pool",
        "echo, warm pool, p50",
        "echo cold start, warm pool",
        note="runs name the bundle by hash: a warm session carries no bundle",
    )
    figure(
        "cold start",
        "ONNX example: cold session → first result, no warm pool, p50",
        "onnx cold start, no warm pool",
        "echo without the warm pool, p50",
        "echo cold start, no warm pool",
    )
    # invoke
    figure(
        "invoke",
        "warm invoke, 1 KiB echo (channel + HPKE + sandbox), p50",
        "warm invoke, 1 KiB echo",
        "bare sandbox call round trip, 1 KiB, p50",
        "sandbox call alone, 1 KiB",
    )
    figure(
        "invoke",
        "warm invoke, ONNX example (256 B in, JSON out), p50",
        "warm invoke, ONNX (256 B in, JSON out)",
        "warm invoke, 1 KiB echo, p50",
        "warm invoke, 1 KiB echo",
    )


SERIES = {
    "key service": [
        "key release",
        "key release, document already verified",
        "key release, enclave side",
        "RSA-4096 unwrap alone",
        "CMS sealing alone",
    ],
    "session set-up": [
        "echo set-up, warm pool",
        "echo set-up, no warm pool",
        "onnx set-up, warm pool",
        "onnx set-up, no warm pool",
        "echo-padded set-up, warm pool",
        "key session set-up",
        "document generation alone",
        "document verification alone",
    ],
    "cold start": [
        "echo cold start, warm pool",
        "echo cold start, no warm pool",
        "onnx cold start, warm pool",
        "onnx cold start, no warm pool",
        "echo-padded cold start, warm pool",
        "sandbox start + first call alone",
    ],
    "invoke": [
        "warm invoke, 1 KiB echo",
        "sandbox call alone, 1 KiB",
        "warm invoke, ONNX (256 B in, JSON out)",
    ],
}


def report(results: Results, samples: Samples) -> None:
    """Series and figures into ``results``, and the human table."""
    figures(results, samples)
    print("enclave (simulated mode, real processes)")
    for group, names in SERIES.items():
        print(f"\n{group}")
        for name in names:
            if samples.get(name):
                unit = "us" if group == "invoke" else "ms"
                print("  " + summary(name, samples.get(name), unit))
                results.series.append(Series(group, name, "ms", samples.get(name)))
        for f in results.figures:
            if f.group != group or f.ratio is None:
                continue
            print(f"  -> {f.name}: {f.value:.2f} ms = {f.ratio:.2f}x {f.reference}")
            if f.goal is not None:
                print(f"     goal {f.goal}: {'met' if f.goal_met else 'NOT met'}")
    for note in results.notes:
        print(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="few repeats, no ONNX figures")
    parser.add_argument("--onnx", action="store_true", help="ONNX figures even with --quick")
    parser.add_argument("--json", type=Path, help="also write the results (_results.Results)")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 30
    onnx_repeats = 2 if args.quick else 10
    results = Results("enclave", quick=args.quick)
    if os.geteuid() != 0:
        print("enclave benchmark skipped: simulated enclaves need root", file=sys.stderr)
        results.notes.append("skipped: simulated enclaves need root")
        results.write(args.json)
        return 0
    began = time.perf_counter()
    samples = Samples()
    apps = {"echo": zip_app(ECHO)}
    if args.quick and not args.onnx:
        results.notes.append("quick run: ONNX figures skipped (a full run or --onnx has them)")
    else:
        onnx = build_onnx(results.notes)
        if onnx is not None:
            apps["onnx"] = onnx
            apps["echo-padded"] = padded_zip(ECHO, len(onnx))
    with tempfile.TemporaryDirectory() as tmp:
        platform = LocalPlatform(Path(tmp), master_key=os.urandom(32))
        try:
            platform.kms.get_or_create_key(OWNER)
            kms_samples(platform, repeats, samples)
            document_samples(platform, repeats, samples)
            sandbox_samples(repeats, samples)
            bench = Bench(platform)
            for warm in (False, True):
                asyncio.run(
                    one_enclave(
                        bench,
                        apps,
                        warm=warm,
                        repeats=repeats,
                        onnx_repeats=onnx_repeats,
                        samples=samples,
                    )
                )
        finally:
            platform.close()
    report(results, samples)
    print(f"  ({time.perf_counter() - began:.1f} s)")
    results.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
