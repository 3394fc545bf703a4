"""Cold start and call cost of the function sandbox (cape.enclave.sandbox).

Usage: ``python benchmarks/sandbox_bench.py [--quick] [--repeats N] [--json PATH]``

Figures, each the median of N runs (``time.perf_counter``) beside a reference measured in the
same run:

- *probe*: the first ``check_isolation()`` of a process (one real sandbox; on hosts whose
  interpreter lives in a private directory it also mirrors the standard library once), against
  a bare process start.
- *cold start*: ``FunctionSandbox.start`` → first result, for an echo function, against a bare
  ``python -I -S -c pass`` (the interpreter and flags the sandbox runs, without bubblewrap,
  namespaces, seccomp or the worker); then the same split into start (bubblewrap + interpreter
  + import of app.py) and first call.
- *call*: round trip of one call on a warm sandbox, for 1 KiB, 1 MiB and 16 MiB inputs, against
  the same bytes echoed by a plain (unsandboxed) Python child over a Unix socket pair with a
  length prefix.
- *numpy cold start* (full run only, when the host has numpy to copy): the same for a
  function whose bundle vendors numpy and imports it at module level, against echo's.
- *CPU per sandbox start* (``getrusage``: the benchmark's own CPU and its reaped children's,
  so other work on the machine does not count): start → first result → close of an echo
  sandbox, beside what it is made of, each measured alone the same way: bubblewrap building the
  same namespaces and mount tree around ``/usr/bin/true`` (no Python), a bare
  ``python -I -S -B -c pass``, and ``os.fork`` of this warm interpreter whose child exits at
  once. Where this runs as root the start goes through the sandbox zygote (issue 16), whose
  own CPU and its reaped children's (each session's monitor and sandbox, which are not this
  process's children) come from ``/proc/PID/stat``; the same start with bubblewrap
  (``sandbox_start``) follows it, and the figure compares the two. The bubblewrap-around-`true`
  and fork lines make the floor of a forking start (namespaces and mounts and a fork, no
  interpreter start). The start's line is followed by the share of this process alone
  (``RUSAGE_SELF``: the runtime's side of a start, the rest being the sandbox's own processes).
  Where a C compiler exists, ``sandbox_floor.c`` is built and run too: the same system calls
  as a forking start (fork, uid switch, the 7 namespaces and maps, the fork of pid 1,
  bubblewrap's mount tree) without Python or bubblewrap's own exec, level by level; with one
  fork of this interpreter it is the floor the zygote's start is judged against (issue 16).

``--json PATH`` also writes the figures and the raw samples (``benchmarks/_results.py``).
Needs bubblewrap; prints why and exits 0 without it (it is a benchmark, not a test).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _results import Results, Series
from cape.enclave import seccomp
from cape.enclave import zygote as zygote_module
from cape.enclave.sandbox import BWRAP, UIDS, FunctionSandbox, SandboxLimits, check_isolation
from cape.enclave.staging import SUPPORT, layout
from cape.enclave.zygote import ZygoteSpawn, set_start_path
from cape.errors import SandboxError

KIB = 1 << 10
MIB = 1 << 20
ECHO = "def cape_handler(data):\n    return data\n"
NUMPY_APP = (
    "import numpy as np\n\n"
    "def cape_handler(data):\n"
    "    return str(np.frombuffer(data, dtype=np.uint8).sum())\n"
)
#: The interpreter the sandbox runs (the venv's base), for the references.
PYTHON = os.path.realpath(sys.executable)
LIMITS = SandboxLimits(max_input_bytes=64 * MIB, max_output_bytes=64 * MIB)
SIZES = ((KIB, "1 KiB"), (MIB, "1 MiB"), (16 * MIB, "16 MiB"))
#: The reference for a call: a plain child echoing length-prefixed messages on a socket.
PLAIN_ECHO = """
import socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
def read(n):
    buf = bytearray(n); view = memoryview(buf); got = 0
    while got < n:
        k = s.recv_into(view[got:])
        if not k: raise SystemExit
        got += k
    return buf
