"""What a verifier requires of an attestation document beyond a valid signature and chain."""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from cape.errors import FormatError

__all__ = [
    "DEFAULT_CLOCK_SKEW",
    "DEFAULT_MAX_AGE",
    "AttestationPolicy",
    "parse_pcr_pin",
    "pcr_allow_list",
]

#: Chainlink settled on five minutes after an audit finding; live sessions need far less.
DEFAULT_MAX_AGE = dt.timedelta(minutes=5)
#: How far a document's timestamp may lie in the verifier's future (clock drift).
DEFAULT_CLOCK_SKEW = dt.timedelta(seconds=60)


@dataclass(frozen=True)
class AttestationPolicy:
    """Checks applied after the signature and the certificate chain.

    - ``nonce``: when set, the document must carry exactly these bytes.
    - ``pcrs``: allow-lists, ``{index: {allowed values}}``; each listed PCR must be present
      and hold one of its allowed values.
    - ``max_age``: the oldest acceptable ``timestamp`` relative to the check time; ``None``
      disables the check (for audits at a chosen time).
    - ``allow_debug``: accept debug-mode enclaves (PCR0 zero). Never for production.
    """

    nonce: bytes | None = None
    pcrs: Mapping[int, Collection[bytes]] = field(default_factory=dict)
    max_age: dt.timedelta | None = DEFAULT_MAX_AGE
    clock_skew: dt.timedelta = DEFAULT_CLOCK_SKEW
    allow_debug: bool = False

    def __post_init__(self) -> None:
        pcrs = {int(i): frozenset(values) for i, values in self.pcrs.items()}
        for index, values in pcrs.items():
            if not 0 <= index < 32:
                raise ValueError(f"PCR index {index} is outside 0..31")
            if not values:
                raise ValueError(f"PCR{index} allow-list is empty")
        object.__setattr__(self, "pcrs", MappingProxyType(pcrs))
        if self.max_age is not None and self.max_age < dt.timedelta(0):
            raise ValueError("max_age must not be negative")


def parse_pcr_pin(text: str) -> tuple[int, bytes]:
    """Parse ``"I:HEX"`` (as ``--pcr 0:abcd…`` gives it) into ``(index, value)``."""
    index_text, sep, hex_text = text.partition(":")
    if not sep:
        raise FormatError(f"PCR pin {text!r} must look like INDEX:HEX")
    try:
        index = int(index_text, 10)
        value = bytes.fromhex(hex_text)
    except ValueError:
        raise FormatError(f"PCR pin {text!r} must look like INDEX:HEX") from None
    if not 0 <= index < 32:
        raise FormatError(f"PCR index {index} is outside 0..31")
    if len(value) not in (32, 48, 64):
        raise FormatError(f"PCR{index} value must be 32, 48 or 64 bytes, got {len(value)}")
    return index, value


def pcr_allow_list(pins: Iterable[tuple[int, bytes]]) -> dict[int, frozenset[bytes]]:
    """Group ``(index, value)`` pins into allow-lists; repeating an index allows either value."""
    grouped: dict[int, set[bytes]] = {}
    for index, value in pins:
        grouped.setdefault(index, set()).add(value)
    return {index: frozenset(values) for index, values in grouped.items()}
