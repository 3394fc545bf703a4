"""Random identifiers for functions, tokens and blobs (protocol.md "Identifiers").

An id is 22 characters from ``[A-Za-z0-9]``, drawn uniformly with :mod:`secrets`: 62**22 is
about 2**131, so ids are unguessable and never collide in practice. pycape treats any
22-character string as an id, so every id we hand out has exactly this shape.
"""

from __future__ import annotations

import secrets
import string

from cape.formats.names import ID_LENGTH, ID_PATTERN, is_id

__all__ = ["ID_ALPHABET", "ID_LENGTH", "ID_PATTERN", "is_id", "new_id"]

ID_ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
"""The 62 characters an id is made of (shortuuid's alphabet plus the look-alikes)."""


def new_id() -> str:
    """A fresh id: 22 characters, each drawn uniformly from :data:`ID_ALPHABET`."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))
