"""A session's start is authorised on the event loop for a SQLite store, with the same
outcomes as in a worker thread (cape.host.api.session_deps.authorized, issue 16)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cape.host.api import session_deps
from cape.host.api.session_deps import SessionDeps, authorized
from cape.host.auth import Accounts, LoginRateLimiter, TokenIssuer
from cape.host.errors import AuthError, ForbiddenError, NotFoundError
from cape.host.ids import new_id
from cape.host.store.blobs import DirectoryBlobStore
from cape.host.store.loop_reads import ReadWouldWait
from cape.host.store.metadata import Function, SqlMetadataStore, User
from tests.unit.host.test_auth import PASSWORD, Clock, CountingHasher, Monotonic

T0 = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
CHECKSUM = "ab" * 32


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[SqlMetadataStore]:
    with SqlMetadataStore(f"sqlite:///{tmp_path / 'meta.db'}", clock=clock) as store:
        yield store


@pytest.fixture
def accounts(store: SqlMetadataStore, clock: Clock) -> Accounts:
    issuer = TokenIssuer(Ed25519PrivateKey.generate())
    limiter = LoginRateLimiter(clock=Monotonic())
    return Accounts(store, issuer, hasher=CountingHasher(), limiter=limiter, clock=clock)


@pytest.fixture
def deps(
    store: SqlMetadataStore, accounts: Accounts, clock: Clock, tmp_path: Path
) -> Iterator[SessionDeps]:
    deps = SessionDeps(
        store=store,
        blobs=DirectoryBlobStore(tmp_path / "blobs"),
        accounts=accounts,
        pool=None,  # type: ignore[arg-type]  # no session is opened here
        clock=clock,
    )
    yield deps
    deps.blob_io.shutdown()


@pytest.fixture
def trips(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The worker-thread trips ``authorized`` makes, by the function it sends."""
    made: list[str] = []
    real = session_deps.run_in_threadpool  # type: ignore[attr-defined]

    async def counted(func: Any, *args: Any) -> Any:
        made.append(func.__name__)
        return await real(func, *args)

    monkeypatch.setattr(session_deps, "run_in_threadpool", counted)
    return made


def _function(store: SqlMetadataStore, owner: User, name: str = "echo") -> Function:
    return store.add_function(
        owner_id=owner.id, name=name, checksum=CHECKSUM, public=False, blob_key=new_id(), size=1
    )


def test_a_sqlite_store_authorises_on_the_loop_and_touches_last_used_in_a_thread(
    deps: SessionDeps, accounts: Accounts, store: SqlMetadataStore, trips: list[str]
) -> None:
    assert deps.reads is not None
    alice = accounts.signup("alice", PASSWORD)
    function = _function(store, alice)
    token = accounts.create_token(alice, "ci").token
    principal, found = asyncio.run(authorized(deps, "run", token, {"id": function.id}))
    assert (principal.user, found) == (alice, function)
    assert trips == ["touch"]  # last_used was never set: the one write, in a thread
    assert store.get_token(principal.token.id).last_used == T0  # type: ignore[union-attr]
    deps.clock.now = T0 + dt.timedelta(seconds=30)  # type: ignore[attr-defined]
    by_name = {"user": "alice", "name": "echo"}
    assert asyncio.run(authorized(deps, "run", token, by_name))[1] == function
    assert asyncio.run(authorized(deps, "deploy", token, {}))[1] is None
    assert trips == ["touch"]  # nothing more: every read on the loop


def test_without_loop_reads_every_start_makes_one_thread_trip(
    deps: SessionDeps, accounts: Accounts, store: SqlMetadataStore, trips: list[str]
) -> None:
    deps.reads = None  # PostgreSQL, an in-memory store
    alice = accounts.signup("alice", PASSWORD)
    function = _function(store, alice)
    token = accounts.create_token(alice, "ci").token
    for _ in range(2):
        assert asyncio.run(authorized(deps, "run", token, {"id": function.id}))[1] == function
    assert trips == ["_authorize", "_authorize"]


def test_a_read_that_would_wait_runs_every_check_in_a_thread(
    deps: SessionDeps,
    accounts: Accounts,
    store: SqlMetadataStore,
    trips: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alice = accounts.signup("alice", PASSWORD)
    function = _function(store, alice)
    token = accounts.create_token(alice, "ci").token

    def locked(*_: object) -> None:
        raise ReadWouldWait("locked")

    assert deps.reads is not None
    monkeypatch.setattr(deps.reads, "get_function", locked)
    principal, found = asyncio.run(authorized(deps, "run", token, {"id": function.id}))
    assert (principal.user, found) == (alice, function)
    assert trips == ["touch", "_authorize"]


@pytest.mark.parametrize("on_loop", [True, False])
def test_the_same_refusals_on_the_loop_as_in_a_thread(
    deps: SessionDeps, accounts: Accounts, store: SqlMetadataStore, on_loop: bool
) -> None:
    if not on_loop:
        deps.reads = None
    alice, bob = accounts.signup("alice", PASSWORD), accounts.signup("bob", PASSWORD)
    mine, theirs = _function(store, alice), _function(store, bob)
    other = _function(store, alice, "other")
    token = accounts.create_token(alice, "ci")
    scoped = accounts.create_token(alice, "one", function_id=mine.id).token

    def start(kind: str, token: str, params: dict[str, str]) -> Any:
        return asyncio.run(authorized(deps, kind, token, params))

    with pytest.raises(NotFoundError):  # another tenant's private function: as if missing
        start("run", token.token, {"id": theirs.id})
    with pytest.raises(NotFoundError):
        start("run", token.token, {"user": "bob", "name": "echo"})
    with pytest.raises(NotFoundError):
        start("run", token.token, {"id": "not-an-id"})
    assert start("run", scoped, {"id": mine.id})[1] == mine
    with pytest.raises(ForbiddenError):  # a function-scoped token: only its function
        start("run", scoped, {"id": other.id})
    with pytest.raises(ForbiddenError):
        start("deploy", scoped, {})
    with pytest.raises(AuthError):
        start("run", token.token + "x", {"id": mine.id})
    assert store.delete_token(token.id, alice.id)  # revoked: refused at the next start
    with pytest.raises(AuthError, match="revoked"):
        start("run", token.token, {"id": mine.id})
    fresh = accounts.create_token(alice, "fresh").token
    assert store.delete_function(mine.id) is not None  # deleted: refused at the next start
    with pytest.raises(NotFoundError):
        start("run", fresh, {"id": mine.id})
    with pytest.raises(AuthError, match="revoked"):  # its scoped tokens went with it
        start("run", scoped, {"id": mine.id})
