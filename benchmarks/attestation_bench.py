"""Attestation figures: ms per document to verify (real AWS samples and simulated documents)
and to produce a simulated document.

Run: ``.venv/bin/python benchmarks/attestation_bench.py [--quick]``. Real samples are read
from ``../shared/nitro-samples`` (or ``CAPE_NITRO_SAMPLES``) and skipped when absent.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

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


def per_call_ms(action: Callable[[], object], repeats: int) -> float:
    """Best of three rounds of ``repeats`` calls, in milliseconds per call."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            action()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few repeats (CI smoke run)")
    args = parser.parse_args(argv)
    repeats = 5 if args.quick else 200

    rows: list[tuple[str, float]] = []
    root_pem = SAMPLES_DIR / "AWS_NitroEnclaves_Root-G1.pem"
    if root_pem.is_file():
        root = load_root_certificate_file(root_pem)
        for name, when, debug in SAMPLES:
            raw = decode_document_bytes((SAMPLES_DIR / name).read_bytes())
            at = dt.datetime.fromisoformat(when)
            policy = AttestationPolicy(max_age=None, allow_debug=debug)

            def verify_real(
                raw: bytes = raw, at: dt.datetime = at, policy: AttestationPolicy = policy
            ) -> object:
                return verify_attestation(raw, root=root, now=at, policy=policy)

            rows.append(
                (
                    f"verify {name.split('_')[0]} {name.split('_')[1]}",
                    per_call_ms(verify_real, repeats),
                )
            )
            rows.append(
                (
                    f"  parse only ({len(raw)} bytes)",
                    per_call_ms(functools.partial(parse_attestation, raw), repeats),
                )
            )
    else:
        print(f"(real samples not found at {SAMPLES_DIR}; skipped)", file=sys.stderr)

    authority = SimulatedAuthority.generate()
    module = SimulatedSecureModule(authority.issue_instance(dt.datetime.now(dt.UTC)))
    nonce, public_key = secrets.token_bytes(16), secrets.token_bytes(32)
    document = module.attestation(nonce=nonce, public_key=public_key, user_data=b"{}")
    policy = AttestationPolicy(nonce=nonce)
    sim_root = authority.root_certificate
    rows.append(
        (
            "produce simulated document",
            per_call_ms(lambda: module.attestation(nonce=nonce, public_key=public_key), repeats),
        )
    )
    rows.append(
        (
            "verify simulated document (live)",
            per_call_ms(
                lambda: verify_attestation(
                    document, root=sim_root, now=dt.datetime.now(dt.UTC), policy=policy
                ),
                repeats,
            ),
        )
    )

    width = max(len(name) for name, _ in rows)
    print(f"{'attestation':<{width}}  ms/doc")
    for name, ms in rows:
        print(f"{name:<{width}}  {ms:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
