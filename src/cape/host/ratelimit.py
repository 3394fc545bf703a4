"""Login and signup throttling, in memory (docs/limits.md "Accounts").

**Logins** (:class:`LoginRateLimiter`) are throttled by three keys, so that guessing is slow
but nobody can lock a user out of their own account from somewhere else:

1. *(account, client address)*: after ``max_failures_per_pair`` failures each further one
   locks that pair out for ``base_lockout_s``, doubling up to ``max_lockout_s``. An attacker
   guessing at ``alice`` from one address locks out only that address for ``alice``; Alice,
   at hers, is not affected.
2. *client address* (any account): after ``max_failures_per_client`` failures the address is
   locked out the same way (password spraying across many accounts from one place).
3. *account* (any address): a ceiling of ``account_failures_per_hour`` failures, a leaky
   bucket (a full bucket drains at that rate). While it is full, only addresses that have
   logged into that account before (successfully, since the server started, within
   ``remember_s``) may try; others get 429 until it drains. This stops distributed guessing
   from many addresses (at most that many guesses an hour) without locking the user out of
   an address they have used. The trade-off: during such an attack the user cannot log in
   from an address they have never used (or not since a restart), and an attacker behind the
   same address as the user (one NAT) is indistinguishable from them.

A success resets its pair and remembers the address for the account; it does not reset the
client's count (else an attacker could log into an account of their own between guesses at
others' passwords).

**Signups** (:class:`SignupRateLimiter`) are a token bucket per client address:
``burst`` at once, then ``per_hour`` an hour.

Both are per process, lost on restart and bounded to ``max_entries`` keys per kind (the least
recently used dropped first). ``clock`` is monotonic seconds (a seam for tests). The client
address is whatever the ASGI server reports: the TCP peer, or the ``X-Forwarded-For`` address
when the peer is a proxy the operator listed (``cape serve --forwarded-allow-ips``).
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from cape.host.errors import RateLimitedError

__all__ = [
    "DEFAULT_SIGNUPS_PER_HOUR",
    "LoginRateLimiter",
    "SignupRateLimiter",
]

DEFAULT_SIGNUPS_PER_HOUR: Final = 20
"""Signups one client address may make per hour (also the burst)."""
_HOUR_S: Final = 3600.0


def _refusal(what: str, wait_s: float) -> RateLimitedError:
    seconds = max(1, math.ceil(wait_s))
    return RateLimitedError(f"{what}; try again in {seconds} s", retry_after_s=float(seconds))


# --------------------------------------------------------------------------- backoff


@dataclass(slots=True)
class _Failures:
    count: int = 0
    last_failure: float = 0.0
    locked_until: float = 0.0


class _Backoff:
    """Failure counts per key with exponential lockouts (callers hold the lock)."""

    def __init__(
        self,
        *,
        max_failures: int,
        base_lockout_s: float,
        max_lockout_s: float,
        forget_after_s: float,
        max_entries: int,
    ) -> None:
        self.max_failures = max_failures
        self.base_lockout_s = base_lockout_s
        self.max_lockout_s = max_lockout_s
        self.forget_after_s = forget_after_s
        self.max_entries = max_entries
        self.entries: collections.OrderedDict[object, _Failures] = collections.OrderedDict()

    def retry_after(self, key: object, now: float) -> float:
        entry = self.entries.get(key)
        if entry is None:
            return 0.0
        if now - entry.last_failure >= self.forget_after_s and now >= entry.locked_until:
            del self.entries[key]
            return 0.0
        return max(0.0, entry.locked_until - now)

    def failure(self, key: object, now: float) -> None:
        self.retry_after(key, now)  # forgets a stale entry
        entry = self.entries.setdefault(key, _Failures())
        self.entries.move_to_end(key)
        entry.count += 1
        entry.last_failure = now
        if entry.count >= self.max_failures:
            doublings = min(entry.count - self.max_failures, 62)
            lockout = min(self.base_lockout_s * 2.0**doublings, self.max_lockout_s)
            entry.locked_until = now + lockout
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)  # the key that failed least recently

    def reset(self, key: object) -> None:
        self.entries.pop(key, None)


class _Buckets:
    """Leaky buckets per key: each event adds one, the level drains at ``rate`` per second
    (callers hold the lock)."""

    def __init__(self, *, capacity: float, rate_per_s: float, max_entries: int) -> None:
        self.capacity = capacity
        self.rate_per_s = rate_per_s
        self.max_entries = max_entries
        self.entries: collections.OrderedDict[object, tuple[float, float]] = (
            collections.OrderedDict()
        )

    def level(self, key: object, now: float) -> float:
        entry = self.entries.get(key)
        if entry is None:
            return 0.0
        level, at = entry
        level = max(0.0, level - (now - at) * self.rate_per_s)
        if level == 0.0:
            del self.entries[key]
        return level

    def wait(self, key: object, now: float) -> float:
        """Seconds until one more event fits (0 if it fits now)."""
        excess = self.level(key, now) + 1.0 - self.capacity
        return 0.0 if excess <= 0 else excess / self.rate_per_s

    def add(self, key: object, now: float) -> None:
        self.entries[key] = (self.level(key, now) + 1.0, now)
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)


# --------------------------------------------------------------------------- logins


class LoginRateLimiter:
    """Failed-login throttling per (account, address), per address and per account (see
    the module docstring)."""

    def __init__(
        self,
        *,
        max_failures_per_pair: int = 5,
        max_failures_per_client: int = 20,
        account_failures_per_hour: int = 100,
        base_lockout_s: float = 1.0,
        max_lockout_s: float = 900.0,
        forget_after_s: float = 3600.0,
        remember_s: float = 30 * 24 * 3600.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min(max_failures_per_pair, max_failures_per_client, account_failures_per_hour) < 1:
            raise ValueError("login failure limits must be positive")

        def backoff(max_failures: int) -> _Backoff:
            return _Backoff(
                max_failures=max_failures,
                base_lockout_s=base_lockout_s,
                max_lockout_s=max_lockout_s,
                forget_after_s=forget_after_s,
                max_entries=max_entries,
            )

        self._pairs = backoff(max_failures_per_pair)
        self._clients = backoff(max_failures_per_client)
        self._accounts = _Buckets(
            capacity=account_failures_per_hour,
            rate_per_s=account_failures_per_hour / _HOUR_S,
            max_entries=max_entries,
        )
        self._known: collections.OrderedDict[tuple[str, str], float] = collections.OrderedDict()
        self._remember_s = remember_s
        self._max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()

    def _is_known(self, username: str, client: str, now: float) -> bool:
        seen = self._known.get((username, client))
        if seen is None:
            return False
        if now - seen > self._remember_s:
            del self._known[(username, client)]
            return False
        return True

    def check(self, username: str, client: str) -> None:
        """Raise :class:`RateLimitedError` if this attempt may not be made now."""
        with self._lock:
            now = self._clock()
            wait = max(
                self._pairs.retry_after((username, client), now),
                self._clients.retry_after(client, now),
            )
            if wait == 0 and not self._is_known(username, client, now):
                # The account ceiling: full means "under attack", and new addresses wait.
                level = self._accounts.level(username, now)
                if level >= self._accounts.capacity:
                    wait = (level - self._accounts.capacity + 1.0) / self._accounts.rate_per_s
        if wait > 0:
            raise _refusal("too many failed logins", wait)

    def failure(self, username: str, client: str) -> None:
        with self._lock:
            now = self._clock()
            self._pairs.failure((username, client), now)
            self._clients.failure(client, now)
            self._accounts.add(username, now)

    def success(self, username: str, client: str) -> None:
        """Reset the pair's count and remember the address for the account (not the client's
        count: see the module docstring)."""
        with self._lock:
            self._pairs.reset((username, client))
            self._known[(username, client)] = self._clock()
            self._known.move_to_end((username, client))
            while len(self._known) > self._max_entries:
                self._known.popitem(last=False)


# --------------------------------------------------------------------------- signups


class SignupRateLimiter:
    """Signup attempts per client address: a bucket of ``burst`` that refills at
    ``per_hour`` an hour. ``per_hour=0`` turns the limit off."""

    def __init__(
        self,
        *,
        per_hour: int = DEFAULT_SIGNUPS_PER_HOUR,
        burst: int | None = None,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(per_hour, bool) or not isinstance(per_hour, int) or per_hour < 0:
            raise ValueError("per_hour must be a non-negative integer")
        self.per_hour = per_hour
        capacity = per_hour if burst is None else burst
        self._buckets = _Buckets(
            capacity=max(1, capacity), rate_per_s=per_hour / _HOUR_S, max_entries=max_entries
        )
        self._clock = clock
        self._lock = threading.Lock()

    def attempt(self, client: str) -> None:
        """Count one signup attempt from ``client``.

        Raises:
            RateLimitedError: the client has used up its signups for now (nothing counted).
        """
        if self.per_hour == 0:
            return
        with self._lock:
            now = self._clock()
            wait = self._buckets.wait(client, now)
            if wait == 0:
                self._buckets.add(client, now)
        if wait > 0:
            raise _refusal("too many signups from your address", wait)
