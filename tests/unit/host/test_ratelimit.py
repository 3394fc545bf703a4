"""Login and signup throttling (issue 18, finding 6): per (account, address), per address, an
account ceiling that spares addresses the user logged in from, and signups per address."""

from __future__ import annotations

import pytest

from cape.host.errors import RateLimitedError
from cape.host.ratelimit import LoginRateLimiter, SignupRateLimiter


class Monotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def mono() -> Monotonic:
    return Monotonic()


def test_a_pair_lockout_is_capped_and_forgotten(mono: Monotonic) -> None:
    limiter = LoginRateLimiter(
        max_failures_per_pair=2, max_lockout_s=60.0, forget_after_s=3600.0, clock=mono
    )
    for _ in range(30):
        limiter.failure("alice", "c")
    with pytest.raises(RateLimitedError) as capped:
        limiter.check("alice", "c")
    assert capped.value.retry_after_s == 60.0
    limiter.check("alice", "other")  # another address is not locked out
    mono.now += 3600.0
    limiter.check("alice", "c")
    limiter.failure("alice", "c")  # counting starts again from one
    limiter.check("alice", "c")


def test_the_account_ceiling_stops_distributed_guessing(mono: Monotonic) -> None:
    limiter = LoginRateLimiter(account_failures_per_hour=10, clock=mono)
    for i in range(10):  # one guess from each of many addresses
        limiter.check("alice", f"bot{i}")
        limiter.failure("alice", f"bot{i}")
    with pytest.raises(RateLimitedError) as ceiling:
        limiter.check("alice", "bot-new")
    assert ceiling.value.retry_after_s == 360.0  # one failure drains every 3600/10 s
    limiter.check("bob", "bot-new")  # other accounts are unaffected
    mono.now += 360.0
    limiter.check("alice", "bot-new")


def test_the_account_ceiling_spares_addresses_the_user_logged_in_from(mono: Monotonic) -> None:
    limiter = LoginRateLimiter(account_failures_per_hour=10, remember_s=86400.0, clock=mono)
    limiter.success("alice", "home")
    for i in range(50):
        limiter.failure("alice", f"bot{i}")
    limiter.check("alice", "home")  # under attack, the user's own address still may try
    with pytest.raises(RateLimitedError):
        limiter.check("alice", "cafe")  # a never-used address waits: the documented trade-off
    mono.now += 86401.0  # addresses are remembered for remember_s only
    for i in range(50):
        limiter.failure("alice", f"bot{i}")
    with pytest.raises(RateLimitedError):
        limiter.check("alice", "home")


def test_the_login_limiter_stays_bounded(mono: Monotonic) -> None:
    limiter = LoginRateLimiter(max_entries=100, clock=mono)
    for i in range(1000):
        limiter.failure(f"user{i}", f"client{i}")
        limiter.success(f"user{i}", f"client{i}")
    assert len(limiter._pairs) <= 100
    assert len(limiter._clients) == 100
    assert len(limiter._accounts) == 100
    assert len(limiter._known) == 100


def test_signups_are_limited_per_address(mono: Monotonic) -> None:
    limiter = SignupRateLimiter(per_hour=3, clock=mono)
    for _ in range(3):
        limiter.attempt("flood")
    with pytest.raises(RateLimitedError, match="too many signups") as refused:
        limiter.attempt("flood")
    assert refused.value.retry_after_s == 1200.0
    limiter.attempt("elsewhere")
    mono.now += 1200.0
    limiter.attempt("flood")
    with pytest.raises(RateLimitedError):
        limiter.attempt("flood")


def test_a_zero_signup_rate_means_no_limit(mono: Monotonic) -> None:
    limiter = SignupRateLimiter(per_hour=0, clock=mono)
    for _ in range(1000):
        limiter.attempt("one")


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        LoginRateLimiter(max_failures_per_pair=0)
    with pytest.raises(ValueError):
        SignupRateLimiter(per_hour=-1)
