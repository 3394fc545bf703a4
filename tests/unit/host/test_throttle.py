"""Login and signup throttling shared through the metadata database (issue 14): nodes of a
cluster on one database count failed logins and signups together, so N nodes behind a load
balancer give an attacker no more attempts than one node would.

Each "node" here is what ``cape serve`` builds: its own engine on the database
(:class:`SqlMetadataStore`), its own :class:`Accounts` with a :class:`LoginRateLimiter` and a
:class:`SignupRateLimiter` over :class:`SqlThrottle` (the pepper derived from the shared token
signing key). Every test runs on PostgreSQL (the cluster case) and on SQLite (one node, whose
counts now survive a restart).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from argon2 import PasswordHasher
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cape.host.auth import Accounts, TokenIssuer
from cape.host.errors import AuthError, RateLimitedError
from cape.host.ratelimit import LoginRateLimiter, SignupRateLimiter, ThrottleTables
from cape.host.store.metadata import SqlMetadataStore
from cape.host.store.throttle import SqlThrottle, ThrottleRow
from cape.platform.serve import THROTTLE_PEPPER
from tests.services import Postgres

PASSWORD = "correct horse battery"
ATTACKER = "203.0.113.7"


class WallClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        postgres: Postgres = request.getfixturevalue("postgres")
        return postgres.new_database()
    return f"sqlite:///{tmp_path / 'meta.db'}"


@pytest.fixture
def issuer() -> TokenIssuer:
    return TokenIssuer(Ed25519PrivateKey.generate())  # one key, shared by every node


@pytest.fixture
def clock() -> WallClock:
    return WallClock()


class Node:
    """One node's stack over the shared database (as ``cape serve`` wires it)."""

    def __init__(self, url: str, issuer: TokenIssuer, clock: WallClock, **limits: Any) -> None:
        self.store = SqlMetadataStore(url)
        self.throttle = SqlThrottle(
            self.store, pepper=issuer.derive_secret(THROTTLE_PEPPER), clock=clock
        )
        self.accounts = self.accounts_over(self.throttle, issuer, **limits)

    def accounts_over(self, tables: ThrottleTables, issuer: TokenIssuer, **limits: Any) -> Accounts:
        signups = limits.pop("signups_per_hour", 20)
        return Accounts(
            self.store,
            issuer,
            hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1),
            limiter=LoginRateLimiter(tables=tables, **limits),
            signup_limiter=SignupRateLimiter(per_hour=signups, tables=tables),
        )


@pytest.fixture
def nodes(database_url: str, issuer: TokenIssuer, clock: WallClock) -> Iterator[list[Node]]:
    made = [Node(database_url, issuer, clock) for _ in range(2)]
    yield made
    for node in made:
        node.store.close()


def _fail(node: Node, username: str, client: str = ATTACKER) -> type[Exception]:
    """One wrong-password login; the error class it met."""
    try:
        node.accounts.login(username, "wrong password", client=client)
    except (AuthError, RateLimitedError) as exc:
        return type(exc)
    raise AssertionError("a wrong password logged in")


def test_failed_logins_spread_over_two_nodes_lock_as_on_one(nodes: list[Node]) -> None:
    a, b = nodes
    a.accounts.signup("alice", PASSWORD, client="home")
    # Five guesses (the per-pair limit), alternating nodes as a round-robin balancer would.
    assert [_fail(nodes[i % 2], "alice") for i in range(5)] == [AuthError] * 5
    for node in (a, b):  # the sixth is refused on either node, without checking the password
        with pytest.raises(RateLimitedError, match="too many failed logins"):
            node.accounts.login("alice", PASSWORD, client=ATTACKER)
    # The lock is the pair's: Alice, at her own address, logs in through either node.
    assert a.accounts.login("alice", PASSWORD, client="home").token
    assert b.accounts.login("alice", PASSWORD, client="home").token


