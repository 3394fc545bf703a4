"""A pool of enclave processes: started together, healed when one dies, sessions spread out.

Each slot holds one :class:`~cape.host.launcher.EnclaveConnection`. A supervisor task per
slot waits for its enclave to exit and starts a new one (with a growing back-off if starts
keep failing); sessions on the dead enclave already got ``TransportError`` from their
:class:`~cape.host.launcher.HostSession`. :meth:`EnclavePool.open_session` picks a live
enclave: for ``run`` sessions the one a function hashes to (rendezvous hashing, so a
function's warm sandbox in that enclave gets reused and the choice moves only when the pool
changes), unless it is much busier than the least-loaded one; other sessions go to the
least-loaded enclave.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Final

from cape.errors import CapeError, TransportError
from cape.host.launcher import EnclaveConnection, EnclaveLauncher, HostSession

__all__ = ["EnclavePool", "PoolStats"]

log = logging.getLogger("cape.host.pool")

#: A function stays on its enclave unless that one has this many more sessions than the
#: least-loaded live enclave.
AFFINITY_SLACK: Final = 4
RESTART_BACKOFF_S: Final = (0.1, 0.5, 1.0, 2.0, 5.0)
WAIT_FOR_ENCLAVE_S: Final = 30.0


@dataclass
class _Slot:
    index: int
    connection: EnclaveConnection | None = None
    sessions: int = 0
    restarts: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class PoolStats:
    """What :meth:`EnclavePool.stats` reports (for logs, tests and benchmarks)."""

    size: int
    alive: int
    sessions: tuple[int, ...]
    restarts: int


class EnclavePool:
    """``size`` enclaves from ``launcher``, kept running until :meth:`close`."""

    def __init__(self, launcher: EnclaveLauncher, size: int = 1) -> None:
        if size < 1:
            raise ValueError("an enclave pool needs at least one enclave")
        self._launcher = launcher
        self._slots = [_Slot(i) for i in range(size)]
        self._supervisors: list[asyncio.Task[None]] = []
        self._closing = False
        self._healing = True
        self._changed = asyncio.Event()

    async def start(self) -> None:
        """Start every enclave; raises (after stopping the ones that started) if one cannot."""
        results = await asyncio.gather(
            *(self._launcher.start() for _ in self._slots), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            for result in results:
                if not isinstance(result, BaseException):
                    await result.close()
            error = failures[0]
            if isinstance(error, CapeError):
                raise error
            raise TransportError(f"cannot start the enclave pool: {error}")
        for slot, connection in zip(self._slots, results, strict=True):
            assert not isinstance(connection, BaseException)
            slot.connection = connection
            slot.ready.set()
            self._supervisors.append(asyncio.create_task(self._supervise(slot)))

    @property
    def pcrs(self) -> dict[int, bytes]:
        """The measurements the enclaves reported (all run the same runtime)."""
        for slot in self._slots:
            if slot.connection is not None:
                return dict(slot.connection.pcrs)
        return {}

    def stats(self) -> PoolStats:
        return PoolStats(
            size=len(self._slots),
            alive=sum(1 for s in self._slots if s.connection is not None and s.connection.alive),
            sessions=tuple(s.sessions for s in self._slots),
            restarts=sum(s.restarts for s in self._slots),
        )

    async def _supervise(self, slot: _Slot) -> None:
        failures = 0
        while not self._closing:
            connection = slot.connection
            if connection is not None:
                await connection.wait_closed()
                if self._closing:
                    return
                slot.ready.clear()
                slot.connection = None
                if not self._healing:  # draining: a signal to the process group ended it
                    log.info("enclave %d exited during shutdown", slot.index)
                    await connection.close()  # reaps it and removes its temporary directory
                    self._changed.set()
                    return
                log.warning("enclave %d exited; starting a new one", slot.index)
                await connection.close()
            if not self._healing:
                return
            try:
                slot.connection = await self._launcher.start()
            except (CapeError, OSError) as exc:
                delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
                failures += 1
                log.error(
                    "enclave %d failed to start (%s); retrying in %.1fs", slot.index, exc, delay
                )
                await asyncio.sleep(delay)
                continue
            failures = 0
            slot.restarts += 1
            slot.ready.set()
            self._changed.set()

    def stop_healing(self) -> None:
        """Stop restarting enclaves that exit (the server is draining; safe to call from a
        signal handler). Sessions still running keep their enclaves."""
        self._healing = False

    def _live(self) -> list[_Slot]:
        return [s for s in self._slots if s.connection is not None and s.connection.alive]

    def _choose(self, affinity: str | None) -> _Slot | None:
        live = self._live()
        if not live:
            return None
        least = min(live, key=lambda s: s.sessions)
        if affinity is None:
            return least

        def score(slot: _Slot) -> bytes:
            return hashlib.sha256(f"{slot.index}:{affinity}".encode()).digest()

        preferred = max(live, key=score)
        if preferred.sessions - least.sessions >= AFFINITY_SLACK:
            return least
        return preferred

    async def _pick(self, affinity: str | None) -> _Slot:
        deadline = asyncio.get_running_loop().time() + WAIT_FOR_ENCLAVE_S
        while (slot := self._choose(affinity)) is None:
            if self._closing or not self._healing:
                raise TransportError("the enclave pool is shutting down")
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TransportError("no enclave is available; try again shortly")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
        return slot

    @contextlib.asynccontextmanager
    async def session(
        self,
        kind: str,
        *,
        owner: str,
        nonce: bytes,
        response_key: bytes | None = None,
        sealed_inputs: bool = False,
        sealing: str | None = None,
        bundle: bytes | None = None,
        bundle_sha256: bytes | None = None,
        affinity: str | None = None,
        caller: str | None = None,
    ) -> AsyncIterator[HostSession]:
        """Open a session on a live enclave; closes it (and frees the slot) on exit.

        ``caller`` (who runs the function, if not its owner) is whom the enclave counts the
        session against when it shares its capacity between users."""
        slot = await self._pick(affinity)
        connection = slot.connection
        assert connection is not None
        slot.sessions += 1
        try:
            session = await connection.open_session(
                kind,
                owner=owner,
                nonce=nonce,
                response_key=response_key,
                sealed_inputs=sealed_inputs,
                sealing=sealing,
                bundle=bundle,
                bundle_sha256=bundle_sha256,
                caller=caller,
            )
            try:
                yield session
            finally:
                await session.close()
        finally:
            slot.sessions -= 1

    async def close(self) -> None:
        """Stop the supervisors, then every enclave."""
        self._closing = True
        self._changed.set()
        for task in self._supervisors:
            task.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        for slot in self._slots:
            if slot.connection is not None:
                await slot.connection.close()
                slot.connection = None
