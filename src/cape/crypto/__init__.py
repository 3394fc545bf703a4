"""Cape's client and enclave cryptographic recipes, all built on ``cryptography``.

- :mod:`cape.crypto.keys` — loading, checking and generating RSA Cape keys.
- :mod:`cape.crypto.envelope` — the single-shot ``cape:`` envelope (byte-compatible with Cape).
- :mod:`cape.crypto.stream` — the chunked ``cape-stream-v1:`` envelope for large inputs, and
  :func:`~cape.crypto.stream.decrypt_any` for either form.
- :mod:`cape.crypto.hpke` — per-session HPKE (RFC 9180), Cape's suite and an opt-in PQ hybrid.

Import the submodules directly; this package re-exports nothing.
"""

from __future__ import annotations

__all__: list[str] = []
