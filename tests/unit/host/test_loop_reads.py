"""A session's reads on the event loop (SQLite only): the same rows as the store's own reads,
every commit seen at once, never a wait, never a write (cape.host.store.loop_reads)."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from cape.host.auth import Accounts, LoginRateLimiter, TokenIssuer
from cape.host.errors import AuthError
from cape.host.ids import new_id
from cape.host.store.loop_reads import LoopReads, ReadWouldWait, loop_reads
from cape.host.store.metadata import SqlMetadataStore, Token, User
from tests.unit.host.test_auth import PASSWORD, Clock, CountingHasher, Monotonic

T0 = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
CHECKSUM = "ab" * 32


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "meta.db"


@pytest.fixture
def store(db_path: Path, clock: Clock) -> Iterator[SqlMetadataStore]:
    with SqlMetadataStore(f"sqlite:///{db_path}", clock=clock) as store:
        yield store


@pytest.fixture
def reads(store: SqlMetadataStore) -> Iterator[LoopReads]:
    found = loop_reads(store)
    assert found is not None
    with found:
        yield found


@pytest.fixture
def accounts(store: SqlMetadataStore, clock: Clock) -> Accounts:
    issuer = TokenIssuer(Ed25519PrivateKey.generate())
    limiter = LoginRateLimiter(clock=Monotonic())
    return Accounts(store, issuer, hasher=CountingHasher(), limiter=limiter, clock=clock)


@pytest.fixture
def alice(accounts: Accounts) -> User:
    return accounts.signup("alice", PASSWORD)


def _record(store: SqlMetadataStore, user: User) -> Token:
    return store.add_token(
        user_id=user.id, kind="pat", name="ci", description="", function_id=None, expires_at=None
    )


def test_only_a_file_backed_sqlite_store_reads_on_the_loop(tmp_path: Path) -> None:
    with SqlMetadataStore("sqlite:///:memory:") as memory:
        assert loop_reads(memory) is None  # one connection, the store's: never a second one
    with SqlMetadataStore(f"sqlite:///{tmp_path / 'm.db'}") as on_disk:
        assert isinstance(loop_reads(on_disk), LoopReads)


def test_the_loop_reads_the_rows_the_store_reads_and_every_commit_at_once(
    store: SqlMetadataStore, reads: LoopReads, alice: User
) -> None:
    function = store.add_function(
        owner_id=alice.id, name="echo", checksum=CHECKSUM, public=False, blob_key="b", size=1
    )
    token = _record(store, alice)
    assert reads.get_user_by_id(alice.id) == store.get_user_by_id(alice.id) == alice
    assert reads.get_token(token.id) == store.get_token(token.id)
    assert reads.get_function(function.id) == store.get_function(function.id) == function
    assert reads.resolve_function("alice", "echo") == function
    assert reads.get_token(new_id()) is None
    assert reads.get_token("not an id") is None
    # Deletions are seen by the very next read: nothing is remembered between reads.
    assert store.delete_token(token.id, alice.id)
    assert reads.get_token(token.id) is None
    assert store.delete_function(function.id) is not None
    assert reads.get_function(function.id) is None
    assert reads.resolve_function("alice", "echo") is None


def test_the_loop_never_writes(store: SqlMetadataStore, reads: LoopReads, alice: User) -> None:
    token = _record(store, alice)
    with pytest.raises(RuntimeError):
        reads.touch_token(token.id, T0)
    with pytest.raises(RuntimeError):
        reads.create_user("bob", "hash")
    with reads._engine.connect() as connection, pytest.raises(OperationalError, match="readonly"):
        connection.execute(text("DELETE FROM tokens"))
    assert store.get_token(token.id) is not None


def test_a_read_that_would_wait_raises_at_once_and_the_store_still_answers(
    db_path: Path, store: SqlMetadataStore, reads: LoopReads, alice: User
) -> None:
    # A connection in exclusive locking mode holding a write: WAL readers would have to wait
    # (the store's own connections wait up to their busy timeout of 30 s). It can take that
    # lock only while no other connection is open.
    with reads._engine.connect() as connection:  # at once: no busy wait at all
        assert connection.execute(text("PRAGMA busy_timeout")).scalar() == 0
    store.close()
    reads.close()
    holder = sqlite3.connect(db_path)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(ReadWouldWait):
            reads.get_user_by_id(alice.id)
    finally:
        holder.rollback()
        holder.close()
    assert reads.get_user_by_id(alice.id) == alice  # and the next read goes through again


def test_check_reads_from_the_loop_and_leaves_last_used_to_its_caller(
    accounts: Accounts, store: SqlMetadataStore, reads: LoopReads, alice: User, clock: Clock
) -> None:
    issued = accounts.create_token(alice, "ci")
    principal = accounts.check(issued.token, now=T0, reads=reads)
    assert principal.user == alice and principal.token.id == issued.id
    assert store.get_token(issued.id).last_used is None  # type: ignore[union-attr]
    assert accounts.touch_due(principal, T0)
    touched = accounts.touch(principal, T0)
    assert store.get_token(issued.id).last_used == T0  # type: ignore[union-attr]
    assert touched.token.last_used == T0
    again = accounts.check(issued.token, now=T0 + dt.timedelta(seconds=30), reads=reads)
    assert not accounts.touch_due(again, T0 + dt.timedelta(seconds=30))
    assert accounts.touch_due(again, T0 + dt.timedelta(seconds=60))
    # Revocation: the record's deletion refuses the token at its next check.
    assert store.delete_token(issued.id, alice.id)
    with pytest.raises(AuthError, match="revoked"):
        accounts.check(issued.token, now=T0, reads=reads)


def test_the_loop_reads_close_with_their_store(db_path: Path) -> None:
    store = SqlMetadataStore(f"sqlite:///{db_path}")
    reads = loop_reads(store)
    assert reads is not None and reads.get_token(new_id()) is None  # its connection is open
    store.close()
    # Every connection to the database is closed: one can now hold it exclusively.
    holder = sqlite3.connect(db_path)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
    finally:
        holder.rollback()
        holder.close()
