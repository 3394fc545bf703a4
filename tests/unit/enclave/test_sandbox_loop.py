"""A session's sandbox released on the runtime's event loop (issue 16): no thread hand-off
where the zygote started it, and nothing leaks when a release races the session's end or is
cancelled midway. Real sandboxes (the zygote: the runtime is root here)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from cape.enclave import cgroups
from cape.enclave import sandbox as sandbox_module
from cape.enclave.cgroups import SandboxCgroup
from cape.enclave.lanes import Lanes
from cape.enclave.sandbox import FunctionSandbox
from cape.enclave.warm import WarmPool
from cape.enclave.zygote import ZygoteSpawn
from cape.errors import SandboxError
from cape.formats.bundle import BundleLimits
from tests.unit.enclave.test_sandbox import LIMITS, make_function, processes_of
from tests.unit.enclave.test_warm import KEY, _acquire, _settle

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the zygote (the loop's start path) runs where the runtime is root"
)

SLEEPY = "import time\n\ndef cape_handler(data):\n    time.sleep(30)\n    return data\n"


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """The threads on which sandboxes gave back their uids (a release's last step)."""
    seen: dict[str, list[int]] = {"acquire": [], "release": []}
    pool = sandbox_module.UIDS
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
    assert box.host_uid not in sandbox_module.UIDS._in_use
    group = box.cgroup
    if group is not None:
        assert all(not os.path.exists(path) for path in group._unique)


def _start(directory: Path) -> FunctionSandbox:
    box = FunctionSandbox.start(directory, limits=LIMITS)
    assert isinstance(box._spawn, ZygoteSpawn)
    return box


def test_a_sessions_release_stays_on_the_loops_thread(
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
            threads["release"].clear()  # the probes' (the process's first start) were on a thread
            for lease in (first, second):
                assert isinstance(lease.sandbox._spawn, ZygoteSpawn) and lease.inline
                assert lease.sandbox.call(b"x").endswith(b":x")
                await lease.release_async()
                _gone(lease.sandbox)
                assert not lease.holder.exists()
        finally:
            await pool.close()
        assert len(threads["release"]) == 3  # the two sessions and the spare left
        assert set(threads["release"]) == {loop_thread}

    asyncio.run(main())


def test_a_release_racing_the_sessions_end_ends_the_sandbox_once(tmp_path: Path) -> None:
    """The host's hang-up closes the sandbox on a thread (the inbox's ``on_close``) while the
    session's own release runs on the loop: both return, everything is given back."""

    async def main() -> None:
        lanes = Lanes()
        before = _open_fds()
        boxes = [_start(make_function(tmp_path, "echo_state", name=f"f{n}")) for n in range(3)]
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
        box = _start(make_function(tmp_path, SLEEPY))
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
        box = _start(make_function(tmp_path, "echo_state"))
        release = asyncio.ensure_future(box.close_async())
        await asyncio.sleep(0)  # the kill is sent; the exit report is awaited
        release.cancel()
        with pytest.raises(asyncio.CancelledError):
            await release
        _gone(box)
        assert _open_fds() <= before
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
