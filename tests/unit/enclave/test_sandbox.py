"""The function sandbox, against real bubblewrap sandboxes and hostile functions (no mocks).

Every hostile case checks three things: the failure is a clear error, no process of the
sandbox's uid survives it, and a fresh sandbox (another session) still works afterwards.
The functions live in ``hostile/`` and are copied in as ``app.py``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import cape
from cape.enclave import sandbox as sandbox_module
from cape.enclave import spawn as spawn_module
from cape.enclave import zygote as zygote_module
from cape.enclave.sandbox import FunctionSandbox, SandboxLimits, check_isolation
from cape.enclave.zygote import ZygoteSpawn
from cape.errors import FunctionError, LimitExceededError, SandboxError

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None,
    reason="bubblewrap (bwrap) is not installed; scripts/setup.sh installs it",
)

HOSTILE = Path(__file__).with_name("hostile")
LIMITS = SandboxLimits(
    memory_bytes=1 << 30,
    cpu_seconds=20,
    processes=32,
    call_timeout_s=10.0,
    load_timeout_s=10.0,
    max_output_bytes=1 << 20,
    max_input_bytes=1 << 20,
    tmp_bytes=16 << 20,
)
MIB = 1 << 20


def make_function(tmp_path: Path, app: str, *, name: str = "fn") -> Path:
    """A function directory whose app.py is hostile/<app>.py (or the given source text)."""
    directory = tmp_path / name
    directory.mkdir()
    source = (HOSTILE / f"{app}.py").read_text() if "\n" not in app else app
    (directory / "app.py").write_text(source)
    return directory


def processes_of(uid: int | None) -> list[int]:
    """Pids of live processes whose real or effective uid is ``uid``."""
    if uid is None:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        line = next(x for x in status.splitlines() if x.startswith("Uid:"))
        real, effective = (int(v) for v in line.split()[1:3])
        if uid in (real, effective):
            found.append(int(entry.name))
    return found


def assert_fresh_session_works(tmp_path: Path) -> None:
    directory = make_function(tmp_path, "echo_state", name=f"fresh-{time.monotonic_ns()}")
    with FunctionSandbox.start(directory, limits=LIMITS) as fresh:
        assert fresh.call(b"still serving") == b"still serving"


@pytest.fixture(params=["zygote", "bubblewrap"])
def start_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs an isolation test against both start paths: the sandbox zygote (the default where
    the runtime is root; test_zygote.py) and bubblewrap (forced, as ``sandbox_start``)."""
    if request.param == "bubblewrap":
        monkeypatch.setattr(zygote_module, "_settings", {"start": "bubblewrap"})
    return str(request.param)


def start(
    started: list[FunctionSandbox], directory: Path, limits: SandboxLimits = LIMITS
) -> FunctionSandbox:
    box = FunctionSandbox.start(directory, limits=limits)
    started.append(box)
    return box


def call_json(box: FunctionSandbox, payload: object) -> dict[str, object]:
    result = json.loads(box.call(json.dumps(payload).encode()))
    assert isinstance(result, dict)
    return result


# --- honest functions -------------------------------------------------------------------------


