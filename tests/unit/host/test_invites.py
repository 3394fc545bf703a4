"""Signup modes and invite codes (issue 18, finding 6): migration 0002, single use, expiry,
hashes only at rest, one atomic redeem, and the modes' typed refusals."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from argon2 import PasswordHasher
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cape.errors import FormatError
from cape.host.auth import Accounts, TokenIssuer
from cape.host.errors import ConflictError, NotFoundError, RateLimitedError, SignupRefusedError
from cape.host.ratelimit import SignupRateLimiter
from cape.host.signup import Invites, SignupMode, hash_invite_code
from cape.host.store.invites import InviteStore
from cape.host.store.metadata import SqlMetadataStore, migration_config

T0 = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
PASSWORD = "correct horse battery staple"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "meta.db"


@pytest.fixture
def store(db_path: Path, clock: Clock) -> Iterator[SqlMetadataStore]:
    with SqlMetadataStore(f"sqlite:///{db_path}", clock=clock) as metadata:
        yield metadata


@pytest.fixture
def invites(store: SqlMetadataStore) -> Invites:
    return Invites(InviteStore(store))


def accounts_for(
    store: SqlMetadataStore, mode: SignupMode, clock: Clock, per_hour: int = 0
) -> Accounts:
    return Accounts(
        store,
        TokenIssuer(Ed25519PrivateKey.generate()),
        hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1),
        signup_mode=mode,
        invites=InviteStore(store),
        signup_limiter=SignupRateLimiter(per_hour=per_hour),
        clock=clock,
    )


# --------------------------------------------------------------------------- schema


def test_migration_0002_upgrades_a_0001_database_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with SqlMetadataStore(f"sqlite:///{path}", migrate=False) as at_0001:
        with at_0001.connect() as conn:
            command.upgrade(migration_config(conn), "0001")
        with at_0001.connect() as conn:
            assert "invites" not in sa.inspect(conn).get_table_names()
        at_0001.create_user("alice", "hash")
    with SqlMetadataStore(f"sqlite:///{path}") as upgraded:  # opening migrates to head
        assert upgraded.get_user_by_name("alice") is not None
        with upgraded.connect() as conn:
            assert "invites" in sa.inspect(conn).get_table_names()
            command.check(migration_config(conn))
        created = Invites(InviteStore(upgraded)).create(now=T0)
        assert [i.id for i in Invites(InviteStore(upgraded)).list()] == [created.invite.id]


# --------------------------------------------------------------------------- invites


def test_an_invite_is_stored_as_a_hash_only(invites: Invites, db_path: Path) -> None:
    created = invites.create(now=T0, note="for bob")
    assert len(created.code) == 32
    raw = b"".join(p.read_bytes() for p in db_path.parent.glob("meta.db*"))
    assert created.code.encode() not in raw
    assert hash_invite_code(created.code).encode() in raw
    (listed,) = invites.list()
    assert (listed.id, listed.note, listed.state(now=T0)) == (
        created.invite.id,
        "for bob",
        "unused",
    )
    assert listed.expires_at == T0 + dt.timedelta(days=7)


def test_bad_invite_parameters_are_refused(invites: Invites) -> None:
    for ttl in (dt.timedelta(0), dt.timedelta(days=-1), dt.timedelta(days=367)):
        with pytest.raises(FormatError, match="expire"):
            invites.create(now=T0, ttl=ttl)
    for note in ("x" * 201, "line\nbreak"):
        with pytest.raises(FormatError, match="note"):
            invites.create(now=T0, note=note)
    with pytest.raises(NotFoundError):
        invites.revoke("a" * 22)
    with pytest.raises(NotFoundError):
        invites.revoke("not an id")


def test_invite_mode_accepts_a_valid_code_exactly_once(
    store: SqlMetadataStore, invites: Invites, clock: Clock
) -> None:
    accounts = accounts_for(store, SignupMode.invite, clock)
    code = invites.create(now=T0).code
    with pytest.raises(SignupRefusedError, match="invitation only"):
        accounts.signup("alice", PASSWORD)
    with pytest.raises(SignupRefusedError, match="invalid invite code"):
        accounts.signup("alice", PASSWORD, invite="not-a-code")
    with pytest.raises(SignupRefusedError, match="invalid invite code"):
        accounts.signup("alice", PASSWORD, invite="x" * 10_000)
    user = accounts.signup("alice", PASSWORD, invite=code)
    (listed,) = invites.list()
    assert (listed.state(now=T0), listed.used_by, listed.used_at) == ("used", "alice", T0)
    with pytest.raises(SignupRefusedError, match="invalid invite code"):
        accounts.signup("bob", PASSWORD, invite=code)
    assert store.get_user_by_name("bob") is None
    assert store.get_user_by_id(user.id) == user


def test_expired_and_revoked_codes_are_refused_like_unknown_ones(
    store: SqlMetadataStore, invites: Invites, clock: Clock
) -> None:
    accounts = accounts_for(store, SignupMode.invite, clock)
    expiring = invites.create(now=T0, ttl=dt.timedelta(hours=1))
    revoked = invites.create(now=T0)
    invites.revoke(revoked.invite.id)
    clock.now = T0 + dt.timedelta(hours=1)
    assert invites.list()[0].state(now=clock.now) == "expired"
    messages = set()
    for code in (expiring.code, revoked.code, "unknown"):
        with pytest.raises(SignupRefusedError) as refused:
            accounts.signup("alice", PASSWORD, invite=code)
        messages.add(str(refused.value))
    assert len(messages) == 1
    assert store.get_user_by_name("alice") is None


def test_a_taken_username_leaves_the_invite_unused(
    store: SqlMetadataStore, invites: Invites, clock: Clock
) -> None:
    store.create_user("alice", "hash")
    accounts = accounts_for(store, SignupMode.invite, clock)
    code = invites.create(now=T0).code
    with pytest.raises(ConflictError):
        accounts.signup("Alice", PASSWORD, invite=code)
    assert invites.list()[0].state(now=T0) == "unused"
    accounts.signup("bob", PASSWORD, invite=code)


def test_concurrent_signups_spend_one_code_once(
    store: SqlMetadataStore, invites: Invites, clock: Clock
) -> None:
    accounts = accounts_for(store, SignupMode.invite, clock)
    code = invites.create(now=T0).code
    outcomes: list[str] = []

    def sign_up(name: str) -> None:
        try:
            accounts.signup(name, PASSWORD, invite=code)
            outcomes.append("ok")
        except SignupRefusedError:
            outcomes.append("refused")

    threads = [threading.Thread(target=sign_up, args=(f"user{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ["ok"] + ["refused"] * 7


def test_closed_mode_refuses_everyone_and_open_mode_ignores_codes(
    store: SqlMetadataStore, invites: Invites, clock: Clock
) -> None:
    code = invites.create(now=T0).code
    closed = accounts_for(store, SignupMode.closed, clock)
    with pytest.raises(SignupRefusedError, match="closed"):
        closed.signup("alice", PASSWORD, invite=code)
    assert store.get_user_by_name("alice") is None
    accounts_for(store, SignupMode.open, clock).signup("alice", PASSWORD, invite=code)
    assert invites.list()[0].state(now=T0) == "unused"


def test_signups_are_rate_limited_per_client(store: SqlMetadataStore, clock: Clock) -> None:
    accounts = accounts_for(store, SignupMode.open, clock, per_hour=3)
    for i in range(3):
        accounts.signup(f"flood{i}", PASSWORD, client="203.0.113.9")
    with pytest.raises(RateLimitedError, match="too many signups"):
        accounts.signup("flood3", PASSWORD, client="203.0.113.9")
    assert store.get_user_by_name("flood3") is None
    accounts.signup("alice", PASSWORD, client="198.51.100.7")


def test_invite_mode_needs_an_invite_store(store: SqlMetadataStore) -> None:
    with pytest.raises(ValueError, match="invite store"):
        Accounts(store, TokenIssuer(Ed25519PrivateKey.generate()), signup_mode=SignupMode.invite)
