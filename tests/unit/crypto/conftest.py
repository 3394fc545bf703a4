"""Session-wide RSA-4096 Cape keys (key generation is slow: exactly two per session)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from cape.crypto.keys import generate_cape_key


@pytest.fixture(scope="session")
def cape_key() -> RSAPrivateKey:
    """The Cape key most tests encrypt to."""
    return generate_cape_key()


@pytest.fixture(scope="session")
def other_cape_key() -> RSAPrivateKey:
    """A second, unrelated Cape key, for wrong-key tests."""
    return generate_cape_key()
