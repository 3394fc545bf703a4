"""Cold start and call cost of the function sandbox (cape.enclave.sandbox).

Usage: ``python benchmarks/sandbox_bench.py [--quick] [--repeats N]``

Figures, each the median (and best) of N runs, ``time.perf_counter``:

- *probe*: the first ``check_isolation()`` of a process (one real sandbox; on hosts whose
  interpreter lives in a private directory it also mirrors the standard library once).
- *cold start*: ``FunctionSandbox.start`` → first result, for an echo function; then the same
  split into start (bubblewrap + interpreter + import of app.py) and first call.
- *call*: round trip of one call on a warm sandbox, for 1 KiB, 1 MiB and 16 MiB inputs.
- *numpy cold start* (full run only, when the host has numpy to copy): the same for a
  function whose bundle vendors numpy and imports it at module level.

Needs bubblewrap; prints why and exits 0 without it (it is a benchmark, not a test).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cape.enclave.sandbox import FunctionSandbox, SandboxLimits, check_isolation
from cape.errors import SandboxError

KIB = 1 << 10
MIB = 1 << 20
ECHO = "def cape_handler(data):\n    return data\n"
NUMPY_APP = (
    "import numpy as np\n\n"
    "def cape_handler(data):\n"
    "    return str(np.frombuffer(data, dtype=np.uint8).sum())\n"
)
LIMITS = SandboxLimits(max_input_bytes=64 * MIB, max_output_bytes=64 * MIB)


def _timed(repeats: int, run: Callable[[], float | None]) -> list[float]:
    return [t for t in (run() for _ in range(repeats)) if t is not None]


def _fmt(label: str, samples: list[float]) -> str:
    if not samples:
        return f"{label:<44} n/a"
    return (
        f"{label:<44} median {statistics.median(samples) * 1e3:8.2f} ms"
        f"   best {min(samples) * 1e3:8.2f} ms   (n={len(samples)})"
    )


def _function(root: Path, name: str, source: str) -> Path:
    directory = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    directory.chmod(0o711)
    (directory / "app.py").write_text(source)
    return directory


def _cold_start(directory: Path) -> tuple[float, float]:
    began = time.perf_counter()
    with FunctionSandbox.start(directory, limits=LIMITS) as box:
        started = time.perf_counter()
        box.call(b"x")
        done = time.perf_counter()
    return started - began, done - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, no numpy run")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 20)

    began = time.perf_counter()
    try:
        check_isolation()
    except SandboxError as exc:
        print(f"sandbox unavailable, nothing to measure: {exc.diagnostics()}")
        return 0
    print(_fmt("probe (first check_isolation)", [time.perf_counter() - began]))

    root = Path(tempfile.mkdtemp(prefix="cape-sandbox-bench-"))
    root.chmod(0o711)
    try:
        echo = _function(root, "echo", ECHO)
        splits = [_cold_start(echo) for _ in range(repeats)]
        print(_fmt("cold start: start -> first result (echo)", [a + b for a, b in splits]))
        print(_fmt("  of which start (incl. import of app.py)", [a for a, _ in splits]))
        print(_fmt("  of which first call", [b for _, b in splits]))
        with FunctionSandbox.start(echo, limits=LIMITS) as box:
            for size, label in ((KIB, "1 KiB"), (MIB, "1 MiB"), (16 * MIB, "16 MiB")):
                data = b"\xa5" * size

                def one_call(data: bytes = data) -> float:
                    t = time.perf_counter()
                    box.call(data)
                    return time.perf_counter() - t

                print(_fmt(f"call round trip, warm sandbox, {label}", _timed(repeats, one_call)))
        if not args.quick:
            _numpy(root, repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _numpy(root: Path, repeats: int) -> None:
    """Vendor a host copy of numpy into the bundle, as ``pip install --target`` would."""
    places = {sysconfig.get_paths()["purelib"], _base_purelib()}
    package = next((Path(p) / "numpy" for p in places if (Path(p) / "numpy").is_dir()), None)
    if package is None:
        print("numpy cold start: no numpy on this host to vendor; skipped")
        return
    directory = _function(root, "numpy", NUMPY_APP)
    shutil.copytree(package, directory / "numpy")
    libs = package.with_name("numpy.libs")
    if libs.is_dir():
        shutil.copytree(libs, directory / "numpy.libs")
    splits = [_cold_start(directory) for _ in range(max(3, repeats // 4))]
    print(_fmt("numpy cold start -> first result", [a + b for a, b in splits]))
    print(_fmt("  of which start (incl. import numpy)", [a for a, _ in splits]))


def _base_purelib() -> str:
    return sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})[
        "purelib"
    ]


if __name__ == "__main__":
    sys.exit(main())
