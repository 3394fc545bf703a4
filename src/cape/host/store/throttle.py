"""Login and signup throttling state in the metadata database (``throttle`` table), shared by
every node that uses the database.

:class:`SqlThrottle` gives :class:`~cape.host.ratelimit.LoginRateLimiter` and
:class:`~cape.host.ratelimit.SignupRateLimiter` their tables (see :mod:`cape.host.ratelimit`
for the policy). A row is one key's :class:`~cape.host.ratelimit.Throttle` record:

- **No user data in the clear.** A row is named by ``key_hash``, an HMAC-SHA256 of its kind
  and parts (username, client address) under ``pepper``, a secret the nodes share but the
  database does not hold (``cape serve`` derives it from the token signing key). A copy of
  the database tells neither who tried to log in nor from where; no password is ever here.
- **One key at a time, atomically, across nodes.** An update inserts the row if missing
  (``ON CONFLICT DO NOTHING``), locks it (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite's
  write lock, which the insert already took), applies the change and commits, so concurrent
  failures on two nodes are both counted.
- **Bounded, with expiry.** Times are wall-clock seconds (nodes' clocks agree to NTP's
  precision; a step back never increases a count). Every ``purge_every`` writes a node
  deletes the expired rows and, should a kind hold more than ``max_entries`` rows, its least
  recently touched ones; a failed purge (two nodes purging at once) is logged and retried
  later, never surfaced to a login.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

from sqlalchemy import Double, Index, Integer, String, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, mapped_column

from cape.host.ratelimit import Change, Key, Throttle
from cape.host.store.metadata import Base, SqlMetadataStore

__all__ = ["SCOPE_CHARS", "SqlThrottle", "SqlThrottleTable", "ThrottleRow"]

SCOPE_CHARS: Final = 16
MIN_PEPPER_BYTES: Final = 16

T = TypeVar("T")
log = logging.getLogger("cape.throttle")


class ThrottleRow(Base):
    __tablename__ = "throttle"
    __table_args__ = (Index("ix_throttle_scope_touched", "scope", "touched"),)

    scope: Mapped[str] = mapped_column(String(SCOPE_CHARS), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer())
    level: Mapped[float] = mapped_column(Double())
    touched: Mapped[float] = mapped_column(Double())
    locked_until: Mapped[float] = mapped_column(Double())
    expires: Mapped[float] = mapped_column(Double(), index=True)


def _record(row: Any) -> Throttle:
    return Throttle(row.failures, row.level, row.touched, row.locked_until, row.expires)


def _values(entry: Throttle) -> dict[str, float | int]:
    return {
        "failures": entry.failures,
        "level": entry.level,
        "touched": entry.touched,
        "locked_until": entry.locked_until,
        "expires": entry.expires,
    }


class SqlThrottle:
    """Throttle tables in ``store``'s database (a :class:`~cape.host.ratelimit.ThrottleTables`).

    ``pepper`` keys the row names (at least 16 bytes, the same on every node); ``clock`` is
    wall-clock seconds (a seam for tests).
    """

    def __init__(
        self,
        store: SqlMetadataStore,
        *,
        pepper: bytes,
        max_entries: int = 100_000,
        purge_every: int = 256,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(pepper) < MIN_PEPPER_BYTES:
            raise ValueError(f"the throttle pepper needs at least {MIN_PEPPER_BYTES} bytes")
        if max_entries < 1 or purge_every < 1:
            raise ValueError("max_entries and purge_every must be positive")
        self.store = store
        self.max_entries = max_entries
        self._pepper = pepper
        self._purge_every = purge_every
        self._clock = clock
        self._writes = 0
        self._lock = threading.Lock()

    def clock(self) -> float:
        return self._clock()

    def table(self, scope: str) -> SqlThrottleTable:
        if not 0 < len(scope) <= SCOPE_CHARS:
            raise ValueError(f"a throttle scope has 1-{SCOPE_CHARS} characters")
        return SqlThrottleTable(self, scope)

    def key_hash(self, scope: str, key: Key) -> str:
        message = json.dumps([scope, *key], ensure_ascii=True).encode("ascii")
        return hmac.new(self._pepper, message, hashlib.sha256).hexdigest()

    def wrote(self) -> None:
        """Count a write; every ``purge_every`` of them, purge."""
        with self._lock:
            self._writes += 1
            due = self._writes % self._purge_every == 0
        if due:
            self.purge()

    def purge(self) -> int:
        """Delete expired rows, then the least recently touched of any kind over
        ``max_entries``; return how many went (0 if the purge failed, which is logged)."""
        now = self._clock()
        removed = 0
        try:
            with self.store.connect() as connection:
                gone = connection.execute(delete(ThrottleRow).where(ThrottleRow.expires <= now))
                removed += max(0, gone.rowcount)
                counts = connection.execute(
                    select(ThrottleRow.scope, func.count()).group_by(ThrottleRow.scope)
                ).all()
                for scope, count in counts:
                    if count <= self.max_entries:
                        continue
                    oldest = (
                        select(ThrottleRow.key_hash)
                        .where(ThrottleRow.scope == scope)
                        .order_by(ThrottleRow.touched)
                        .limit(count - self.max_entries)
                    )
                    gone = connection.execute(
                        delete(ThrottleRow).where(
                            ThrottleRow.scope == scope,
                            ThrottleRow.key_hash.in_(oldest.scalar_subquery()),
                        )
                    )
                    removed += max(0, gone.rowcount)
        except SQLAlchemyError as exc:
            log.warning("throttle purge failed, retried later: %s", type(exc).__name__)
            return 0
        return removed


class SqlThrottleTable:
    """One kind of key in the ``throttle`` table (a :class:`~cape.host.ratelimit.ThrottleTable`)."""

    def __init__(self, owner: SqlThrottle, scope: str) -> None:
        self._owner = owner
        self.scope = scope

    def __len__(self) -> int:
        """Rows of this kind, expired ones included until the next purge."""
        with self._owner.store.connect() as connection:
            query = select(func.count()).where(ThrottleRow.scope == self.scope)
            return int(connection.execute(query).scalar_one())

    def get(self, key: Key, now: float) -> Throttle | None:
        key_hash = self._owner.key_hash(self.scope, key)
        query = select(ThrottleRow).where(
            ThrottleRow.scope == self.scope, ThrottleRow.key_hash == key_hash
        )
        with self._owner.store.connect() as connection:
            row = connection.execute(query).one_or_none()
        return None if row is None or row.expires <= now else _record(row)

    def update(self, key: Key, now: float, change: Change[T]) -> T:
        store = self._owner.store
        key_hash = self._owner.key_hash(self.scope, key)
        dialect = sqlite if store.is_sqlite else postgresql
        placeholder = dialect.insert(ThrottleRow).values(
            scope=self.scope, key_hash=key_hash, **_values(Throttle())
        )
        where = (ThrottleRow.scope == self.scope, ThrottleRow.key_hash == key_hash)
        with store.connect() as connection:
            # The insert takes SQLite's write lock; FOR UPDATE the row's lock on PostgreSQL.
            connection.execute(placeholder.on_conflict_do_nothing())
            row = connection.execute(select(ThrottleRow).where(*where).with_for_update()).one()
            current = None if row.expires <= now else _record(row)
            entry, result = change(current)
            if entry is None:
                connection.execute(delete(ThrottleRow).where(*where))
            elif entry is not current:
                connection.execute(update(ThrottleRow).where(*where).values(**_values(entry)))
        self._owner.wrote()
        return result
