"""Login and signup throttling (docs/limits.md "Accounts"), kept in a table every node shares.

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
   logged into that account before (successfully, within ``remember_s``) may try; others get
   429 until it drains. This stops distributed guessing from many addresses (at most that
   many guesses an hour) without locking the user out of an address they have used. The
   trade-off: during such an attack the user cannot log in from an address they have never
   used, and an attacker behind the same address as the user (one NAT) is indistinguishable
   from them.

A success resets its pair and remembers the address for the account; it does not reset the
client's count (else an attacker could log into an account of their own between guesses at
others' passwords).

**Signups** (:class:`SignupRateLimiter`) are a token bucket per client address:
``burst`` at once, then ``per_hour`` an hour.

**Where the counts live.** Each limiter keeps one :class:`ThrottleTable` per kind of key
(from ``tables``). :class:`MemoryTables`, the default, keeps them in this process, lost on
restart and bounded to ``max_entries`` keys per kind (the least recently used dropped first),
with ``time.monotonic`` as the clock. ``cape serve`` passes
:class:`~cape.host.store.throttle.SqlThrottle` instead: the counts live in the metadata
database, so every node of a cluster sees the same ones (N nodes behind a load balancer give
an attacker no more attempts than one), with the wall clock. The policy (what a failure
does, when a key is locked, when it is forgotten) is here, once, for both: a table only
stores :class:`Throttle` records and applies changes to one key atomically.

``clock`` is seconds (a seam for tests; the tables' own clock by default). The client address
is whatever the ASGI server reports: the TCP peer, or the ``X-Forwarded-For`` address when the
peer is a proxy the operator listed (``cape serve --forwarded-allow-ips``).
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar

from cape.host.errors import RateLimitedError

__all__ = [
    "DEFAULT_SIGNUPS_PER_HOUR",
    "LoginRateLimiter",
    "MemoryTables",
    "SignupRateLimiter",
    "Throttle",
    "ThrottleTable",
    "ThrottleTables",
]

DEFAULT_SIGNUPS_PER_HOUR: Final = 20
"""Signups one client address may make per hour (also the burst)."""
_HOUR_S: Final = 3600.0

T = TypeVar("T")
Key = tuple[str, ...]


def _refusal(what: str, wait_s: float) -> RateLimitedError:
    seconds = max(1, math.ceil(wait_s))
    return RateLimitedError(f"{what}; try again in {seconds} s", retry_after_s=float(seconds))


# --------------------------------------------------------------------------- storage


@dataclass(frozen=True, slots=True)
class Throttle:
    """One key's state. A failure counter uses ``failures``, ``touched`` (the last failure)
    and ``locked_until``; a bucket ``level`` and ``touched`` (when it had that level); a
    remembered address ``touched`` (its last login). Times are the limiter's clock."""

    failures: int = 0
    level: float = 0.0
    touched: float = 0.0
    locked_until: float = 0.0
    expires: float = 0.0
    """From then on the key is forgotten (as if it had never been seen)."""


Change = Callable[[Throttle | None], tuple[Throttle | None, T]]
"""Given a key's live record (``None``: none), the record to keep (``None``: forget the key;
the same object: leave it as it is) and a result for the caller."""


class ThrottleTable(Protocol):
    """Records of one kind of key (e.g. failed logins per address)."""

    def __len__(self) -> int:
        """How many keys it holds (expired ones may count until they are purged)."""

    def get(self, key: Key, now: float) -> Throttle | None:
        """The key's record, or ``None`` if there is none or it expired by ``now``."""

    def update(self, key: Key, now: float, change: Change[T]) -> T:
        """Apply ``change`` to the key's live record atomically (no other update of the key,
        from this process or another node, interleaves) and return its result."""


class ThrottleTables(Protocol):
    """Where a limiter keeps its tables, and the clock their times are in."""

    def clock(self) -> float: ...

    def table(self, scope: str) -> ThrottleTable:
        """The table for ``scope`` (a short name such as ``login_pair``)."""


