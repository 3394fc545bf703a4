"""The sandbox zygote (issue 16): the same sandbox as bubblewrap's, cheaper, and never a hang.

The isolation suites (test_sandbox*.py, the hostile corpus, test_tenant_enclave.py) run against
the zygote, the default start path where the runtime is root; a few of them run against
bubblewrap too (``start_path`` in test_sandbox.py). Here: what is new with the zygote.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cape.enclave import sandbox as sandbox_module
from cape.enclave import zygote as zygote_module
from cape.enclave.sandbox import FunctionSandbox
from cape.enclave.sandbox_root import GUEST_PATH
from cape.enclave.spawn import Spawn
from cape.enclave.staging import layout
from cape.enclave.zygote import Zygote, ZygoteSpawn, describe_start, set_start_path
from cape.errors import SandboxError
from tests.unit.enclave.test_sandbox import LIMITS, call_json, make_function, processes_of

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the zygote runs where the runtime is root (a uid range)"
)

#: Reports the sandbox's identity, mount table, descriptors and environment as JSON.
INSIDE_APP = """
import json, os, resource, socket, sys

import cape_encrypt

MODULES = sorted(sys.modules)
#: The encryption helper as the worker loaded it (the zygote compiles it ahead, issue 16).
GUEST = [
    cape_encrypt.__name__, cape_encrypt.__file__, cape_encrypt.__spec__.origin,
    cape_encrypt.__cached__, cape_encrypt.__loader__.path, sorted(vars(cape_encrypt)),
    cape_encrypt._attach.__code__.co_filename, cape_encrypt._attach.__code__.co_firstlineno,
]
FIELDS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
          "NoNewPrivs", "Seccomp", "Seccomp_filters")


def cape_handler(data):
    status = {}
    with open("/proc/self/status") as file:
        for line in file:
            key, _, value = line.partition(":")
            if key in FIELDS:
                status[key] = value.split()
    mounts = []
    with open("/proc/self/mountinfo") as file:
        for line in file:
            fields = line.split()
            options = fields[5].split(",")
            flags = [flag for flag in ("ro", "nosuid", "nodev", "noexec") if flag in options]
            mounts.append([fields[4], fields[fields.index("-") + 1], flags])
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink("/proc/self/fd/" + fd)
        except OSError:
            pass  # the listing's own descriptor, closed by now
    return json.dumps({
        "status": status,
        "mounts": sorted(mounts),
        "fds": fds,
        "root": sorted(os.listdir("/")),
        "dev": sorted(os.listdir("/dev")),
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "hostname": socket.gethostname(),
        "session": [os.getpid(), os.getsid(0), os.getpgid(0), os.getppid()],
        "sys_path": sys.path,
        "modules": MODULES,
        "guest": GUEST,
        "argv": sys.argv,
        "umask": os.umask(0o22),
        "limits": [resource.getrlimit(r) for r in (resource.RLIMIT_AS, resource.RLIMIT_NOFILE)],
    })
