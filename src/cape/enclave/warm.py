"""Fast cold starts: decrypted functions kept in enclave memory, with a sandbox pre-started for
the next session.

Cape's protocol gives every session its own sandbox (state lives for the session, module-level
code runs once per session). Forking sessions from one shared template process would let a
function carry one caller's data into another caller's session (they would share a mount and
pid namespace and a uid), so instead each function gets a *spare*: a sandbox started ahead of
time from a private copy of the function's files, which has already imported ``app.py`` and
is handed to exactly one session. Plaintext stays inside the enclave (its private tmpfs).

**How many spares** (issue 16): one per function to begin with; a session that finds none
ready raises the function's target by one, up to ``max_spares``, and after ``idle_s`` seconds
without such a miss each session lowers it by one again (it takes a spare that is then not
replaced). Spares kept for a function that gets no sessions stay until it is evicted. Spares
beyond the first start only while the ``calls`` lane has a free slot for the party and nobody
of that party waits: they use idle capacity, never a place a session of the user could take.
Each spare is still a whole sandbox of its own (nothing is shared between sessions).

**When spares start**: the spares that replace the one a session took start once that
session's attestation document is on its way (``document_sent``, at most
``REFILL_WAIT_S`` later): starting one costs the runtime and the zygote several milliseconds
of CPU, which would otherwise run beside the session's own attestation (issue 16, session
set-up).

Entries are keyed by ``(owner, SHA-256 of the stored ciphertext)``: the host names the owner,
and keying by ciphertext alone would let it run one user's cached function under another
user's key. A miss decrypts through the key service as usual.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from cape.enclave.lanes import Lanes
from cape.enclave.sandbox import FunctionSandbox, SandboxLimits, Services
from cape.enclave.unpack import unpack_bundle
from cape.errors import CapeError
from cape.formats.bundle import BundleLimits

__all__ = ["REFILL_WAIT_S", "Lease", "SpareStats", "WarmPool"]

REFILL_WAIT_S = 1.0
"""Longest a replacement spare waits for the taking session's document before it starts."""


@dataclass(frozen=True)
class Lease:
    """One session's sandbox and its private copy of the function; :meth:`release` ends both."""

    sandbox: FunctionSandbox
    holder: Path

    def release(self) -> None:
        self.sandbox.close()
        shutil.rmtree(self.holder, ignore_errors=True)


@dataclass(frozen=True)
class SpareStats:
    """A held function's spares: sessions served by one (``hits``) or not (``misses``)."""

    target: int
    spares: int
    hits: int
    misses: int


@dataclass
class _Entry:
    checksum: bytes
    holder: Path  # what _load created; removed on eviction
    source: Path  # the unpacked function, never handed to a sandbox itself
    spares: deque[asyncio.Task[Lease | None]] = field(default_factory=deque)
    target: int = 1  # spares to keep: grows with misses, shrinks when idle
    last_miss: float = field(default_factory=time.monotonic)
    hits: int = 0
    misses: int = 0
    sessions: int = field(default=0)
    starting: int = 0  # sessions copying ``source`` right now: not evicted meanwhile


def _start(source: Path, parent: Path, limits: SandboxLimits, services: Services) -> Lease:
    """Copy the function into a private directory and start a sandbox on it."""
    holder = Path(tempfile.mkdtemp(prefix="session-", dir=parent))
    try:
        holder.chmod(0o711)  # the sandbox's uid must traverse to its directory
        target = holder / "fn"
        shutil.copytree(source, target, symlinks=True)
        return Lease(FunctionSandbox.start(target, limits=limits, services=services), holder)
    except BaseException:
        shutil.rmtree(holder, ignore_errors=True)
        raise