while True:
    n = int.from_bytes(read(8), "big")
    data = read(n)
    s.sendall(n.to_bytes(8, "big")); s.sendall(data)
"""


def _timed(repeats: int, run: Callable[[], float | None]) -> list[float]:
    return [t for t in (run() for _ in range(repeats)) if t is not None]


def _fmt(label: str, samples: list[float]) -> str:
    if not samples:
        return f"{label:<48} n/a"
    return (
        f"{label:<48} median {statistics.median(samples) * 1e3:8.2f} ms"
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


def _bare_start() -> float:
    began = time.perf_counter()
    subprocess.run([PYTHON, "-I", "-S", "-c", "pass"], check=True)
    return time.perf_counter() - began


def _cpu_s(who: int | None = None) -> float:
    """CPU seconds of this process and of every child it has reaped (or of ``who`` alone)."""
    total = 0.0
    for whose in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) if who is None else (who,):
        usage = resource.getrusage(whose)
        total += usage.ru_utime + usage.ru_stime
    return total


def _zygote_cpu_s() -> float:
    """CPU seconds of this process's sandbox zygote and of the children it reaped (each
    session's monitor and sandbox: not this process's children), from ``/proc/PID/stat``."""
    zygote = zygote_module._zygotes.get(layout())
    if zygote is None or zygote.pid is None:
        return 0.0
    with open(f"/proc/{zygote.pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # utime, stime, cutime, cstime: fields 14-17 of stat(5), 12-15 after "pid (comm)"
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _cpu_per(action: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """(CPU ms, of it this process's own CPU ms, wall ms) per run of ``action``, over
    ``repeats`` runs after one warm-up; CPU includes the sandbox zygote's (and its reaped
    children's) when a zygote starts the sandboxes."""
    action()
    zygote = zygote_module._zygotes.get(layout())
    zygote_pid = None if zygote is None else zygote.pid
    cpu, own, wall = _cpu_s() + _zygote_cpu_s(), _cpu_s(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(repeats):
        action()
    own = (_cpu_s(resource.RUSAGE_SELF) - own) * 1e3 / repeats
    if zygote is not None and zygote.pid != zygote_pid:
        raise RuntimeError("the sandbox zygote was restarted during the measurement")
    spent = _cpu_s() + _zygote_cpu_s() - cpu
    return spent * 1e3 / repeats, own, (time.perf_counter() - wall) * 1e3 / repeats


def _bwrap_true() -> None:
    """bubblewrap building the sandbox's namespaces and mount tree around ``true`` (no Python):
    the same flags as :mod:`cape.enclave.spawn` but the worker's files and its descriptors."""
    assert BWRAP is not None
    tree = layout()
    argv = [BWRAP, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent"]
    argv += ["--as-pid-1", "--new-session", "--uid", "1000", "--gid", "1000", "--clearenv"]
    for source, dest in tree.binds:
        argv += ["--ro-bind", source, dest]
    for target, path in tree.symlinks:
        argv += ["--symlink", target, path]
    for path in tree.hidden:
        argv += ["--ro-bind", str(SUPPORT.empty), path]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(LIMITS.tmp_bytes)]
    argv += ["--tmpfs", "/dev/shm", "--size", str(LIMITS.tmp_bytes), "--tmpfs", "/tmp"]
    argv += ["--ro-bind", str(SUPPORT.empty), "/function", "--remount-ro", "/"]
    program = seccomp.program_fd()
    try:
        argv += ["--seccomp", str(program), "/usr/bin/true"]
        subprocess.run(argv, check=True, pass_fds=[program], stdin=subprocess.DEVNULL)
    finally:
        os.close(program)


def _fork_exit() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


#: The same system calls as a forking start, in C (built here where a compiler exists).
FLOOR_SOURCE = Path(__file__).with_name("sandbox_floor.c")
FLOOR_LEVELS = (
    "fork, the child exits",
    "+ uid switch, 7 namespaces, uid/gid maps",
    "+ fork of the sandbox's pid 1",
    "+ bubblewrap's mount tree in pid 1",
)


def _kernel_floor(repeats: int) -> list[float] | None:
    """CPU ms per session of :data:`FLOOR_LEVELS` (``sandbox_floor.c``, each level run
    ``repeats`` times in one process), or None where there is no C compiler, no root or no
    free sandbox uid. Cumulative: each level includes the previous ones."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or os.geteuid() != 0:
        return None
    uid = UIDS.acquire()
    if uid is None:
        return None
    tree = layout()
    binds = [f"{os.path.realpath(source)}={dest}" for source, dest in tree.binds]
    try:
        with tempfile.TemporaryDirectory(prefix="cape-sandbox-floor-") as tmp:
            program = Path(tmp) / "sandbox_floor"
            subprocess.run([compiler, "-O2", "-o", str(program), str(FLOOR_SOURCE)], check=True)
            figures = []
            for level in range(len(FLOOR_LEVELS)):
                argv = [str(program), str(level), str(repeats), str(uid), str(SUPPORT.empty)]
                before = _cpu_s(resource.RUSAGE_CHILDREN)
                subprocess.run(argv + binds, check=True)
                figures.append((_cpu_s(resource.RUSAGE_CHILDREN) - before) * 1e3 / repeats)
            return figures
    finally:
        UIDS.release(uid)


def _start_cost(directory: Path, repeats: int, results: Results) -> None:
    def sandbox() -> None:
        with FunctionSandbox.start(directory, limits=LIMITS) as box:
            box.call(b"x")

    def bubblewrap() -> None:
        set_start_path("bubblewrap")
        try:
            sandbox()
        finally:
            set_start_path("auto")

    zygote_used = _zygote_in_use(directory)
    rows = [
        (
            "sandbox start -> first result -> close (echo)"
            + (", zygote" if zygote_used else ", bubblewrap"),
            sandbox,
        ),
        ("  the same with bubblewrap (sandbox_start)", bubblewrap),
        ("  bubblewrap, same namespaces + mounts, `true`", _bwrap_true),
        (
            "  bare python -I -S -B -c pass",
            lambda: subprocess.run([PYTHON, "-I", "-S", "-B", "-c", "pass"], check=True),
        ),
        ("  os.fork of a warm interpreter, child exits", _fork_exit),
    ]
    print("CPU per sandbox start (this process + its reaped children; other work excluded):")
    measured = {}
    for label, action in rows:
        cpu, own, wall = _cpu_per(action, repeats)
        measured[label] = cpu
        print(f"{label:<48} CPU {cpu:7.2f} ms   wall {wall:7.2f} ms")
        if action is sandbox:
            # The runtime's side (uid, cgroup, spawning bubblewrap, the worker's frames) and
            # the sandbox's own processes: issue 16 works on each separately.
            measured["runtime"] = own
            print(f"{'  of it: this process (the runtime side)':<48} CPU {own:7.2f} ms")
    start_cpu = measured[rows[0][0]]
    bwrap_cpu = measured[rows[1][0]]
    floor = measured[rows[2][0]] + measured[rows[4][0]]
    if zygote_used:
        print(
            f"zygote start: {start_cpu:.2f} ms of CPU against bubblewrap's {bwrap_cpu:.2f} ms "
            f"({start_cpu / bwrap_cpu:.2f}x; the zygote's own CPU and its reaped children's "
            "from /proc/PID/stat included)"
        )
        results.figure(
            "start CPU",
            "echo sandbox start → first result → close, CPU, zygote (incl. the zygote's CPU)",
            start_cpu,
            "ms",
            reference="the same start with bubblewrap, CPU",
            reference_value=bwrap_cpu,
            higher_is_better=False,
        )
    kernel = _kernel_floor(max(repeats, 20))
    if kernel is None:
        results.notes.append("no C compiler (or not root): the kernel's floor was not measured")
    else:
        print("the kernel's part of a forking start, the same system calls in C (cumulative):")
        for label, cpu in zip(FLOOR_LEVELS, kernel, strict=True):
            print(f"  {label:<46} CPU {cpu:7.2f} ms")
        fork = measured[rows[4][0]]
        print(
            f"floor of a forking start (the kernel's part {kernel[-1]:.2f} ms + one fork of a "
            f"warm interpreter {fork:.2f} ms) ≈ {kernel[-1] + fork:.2f} ms of CPU: the start "
            f"above is {start_cpu - kernel[-1] - fork:.2f} ms above it (bubblewrap's `true` "
            "below also pays its own exec and set-up)"
        )
        results.figure(
            "start CPU",
            "echo sandbox start → first result → close, CPU, against the kernel's floor",
            start_cpu,
            "ms",
            reference="the same system calls in C (sandbox_floor.c) + one fork of a warm "
            "interpreter, CPU",
            reference_value=kernel[-1] + fork,
            higher_is_better=False,
            note=", ".join(
                f"{label} {cpu:.2f} ms" for label, cpu in zip(FLOOR_LEVELS, kernel, strict=True)
            ),
        )
    print(
        f"floor of a forking start (namespaces + mounts + fork, no interpreter start) ≈ "
        f"{floor:.2f} ms of CPU: the start above is {start_cpu - floor:.2f} ms "
        f"({1 - floor / start_cpu:.0%}) above it"
    )
    results.figure(
        "start CPU",
        "echo sandbox start → first result → close, CPU",
        start_cpu,
        "ms",
        reference="floor: bubblewrap's namespaces + mounts around `true` + one fork, CPU",
        reference_value=floor,
        higher_is_better=False,
        note=(
            f"the runtime's own share {measured['runtime']:.2f} ms; "
            f"bare python -I -S -B start {measured[rows[3][0]]:.2f} ms, bubblewrap + `true` "
            f"{measured[rows[2][0]]:.2f} ms, fork {measured[rows[4][0]]:.2f} ms of CPU"
        ),
    )


def _zygote_in_use(directory: Path) -> bool:
    with FunctionSandbox.start(directory, limits=LIMITS) as box:
        box.call(b"x")
        return isinstance(box._spawn, ZygoteSpawn)


class PlainEcho:
    """An unsandboxed Python child echoing length-prefixed messages over a socket pair."""

    def __init__(self) -> None:
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with child:
            self.proc = subprocess.Popen(
                [PYTHON, "-I", "-S", "-c", PLAIN_ECHO, str(child.fileno())],
                pass_fds=[child.fileno()],
            )

    def _read(self, n: int) -> bytearray:
        buffer = bytearray(n)
        view, got = memoryview(buffer), 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if not k:
                raise RuntimeError("the plain echo child went away")
            got += k
        return buffer

    def call(self, data: bytes) -> bytes:
        self.sock.sendall(len(data).to_bytes(8, "big"))
        self.sock.sendall(data)
        return bytes(self._read(int.from_bytes(self._read(8), "big")))

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(timeout=10)


def _round_trips(call: Callable[[bytes], bytes], data: bytes, repeats: int) -> list[float]:
    call(data)  # first call of this size (buffers, page faults) not counted

    def one() -> float:
        t = time.perf_counter()
        call(data)
        return time.perf_counter() - t

    return _timed(repeats, one)


def _ms(samples: list[float]) -> list[float]:
    return [s * 1e3 for s in samples]


def _figure(
    results: Results, group: str, name: str, samples: list[float], reference: str, ref: list[float]
) -> None:
    if samples and ref:
        results.figure(
            group,
            name,
            statistics.median(samples) * 1e3,
            "ms",
            reference=reference,
            reference_value=statistics.median(ref) * 1e3,
            higher_is_better=False,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, no numpy run")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", type=Path, help="also write the results (_results.Results)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 20)
    results = Results("sandbox", quick=args.quick)

    began = time.perf_counter()
    try:
        check_isolation()
    except SandboxError as exc:
        print(f"sandbox unavailable, nothing to measure: {exc.diagnostics()}")
        results.notes.append(f"skipped: sandbox unavailable ({exc.diagnostics()})")
        results.write(args.json)
        return 0
    probe = [time.perf_counter() - began]
    print(_fmt("probe (first check_isolation)", probe))
    _bare_start()  # page cache warm for the reference, as it is for the sandbox after the probe
    bare = _timed(repeats, _bare_start)
    print(_fmt("bare process start (python -I -S -c pass)", bare))
    _figure(
        results,
        "cold start",
        "probe: first check_isolation() (once per process)",
        probe,
        "bare process start, p50",
        bare,
    )

    root = Path(tempfile.mkdtemp(prefix="cape-sandbox-bench-"))
    root.chmod(0o711)
    try:
        echo = _function(root, "echo", ECHO)
        _start_cost(echo, repeats, results)
        splits = [_cold_start(echo) for _ in range(repeats)]
        cold = [a + b for a, b in splits]
        print(_fmt("cold start: start -> first result (echo)", cold))
        print(_fmt("  of which start (incl. import of app.py)", [a for a, _ in splits]))
        print(_fmt("  of which first call", [b for _, b in splits]))
        _figure(
            results,
            "cold start",
            "echo: FunctionSandbox.start → first result, p50",
            cold,
            "bare `python -I -S -c pass` process start, p50",
            bare,
        )
        if results.figures:
            results.figures[-1].note = (
                f"start {statistics.median([a for a, _ in splits]) * 1e3:.2f} ms "
                f"+ first call {statistics.median([b for _, b in splits]) * 1e3:.2f} ms"
            )
        results.series += [
            Series("cold start", "echo: start → first result", "ms", _ms(cold)),
            Series("cold start", "bare python -I -S -c pass", "ms", _ms(bare)),
        ]
        plain = PlainEcho()
        try:
            with FunctionSandbox.start(echo, limits=LIMITS) as box:
                for size, label in SIZES:
                    data = b"\xa5" * size
                    boxed = _round_trips(box.call, data, repeats)
                    reference = _round_trips(plain.call, data, repeats)
                    print(_fmt(f"call round trip, warm sandbox, {label}", boxed))
                    print(_fmt(f"  plain child over a socket pair, {label}", reference))
                    _figure(
                        results,
                        "call",
                        f"warm call round trip, {label}, p50",
                        boxed,
                        f"plain unsandboxed child echo over a socket pair, {label}, p50",
                        reference,
                    )
                    results.series += [
                        Series("call", f"sandbox call, {label}", "ms", _ms(boxed)),
                        Series("call", f"plain child echo, {label}", "ms", _ms(reference)),
                    ]
        finally:
            plain.close()
        if not args.quick:
            _numpy(root, repeats, cold, results)
        else:
            results.notes.append("quick run: numpy cold start skipped")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for f in results.figures:
        if f.ratio is not None:
            print(f"-> {f.name}: {f.value:.2f} ms = {f.ratio:.2f}x {f.reference}")
    results.write(args.json)
    return 0


def _numpy(root: Path, repeats: int, echo_cold: list[float], results: Results) -> None:
    """Vendor a host copy of numpy into the bundle, as ``pip install --target`` would."""
    places = {sysconfig.get_paths()["purelib"], _base_purelib()}
    package = next((Path(p) / "numpy" for p in places if (Path(p) / "numpy").is_dir()), None)
    if package is None:
        print("numpy cold start: no numpy on this host to vendor; skipped")
        results.notes.append("numpy cold start skipped: no numpy on this host to vendor")
        return
    directory = _function(root, "numpy", NUMPY_APP)
    shutil.copytree(package, directory / "numpy")
    libs = package.with_name("numpy.libs")
    if libs.is_dir():
        shutil.copytree(libs, directory / "numpy.libs")
    splits = [_cold_start(directory) for _ in range(max(3, repeats // 4))]
    cold = [a + b for a, b in splits]
    print(_fmt("numpy cold start -> first result", cold))
    print(_fmt("  of which start (incl. import numpy)", [a for a, _ in splits]))
    _figure(
        results,
        "cold start",
        "numpy function: FunctionSandbox.start → first result, p50",
        cold,
        "echo cold start, p50",
        echo_cold,
    )
    results.series.append(Series("cold start", "numpy: start → first result", "ms", _ms(cold)))


def _base_purelib() -> str:
    return sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})[
        "purelib"
    ]


if __name__ == "__main__":
    sys.exit(main())
