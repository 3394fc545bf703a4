"""Attestation figures: ms per document to verify (real AWS samples and simulated documents)
and to produce a simulated document, each beside a reference measured in the same run.

Run: ``.venv/bin/python benchmarks/attestation_bench.py [--quick] [--json PATH]``. Real samples
are read from ``../shared/nitro-samples`` (or ``CAPE_NITRO_SAMPLES``) and skipped when absent.

Every call is timed on its own (``time.perf_counter``), after one warm-up call; a figure is the
median (p50) of its samples, and p99 is printed beside it. A figure and its reference are timed
alternately, call by call, so load elsewhere on the machine hits both alike. References:

- verification (``cape.verify.verify_attestation``): the signature checks no verifier can skip,
  done directly with ``cryptography`` on pre-parsed objects: the COSE ES384 signature with the
  leaf's key plus each certificate's ECDSA P-384 signature by its issuer, up to the pinned root.
  The ratio is what parsing, path building (``cryptography.x509.verification``), the validity
  windows, extension policy and claim checks add on top;
- parsing alone (``parse_attestation``): full verification of the same document, so the ratio
  is parsing's share;
- producing a simulated document: one ECDSA P-384 signature over a ``Sig_structure`` of the
  same size, so the ratio is what CBOR encoding and the request/response framing add.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from _results import Results, Series
from cape.enclave.secure_module.simulated import SimulatedAuthority, SimulatedSecureModule
from cape.formats.attestation import decode_document_bytes, parse_attestation
from cape.verify.policy import AttestationPolicy
from cape.verify.roots import load_root_certificate_file
from cape.verify.verifier import verify_attestation

SAMPLES_DIR = Path(
    os.environ.get(
        "CAPE_NITRO_SAMPLES", Path(__file__).resolve().parents[1].parent / "shared/nitro-samples"
    )
)
# (file, check time inside the leaf's window, debug) — see shared/nitro-samples/README.md.
SAMPLES = (
    ("blocky-nitrite_prod_us-east-1_2024-09-07.cose.b64", "2024-09-07T15:00:00+00:00", False),
    ("blocky-nitrite_debug_us-east-1_2024-09-07.cose.b64", "2024-09-07T15:00:00+00:00", True),
    ("anjuna_prod_rsa-pubkey_us-east-2_2021-03-24.cose.bin", "2021-03-24T16:30:00+00:00", False),
)
GROUP = "attestation"
VERIFY_NOTE = (
    "cape.verify.verify_attestation (parse, COSE signature, X.509 path building to the pinned "
    "root, validity windows, claims); reference: the {k} ECDSA P-384 signature checks "
    "(COSE + each certificate by its issuer) alone, with cryptography on pre-parsed objects"
)


@dataclass(frozen=True)
class Row:
    """One printed and recorded figure: per-call samples beside its reference's."""

    name: str
    samples: list[float]
    reference: str
    reference_short: str
    reference_samples: list[float]
    note: str

    @property
    def p50(self) -> float:
        return statistics.median(self.samples)

    @property
    def p99(self) -> float:
        return Series(GROUP, self.name, "ms", self.samples).p99

    @property
    def reference_p50(self) -> float:
        return statistics.median(self.reference_samples)


def sample_ms(
    action: Callable[[], object], reference: Callable[[], object], n: int
) -> tuple[list[float], list[float]]:
    """``n`` per-call times (ms) of ``action`` and of ``reference``, called alternately."""
    action()
    reference()
    samples: list[float] = []
    reference_samples: list[float] = []
    for _ in range(n):
        for fn, out in ((action, samples), (reference, reference_samples)):
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1000)
    return samples, reference_samples


def signature_checks(raw: bytes, root: x509.Certificate) -> tuple[Callable[[], None], int]:
    """The bare signature checks of one document, pre-parsed, and how many there are.

    COSE ES384 with the leaf's key, then the leaf and each ``cabundle`` certificate (root
    first, so walked backwards) against its issuer, ending at the pinned ``root``.
    """
    signed = parse_attestation(raw)
    leaf = x509.load_der_x509_certificate(signed.document.certificate)
    bundle = [x509.load_der_x509_certificate(der) for der in signed.document.cabundle]
    if bundle and bundle[0] == root:
        bundle = bundle[1:]  # the pinned root is the trust anchor: nothing to check above it
    issuers = [root, *bundle]
    pairs = list(zip([*bundle, leaf], issuers, strict=True))
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise TypeError("document certificate does not hold an EC key")
    half = len(signed.cose.signature) // 2
    signature = encode_dss_signature(
        int.from_bytes(signed.cose.signature[:half], "big"),
        int.from_bytes(signed.cose.signature[half:], "big"),
    )
    to_be_signed = signed.cose.to_be_signed()
    algorithm = ec.ECDSA(hashes.SHA384())

    def check() -> None:
        key.verify(signature, to_be_signed, algorithm)
        for child, issuer in pairs:
            child.verify_directly_issued_by(issuer)

    check()  # raises if the reference would not be doing the same work as the verifier
    return check, 1 + len(pairs)