"""
#: /proc covers bubblewrap attempts and this kernel refuses it inside a user namespace, which
#: the zygote gets (read-only, so stricter than bubblewrap's sandbox here).
PROC_COVERS = {"/proc/sys", "/proc/irq", "/proc/bus"}


def _start(started: list[FunctionSandbox], directory: Path) -> FunctionSandbox:
    box = FunctionSandbox.start(directory, limits=LIMITS)
    started.append(box)
    return box


def _zygote() -> Zygote:
    zygote = zygote_module._zygotes.get(layout())
    assert zygote is not None and zygote.pid is not None
    return zygote


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _inside(box: FunctionSandbox) -> dict[str, Any]:
    return call_json(box, {})


def test_the_zygote_builds_the_sandbox_bubblewrap_builds(
    tmp_path: Path, started: list[FunctionSandbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    zygote_box = _start(started, make_function(tmp_path, INSIDE_APP, name="zygote"))
    assert isinstance(zygote_box._spawn, ZygoteSpawn)
    by_zygote = _inside(zygote_box)
    monkeypatch.setattr(zygote_module, "_settings", {"start": "bubblewrap"})
    bwrap_box = _start(started, make_function(tmp_path, INSIDE_APP, name="bwrap"))
    assert isinstance(bwrap_box._spawn, Spawn)
    by_bwrap = _inside(bwrap_box)

    # Identity, capabilities (bounding and ambient sets included), no_new_privs, seccomp.
    assert by_zygote["status"] == by_bwrap["status"]
    status = by_zygote["status"]
    assert isinstance(status, dict)
    assert status["Uid"] == status["Gid"] == ["1000"] * 4
    assert status["Groups"] == []
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert status[cap] == ["0000000000000000"], cap
    assert status["NoNewPrivs"] == ["1"]
    assert status["Seccomp"] == ["2"]
    assert status["Seccomp_filters"] == ["1"]

    # The mount table: the same mount points, file systems and ro/nosuid/nodev/noexec flags.
    zygote_mounts = {tuple(m[:2]): m[2] for m in by_zygote["mounts"]}
    bwrap_mounts = {tuple(m[:2]): m[2] for m in by_bwrap["mounts"]}
    covers = {key: flags for key, flags in zygote_mounts.items() if key[0] in PROC_COVERS}
    assert all("ro" in flags for flags in covers.values())
    for key in covers:
        if key not in bwrap_mounts:
            del zygote_mounts[key]
    assert zygote_mounts == bwrap_mounts
    assert zygote_mounts[("/", "tmpfs")] == ["ro", "nosuid", "nodev"]
    assert [flags for (point, _), flags in zygote_mounts.items() if point == "/function"] == [
        ["ro", "nosuid", "nodev"]
    ]

    # Descriptors, the view of / and /dev, environment, session and the interpreter's state.
    names = ("root", "dev", "env", "cwd", "hostname", "session", "sys_path", "modules", "guest")
    for name in names:
        assert by_zygote[name] == by_bwrap[name], name
    # The same worker arguments, but for the channel's descriptor number (bubblewrap keeps
    # the runtime's; the zygote's child moves it to 3).
    argv_zygote, argv_bwrap = by_zygote["argv"], by_bwrap["argv"]
    assert isinstance(argv_zygote, list) and isinstance(argv_bwrap, list)
    assert argv_zygote[1] == "3"
    assert argv_zygote[:1] + argv_zygote[2:] == argv_bwrap[:1] + argv_bwrap[2:]
    assert by_zygote["limits"] == by_bwrap["limits"]
    kinds = [
        sorted(target.split(":")[0] for target in fds.values())
        for fds in (by_zygote["fds"], by_bwrap["fds"])
    ]
    assert kinds[0] == kinds[1] == ["/dev/null"] * 3 + ["socket"]
    assert by_zygote["session"] == [1, 1, 1, 0]


MOUNTS_APP = """
def cape_handler(data):
    with open("/proc/self/mountinfo") as file:
        lines = [line.split() for line in file]
    return "\\n".join(
        f[4] + " " + ",".join(o for o in f[5].split(",") if o in ("ro", "rw", "nosuid", "nodev"))
        for f in lines
        if f[4].startswith("/opt/hostdev")
    )