class MemoryTable:
    """A :class:`ThrottleTable` in this process: at most ``max_entries`` keys, the least
    recently updated dropped first."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.entries: collections.OrderedDict[Key, Throttle] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.entries)

    def _live(self, key: Key, now: float) -> Throttle | None:
        entry = self.entries.get(key)
        if entry is not None and entry.expires <= now:
            del self.entries[key]
            return None
        return entry

    def get(self, key: Key, now: float) -> Throttle | None:
        with self._lock:
            return self._live(key, now)

    def update(self, key: Key, now: float, change: Change[T]) -> T:
        with self._lock:
            current = self._live(key, now)
            entry, result = change(current)
            if entry is None:
                self.entries.pop(key, None)
            elif entry is not current:
                self.entries[key] = entry
                self.entries.move_to_end(key)
                while len(self.entries) > self.max_entries:
                    self.entries.popitem(last=False)
            return result


class MemoryTables:
    """:class:`ThrottleTables` in this process (one node; lost on restart)."""

    def __init__(self, *, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries

    def clock(self) -> float:
        return time.monotonic()

    def table(self, scope: str) -> MemoryTable:
        return MemoryTable(self.max_entries)


# --------------------------------------------------------------------------- policies


@dataclass(frozen=True, slots=True)
class _Backoff:
    """A failure counter with exponential lockouts."""

    max_failures: int
    base_lockout_s: float
    max_lockout_s: float
    forget_after_s: float

    @staticmethod
    def wait(entry: Throttle | None, now: float) -> float:
        return 0.0 if entry is None else max(0.0, entry.locked_until - now)

    def fail(self, entry: Throttle | None, now: float) -> Throttle:
        failures = 1 if entry is None else entry.failures + 1
        locked_until = 0.0 if entry is None else entry.locked_until
        if failures >= self.max_failures:
            doublings = min(failures - self.max_failures, 62)
            locked_until = now + min(self.base_lockout_s * 2.0**doublings, self.max_lockout_s)
        return Throttle(
            failures=failures,
            touched=now,
            locked_until=locked_until,
            expires=max(now + self.forget_after_s, locked_until),
        )


@dataclass(frozen=True, slots=True)
class _Bucket:
    """A leaky bucket: each event adds one, the level drains at ``rate_per_s``."""

    capacity: float
    rate_per_s: float

    def level(self, entry: Throttle | None, now: float) -> float:
        if entry is None:
            return 0.0
        return max(0.0, entry.level - max(0.0, now - entry.touched) * self.rate_per_s)

    def wait(self, entry: Throttle | None, now: float) -> float:
        """Seconds until one more event fits (0 if it fits now)."""
        excess = self.level(entry, now) + 1.0 - self.capacity
        return 0.0 if excess <= 0 else excess / self.rate_per_s

    def add(self, entry: Throttle | None, now: float) -> Throttle:
        level = self.level(entry, now) + 1.0
        return Throttle(level=level, touched=now, expires=now + level / self.rate_per_s)


def _forget(_entry: Throttle | None) -> tuple[None, None]:
    return None, None


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
        clock: Callable[[], float] | None = None,
        tables: ThrottleTables | None = None,
    ) -> None:
        if min(max_failures_per_pair, max_failures_per_client, account_failures_per_hour) < 1:
            raise ValueError("login failure limits must be positive")
        if tables is None:
            tables = MemoryTables(max_entries=max_entries)

        def backoff(max_failures: int) -> _Backoff:
            return _Backoff(max_failures, base_lockout_s, max_lockout_s, forget_after_s)

        self._pair_policy = backoff(max_failures_per_pair)
        self._client_policy = backoff(max_failures_per_client)
        self._bucket = _Bucket(account_failures_per_hour, account_failures_per_hour / _HOUR_S)
        self._pairs = tables.table("login_pair")
        self._clients = tables.table("login_client")
        self._accounts = tables.table("login_account")
        self._known = tables.table("login_known")
        self._remember_s = remember_s
        self._clock = tables.clock if clock is None else clock

    def check(self, username: str, client: str) -> None:
        """Raise :class:`RateLimitedError` if this attempt may not be made now."""
        now = self._clock()
        wait = max(
            self._pair_policy.wait(self._pairs.get((username, client), now), now),
            self._client_policy.wait(self._clients.get((client,), now), now),
        )
        if wait == 0 and self._known.get((username, client), now) is None:
            # The account ceiling: full means "under attack", and new addresses wait.
            level = self._bucket.level(self._accounts.get((username,), now), now)
            if level >= self._bucket.capacity:
                wait = (level - self._bucket.capacity + 1.0) / self._bucket.rate_per_s
        if wait > 0:
            raise _refusal("too many failed logins", wait)

    def failure(self, username: str, client: str) -> None:
        now = self._clock()
        self._pairs.update((username, client), now, lambda e: (self._pair_policy.fail(e, now), 0))
        self._clients.update((client,), now, lambda e: (self._client_policy.fail(e, now), 0))
        self._accounts.update((username,), now, lambda e: (self._bucket.add(e, now), 0))

    def success(self, username: str, client: str) -> None:
        """Reset the pair's count and remember the address for the account (not the client's
        count: see the module docstring)."""
        now = self._clock()
        seen = Throttle(touched=now, expires=now + self._remember_s)
        self._pairs.update((username, client), now, _forget)
        self._known.update((username, client), now, lambda _e: (seen, 0))


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
        clock: Callable[[], float] | None = None,
        tables: ThrottleTables | None = None,
    ) -> None:
        if isinstance(per_hour, bool) or not isinstance(per_hour, int) or per_hour < 0:
            raise ValueError("per_hour must be a non-negative integer")
        if tables is None:
            tables = MemoryTables(max_entries=max_entries)
        self.per_hour = per_hour
        capacity = per_hour if burst is None else burst
        self._bucket = _Bucket(max(1, capacity), max(per_hour, 1) / _HOUR_S)
        self._buckets = tables.table("signup")
        self._clock = tables.clock if clock is None else clock

    def attempt(self, client: str) -> None:
        """Count one signup attempt from ``client``.

        Raises:
            RateLimitedError: the client has used up its signups for now (nothing counted).
        """
        if self.per_hour == 0:
            return
        now = self._clock()

        def take(entry: Throttle | None) -> tuple[Throttle | None, float]:
            wait = self._bucket.wait(entry, now)
            return (entry, wait) if wait > 0 else (self._bucket.add(entry, now), 0.0)

        wait = self._buckets.update((client,), now, take)
        if wait > 0:
            raise _refusal("too many signups from your address", wait)
