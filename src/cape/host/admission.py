"""Admission: how many sessions, deploys and bundle bytes each user, and the server, may
have open at once.

Every websocket session takes a slot when it is admitted, before the upgrade is accepted, and
gives it back when it ends; a deploy also takes a deploy slot and, once it says how large its
bundle is (or, for a single-frame bundle, before the frame is read), reserves those bytes.
Nothing is allocated from a size a client announces: a reservation is only a number.

A refusal says whose limit it hit:

- the caller's own limit: :class:`QuotaExceededError` (HTTP 429, close 1013; ``Retry-After``),
- the server's: :class:`ServerBusyError` (HTTP 503, close 1013; ``Retry-After``).

A deploy whose bundle would pass a byte limit mid-session gets ``{"error"}`` and close 1013;
one larger than a user may ever have in flight gets close 1008 (retrying cannot help).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from cape.errors import LimitExceededError
from cape.host.errors import RateLimitedError, UnavailableError

__all__ = [
    "Admission",
    "Limits",
    "QuotaExceededError",
    "Reservation",
    "ServerBusyError",
]

RETRY_AFTER_S: Final = 5.0


class QuotaExceededError(RateLimitedError):
    """The caller has as many sessions, deploys or bundle bytes open as it may (HTTP 429,
    close 1013)."""


class ServerBusyError(UnavailableError):
    """The server has as many sessions, deploys or bundle bytes open as it takes (HTTP 503,
    close 1013)."""

    def __init__(self, message: str, *, retry_after_s: float = RETRY_AFTER_S) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


@dataclass(frozen=True)
class Limits:
    """The admission limits; the defaults are ``cape serve``'s (docs/limits.md)."""

    sessions_per_user: int = 32
    sessions: int = 1024
    deploys_per_user: int = 2
    deploys: int = 16
    bundle_bytes_per_user: int = 1_000_000_000
    """Bundle bytes one user may have in flight (deploys not yet committed)."""
    bundle_bytes: int = 4_000_000_000
    """Bundle bytes the whole server may have in flight."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"the admission limit {name} must be a positive integer")


class _Gauge:
    """Counts per user and in total against two limits."""

    def __init__(self, what: str, per_user: int, total: int) -> None:
        self.what = what
        self.per_user = per_user
        self.total = total
        self.by_user: Counter[str] = Counter()
        self.sum = 0

    def take(self, user: str, amount: int) -> None:
        if amount > self.per_user:  # could never be admitted: not worth a retry
            raise LimitExceededError(f"{self.what} (per account)", self.per_user, amount)
        if self.by_user[user] + amount > self.per_user:
            raise QuotaExceededError(
                f"too many {self.what} at once for this account (limit {self.per_user}); "
                "wait for one to finish",
                retry_after_s=RETRY_AFTER_S,
            )
        if self.sum + amount > self.total:
            raise ServerBusyError(f"the server has too many {self.what} at once; try again later")
        self.by_user[user] += amount
        self.sum += amount

    def give(self, user: str, amount: int) -> None:
        self.by_user[user] -= amount
        if self.by_user[user] <= 0:
            del self.by_user[user]
        self.sum -= amount


class Reservation:
    """Bundle bytes one deploy holds; :meth:`resize` within the limits, freed on exit."""

    def __init__(self, gauge: _Gauge, user: str) -> None:
        self._gauge = gauge
        self._user = user
        self.amount = 0

    def resize(self, amount: int) -> None:
        """Hold ``amount`` bytes instead (raises the admission errors if that is too many)."""
        if amount > self.amount:
            self._gauge.take(self._user, amount - self.amount)
        else:
            self._gauge.give(self._user, self.amount - amount)
        self.amount = amount

    def available(self) -> int:
        """The most this reservation could grow to right now."""
        gauge = self._gauge
        return self.amount + min(
            gauge.per_user - gauge.by_user[self._user], gauge.total - gauge.sum
        )

    def release(self) -> None:
        self.resize(0)


class Admission:
    """The server's admission state (one per process; used from the event loop only)."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits = limits or Limits()
        self._sessions = _Gauge("sessions", limits.sessions_per_user, limits.sessions)
        self._deploys = _Gauge("deploys", limits.deploys_per_user, limits.deploys)
        self._bytes = _Gauge(
            "bundle bytes in flight", limits.bundle_bytes_per_user, limits.bundle_bytes
        )

    def sessions(self, user: str) -> int:
        return self._sessions.by_user[user]

    @contextlib.contextmanager
    def session(self, user: str, *, deploy: bool = False) -> Iterator[Reservation]:
        """Hold a session slot (and a deploy slot) for ``user`` while the block runs; the
        reservation it yields holds the deploy's bundle bytes."""
        self._sessions.take(user, 1)
        try:
            if deploy:
                self._deploys.take(user, 1)
            reservation = Reservation(self._bytes, user)
            try:
                yield reservation
            finally:
                reservation.release()
                if deploy:
                    self._deploys.give(user, 1)
        finally:
            self._sessions.give(user, 1)