"""


def test_submounts_of_a_bind_are_read_only_too(
    tmp_path: Path, started: list[FunctionSandbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bind whose source has mounts below it (the host's /dev: /dev/shm, /dev/pts): as with
    # bubblewrap, every one of them is read-only, nosuid and nodev inside, not only the top.
    good = layout()
    wider = dataclasses.replace(good, binds=(*good.binds, ("/dev", "/opt/hostdev")))
    monkeypatch.setattr(sandbox_module, "layout", lambda: wider)
    seen = {}
    for path in ("zygote", "bubblewrap"):
        monkeypatch.setattr(zygote_module, "_settings", {"start": path})
        box = _start(started, make_function(tmp_path, MOUNTS_APP, name=path))
        assert isinstance(box._spawn, ZygoteSpawn) == (path == "zygote")
        seen[path] = box.call(b"").decode().splitlines()
    assert sorted(seen["zygote"]) == sorted(seen["bubblewrap"])
    # The mount that is visible at each point is the last one stacked there (the host here has
    # two at /dev/pts and at /dev/shm; the lower ones are covered, both ways alike).
    top = {line.split()[0]: line.split()[1] for line in seen["zygote"]}
    assert len(top) >= 2  # /opt/hostdev and what is below it
    assert set(top.values()) == {"ro,nosuid,nodev"}, seen


def test_descriptors_of_one_session_are_absent_from_the_next(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    first = _start(started, make_function(tmp_path, "echo_state", name="first"))
    assert first.call(b"first") == b"first"
    zygote = _zygote()
    baseline = len(os.listdir(f"/proc/{zygote.pid}/fd"))
    directory = make_function(tmp_path, INSIDE_APP, name="second")
    directory.chmod(0o755)
    second = _start(started, directory)
    assert isinstance(second._spawn, ZygoteSpawn)
    seen = _inside(second)
    fds = seen["fds"]
    assert isinstance(fds, dict)
    # Inside: stdio on /dev/null and the call channel, nothing of the first session's.
    assert {fd: target for fd, target in fds.items() if fd in "012"} == {
        "0": "/dev/null",
        "1": "/dev/null",
        "2": "/dev/null",
    }
    assert set(fds) == {"0", "1", "2", "3"}
    assert fds["3"].startswith("socket:")
    # The second session's monitor (outside the sandbox) holds its stderr pipe and /dev/null.
    monitor = second._spawn.pid
    assert sorted(os.listdir(f"/proc/{monitor}/fd")) == ["0", "1", "2"]
    # The zygote keeps two descriptors per live session (its status socket and the monitor's
    # pidfd) and none of a session's own (channel, services, stderr, cgroup).
    assert len(os.listdir(f"/proc/{zygote.pid}/fd")) == baseline + 2
    first.close()
    second.close()
    _wait_until(
        lambda: len(os.listdir(f"/proc/{zygote.pid}/fd")) == baseline - 2,
        "the zygote let go of the closed sessions' descriptors",
    )


def test_the_zygote_killed_mid_session_ends_the_session_and_is_restarted(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    box = FunctionSandbox.start(make_function(tmp_path, "echo_state"), limits=LIMITS)
    assert box.call(b"before") == b"before"
    old = _zygote().pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    _wait_until(lambda: not box.alive, "the sandbox died with its zygote")
    with pytest.raises(SandboxError) as info:
        box.call(b"after")
    assert info.value.reason == "crashed"
    box.close()
    # Its processes died with the zygote; orphaned, they are reaped by the host's init (which
    # here does that every few seconds), so they may stay zombies for a moment.
    _wait_until(lambda: processes_of(box.host_uid) == [], "no process of the session is left", 60)
    fresh = _start(started, make_function(tmp_path, "echo_state", name="fresh"))
    assert isinstance(fresh._spawn, ZygoteSpawn)
    assert fresh.call(b"fresh") == b"fresh"
    assert _zygote().pid not in (None, old)


def test_a_zygote_that_died_between_sessions_is_restarted(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    first = _start(started, make_function(tmp_path, "echo_state", name="first"))
    first.close()
    zygote = _zygote()
    old = zygote.pid
    assert zygote._proc is not None
    zygote._proc.kill()
    zygote._proc.wait(timeout=30)
    second = _start(started, make_function(tmp_path, "echo_state", name="second"))
    assert isinstance(second._spawn, ZygoteSpawn)
    assert second.call(b"second") == b"second"
    assert zygote.pid not in (None, old)


def test_a_wedged_zygote_falls_back_to_bubblewrap_without_hanging(
    tmp_path: Path, started: list[FunctionSandbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    _start(started, make_function(tmp_path, "echo_state", name="first")).close()
    zygote = _zygote()
    default_timeout = zygote_module._FORK_TIMEOUT_S
    monkeypatch.setattr(zygote_module, "_FORK_TIMEOUT_S", 1.0)
    assert zygote.pid is not None
    os.kill(zygote.pid, signal.SIGSTOP)
    box = _start(started, make_function(tmp_path, "echo_state", name="second"))
    assert isinstance(box._spawn, Spawn)  # bubblewrap for this start
    assert box.call(b"second") == b"second"
    assert zygote.pid is None  # the wedged one was ended; the next start gets a fresh one
    # The next start launches a fresh zygote within the usual deadline: 1 s is for the wedge
    # above only (a fresh zygote's start can take longer on a loaded machine).
    monkeypatch.setattr(zygote_module, "_FORK_TIMEOUT_S", default_timeout)
    again = _start(started, make_function(tmp_path, "echo_state", name="third"))
    assert isinstance(again._spawn, ZygoteSpawn)


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        ("missing_source", "cape-zygote: bind /nonexistent-cape-source: No such file or directory"),
        ("read_only_tree", "cape-zygote: create /usr/cape-no-such-dir: Read-only file system"),
    ],
)
def test_a_failing_setup_step_is_reported_before_any_user_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: str, reason: str
) -> None:
    good = layout()
    if broken == "missing_source":
        bad = dataclasses.replace(
            good, binds=(*good.binds, ("/nonexistent-cape-source", "/opt/cape"))
        )
    else:
        bad = dataclasses.replace(good, hidden=(*good.hidden, "/usr/cape-no-such-dir"))
    zygote = Zygote(bad)
    monkeypatch.setattr(sandbox_module, "zygote_for", lambda *_: zygote)
    try:
        with pytest.raises(SandboxError) as info:
            FunctionSandbox.start(make_function(tmp_path, "marker_at_import"), limits=LIMITS)
    finally:
        zygote.close()
    assert info.value.reason == "unavailable"
    assert str(info.value) == f"the sandbox zygote could not build the sandbox: {reason}"


def test_the_first_step_joins_the_cgroup_and_a_failure_there_stops_the_session(
    tmp_path: Path,
) -> None:
    # A descriptor the monitor cannot write (read-only): the join fails, nothing else runs.
    zygote = Zygote(layout())
    read_only = os.open(os.devnull, os.O_RDONLY)
    uid = sandbox_module.UIDS.acquire()
    assert uid is not None
    try:
        spawn = ZygoteSpawn(
            zygote, uid, tmp_path, 1 << 20, lambda *_: ["--probe"], cgroup_fds=(read_only,)
        )
        try:
            result = spawn.reap(30.0)
            assert result is not None and result[0] == 1
            assert spawn.read_stderr() == (
                "cape-zygote: join the session's cgroup: Bad file descriptor"
            )
            with pytest.raises(Exception):  # noqa: B017 - WorkerGone: never started
                spawn.wait_started(time.monotonic() + 5, None)
        finally:
            spawn.close_fds()
    finally:
        os.close(read_only)
        sandbox_module.UIDS.release(uid)
        zygote.close()


def test_the_start_path_setting(tmp_path: Path, started: list[FunctionSandbox]) -> None:
    with pytest.raises(ValueError, match="auto, bubblewrap"):
        set_start_path("fork")
    assert "zygote" in describe_start("auto")
    assert describe_start("bubblewrap") == "bubblewrap per session (sandbox_start = bubblewrap)"
    set_start_path("bubblewrap")
    try:
        box = _start(started, make_function(tmp_path, "echo_state"))
        assert isinstance(box._spawn, Spawn)
    finally:
        set_start_path("auto")
    assert isinstance(
        _start(started, make_function(tmp_path, "echo_state", name="b"))._spawn, ZygoteSpawn
    )


@pytest.mark.parametrize("program", ["zygote_program.py", "sandbox_root.py"])
def test_the_zygote_program_imports_only_the_standard_library(program: str) -> None:
    # It runs under the sandbox's interpreter with -I -S (no site-packages), as the worker;
    # imports under ``if TYPE_CHECKING:`` are for mypy only.
    tree = ast.parse((zygote_module.PROGRAM.parent / program).read_text())
    checked = [
        node
        for node in ast.walk(tree)
        if not (isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    ]
    skipped = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for inner in ast.walk(ast.Module(body=node.body, type_ignores=[]))
    }
    imported: set[str] = set()
    for node in checked:
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.add(node.module.split(".")[0])
    assert imported - {"__future__"} <= set(sys.stdlib_module_names)
    assert "ctypes" in imported or program == "zygote_program.py"


def test_the_zygote_compiles_the_guest_helper_once_and_sessions_run_that_code(
    tmp_path: Path,
) -> None:
    # Issue 16: each session compiled cape_encrypt.py again (≈ 0.8 ms of CPU); the zygote now
    # compiles the bytes it binds into every sandbox once, under the path the sandbox sees, and
    # the worker runs that code instead. (The parity test above compares the module the
    # function gets either way.) Loaded here as the zygote loads it, outside any sandbox: the
    # in-sandbox path does not exist on the host, so only the precompiled code can load it.
    spec = importlib.util.spec_from_file_location("zygote_program_t16y", zygote_module.PROGRAM)
    assert spec is not None and spec.loader is not None
    program = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(program)
    empty = tmp_path / "empty"
    empty.mkdir()
    program.Config(["empty", str(empty), "python_bin", "/usr/bin"], b"\0" * 8)
    worker = program.WORKER
    path = f"{GUEST_PATH}/cape_encrypt.py"
    assert not os.path.exists(path)
    code = worker.PRECOMPILED[path]
    source = (zygote_module.PROGRAM.parent / "guest" / "cape_encrypt.py").read_bytes()
    assert code.co_filename == path
    assert code.co_code == compile(source, path, "exec", dont_inherit=True).co_code
    module = worker._exec_source("cape_encrypt", path)
    assert module.__file__ == path and callable(module.encrypt) and callable(module._attach)
    assert path not in worker.PRECOMPILED  # used once: a second load would read the file
    with pytest.raises(FileNotFoundError):
        worker._exec_source("cape_encrypt", path)
