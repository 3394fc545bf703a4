"""The server's limits and quotas, as ``cape serve --limit NAME=VALUE`` sets them.

Every name, its default and what it bounds is in docs/limits.md ("Server"); the defaults
are safe for a shared server on a small machine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

from cape.errors import FormatError
from cape.host.admission import Limits
from cape.host.hashgate import DEFAULT_HASH_QUEUE, default_hash_concurrency

__all__ = ["ServerLimits", "parse_limits"]


@dataclass(frozen=True)
class ServerLimits:
    """What one tenant, and all of them together, may hold of the server."""

    sessions_per_user: int = 32
    sessions: int = 1024
    deploys_per_user: int = 2
    deploys: int = 16
    bundle_bytes_in_flight_per_user: int = 1_000_000_000
    bundle_bytes_in_flight: int = 4_000_000_000
    bundle_bytes: int = 1_000_000_000
    frame_timeout_s: float = 30.0
    header_timeout_s: float = 30.0
    body_timeout_s: float = 30.0
    password_hashes: int = field(default_factory=default_hash_concurrency)
    """Password hashes (signups, logins) computed at once; by default half the CPUs."""
    password_hash_queue: int = DEFAULT_HASH_QUEUE
    """Signups and logins that may wait for a hash turn; more get 503 at once."""

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise FormatError(f"the limit {item.name} must be a positive number")

    def admission(self) -> Limits:
        return Limits(
            sessions_per_user=self.sessions_per_user,
            sessions=self.sessions,
            deploys_per_user=self.deploys_per_user,
            deploys=self.deploys,
            bundle_bytes_per_user=self.bundle_bytes_in_flight_per_user,
            bundle_bytes=self.bundle_bytes_in_flight,
        )


def parse_limits(settings: Iterable[str], base: ServerLimits | None = None) -> ServerLimits:
    """``base`` (default: the defaults) with each ``NAME=VALUE`` of ``settings`` applied.

    Raises:
        FormatError: an unknown name or a value that is not a positive number of its kind.
    """
    base = base or ServerLimits()
    kinds = {item.name: item.type for item in dataclasses.fields(ServerLimits)}
    changes: dict[str, int | float] = {}
    for setting in settings:
        name, sep, text = setting.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in kinds:
            raise FormatError(
                f"unknown limit {setting!r}: use NAME=VALUE with NAME one of {', '.join(kinds)}"
            )
        try:
            changes[name] = float(text) if kinds[name] == "float" else int(text)
        except ValueError:
            raise FormatError(f"the limit {name} must be a number, not {text!r}") from None
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]
