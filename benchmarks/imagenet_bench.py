"""The ImageNet example in the enclave against the same code in a plain process, same run.

Run: ``.venv/bin/python benchmarks/imagenet_bench.py [--quick] [--json PATH]`` (needs root and
bubblewrap, as simulated enclaves do, ``examples/imagenet/model.onnx`` and the wheels of its
requirements in ``.wheelhouse``: ``bash scripts/setup.sh test`` makes both; without them it
prints why and exits 0).

``examples/imagenet`` is bundled as ``cape deploy`` would (onnxruntime, numpy and Pillow
vendored from ``.wheelhouse``, outside every figure) and classifies ``images/chelsea.png``
(240 kB PNG, decoded, resized and classified by EfficientNet-Lite0 in the enclave):

- *cold start*: open a run session → verified document → first top-5, with the warm pool
  (a sandbox pre-started per function, ``cape.enclave.warm``) and without it (key-service
  unwrap + unpack + sandbox start + import + model load per session), against a plain process
  doing the same from nothing: ``python`` started on the very same unpacked bundle (same
  vendored wheels, same ``app.py``), importing it and returning the first top-5.
- *per call*: a warm session's call (HPKE-sealed photo through the enclave channel and the
  sandbox, decode + preprocess + inference, JSON back) against ``app.cape_handler`` on the same
  photo in that plain process (same single-threaded onnxruntime session options), the two
  alternating call by call. Goal: ≤ 1.3x.

``--json PATH`` also writes the figures and the raw samples (``benchmarks/_results.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from _results import Results, Series
from cape.errors import CapeError
from cape.platform.local import LocalPlatform
from enclave_bench import (
    MS,
    OWNER,
    App,
    Bench,
    Samples,
    cold_series,
    p50,
    summary,
    wheelhouse_only,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "imagenet"
PHOTO = EXAMPLE / "images" / "chelsea.png"
WHEELHOUSE = REPO / ".wheelhouse"
CALL_GOAL = 1.3
CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}

# The reference: the bundle's own app.py in a plain process (no sandbox, no enclave), started
# as the worker starts it (its folder first on sys.path, as the working directory). It prints
# "first" after its first result, then classifies the photo once per line read, printing the
# seconds each call took.
PLAIN = r"""
import sys, time
sys.path.insert(0, ".")
import app
photo = open(sys.argv[1], "rb").read()
app.cape_handler(photo)
print("first", flush=True)
for _ in sys.stdin:
    start = time.perf_counter()
    app.cape_handler(photo)
    print(time.perf_counter() - start, flush=True)