def test_echo_state_persists_and_module_code_runs_once(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    box = start(started, make_function(tmp_path, "echo_state"))
    assert box.alive
    assert box.call(b"hello") == b"hello"
    assert box.call(b"") == b""
    assert box.call(b"count") == b"3 1"  # third call, one import
    assert box.call(b"count") == b"4 1"


def test_sessions_do_not_share_state(
    tmp_path: Path, started: list[FunctionSandbox], start_path: str
) -> None:
    first = start(started, make_function(tmp_path, "echo_state", name="a"))
    second = start(started, make_function(tmp_path, "echo_state", name="b"))
    first.call(b"x")
    first.call(b"x")
    assert first.call(b"count") == b"3 1"
    assert second.call(b"count") == b"1 1"
    if first.host_uid is not None:
        assert first.host_uid != second.host_uid


def test_return_values_follow_the_handler_contract(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    box = start(started, make_function(tmp_path, "contract"))
    assert box.call(b"bytes") == b"\x00\xffraw"
    assert box.call(b"str") == "h\u00e9llo".encode()
    assert box.call(b"none") == b""
    assert box.call(b"int") == b"42"
    assert box.call(b"tuple") == b"(1, 'a')"
    assert box.call(b"dict") == b"{'k': 1.5}"
    assert box.call(b"bytearray") == b"ba"


def test_handler_exception_is_a_function_error_and_the_session_goes_on(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    box = start(started, make_function(tmp_path, "raises"))
    with pytest.raises(FunctionError) as info:
        box.call(b"boom")
    assert info.value.diagnostics() == "function raised ValueError: boom"
    with pytest.raises(FunctionError, match="SystemExit: 7"):
        box.call(b"exit")
    assert box.alive
    assert box.call(b"again") == b"again"


def test_app_py_in_a_single_top_level_folder(tmp_path: Path) -> None:
    outer = tmp_path / "bundle"
    outer.mkdir()
    inner = make_function(outer, "echo_state", name="myfunc")
    with FunctionSandbox.start(outer, limits=LIMITS) as box:
        assert box.call(b"count") == b"1 1"
        assert box.call(b"cwd") == f"/function/{inner.name}".encode()  # cwd was the folder


def test_calls_from_many_threads_are_serialised(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    box = start(started, make_function(tmp_path, "echo_state"))
    results: list[bytes] = []

    def worker(i: int) -> None:
        for j in range(10):
            results.append(box.call(f"{i}-{j}".encode()))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == sorted(f"{i}-{j}".encode() for i in range(4) for j in range(10))
    assert box.call(b"count") == b"41 1"


def test_input_over_the_limit_is_refused_before_the_sandbox(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    box = start(started, make_function(tmp_path, "echo_state"))
    with pytest.raises(LimitExceededError, match="function input in bytes"):
        box.call(b"x" * (LIMITS.max_input_bytes + 1))
    assert box.call(b"x" * LIMITS.max_input_bytes) == b"x" * LIMITS.max_input_bytes


def test_close_is_idempotent_and_moves_the_function_directory_back(tmp_path: Path) -> None:
    directory = make_function(tmp_path, "echo_state")
    with FunctionSandbox.start(directory, limits=LIMITS) as box:
        box.call(b"x")
        uid = box.host_uid
    box.close()
    box.close()
    assert not box.alive
    assert (directory / "app.py").is_file()  # pytest's tmp dirs are 0700: it was relocated
    assert processes_of(uid) == []
    with pytest.raises(SandboxError) as info:
        box.call(b"x")
    assert info.value.reason == "crashed"
    assert "no longer running" in str(info.value)


def _identity(pid: int) -> dict[str, list[str]]:
    status = Path(f"/proc/{pid}/status").read_text()
    wanted = ("Uid", "Gid", "Groups", "CapPrm", "CapEff", "CapAmb")
    fields = (line.split(":", 1) for line in status.splitlines())
    return {key: value.split() for key, value in fields if key in wanted}


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid switch needs root")
@pytest.mark.parametrize("way", ["setpriv", "subprocess", "zygote"])
def test_bubblewrap_runs_as_the_sandbox_uid_with_no_groups_or_capabilities(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    # Both ways of switching (setpriv, then vfork; or subprocess's own switch after a fork)
    # leave bubblewrap, on the host, with nothing of root's: every uid and gid the sandbox's
    # own, no supplementary group (root's 0 would let it read group-0 files), no capability.
    # The zygote's monitor of the session (the process in bubblewrap's place) likewise.
    if way != "zygote":
        monkeypatch.setattr(zygote_module, "_settings", {"start": "bubblewrap"})
    if way == "subprocess":
        monkeypatch.setattr(spawn_module, "SETPRIV", None)
    elif way == "setpriv" and spawn_module.SETPRIV is None:
        pytest.skip("setpriv (util-linux) is not installed")
    groups = os.getgroups()
    os.setgroups([0, 4])  # root with supplementary groups, as on many hosts (0 root, 4 adm)
    try:
        with FunctionSandbox.start(make_function(tmp_path, "echo_state"), limits=LIMITS) as box:
            uid = str(box.host_uid)
            assert isinstance(box._spawn, ZygoteSpawn) == (way == "zygote")
            seen = _identity(box._spawn.pid)
            assert box.call(b"x") == b"x"
    finally:
        os.setgroups(groups)
    assert seen == {
        "Uid": [uid] * 4,
        "Gid": [uid] * 4,
        "Groups": [],
        "CapPrm": ["0000000000000000"],
        "CapEff": ["0000000000000000"],
        "CapAmb": ["0000000000000000"],
    }


# --- what the function can see ---------------------------------------------------------------


def test_the_inside_is_isolated_and_limited(
    tmp_path: Path, started: list[FunctionSandbox], start_path: str
) -> None:
    box = start(started, make_function(tmp_path, "introspect"))
    seen = call_json(box, {})
    assert seen["uid"] == seen["gid"] == 1000
    assert seen["cap_eff"] == "0000000000000000"
    assert seen["hostname"] == "cape-sandbox"
    assert seen["cwd"] == "/function"
    pids = seen["pids"]
    assert isinstance(pids, list) and len(pids) <= 3  # bwrap's init, the worker, maybe zombies
    assert os.getpid() not in pids or os.getpid() < 4
    env = seen["env"]
    assert isinstance(env, dict)
    assert set(env) <= {
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "USER",
        "LOGNAME",
        "PWD",
        "MALLOC_ARENA_MAX",
    }
    assert seen["limits"] == {
        "RLIMIT_AS": [LIMITS.memory_bytes] * 2,
        "RLIMIT_CPU": [LIMITS.cpu_seconds] * 2,
        "RLIMIT_NPROC": [LIMITS.processes] * 2,
        "RLIMIT_NOFILE": [LIMITS.open_files] * 2,
        "RLIMIT_FSIZE": [LIMITS.file_size_bytes] * 2,
        "RLIMIT_CORE": [0, 0],
    }
    # Only stdio and the channel are open: nothing else of the runtime leaked in.
    assert len(seen["open_fds"]) <= 5  # type: ignore[arg-type]
    assert seen["imports"] == {
        "cryptography": "ModuleNotFoundError",
        "cape": "ModuleNotFoundError",
        "pytest": "ModuleNotFoundError",
        "json": "imported",
    }
    sys_path = seen["sys_path"]
    assert isinstance(sys_path, list)
    assert not any("site-packages" in p or "dist-packages" in p for p in sys_path)


def test_runtime_files_and_keys_are_invisible(
    tmp_path: Path, started: list[FunctionSandbox], start_path: str
) -> None:
    key_file = tmp_path / "kms-master.key"
    key_file.write_bytes(os.urandom(32))
    directory = make_function(tmp_path, "snoop")
    cape_dir = str(Path(cape.__file__).parent)
    site_packages = str(Path(json.__file__).parent)  # stdlib, for contrast below
    secrets = [
        str(key_file),
        str(tmp_path),
        str(directory),  # the function's own host path
        sys.prefix,  # the virtualenv
        str(Path(sys.prefix) / "lib"),
        cape_dir,
        str(Path(cape_dir) / "errors.py"),
        f"{sys.base_prefix}/lib/python3.{sys.version_info.minor}/site-packages",
        "/root",
        "/root/.bash_history",
        "/home",
        "/work",
        "/etc/shadow",
        "/etc/hostname",
        "/var",
        "/run",
        "/sys",
        f"/proc/{os.getpid()}/mem",
        f"/proc/{os.getpid()}/environ",
        "/proc/1/mem",  # the worker itself is pid 1 of its namespace
        "/proc/2/environ",
    ]
    outcome = call_json(start(started, directory), [*secrets, site_packages])
    assert str(outcome[site_packages]).startswith("listed")
    leaked = {path: result for path, result in outcome.items() if path in secrets}
    for path, result in leaked.items():
        assert isinstance(result, str)
        if path == f"{sys.base_prefix}/lib/python3.{sys.version_info.minor}/site-packages":
            assert result in ("listed 0 entries", "error 2"), path  # covered by an empty dir
        elif path == "/root":
            assert not result.startswith("read"), path  # at most the interpreter's mount point
        else:
            assert result.startswith("error"), f"{path}: {result}"


def test_network_is_unreachable(
    tmp_path: Path, started: list[FunctionSandbox], start_path: str
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    try:
        outcome = call_json(start(started, make_function(tmp_path, "network")), {"port": port})
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing connected to the host
    finally:
        listener.close()
    assert "connected" not in outcome.values()
    denied = "socket: 13"  # EACCES from the seccomp filter
    assert outcome["inet_local"] == outcome["inet_remote"] == outcome["inet6"] == denied
    assert outcome["netlink"] == outcome["packet"] == denied
    assert outcome["unix"] == "unix ok"
    assert outcome["interfaces"] == ["lo"]


def test_writes_land_only_in_scratch(tmp_path: Path, start_path: str) -> None:
    # /function is read-only (issue 18, finding 4): writes there would land in enclave memory
    # outside every scratch limit.
    directory = make_function(tmp_path, "write_anywhere")
    allowed = ["/tmp/x", "/dev/shm/x"]
    denied = ["/usr/x", "/etc/x", "/function/../x", "/x", "/dev/x", "/proc/x", "/cape-worker/x"]
    denied += ["/function/x", "x", "/function/app.py"]
    denied += [f"{sys.base_prefix}/x", "/cape-worker/worker.py", "/etc/passwd"]
    with FunctionSandbox.start(directory, limits=LIMITS) as box:
        outcome = call_json(box, allowed + denied)
    for path in allowed:
        assert outcome[path] == "written", path
    for path in denied:
        assert str(outcome[path]).startswith("error"), f"{path}: {outcome[path]}"
    assert outcome["/function/x"] == outcome["/function/app.py"] == "error 30"  # EROFS
    assert not (directory / "x").exists()
    assert not (tmp_path / "x").exists()


def test_seccomp_denies_dangerous_syscalls(
    tmp_path: Path, started: list[FunctionSandbox], start_path: str
) -> None:
    outcome = call_json(start(started, make_function(tmp_path, "syscalls")), {})
    assert outcome == {
        "ptrace": "EPERM",
        "personality": "EPERM",
        "unshare_user": "EPERM",
        "unshare_mount": "EPERM",
        "mount": "EPERM",
        "io_uring_setup": "EPERM",
        "socket_inet": "EACCES",
        "seccomp_mode": "2",
    }


# --- hostile functions ---------------------------------------------------------------------


def test_infinite_loop_times_out(tmp_path: Path, started: list[FunctionSandbox]) -> None:
    box = start(started, make_function(tmp_path, "spin"), dataclass_replace(call_timeout_s=1.5))
    began = time.monotonic()
    with pytest.raises(SandboxError) as info:
        box.call(b"")
    assert time.monotonic() - began < 1.5 + 3
    assert info.value.reason == "timeout"
    assert info.value.diagnostics() == "the call exceeded the time limit of 1.5 s"
    assert not box.alive
    assert processes_of(box.host_uid) == []
    with pytest.raises(SandboxError, match="no longer running") as again:
        box.call(b"")
    assert again.value.reason == "crashed"
    assert_fresh_session_works(tmp_path)


def test_cpu_limit(tmp_path: Path, started: list[FunctionSandbox]) -> None:
    box = start(started, make_function(tmp_path, "spin"), dataclass_replace(cpu_seconds=1))
    with pytest.raises(SandboxError) as info:
        box.call(b"")
    assert info.value.reason == "cpu"
    assert "CPU-time limit of 1 s" in str(info.value)
    assert_fresh_session_works(tmp_path)


def test_fork_bomb_is_contained(
    tmp_path: Path, started: list[FunctionSandbox], start_path: str
) -> None:
    limits = dataclass_replace(call_timeout_s=3.0)
    box = start(started, make_function(tmp_path, "fork_bomb"), limits)
    counted = box.call(b"count").decode()
    forks = int(counted.split()[0])
    assert forks < limits.processes
    assert "BlockingIOError" in counted
    assert box.alive

    peak: list[int] = []
    failure: list[BaseException] = []

    def bomb() -> None:
        try:
            box.call(b"forever")
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=bomb)
    thread.start()
    time.sleep(1.0)
    try:
        # The host still forks fine while the bomb runs, and the bomb stays under its limit.
        assert subprocess.run(["true"], check=False).returncode == 0
        peak.append(len(processes_of(box.host_uid)))
    finally:
        thread.join()
    if box.host_uid is not None:
        assert 0 < peak[0] <= limits.processes + 2  # + bubblewrap's two outside the limit
    assert isinstance(failure[0], SandboxError)
    assert failure[0].reason == "timeout"
    assert processes_of(box.host_uid) == []
    assert_fresh_session_works(tmp_path)


def test_allocating_10_gb_fails_inside(tmp_path: Path, started: list[FunctionSandbox]) -> None:
    box = start(started, make_function(tmp_path, "allocate"))
    with pytest.raises(FunctionError) as info:
        box.call(b"big")
    assert info.value.diagnostics().startswith("function raised MemoryError")
    assert f"{LIMITS.memory_bytes} bytes" in str(info.value)
    assert box.call(b"small") == b"\x00\x00"  # the session goes on


def test_huge_output_is_refused_without_reading_it(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    box = start(started, make_function(tmp_path, "huge_output"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(LimitExceededError) as info:
        box.call(str(100 * MIB).encode())
    assert info.value.limit == LIMITS.max_output_bytes
    assert info.value.actual == 100 * MIB
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # KiB
    assert box.call(str(LIMITS.max_output_bytes).encode()) == b"x" * LIMITS.max_output_bytes


def test_forged_oversized_frame_kills_the_sandbox(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    box = start(started, make_function(tmp_path, "forge_frame"))
    with pytest.raises(SandboxError) as info:
        box.call(b"")
    assert info.value.reason == "output"
    assert "exceeds the limit of 1048576 bytes (1073741823 bytes announced)" in str(info.value)
    assert not box.alive
    assert_fresh_session_works(tmp_path)


def test_os_exit_is_a_crash(tmp_path: Path, started: list[FunctionSandbox]) -> None:
    box = start(started, make_function(tmp_path, "exit3"))
    with pytest.raises(SandboxError) as info:
        box.call(b"")
    assert info.value.reason == "crashed"
    assert (
        info.value.diagnostics() == "the function ended the worker during the call (exit status 3)"
    )
    assert_fresh_session_works(tmp_path)


def test_segfault_is_a_crash_naming_the_signal(
    tmp_path: Path, started: list[FunctionSandbox], start_path: str
) -> None:
    box = start(started, make_function(tmp_path, "segfault"))
    with pytest.raises(SandboxError) as info:
        box.call(b"")
    assert info.value.reason == "crashed"
    assert (
        info.value.diagnostics()
        == "the function crashed the worker during the call: killed by SIGSEGV"
    )
    assert_fresh_session_works(tmp_path)


def test_printing_a_gigabyte_does_not_harm_the_runtime(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    box = start(
        started, make_function(tmp_path, "print_flood"), dataclass_replace(call_timeout_s=30)
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcome: bytes | str
    try:
        outcome = box.call(b"1024")
    except SandboxError as exc:  # a slow machine may hit the wall clock instead
        outcome = exc.reason
    assert outcome in (b"done", "timeout")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024
    assert_fresh_session_works(tmp_path)


# --- bad bundles and failing loads ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"main.py": "def cape_handler(x): return x\n"}, "the bundle has no app.py"),
        ({"app.py": "def cape_handler(x) return x\n"}, "app.py failed to import: SyntaxError:"),
        (
            {"app.py": "import no_such_module\n"},
            "ModuleNotFoundError: No module named 'no_such_module'",
        ),
        (
            {"app.py": "raise RuntimeError('at import')\n"},
            "app.py failed to import: RuntimeError: at import",
        ),
        ({"app.py": "import sys\nsys.exit(2)\n"}, "app.py failed to import: SystemExit: 2"),
        ({"app.py": "def handler(x):\n    return x\n"}, "app.py defines no cape_handler"),
        ({"app.py": "cape_handler = 3\n"}, "cape_handler in app.py is not callable (it is a int)"),
    ],
)
def test_bad_bundles_fail_to_load(tmp_path: Path, files: dict[str, str], message: str) -> None:
    directory = tmp_path / "fn"
    directory.mkdir()
    for name, text in files.items():
        (directory / name).write_text(text)
    with pytest.raises(SandboxError) as info:
        FunctionSandbox.start(directory, limits=LIMITS)
    assert info.value.reason == "load"
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert (directory / next(iter(files))).exists()  # moved back after the failed start


def test_module_level_infinite_loop_times_out_at_load(tmp_path: Path) -> None:
    with pytest.raises(SandboxError) as info:
        FunctionSandbox.start(
            make_function(tmp_path, "load_spin"), limits=dataclass_replace(load_timeout_s=1.0)
        )
    assert info.value.reason == "timeout"
    assert info.value.diagnostics() == "loading app.py exceeded the time limit of 1 s"
    assert_fresh_session_works(tmp_path)


def test_running_out_of_memory_at_import(tmp_path: Path) -> None:
    with pytest.raises(SandboxError) as info:
        FunctionSandbox.start(make_function(tmp_path, "load_allocate"), limits=LIMITS)
    assert info.value.reason == "memory"
    limit = LIMITS.memory_bytes
    assert info.value.diagnostics() == (
        f"the function exceeded the memory limit of {limit} bytes while loading app.py"
    )


def test_a_worker_that_hangs_up_is_killed(tmp_path: Path, started: list[FunctionSandbox]) -> None:
    box = start(started, make_function(tmp_path, "hang_up"))
    with pytest.raises(SandboxError) as info:
        box.call(b"")
    assert info.value.reason == "crashed"
    assert info.value.diagnostics() == "the sandbox worker hung up without exiting"
    assert processes_of(box.host_uid) == []


def test_missing_function_directory(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="does not exist") as info:
        FunctionSandbox.start(tmp_path / "absent", limits=LIMITS)
    assert info.value.reason == "load"


# --- fail closed ----------------------------------------------------------------------------


def test_without_bubblewrap_nothing_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "marker"
    directory = make_function(tmp_path, "marker_at_import")
    (directory / "marker_path.txt").write_text(str(marker))
    monkeypatch.setattr(sandbox_module, "BWRAP", str(tmp_path / "no" / "bwrap"))
    with pytest.raises(SandboxError) as info:
        check_isolation()
    assert info.value.reason == "unavailable"
    with pytest.raises(SandboxError) as info:
        FunctionSandbox.start(directory, limits=LIMITS)
    assert info.value.reason == "unavailable"
    assert "refusing to run user code unsandboxed" in str(info.value)
    assert "install bubblewrap" in str(info.value)
    assert not marker.exists()
    monkeypatch.setattr(sandbox_module, "BWRAP", None)
    with pytest.raises(SandboxError, match="bubblewrap not found"):
        FunctionSandbox.start(directory, limits=LIMITS)
    assert not marker.exists()


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="call_timeout_s"):
        SandboxLimits(call_timeout_s=0)


def dataclass_replace(**changes: float) -> SandboxLimits:
    import dataclasses

    return dataclasses.replace(LIMITS, **changes)  # type: ignore[arg-type]


def test_close_from_another_thread_ends_a_running_call(tmp_path: Path) -> None:
    box = FunctionSandbox.start(make_function(tmp_path, "spin"), limits=LIMITS)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            box.call(b"")
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.3)
    began = time.monotonic()
    box.close()
    thread.join()
    assert time.monotonic() - began < 3
    assert isinstance(failure[0], SandboxError)
    assert failure[0].reason == "crashed"
    assert failure[0].diagnostics() == "the sandbox was closed"
    assert processes_of(box.host_uid) == []


def test_check_isolation_passes_here() -> None:
    check_isolation()  # bubblewrap is installed (the module is skipped otherwise)


def test_seccomp_policy_covers_the_required_calls() -> None:
    from cape.enclave import seccomp

    required = {
        "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root",
        "chroot", "unshare", "setns", "bpf", "keyctl", "add_key", "request_key", "kexec_load",
        "kexec_file_load", "init_module", "finit_module", "delete_module", "perf_event_open",
        "userfaultfd", "open_by_handle_at", "name_to_handle_at", "reboot", "swapon", "swapoff",
        "iopl", "ioperm", "settimeofday", "clock_settime", "adjtimex", "acct", "quotactl",
        "lookup_dcookie", "fanotify_init", "io_uring_setup", "io_uring_enter",
        "io_uring_register", "seccomp",
    }  # fmt: skip
    assert required <= set(seccomp.DENIED_SYSCALLS)
    program = seccomp.bpf_program()
    assert program and len(program) % 8 == 0  # struct sock_filter is 8 bytes


def test_a_private_session_directory_is_lent_to_the_sandbox_and_returned() -> None:
    # The runtime's layout: a traversable workdir, a 0700 mkdtemp per session, the bundle in it.
    workdir = Path(tempfile.mkdtemp(prefix="cape-sandbox-test-"))
    try:
        workdir.chmod(0o711)
        session = Path(tempfile.mkdtemp(dir=workdir))
        directory = make_function(session, "echo_state")
        with FunctionSandbox.start(directory, limits=LIMITS) as box:
            assert box.call(b"count") == b"1 1"
            if box.host_uid is not None:
                assert not directory.exists()  # lent out, next to the workdir
                assert [p.name[:13] for p in workdir.iterdir()].count(".cape-sandbox") == 1
        assert (directory / "app.py").is_file()
        assert sorted(p.name for p in workdir.iterdir()) == [session.name]
    finally:
        shutil.rmtree(workdir)
