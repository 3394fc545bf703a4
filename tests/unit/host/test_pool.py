"""The enclave pool's choices and healing, with stand-in connections (the real processes are
exercised end to end in tests/e2e/test_sessions.py)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from cape.errors import CapeError
from cape.host.launcher import EnclaveConnection, EnclaveLauncher, HostSession
from cape.host.pool import AFFINITY_SLACK, EnclavePool


class FakeConnection:
    def __init__(self, number: int) -> None:
        self.number = number
        self.pcrs = {0: b"\x00" * 48}
        self._closed = asyncio.Event()
        self.opened: list[str] = []

    @property
    def alive(self) -> bool:
        return not self._closed.is_set()

    def die(self) -> None:
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def close(self) -> None:
        self._closed.set()

    async def open_session(self, kind: str, **_: Any) -> HostSession:
        self.opened.append(kind)
        session = HostSession(cast(EnclaveConnection, self), len(self.opened))
        session.closed = True  # close() must not send anything
        return session

    def forget(self, sid: int) -> None:
        pass


class FakeLauncher(EnclaveLauncher):
    def __init__(self, fail_first: int = 0) -> None:
        self.started: list[FakeConnection] = []
        self.fail_first = fail_first

    async def start(self) -> EnclaveConnection:
        if self.fail_first:
            self.fail_first -= 1
            raise CapeError("cannot start")
        connection = FakeConnection(len(self.started))
        self.started.append(connection)
        return cast(EnclaveConnection, connection)


async def _enclave_for(pool: EnclavePool, launcher: FakeLauncher, affinity: str | None) -> int:
    async with pool.session("run", owner="o", nonce=b"n", affinity=affinity):
        pass
    return next(c.number for c in launcher.started if c.opened and c.opened.pop())


def test_a_function_sticks_to_one_enclave() -> None:
    async def scenario() -> set[int]:
        launcher = FakeLauncher()
        pool = EnclavePool(launcher, 4)
        await pool.start()
        try:
            return {await _enclave_for(pool, launcher, "fn-1") for _ in range(20)}
        finally:
            await pool.close()

    assert len(asyncio.run(scenario())) == 1


def test_functions_spread_and_busy_enclaves_shed_load() -> None:
    async def scenario() -> tuple[set[int], int, int]:
        launcher = FakeLauncher()
        pool = EnclavePool(launcher, 4)
        await pool.start()
        try:
            spread = {await _enclave_for(pool, launcher, f"fn-{i}") for i in range(40)}
            home = await _enclave_for(pool, launcher, "hot")
            held = [pool.session("run", owner="o", nonce=b"n", affinity="hot") for _ in range(8)]
            for context in held:
                await context.__aenter__()
            busy = pool.stats().sessions[home]
            moved = await _enclave_for(pool, launcher, "hot")
            for context in held:
                await context.__aexit__(None, None, None)
            return spread, busy, moved if moved != home else -1
        finally:
            await pool.close()

    spread, busy, moved = asyncio.run(scenario())
    assert spread == {0, 1, 2, 3}
    assert busy >= AFFINITY_SLACK and moved != -1


def test_a_dead_enclave_is_replaced() -> None:
    async def scenario() -> tuple[int, int]:
        launcher = FakeLauncher()
        pool = EnclavePool(launcher, 2)
        await pool.start()
        try:
            launcher.started[0].die()
            for _ in range(100):
                if pool.stats().alive == 2 and len(launcher.started) == 3:
                    break
                await asyncio.sleep(0.01)
            return pool.stats().alive, pool.stats().restarts
        finally:
            await pool.close()

    assert asyncio.run(scenario()) == (2, 1)


def test_a_pool_that_cannot_start_says_why_and_stops_what_started() -> None:
    async def scenario() -> FakeLauncher:
        launcher = FakeLauncher(fail_first=1)
        pool = EnclavePool(launcher, 3)
        with pytest.raises(CapeError, match="cannot start"):
            await pool.start()
        return launcher

    launcher = asyncio.run(scenario())
    assert launcher.started and not any(c.alive for c in launcher.started)


def test_pool_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least one"):
        EnclavePool(FakeLauncher(), 0)