class WarmPool:
    """Per-runtime cache of decrypted functions and their pre-started sandboxes."""

    def __init__(
        self,
        workdir: Path,
        *,
        sandbox_limits: SandboxLimits,
        bundle_limits: BundleLimits,
        lanes: Lanes,
        capacity: int = 8,
        spares: bool = True,
        max_spares: int = 4,
        idle_s: float = 60.0,
    ) -> None:
        if max_spares < 1 or idle_s < 0:
            raise ValueError("max_spares must be at least 1 and idle_s not negative")
        self._lanes = lanes
        self._workdir = workdir
        self._sandbox_limits = sandbox_limits
        self._bundle_limits = bundle_limits
        self._capacity = capacity
        self._spares = spares
        self._max_spares = max_spares
        self._idle_s = idle_s
        self._entries: OrderedDict[tuple[str, bytes], _Entry] = OrderedDict()
        # One lock per function being loaded, so cold loads of different functions (key
        # service round trip, unpacking) run side by side and one function loads only once.
        self._loading: dict[tuple[str, bytes], asyncio.Lock] = {}

    async def acquire(
        self,
        owner: str,
        ciphertext_sha256: bytes,
        decrypt: Callable[[], Awaitable[bytes]],
        services: Services,
        *,
        party: str,
        document_sent: asyncio.Future[None] | None = None,
    ) -> tuple[bytes, Lease]:
        """The function's checksum and a sandbox for one session (the caller releases it).

        Functions are held by (owner, SHA-256 of the stored ciphertext); ``decrypt`` is called
        only when this one is not held (it may fetch the ciphertext first, and must check it
        against the hash). ``services`` serves ``cape_encrypt`` for the owner; a spare started
        for an earlier session of the same owner and function carries an equivalent one.
        Starting sandboxes and unpacking count against ``party`` in the runtime's lanes.
        Spares replacing the one taken start once ``document_sent`` is done (the caller
        completes it when the session's attestation document is sent, or the session ends
        before), or after ``REFILL_WAIT_S``; without it, at once.
        """
        key = (owner, ciphertext_sha256)
        entry = self._entries.get(key)
        evicted: list[_Entry] = []
        if entry is None:
            entry, evicted = await self._load_once(key, decrypt, party)
        # No await between looking up (or loading) and taking the spare: the event loop makes
        # it atomic. Entries a load evicted are discarded only after it, and this one is not
        # evicted while its session starts: another load may run at every await below.
        self._entries.move_to_end(key)
        spare = _take_spare(entry.spares)
        entry.sessions += 1
        entry.starting += 1
        now = time.monotonic()
        if spare is None:
            entry.misses += 1
            entry.last_miss = now
            entry.target = min(self._max_spares, entry.target + 1)
        elif entry.target > 1 and now - entry.last_miss >= self._idle_s:
            entry.target -= 1
        try:
            for old in evicted:
                await self._discard(old)
            lease: Lease | None = None
            if spare is not None:
                candidate = await spare
                if candidate is not None and candidate.sandbox.alive:
                    lease = candidate
                    entry.hits += 1
                elif candidate is not None:
                    await asyncio.to_thread(candidate.release)
            if lease is None:
                lease = await self._lanes.calls.run(
                    party, _start, entry.source, self._workdir, self._sandbox_limits, services
                )
        finally:
            entry.starting -= 1
        if self._entries.get(key) is entry:
            self._refill(entry, services, party, document_sent)
        return entry.checksum, lease

    def spare_stats(self, owner: str, ciphertext_sha256: bytes) -> SpareStats | None:
        """The spares of a held function (``None`` when it is not held): for tests and logs."""
        entry = self._entries.get((owner, ciphertext_sha256))
        if entry is None:
            return None
        return SpareStats(entry.target, len(entry.spares), entry.hits, entry.misses)

    async def _load_once(
        self, key: tuple[str, bytes], decrypt: Callable[[], Awaitable[bytes]], party: str
    ) -> tuple[_Entry, list[_Entry]]:
        """The entry for ``key`` (loaded now or while we waited) and the entries its loading
        evicted, which the caller discards (no await here once the entry is in the pool)."""
        lock = self._loading.setdefault(key, asyncio.Lock())
        async with lock:
            entry = self._entries.get(key)
            if entry is not None:  # loaded while we waited
                return entry, []
            entry = await self._load(decrypt, party)
            existing = self._entries.get(key)
            if existing is not None:  # a loader under an evicted-and-recreated lock won
                return existing, [entry]
            self._entries[key] = entry
            evicted = []
            while len(self._entries) > self._capacity:
                # The least recently used function no session is starting from; if every
                # other one is, the pool holds one more until they have started.
                old_key = next(
                    (k for k, e in self._entries.items() if k != key and e.starting == 0), None
                )
                if old_key is None:
                    break
                evicted.append(self._entries.pop(old_key))
                self._loading.pop(old_key, None)
        return entry, evicted

    async def _load(self, decrypt: Callable[[], Awaitable[bytes]], party: str) -> _Entry:
        zip_bytes = await decrypt()
        checksum = hashlib.sha256(zip_bytes).digest()
        holder = Path(tempfile.mkdtemp(prefix="function-", dir=self._workdir))
        try:
            source = await self._lanes.keys.run(
                party, unpack_bundle, zip_bytes, holder, self._bundle_limits
            )
        except BaseException:
            shutil.rmtree(holder, ignore_errors=True)
            raise
        return _Entry(checksum=checksum, holder=holder, source=source)

    def _refill(
        self,
        entry: _Entry,
        services: Services,
        party: str,
        after: asyncio.Future[None] | None = None,
    ) -> None:
        if not self._spares:
            return
        calls = self._lanes.calls
        starting = 0  # tasks made here have not taken their slot yet
        while len(entry.spares) < entry.target:
            # The first spare as ever; more only on idle capacity (see the module docstring).
            idle = (
                calls.waiting(party) == 0
                and calls.running(party) + starting < calls.limits.per_party
                and calls.running() + starting < calls.limits.threads
            )
            if entry.spares and not idle:
                return
            starting += 1
            entry.spares.append(
                asyncio.create_task(self._spare(entry.source, services, party, after))
            )

    async def _spare(
        self,
        source: Path,
        services: Services,
        party: str,
        after: asyncio.Future[None] | None = None,
    ) -> Lease | None:
        """A started sandbox, or None when it could not start (the session starts its own).

        Starts once ``after`` is done, or ``REFILL_WAIT_S`` has passed (see the module
        docstring); a session that takes this spare before then waits for it as for any
        spare still starting.
        """
        if after is not None and not after.done():
            await asyncio.wait((after,), timeout=REFILL_WAIT_S)
        try:
            return await self._lanes.calls.run(
                party, _start, source, self._workdir, self._sandbox_limits, services
            )
        except CapeError:
            return None

    async def _discard(self, entry: _Entry) -> None:
        while entry.spares:
            await _close_spare(entry.spares.pop())
        await asyncio.to_thread(shutil.rmtree, entry.holder, True)

    async def close(self) -> None:
        entries = list(self._entries.values())
        self._entries.clear()
        for entry in entries:
            await self._discard(entry)


def _take_spare(spares: deque[asyncio.Task[Lease | None]]) -> asyncio.Task[Lease | None] | None:
    """A started spare if one is ready, else the oldest still starting, else None."""
    for task in spares:
        if task.done():
            spares.remove(task)
            return task
    return spares.popleft() if spares else None


async def _close_spare(task: asyncio.Task[Lease | None]) -> None:
    lease = await task
    if lease is not None:
        await asyncio.to_thread(lease.release)
