"""Throughput of cape's crypto recipes, measured against raw AES-256-GCM in the same run.

Usage: ``python benchmarks/crypto_bench.py [--quick] [--repeats N]``

Each figure is the best of N timed runs (``time.perf_counter``), in MB/s of plaintext
(1 MB = 10^6 bytes). Ratios compare each recipe with raw ``AESGCM.encrypt``/``decrypt`` on the
same buffer. RSA-4096 work (one OAEP per message; the private-key operation on decrypt) dominates
small inputs.

"raw" allocates its output like the recipes do; "raw-into" writes into a reused buffer, so it
is the cipher alone. For inputs far above a chunk, a fresh output costs page faults that can
dominate "raw", while streaming reuses chunk-sized memory and may beat it.

The script is a list of sections (``SECTIONS``); each takes the parsed options and returns the
lines it prints. Add a section (e.g. attestation verification) by appending a function.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO, cast

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cape.crypto import envelope, stream
from cape.crypto.keys import generate_cape_key

KIB = 1 << 10
MIB = 1 << 20
FULL_SIZES = (KIB, MIB, 256 * MIB)
QUICK_SIZES = (KIB, MIB, 16 * MIB)
GOAL_RATIO = 0.8

ENCRYPT_OPS = ("raw", "raw-into", "binary", "text", "stream")
DECRYPT_OPS = ("raw", "raw-into", "binary", "text", "stream")


@dataclass(frozen=True)
class Options:
    """Parsed command-line options."""

    quick: bool
    repeats: int

    @property
    def sizes(self) -> tuple[int, ...]:
        return QUICK_SIZES if self.quick else FULL_SIZES


@dataclass(frozen=True)
class Row:
    """Throughput (MB/s) of every operation for one input size."""

    size: int
    encrypt: dict[str, float]
    decrypt: dict[str, float]


class NullSink(io.RawIOBase):
    """A writable stream that discards what it is given and counts it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        n = len(data)
        self.count += n
        return n


def null_sink() -> BinaryIO:
    """A fresh :class:`NullSink`, typed as the binary stream the recipes take."""
    return cast(BinaryIO, NullSink())


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """The shortest wall time, in seconds, of ``repeats`` calls to ``fn``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def repeats_for(size: int, repeats: int) -> int:
    """More runs for small inputs, where single timings are noisy."""
    return repeats * 4 if size <= MIB else repeats


def measure_crypto(size: int, key: RSAPrivateKey, repeats: int) -> Row:
    """Measure every encrypt and decrypt operation on one ``size``-byte random buffer."""
    public = key.public_key()
    plaintext = os.urandom(size)
    aead = AESGCM(AESGCM.generate_key(256))
    nonce = os.urandom(12)
    n = repeats_for(size, repeats)

    def stream_encrypt() -> int:
        return stream.encrypt_stream(io.BytesIO(plaintext), null_sink(), public)

    out = bytearray(size + 16)

    encrypt_fns: dict[str, Callable[[], object]] = {
        "raw": lambda: aead.encrypt(nonce, plaintext, None),
        "raw-into": lambda: aead.encrypt_into(nonce, plaintext, None, out),
        "binary": lambda: envelope.encrypt(plaintext, public),
        "text": lambda: envelope.encrypt_text(plaintext, public),
        "stream": stream_encrypt,
    }
    encrypt = {name: size / best_of(fn, n) / 1e6 for name, fn in encrypt_fns.items()}

    raw_ct = aead.encrypt(nonce, plaintext, None)
    binary_ct = envelope.encrypt(plaintext, public)
    text_ct = envelope.encrypt_text(plaintext, public)
    stream_ct = stream.encrypt_stream_bytes(plaintext, public)

    def stream_decrypt() -> int:
        return stream.decrypt_stream(io.BytesIO(stream_ct), null_sink(), key)

    decrypt_fns: dict[str, Callable[[], object]] = {
        "raw": lambda: aead.decrypt(nonce, raw_ct, None),
        "raw-into": lambda: aead.decrypt_into(nonce, raw_ct, None, memoryview(out)[:size]),
        "binary": lambda: envelope.decrypt(binary_ct, key),
        "text": lambda: envelope.decrypt(text_ct, key),
        "stream": stream_decrypt,
    }
    if stream_decrypt() != size or envelope.decrypt(binary_ct, key) != plaintext:
        raise RuntimeError("round trip failed")
    decrypt = {name: size / best_of(fn, n) / 1e6 for name, fn in decrypt_fns.items()}
    return Row(size=size, encrypt=encrypt, decrypt=decrypt)


def human_size(size: int) -> str:
    """``1024`` → ``1 KiB``, ``1048576`` → ``1 MiB``."""
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


def format_table(rows: Sequence[Row]) -> list[str]:
    """Two tables (encrypt, decrypt): MB/s with the ratio to "raw" in parentheses."""
    lines: list[str] = []
    for title, ops in (("encrypt", ENCRYPT_OPS), ("decrypt", DECRYPT_OPS)):
        header = f"{title:<8} {'size':>8}" + "".join(f"{op:>20}" for op in ops)
        lines.append(header)
        lines.append("-" * len(header))
        for row in rows:
            values = row.encrypt if title == "encrypt" else row.decrypt
            raw = values["raw"]
            cells = []
            for op in ops:
                cell = (
                    f"{values[op]:.1f}"
                    if op == "raw"
                    else f"{values[op]:.1f} ({values[op] / raw:.2f}x)"
                )
                cells.append(f"{cell:>20}")
            lines.append(f"{'':<8} {human_size(row.size):>8}" + "".join(cells))
        lines.append("")
    return lines


def goal_line(rows: Sequence[Row]) -> str:
    """Whether binary and streaming encrypt of the largest input reach 0.8x raw AES-GCM."""
    largest = max(rows, key=lambda r: r.size)
    enc = largest.encrypt
    binary, streaming = enc["binary"] / enc["raw"], enc["stream"] / enc["raw"]
    met = binary >= GOAL_RATIO and streaming >= GOAL_RATIO
    verdict = "MET" if met else "NOT MET"
    return (
        f"goal: binary and streaming encrypt of {human_size(largest.size)} >= {GOAL_RATIO}x raw "
        f"AES-GCM: {verdict} (binary {binary:.2f}x, stream {streaming:.2f}x; against raw-into, "
        f"the cipher alone: binary {enc['binary'] / enc['raw-into']:.2f}x, "
        f"stream {enc['stream'] / enc['raw-into']:.2f}x)"
    )


def crypto_section(options: Options) -> list[str]:
    """Envelope, text, stream and raw AES-GCM throughput for each input size."""
    key = generate_cape_key()
    rows = [measure_crypto(size, key, options.repeats) for size in options.sizes]
    lines = [
        f"cape crypto throughput, MB/s of plaintext, best of {options.repeats} "
        f"(x4 for inputs <= 1 MiB); RSA-4096 Cape key",
        "",
    ]
    lines += format_table(rows)
    lines.append(goal_line(rows))
    return lines


SECTIONS: list[Callable[[Options], list[str]]] = [crypto_section]
"""Benchmark sections, run in order; append new ones here."""


def parse_args(argv: Sequence[str] | None) -> Options:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    return Options(quick=bool(args.quick), repeats=int(repeats))


def main(argv: list[str] | None = None) -> int:
    """Run every section and print its lines; return the exit status."""
    options = parse_args(argv)
    for section in SECTIONS:
        for line in section(options):
            print(line)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