def test_the_client_lock_and_account_ceiling_are_cluster_wide(
    database_url: str, issuer: TokenIssuer, clock: WallClock
) -> None:
    a, b = (
        Node(database_url, issuer, clock, max_failures_per_client=4, account_failures_per_hour=6)
        for _ in range(2)
    )
    a.accounts.signup("alice", PASSWORD, client="home")
    a.accounts.login("alice", PASSWORD, client="home")  # through node a: "home" is known
    # Spraying: one address, many accounts, over both nodes.
    assert [_fail((a, b)[i % 2], f"user{i}") for i in range(4)] == [AuthError] * 4
    assert _fail(a, "user9") is RateLimitedError
    assert _fail(b, "user10") is RateLimitedError
    # Distributed guessing: many addresses, one account, over both nodes.
    assert [_fail((a, b)[i % 2], "alice", f"bot{i}") for i in range(6)] == [AuthError] * 6
    assert _fail(b, "alice", "bot-new") is RateLimitedError
    # The account's own address is spared (it logged in before, through node a).
    assert [_fail((a, b)[i % 2], "alice", f"bot{i}x") for i in range(2)] == [RateLimitedError] * 2
    assert b.accounts.login("alice", PASSWORD, client="home").token
    a.store.close()
    b.store.close()


def test_concurrent_signups_on_two_nodes_are_all_counted(
    database_url: str, issuer: TokenIssuer, clock: WallClock
) -> None:
    a, b = (Node(database_url, issuer, clock, signups_per_hour=10) for _ in range(2))
    accepted = 0
    lock = threading.Lock()

    def attempt(n: int) -> None:
        nonlocal accepted
        try:
            (a, b)[n % 2].accounts.signup(f"flood{n}", PASSWORD, client=ATTACKER)
        except RateLimitedError:
            return
        with lock:
            accepted += 1

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(attempt, range(30)))
    assert accepted == 10  # a lost update (two nodes reading the same count) would let more in
    with pytest.raises(RateLimitedError, match="too many signups") as refused:
        b.accounts.signup("late", PASSWORD, client=ATTACKER)
    assert refused.value.retry_after_s == 360.0
    clock.now += 360.0  # one signup drains every 3600/10 s, on every node's clock
    a.accounts.signup("later", PASSWORD, client=ATTACKER)
    a.store.close()
    b.store.close()


def test_counts_expire_and_the_table_stays_bounded(nodes: list[Node], clock: WallClock) -> None:
    a, _ = nodes
    throttle = SqlThrottle(a.store, pepper=b"p" * 32, max_entries=5, purge_every=1, clock=clock)
    limiter = LoginRateLimiter(max_failures_per_pair=2, forget_after_s=60.0, tables=throttle)
    for _ in range(2):
        limiter.failure("alice", ATTACKER)
    with pytest.raises(RateLimitedError):
        limiter.check("alice", ATTACKER)
    clock.now += 60.0  # forgotten after forget_after_s, on the wall clock
    limiter.check("alice", ATTACKER)
    for n in range(40):
        limiter.failure(f"user{n}", f"client{n}")
    for scope in ("login_pair", "login_client", "login_account"):
        assert len(throttle.table(scope)) <= 5
    clock.now += 3600.0 + 60.0
    throttle.purge()  # everything has expired
    with a.store.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(ThrottleRow)).scalar() == 0


def test_the_table_holds_no_username_address_or_password(
    nodes: list[Node], database_url: str
) -> None:
    a, b = nodes
    a.accounts.signup("alice", PASSWORD, client="198.51.100.23")
    for node in (a, b):
        _fail(node, "alice")
        _fail(node, "mallory-unknown")
    b.accounts.login("alice", PASSWORD, client="198.51.100.23")
    with a.store.connect() as connection:
        rows = connection.execute(sa.select(ThrottleRow)).all()
    assert {row.scope for row in rows} == {
        "signup",
        "login_pair",
        "login_client",
        "login_account",
        "login_known",
    }
    text = json.dumps([list(row) for row in rows])
    for secret in ("alice", "mallory", ATTACKER, "198.51.100.23", "203.0.113", PASSWORD, "wrong"):
        assert secret not in text
    if database_url.startswith("sqlite:///"):  # and not in the file's raw bytes either
        raw = Path(database_url.removeprefix("sqlite:///")).read_bytes()
        assert ATTACKER.encode() not in raw and b"mallory" not in raw
        sqlite3.connect(database_url.removeprefix("sqlite:///")).close()


def test_a_short_pepper_or_scope_is_refused(nodes: list[Node]) -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        SqlThrottle(nodes[0].store, pepper=b"short")
    with pytest.raises(ValueError, match="scope"):
        SqlThrottle(nodes[0].store, pepper=b"p" * 16).table("x" * 17)
