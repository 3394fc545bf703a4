"""What the websocket sessions stand on: :class:`SessionDeps`, the server's
:class:`Lifecycle`, and the grant re-checked before every call (re-exported by
:mod:`cape.host.api.sessions`)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from starlette.concurrency import run_in_threadpool

from cape._internal.timefile import utc_now
from cape.errors import FormatError
from cape.host.admission import Admission
from cape.host.api.frames import DrainSignal
from cape.host.auth import Accounts, Principal, authorize_account, authorize_run
from cape.host.errors import AuthError, NotFoundError
from cape.host.ids import is_id
from cape.host.pool import EnclavePool
from cape.host.store.blobs import BlobStore
from cape.host.store.loop_reads import LoopReads, ReadWouldWait, loop_reads
from cape.host.store.metadata import Function, MetadataStore

DIGEST_CACHE_SIZE: Final = 4096
BLOB_IO_THREADS: Final = 4
_T = TypeVar("_T")


class Lifecycle:
    """Counts live sessions and tells them when the server starts draining."""

    def __init__(self) -> None:
        self.draining = DrainSignal()
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def track(self) -> Any:
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Ask sessions to end; wait up to ``timeout_s``. True if all ended."""
        self.draining.set()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


def _blob_io() -> Executor:
    return ThreadPoolExecutor(BLOB_IO_THREADS, thread_name_prefix="cape-blob-io")


@dataclass
class SessionDeps:
    """What the websocket routes need."""

    store: MetadataStore
    blobs: BlobStore
    accounts: Accounts
    pool: EnclavePool
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    admission: Admission = field(default_factory=Admission)
    idle_timeout_s: float = 120.0
    """Between calls of a run or test session (the session then ends normally)."""
    frame_timeout_s: float = 30.0
    """For a message due within an exchange: nonce, function info, bundle, each chunk."""
    max_input_bytes: int = 64 << 20
    max_bundle_bytes: int = 1_000_000_000
    blob_io: Executor = field(default_factory=_blob_io)
    """Where blob reads and writes run: bounded jobs only, never one waiting for a client."""
    clock: Callable[[], dt.datetime] = field(default=utc_now)
    bundle_digests: OrderedDict[str, bytes] = field(default_factory=OrderedDict)
    """SHA-256 of stored ciphertexts by blob key, learnt on a function's first run (blobs are
    immutable: a redeploy gets a new key)."""
    reads: LoopReads | None = field(init=False, default=None)
    """A session's reads on the loop (SQLite: :mod:`cape.host.store.loop_reads`), else None."""

    def __post_init__(self) -> None:
        if self.idle_timeout_s < 60:
            raise ValueError("the idle timeout may not be below 60 s (pycape expects it)")
        if self.frame_timeout_s <= 0:
            raise ValueError("the frame timeout must be positive")
        self.reads = loop_reads(self.store)

    def remember_digest(self, blob_key: str, digest: bytes) -> None:
        self.bundle_digests[blob_key] = digest
        self.bundle_digests.move_to_end(blob_key)
        while len(self.bundle_digests) > DIGEST_CACHE_SIZE:
            self.bundle_digests.popitem(last=False)

    async def io(self, call: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``call(*args, **kwargs)`` on the blob executor."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.blob_io, functools.partial(call, *args, **kwargs))


@dataclass
class _Grant:
    """What a session was authorised as, re-checked before every call."""

    principal: Principal
    function: Function | None
    seen: int
    """The store's revocation count when the handshake authorised the session."""


async def _still_allowed(deps: SessionDeps, grant: _Grant) -> None:
    """Raise unless the session's token is unexpired and unrevoked and its function exists.

    Cheap: the expiry is known, and the store is asked again only after a token or function
    was deleted somewhere (its revocation count moved)."""
    expires_at = grant.principal.token.expires_at
    if expires_at is not None and deps.clock() > expires_at:
        raise AuthError("token is expired")
    current = deps.store.revocations
    if current == grant.seen:
        return
    token_id = grant.principal.token.id
    function = grant.function

    def recheck() -> None:
        if deps.store.get_token(token_id) is None:
            raise AuthError("token revoked")
        if function is not None and deps.store.get_function(function.id) is None:
            raise NotFoundError("function deleted")

    await run_in_threadpool(recheck)
    grant.seen = current


def _authorize(
    deps: SessionDeps, kind: str, token: str, params: dict[str, Any]
) -> tuple[Principal, Function | None]:
    """Who the token stands for and, for a run, the function it may run: one trip to a
    worker thread for every read (and the one write) a session's start makes."""
    principal = deps.accounts.authenticate(token, now=deps.clock())
    return principal, _permitted(kind, params, principal, deps.store)


def _permitted(
    kind: str, params: dict[str, Any], principal: Principal, store: MetadataStore
) -> Function | None:
    if kind != "run":
        authorize_account(principal)
        return None
    if "id" in params:
        function_id = params["id"]
        function = store.get_function(function_id) if is_id(function_id) else None
    else:
        try:
            function = store.resolve_function(params["user"], params["name"])
        except FormatError:
            function = None
    if function is None:
        raise NotFoundError("no such function")
    authorize_run(principal, function)
    return function


async def authorized(
    deps: SessionDeps, kind: str, token: str, params: dict[str, Any]
) -> tuple[Principal, Function | None]:
    """Authorise a session's start (``kind``: key, deploy, test or run; ``params``: the run
    route's ``id`` or ``user`` and ``name``). With ``deps.reads`` (SQLite in WAL mode) the
    reads run on the loop, on a connection that never waits: no thread trip unless the
    token's ``last_used`` is due (once a minute per token) or a read would wait, in which case
    every check runs again in a worker thread on the store's own connections."""
    reads = deps.reads
    if reads is not None:
        now = deps.clock()
        try:
            principal = deps.accounts.check(token, now=now, reads=reads)
            if deps.accounts.touch_due(principal, now):
                principal = await run_in_threadpool(deps.accounts.touch, principal, now)
            return principal, _permitted(kind, params, principal, reads)
        except ReadWouldWait:
            pass  # the same checks again, in a worker thread
    return await run_in_threadpool(_authorize, deps, kind, token, params)
