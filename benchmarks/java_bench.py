"""Java SDK encrypt throughput, 1 KiB to 256 MiB, beside the JDK's raw AES-256-GCM (same run).

Usage: ``python benchmarks/java_bench.py [--quick] [--repeats N] [--json PATH]``

Builds ``java/`` with ``java/build.sh`` (javac and Debian's jars, offline), compiles
``benchmarks/java_bench/EncryptBench.java`` against it and runs it in one JVM: for each size,
``Envelope.seal`` (a fresh DEK wrapped with RSA-OAEP-4096, then AES-256-GCM of the input; what
``Cape.encrypt`` does before base64) and, as the reference, one raw AES-256-GCM encryption of
the same buffer. Figures are MB/s (10^6 bytes per second) of the median repeat; the ratio is
envelope / raw. Small inputs are dominated by the RSA wrap, large ones by AES-GCM.

Without a JDK the script says so and exits 0 (outside CI); under CI that is a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _results import Curve, Results

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
JARS = Path(os.environ.get("CAPE_JAVA_JARS", "/usr/share/java"))
FULL_SIZES = [1 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20, 256 << 20]
QUICK_SIZES = [1 << 10, 64 << 10, 1 << 20]
GROUP = "Java SDK encrypt (cape: envelope)"


def _label(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


def _compile(out: Path) -> str:
    subprocess.run(["bash", str(ROOT / "java" / "build.sh")], check=True, stdout=subprocess.DEVNULL)
    classpath = os.pathsep.join(
        [str(ROOT / "java" / "build" / "classes"), str(JARS / "bcprov.jar"), str(JARS / "gson.jar")]
    )
    subprocess.run(
        ["javac", "-d", str(out), "-cp", classpath, str(HERE / "java_bench" / "EncryptBench.java")],
        check=True,
    )
    return os.pathsep.join([str(out), classpath])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per size")
    parser.add_argument("--json", type=Path, default=None, help="also write Results JSON here")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    results = Results(benchmark="java", quick=bool(args.quick))
    if shutil.which("javac") is None or not (JARS / "bcprov.jar").is_file():
        if os.environ.get("CI"):
            print("java_bench: no JDK or Debian jars (scripts/setup.sh installs them)")
            return 1
        results.notes.append("skipped: no JDK or Debian jars on this machine")
        print("java_bench: skipped, no JDK or Debian jars")
        results.write(args.json)
        return 0
    heap = f"-Xmx{max(1, 4 * max(sizes) >> 30) + 1}g"
    with tempfile.TemporaryDirectory() as scratch:
        classpath = _compile(Path(scratch))
        done = subprocess.run(
            [
                "java",
                heap,
                f"-Dwarmup.seconds={0.5 if args.quick else 3}",
                f"-Dwarmup.bytes={(8 if args.quick else 512) << 20}",
                "-cp",
                classpath,
                "EncryptBench",
                str(repeats),
                *map(str, sizes),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
    envelope_curve: list[tuple[float, float]] = []
    raw_curve: list[tuple[float, float]] = []
    print(f"{'size':>8} {'cape: envelope':>16} {'raw AES-GCM':>14} {'ratio':>7}")
    for line in done.stdout.splitlines():
        row = json.loads(line)
        size = int(row["size"])
        envelope = size / statistics.median(row["envelope_s"]) / 1e6
        raw = size / statistics.median(row["aes_gcm_s"]) / 1e6
        envelope_curve.append((size, envelope))
        raw_curve.append((size, raw))
        print(f"{_label(size):>8} {envelope:>11.1f} MB/s {raw:>9.1f} MB/s {envelope / raw:>6.2f}x")
        results.figure(
            GROUP,
            f"Java encrypt {_label(size)}",
            envelope,
            "MB/s",
            reference="JDK AES-256-GCM, same buffer",
            reference_value=raw,
        )
    results.curves += [
        Curve(GROUP, "Java cape: envelope", "input bytes", "MB/s", envelope_curve),
        Curve(GROUP, "JDK raw AES-256-GCM", "input bytes", "MB/s", raw_curve),
    ]
    version = subprocess.run(["java", "-version"], capture_output=True, text=True, check=False)
    results.notes.append(
        f"{version.stderr.splitlines()[0] if version.stderr else 'java'}; median of {repeats}; "
        "RSA-4096 key wrap included in every envelope"
    )
    results.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