"""


class PlainProcess:
    """``PLAIN`` running on an unpacked bundle; ``started`` = process start → first result."""

    def __init__(self, folder: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        start = time.perf_counter()
        self.child = subprocess.Popen(
            [sys.executable, "-I", "-c", PLAIN, str(PHOTO)],
            cwd=folder,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self._line() != "first":
            raise RuntimeError("the plain process failed before its first result")
        self.started = time.perf_counter() - start

    def _line(self) -> str:
        assert self.child.stdout is not None
        return self.child.stdout.readline().strip()

    def call(self) -> float:
        """One classification, timed inside the process (seconds)."""
        assert self.child.stdin is not None
        self.child.stdin.write("\n")
        self.child.stdin.flush()
        return float(self._line())

    def close(self) -> None:
        assert self.child.stdin is not None
        self.child.stdin.close()
        if self.child.wait(timeout=60) != 0:
            raise RuntimeError(f"the plain process failed (exit {self.child.returncode})")


def check_top5(output: bytes) -> None:
    top = json.loads(output)["top5"]
    if len(top) != 5 or top[0]["class"] not in CAT_CLASSES:
        raise RuntimeError(f"unexpected ImageNet output {output[:300]!r}")


def missing() -> str | None:
    """Why the benchmark cannot run here, or None."""
    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        return "simulated enclaves need root and bubblewrap"
    if not (EXAMPLE / "model.onnx").exists():
        return "no examples/imagenet/model.onnx (bash scripts/setup.sh test exports it)"
    wheels = ("onnxruntime", "numpy", "pillow")
    absent = [w for w in wheels if not any(WHEELHOUSE.glob(f"{w}-*.whl"))]
    if absent:
        return f"no {', '.join(absent)} wheel in .wheelhouse (bash scripts/setup.sh test)"
    return None


def build(notes: list[str]) -> bytes:
    from cape.sdk.bundle import RuntimeTarget, build_bundle

    with tempfile.TemporaryDirectory(prefix="cape-bench-vendor-") as cache, wheelhouse_only():
        start = time.perf_counter()
        bundle = build_bundle(
            EXAMPLE, vendor=True, target=RuntimeTarget.local(), cache_dir=Path(cache)
        )
        elapsed = time.perf_counter() - start
    notes.append(
        f"bundle: {len(bundle.data) / 1e6:.1f} MB, {bundle.files} files "
        f"({', '.join(bundle.vendored)}), built in {elapsed:.1f} s (not part of any figure)"
    )
    return bundle.data


def unpack(bundle: bytes, folder: Path) -> None:
    with zipfile.ZipFile(io.BytesIO(bundle)) as archive:
        archive.extractall(folder)


def plain_cold_samples(folder: Path, starts: int, samples: Samples) -> None:
    """The cold-start reference: a new plain process → its first result, ``starts`` times."""
    for _ in range(starts):
        plain = PlainProcess(folder)
        plain.close()
        samples.add("plain process: start → first result", plain.started)


async def one_enclave(
    bench: Bench,
    bundle: bytes,
    plain_folder: Path,
    *,
    warm: bool,
    cold: int,
    calls: int,
    samples: Samples,
) -> None:
    enclave = await bench.platform.launcher(runtime_args=[] if warm else ["--no-warm-pool"]).start()
    try:
        photo = PHOTO.read_bytes()
        app = App("imagenet", await bench.deploy(enclave, "imagenet", bundle), photo, check_top5)
        # With the pool, leave time for the spare (copy + sandbox start + import + model load)
        # between sessions: a little over one pool-less cold start, measured first.
        no_pool = samples.get("imagenet cold start, no warm pool")
        gap = min(8.0, 0.3 + 1.3 * p50(no_pool) / MS) if warm and no_pool else 0.1
        await cold_series(bench, enclave, app, warm=warm, repeats=cold, gap=gap, samples=samples)
        if warm:
            # Calls alternate between the enclave and the plain process, so that both see the
            # same machine (other load comes and goes on a shared one).
            session, public_key = await bench.open(enclave, "run", bundle=app.ciphertext)
            plain = PlainProcess(plain_folder)
            try:
                check_top5(await bench.invoke(session, public_key, photo))  # first: not counted
                for _ in range(calls):
                    start = time.perf_counter()
                    output = await bench.invoke(session, public_key, photo)
                    samples.add("enclave: call (warm session)", time.perf_counter() - start)
                    check_top5(output)
                    samples.add("plain process: call", plain.call())
            finally:
                plain.close()
                await session.close()
    finally:
        await enclave.close()


SERIES = {
    "cold start": [
        "imagenet cold start, warm pool",
        "imagenet cold start, no warm pool",
        "plain process: start → first result",
    ],
    "per call": ["enclave: call (warm session)", "plain process: call"],
}


def report(results: Results, samples: Samples) -> None:
    s = samples.get
    plain_cold = s("plain process: start → first result")
    for pool in ("warm pool", "no warm pool"):
        key = f"imagenet cold start, {pool}"
        if s(key) and plain_cold:
            results.figure(
                "cold start",
                f"imagenet: open session → first top-5, {pool}, p50",
                p50(s(key)),
                "ms",
                reference="plain process: python start → import app → first top-5, p50",
                reference_value=p50(plain_cold),
                higher_is_better=False,
            )
    if s("enclave: call (warm session)") and s("plain process: call"):
        value, reference = p50(s("enclave: call (warm session)")), p50(s("plain process: call"))
        results.figure(
            "per call",
            "imagenet: one photo classified in a warm enclave session, p50",
            value,
            "ms",
            reference="app.cape_handler on the same photo in a plain process, p50",
            reference_value=reference,
            higher_is_better=False,
            goal=f"≤ {CALL_GOAL:g}x the plain process",
            goal_met=value <= CALL_GOAL * reference,
        )
    print("imagenet example (simulated mode, real processes)")
    for group, names in SERIES.items():
        print(f"\n{group}")
        for name in names:
            if s(name):
                print("  " + summary(name, s(name)))
                results.series.append(Series(group, name, "ms", s(name)))
        for f in results.figures:
            if f.group == group and f.ratio is not None:
                print(f"  -> {f.name}: {f.value:.1f} ms = {f.ratio:.2f}x {f.reference}")
                if f.goal is not None:
                    print(f"     goal {f.goal}: {'met' if f.goal_met else 'NOT met'}")
    for note in results.notes:
        print(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke run)")
    parser.add_argument("--json", type=Path, help="also write the results (_results.Results)")
    args = parser.parse_args(argv)
    cold, calls = (1, 5) if args.quick else (10, 50)
    results = Results("imagenet", quick=args.quick)
    why = missing()
    if why is not None:
        print(f"imagenet benchmark skipped: {why}", file=sys.stderr)
        results.notes.append(f"skipped: {why}")
        results.write(args.json)
        return 0
    began = time.perf_counter()
    samples = Samples()
    try:
        bundle = build(results.notes)
    except CapeError as exc:
        print(f"imagenet benchmark: the bundle did not build: {exc}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "plain"
        unpack(bundle, folder)
        plain_cold_samples(folder, cold, samples)
        (Path(tmp) / "platform").mkdir(mode=0o700)
        platform = LocalPlatform(Path(tmp) / "platform", master_key=os.urandom(32))
        try:
            platform.kms.get_or_create_key(OWNER)
            bench = Bench(platform)
            for warm in (False, True):
                asyncio.run(
                    one_enclave(
                        bench,
                        bundle,
                        folder,
                        warm=warm,
                        cold=cold,
                        calls=calls,
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