def real_rows(n: int) -> list[Row]:
    """Verification and parsing of each real AWS Nitro sample."""
    root_pem = SAMPLES_DIR / "AWS_NitroEnclaves_Root-G1.pem"
    if not root_pem.is_file():
        return []
    root = load_root_certificate_file(root_pem)
    rows: list[Row] = []
    for name, when, debug in SAMPLES:
        raw = decode_document_bytes((SAMPLES_DIR / name).read_bytes())
        verify = functools.partial(
            verify_attestation,
            raw,
            root=root,
            now=dt.datetime.fromisoformat(when),
            policy=AttestationPolicy(max_age=None, allow_debug=debug),
        )
        floor, k = signature_checks(raw, root)
        label = " ".join(name.split("_")[:2])
        verify_ms, floor_ms = sample_ms(verify, floor, n)
        rows.append(
            Row(
                f"verify {label} (real Nitro)",
                verify_ms,
                f"signature checks alone ({k} x ECDSA P-384, cryptography)",
                f"{k} sig checks",
                floor_ms,
                f"{len(raw)}-byte document; " + VERIFY_NOTE.format(k=k),
            )
        )
        parse_ms, verify_again_ms = sample_ms(functools.partial(parse_attestation, raw), verify, n)
        rows.append(
            Row(
                f"parse {label} (real Nitro)",
                parse_ms,
                "full verification of the same document",
                "verify",
                verify_again_ms,
                "parse_attestation (COSE_Sign1 + payload rules) alone; ratio = parsing's share "
                "of verification",
            )
        )
    return rows


def simulated_rows(n: int) -> list[Row]:
    """Producing a simulated document, and verifying one live."""
    authority = SimulatedAuthority.generate()
    module = SimulatedSecureModule(authority.issue_instance(dt.datetime.now(dt.UTC)))
    nonce, public_key = secrets.token_bytes(16), secrets.token_bytes(32)
    document = module.attestation(nonce=nonce, public_key=public_key, user_data=b"{}")
    sign_key = ec.generate_private_key(ec.SECP384R1())
    to_be_signed = parse_attestation(document).cose.to_be_signed()
    produce_ms, sign_ms = sample_ms(
        lambda: module.attestation(nonce=nonce, public_key=public_key, user_data=b"{}"),
        lambda: sign_key.sign(to_be_signed, ec.ECDSA(hashes.SHA384())),
        n,
    )
    root = authority.root_certificate
    policy = AttestationPolicy(nonce=nonce)
    floor, k = signature_checks(document, root)
    verify_ms, floor_ms = sample_ms(
        lambda: verify_attestation(document, root=root, now=dt.datetime.now(dt.UTC), policy=policy),
        floor,
        n,
    )
    return [
        Row(
            "produce simulated document",
            produce_ms,
            f"one ECDSA P-384 signature over a {len(to_be_signed)}-byte Sig_structure",
            "1 signature",
            sign_ms,
            "SimulatedSecureModule.attestation (NSM request/response, CBOR payload, COSE "
            "ES384 signature with the cached leaf key); reference: the signature alone",
        ),
        Row(
            "verify simulated document (live)",
            verify_ms,
            f"signature checks alone ({k} x ECDSA P-384, cryptography)",
            f"{k} sig checks",
            floor_ms,
            f"{len(document)}-byte document; " + VERIFY_NOTE.format(k=k),
        ),
    ]


def record(rows: list[Row], results: Results) -> None:
    """One figure per row (p50 against the reference's p50); samples of documents as series."""
    for row in rows:
        results.figure(
            GROUP,
            row.name,
            row.p50,
            "ms",
            reference=row.reference,
            reference_value=row.reference_p50,
            higher_is_better=False,
            note=row.note,
        )
        if not row.name.startswith("parse"):
            results.series.append(Series(GROUP, row.name, "ms", row.samples))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="few repeats (CI smoke run)")
    parser.add_argument("--json", type=Path, default=None, help="also write Results JSON here")
    args = parser.parse_args(argv)
    n = 5 if args.quick else 300

    results = Results(benchmark="attestation", quick=bool(args.quick))
    rows = real_rows(n)
    if not rows:
        skipped = f"real Nitro samples not found at {SAMPLES_DIR}; skipped"
        results.notes.append(skipped)
        print(f"({skipped})", file=sys.stderr)
    rows += simulated_rows(n)
    record(rows, results)
    results.notes.append(
        f"{n} calls per figure, each timed alone and alternating with its reference; figures "
        "are medians. Verification references are the bare signature checks (the "
        "cryptographic floor); parsing's reference is verification; generation's is one "
        "signature"
    )

    width = max(len(row.name) for row in rows)
    header = (
        f"{'attestation (' + str(n) + ' calls each)':<{width}}  {'p50 ms':>7} {'p99 ms':>7}  "
        f"{'reference':>14} {'ref p50':>7} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.name:<{width}}  {row.p50:7.3f} {row.p99:7.3f}  {row.reference_short:>14} "
            f"{row.reference_p50:7.3f} {row.p50 / row.reference_p50:5.2f}x"
        )
    results.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
