"""A session's sandbox started and released on the runtime's event loop (issue 16): no thread
hand-off where the zygote starts it, and nothing leaks when a release races the session's end
or the zygote dies mid-start. Real sandboxes (the zygote: the runtime is root here)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from cape.enclave import cgroups, sandbox_loop
from cape.enclave import sandbox as sandbox_module
from cape.enclave import zygote as zygote_module
from cape.enclave.cgroups import SandboxCgroup
from cape.enclave.lanes import Lanes
from cape.enclave.sandbox import FunctionSandbox
from cape.enclave.spawn import Spawn
from cape.enclave.staging import layout
from cape.enclave.warm import WarmPool
from cape.enclave.zygote import Zygote, ZygoteSpawn
from cape.errors import SandboxError
from cape.formats.bundle import BundleLimits
from tests.unit.enclave.test_sandbox import LIMITS, make_function, processes_of
from tests.unit.enclave.test_warm import KEY, _acquire, _settle

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the zygote (the loop's start path) runs where the runtime is root"
)

SLEEPY = "import time\n\ndef cape_handler(data):\n    time.sleep(30)\n    return data\n"


@pytest.fixture(autouse=True)
def probed(tmp_path: Path) -> None:
    """The isolation and zygote probes done (the first start runs them, on a thread)."""
    directory = make_function(tmp_path, "echo_state", name="probe")
    FunctionSandbox.start(directory, limits=LIMITS).close()
    assert sandbox_module._starts_on_loop()


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """The threads on which sandboxes took and gave back their uids (a start's first step,
    a release's last)."""
    seen: dict[str, list[int]] = {"acquire": [], "release": []}
    pool = sandbox_loop.UIDS
    acquire, release = pool.acquire, pool.release

    def acquired() -> int | None:
        seen["acquire"].append(threading.get_ident())
        return acquire()

    def released(uid: int | None, *, vacated: bool = False) -> None:
        seen["release"].append(threading.get_ident())
        release(uid, vacated=vacated)

    monkeypatch.setattr(pool, "acquire", acquired)
    monkeypatch.setattr(pool, "release", released)
    return seen


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _gone(box: FunctionSandbox) -> None:
    """Nothing of ``box`` is left: no process, no cgroup, its uid given back."""
    assert not box.alive and box._closed
    assert processes_of(box.host_uid) == []
    assert box.host_uid not in sandbox_loop.UIDS._in_use
    group = box.cgroup
    if group is not None:
        assert all(not os.path.exists(path) for path in group._unique)


async def _start(lanes: Lanes, directory: Path) -> FunctionSandbox:
    async def start(offload: Callable[..., object]) -> FunctionSandbox:
        return await FunctionSandbox.start_async(directory, offload, limits=LIMITS)  # type: ignore[arg-type]

    return await lanes.calls.run_async("alice", start)


def test_a_spares_start_and_its_release_stay_on_the_loops_thread(
    tmp_path: Path, threads: dict[str, list[int]]
) -> None:
    async def main() -> None:
        loop_thread = threading.get_ident()
        pool = WarmPool(
            tmp_path / "pool",
            sandbox_limits=LIMITS,
            bundle_limits=BundleLimits(),
            lanes=Lanes(),
            max_spares=1,
        )
        (tmp_path / "pool").mkdir()
        try:
            first = await _acquire(pool)  # a miss: started within the session, then a spare
            await _settle(pool)
            second = await _acquire(pool)  # the spare
            stats = pool.spare_stats(*KEY)
            assert stats is not None and stats.hits == 1
            await _settle(pool)  # its replacement started: no start runs during the releases
            for lease in (first, second):
                assert isinstance(lease.sandbox._spawn, ZygoteSpawn)
                assert lease.sandbox.call(b"x").endswith(b":x")
                await lease.release_async()
                _gone(lease.sandbox)
                assert not lease.holder.exists()
        finally:
            await pool.close()
        assert len(threads["acquire"]) == 3 and len(threads["release"]) == 3
        assert set(threads["acquire"]) | set(threads["release"]) == {loop_thread}

    asyncio.run(main())


def test_a_release_racing_the_sessions_end_ends_the_sandbox_once(tmp_path: Path) -> None:
    """The host's hang-up closes the sandbox on a thread (the inbox's ``on_close``) while the
    session's own release runs on the loop: both return, everything is given back."""

    async def main() -> None:
        lanes = Lanes()
        before = _open_fds()
        boxes = [
            await _start(lanes, make_function(tmp_path, "echo_state", name=f"f{n}"))
            for n in range(3)
        ]
        for box in boxes:
            assert isinstance(box._spawn, ZygoteSpawn)
        loop = asyncio.get_running_loop()
        for box in boxes:
            hang_up = loop.run_in_executor(None, box.close)
            await asyncio.gather(box.close_async(), hang_up)
            _gone(box)
        assert _open_fds() <= before
        lanes.close()

    asyncio.run(main())


def test_a_release_during_a_call_in_flight_kills_it(tmp_path: Path) -> None:
    async def main() -> None:
        lanes = Lanes()
        box = await _start(lanes, make_function(tmp_path, SLEEPY))
        call = asyncio.ensure_future(lanes.calls.run_async("alice", box.call_async, b"x"))
        await asyncio.sleep(0.2)
        await box.close_async()
        with pytest.raises(SandboxError) as info:
            await call
        assert info.value.reason == "crashed"
        _gone(box)
        lanes.close()

    asyncio.run(main())


def test_a_release_cancelled_midway_still_ends_everything(tmp_path: Path) -> None:
    async def main() -> None:
        lanes = Lanes()
        before = _open_fds()
        box = await _start(lanes, make_function(tmp_path, "echo_state"))
        release = asyncio.ensure_future(box.close_async())
        await asyncio.sleep(0)  # the kill is sent; the exit report is awaited
        release.cancel()
        with pytest.raises(asyncio.CancelledError):
            await release
        _gone(box)
        assert _open_fds() <= before
        lanes.close()

    asyncio.run(main())


def test_a_start_cancelled_midway_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[int | None] = []
    acquire = sandbox_loop.UIDS.acquire

    def acquired() -> int | None:
        taken.append(acquire())
        return taken[-1]

    monkeypatch.setattr(sandbox_loop.UIDS, "acquire", acquired)

    async def main() -> None:
        lanes = Lanes()
        before = _open_fds()
        held = set(sandbox_loop.UIDS._in_use)
        start = asyncio.ensure_future(_start(lanes, make_function(tmp_path, SLEEPY)))
        for _ in range(3):  # the request sent, "forked" awaited
            await asyncio.sleep(0)
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        assert set(sandbox_loop.UIDS._in_use) == held
        assert _open_fds() <= before
        # The session the zygote forked for the request was ended (and the zygote reaped it)
        # before its uid and cgroup went back: the zygote has no child left.
        assert len(taken) == 1
        zygote = _zygote().pid
        assert Path(f"/proc/{zygote}/task/{zygote}/children").read_text().split() == []
        lanes.close()

    asyncio.run(main())


def _zygote() -> Zygote:
    zygote = zygote_module._zygotes.get(layout())
    assert zygote is not None and zygote.pid is not None
    return zygote


def test_the_zygote_dying_mid_start_falls_back_to_bubblewrap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The zygote dies with the session's request unread: its status socket hangs up, this
    start is made by bubblewrap, and the next one gets a fresh zygote."""
    zygote = _zygote()
    old = zygote.pid
    assert old is not None
    send = Zygote.try_request

    def send_then_die(self: Zygote, fields: list[str], fds: list[int]) -> bool:
        os.kill(old, signal.SIGSTOP)  # it cannot fork before it dies
        sent = send(self, fields, fds)
        os.kill(old, signal.SIGKILL)
        return sent

    monkeypatch.setattr(Zygote, "try_request", send_then_die)

    async def main() -> None:
        lanes = Lanes()
        box = await _start(lanes, make_function(tmp_path, "echo_state", name="first"))
        try:
            assert isinstance(box._spawn, Spawn)  # bubblewrap for this start
            assert box.call(b"first") == b"first"
        finally:
            await box.close_async()
        _gone(box)
        monkeypatch.setattr(Zygote, "try_request", send)
        again = await _start(lanes, make_function(tmp_path, "echo_state", name="second"))
        try:
            assert isinstance(again._spawn, ZygoteSpawn)
            assert again.call(b"second") == b"second"
            assert _zygote().pid not in (None, old)
        finally:
            await again.close_async()
        _gone(again)
        lanes.close()

    asyncio.run(main())


def test_a_wedged_zygote_is_ended_and_the_start_made_by_bubblewrap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    zygote = _zygote()
    assert zygote.pid is not None
    monkeypatch.setattr(zygote_module, "_FORK_TIMEOUT_S", 1.0)
    os.kill(zygote.pid, signal.SIGSTOP)

    async def main() -> None:
        lanes = Lanes()
        box = await _start(lanes, make_function(tmp_path, "echo_state"))
        try:
            assert isinstance(box._spawn, Spawn)
            assert box.call(b"x") == b"x"
            assert zygote.pid is None  # the wedged one was ended
        finally:
            await box.close_async()
        _gone(box)
        lanes.close()

    asyncio.run(main())


def test_a_load_failure_on_the_loop_is_typed_and_leaves_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        lanes = Lanes()
        held = set(sandbox_loop.UIDS._in_use)
        before = _open_fds()
        failing = (
            ("raise ValueError('no')\n", "load"),
            ("import os\nos._exit(3)\n", "load"),
            ("import ctypes\nctypes.string_at(0)\n", "crashed"),
        )
        for n, (app, reason) in enumerate(failing):
            with pytest.raises(SandboxError) as info:
                await _start(lanes, make_function(tmp_path, app, name=f"bad{n}"))
            assert info.value.reason == reason, info.value
        assert set(sandbox_loop.UIDS._in_use) == held
        assert _open_fds() <= before
        assert not [p for p in Path(tmp_path).glob("*") if p.name.startswith(".cape-sandbox")]
        lanes.close()

    asyncio.run(main())


def test_cgroup_removal_on_the_loop_retries_until_the_group_is_empty(tmp_path: Path) -> None:
    """``remove_async`` waits on the loop's timers, not in a sleep of the loop's thread."""
    del tmp_path
    groups, _ = cgroups.shared()
    if groups is None:
        pytest.skip("no cgroups here")
    group = groups.create(LIMITS._cgroup())
    assert isinstance(group, SandboxCgroup)

    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        beat = asyncio.ensure_future(ticker())
        child = await asyncio.create_subprocess_exec("sleep", "30")
        group.add(child.pid)
        await group.remove_async()
        await child.wait()
        beat.cancel()
        return ticks

    assert asyncio.run(main()) > 1
    assert all(not os.path.exists(path) for path in group._unique)


def test_an_empty_group_goes_without_a_kill_or_a_read_of_its_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reaped sandbox's group is empty: ``rmdir`` (which the kernel refuses for a group
    with a process in it) removes it at once, on the loop and off it."""
    groups, _ = cgroups.shared()
    if groups is None:
        pytest.skip("no cgroups here")
    looked: list[str] = []

    def pids(self: SandboxCgroup) -> list[int]:
        looked.append("pids")
        return []

    monkeypatch.setattr(SandboxCgroup, "pids", pids)
    for remove in (SandboxCgroup.remove, lambda g: asyncio.run(g.remove_async())):
        group = groups.create(LIMITS._cgroup())
        remove(group)
        assert all(not os.path.exists(path) for path in group._unique)
    assert looked == []
