"""Per-session HPKE (RFC 9180), single-shot, built on ``cryptography.hazmat.primitives.hpke``.

Suites (both: base mode, empty info, empty aad, wire form ``enc ‖ ciphertext``):

- :attr:`Suite.X25519_CHACHA20` (default, Cape/pycape wire compatible): DHKEM(X25519,
  HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305. Public keys are raw X25519 (32 bytes); ``enc`` is
  32 bytes.
- :attr:`Suite.MLKEM768_X25519` (opt-in post-quantum hybrid): ``cryptography``'s
  ``KEM.MLKEM768_X25519`` (ML-KEM-768 + X25519; MLKEM768-X25519 of draft-ietf-hpke-pq, also
  called X-Wing; not checked against external vectors here), HKDF-SHA256, ChaCha20-Poly1305.
  ``cryptography`` 50 accepts every KDF/AEAD with this KEM; this pairing keeps the classic suite's
  KDF and AEAD. ``cryptography`` exposes no bytes for the hybrid public key, so cape defines them
  from the parts: ML-KEM-768 encapsulation key (1184 bytes) ‖ X25519 public key (32 bytes), the
  X-Wing order. ``enc`` is 1120 bytes. Cape's own clients do not speak this suite.

The opening verb is :func:`open`, as in the spec; it shadows the builtin inside this module only,
so import the module (``from cape.crypto import hpke; hpke.open(...)``), not the name.

Errors: a ciphertext shorter than ``enc_length + 16`` raises
:class:`~cape.errors.MalformedEnvelopeError`; every other failure to open raises
:class:`~cape.errors.DecryptionError` with the single message
:data:`~cape.crypto.envelope.DECRYPTION_FAILED`. Bad public keys raise
:class:`~cape.errors.KeyFormatError`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke as _hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from cape.crypto.envelope import DECRYPTION_FAILED
from cape.errors import DecryptionError, KeyFormatError, MalformedEnvelopeError

__all__ = [
    "DEFAULT_SUITE",
    "TAG_SIZE",
    "KeyPair",
    "PrivateKey",
    "PublicKey",
    "Suite",
    "generate_keypair",
    "load_public_key",
    "open",
    "seal",
]

TAG_SIZE = 16
"""Bytes of AEAD tag in every ciphertext (both suites use a 16-byte tag)."""

_MLKEM768_PUBLIC_LEN = 1184
_X25519_PUBLIC_LEN = 32

PrivateKey = x25519.X25519PrivateKey | _hpke.MLKEM768X25519PrivateKey
"""A recipient private key of either suite."""

PublicKey = x25519.X25519PublicKey | _hpke.MLKEM768X25519PublicKey
"""A recipient public key of either suite."""


class Suite(enum.Enum):
    """The HPKE suites cape speaks."""

    X25519_CHACHA20 = "x25519-hkdf-sha256-chacha20poly1305"
    MLKEM768_X25519 = "mlkem768x25519-hkdf-sha256-chacha20poly1305"

    @property
    def kem(self) -> _hpke.KEM:
        """The ``cryptography`` KEM of this suite."""
        if self is Suite.MLKEM768_X25519:
            return _hpke.KEM.MLKEM768_X25519
        return _hpke.KEM.X25519

    @property
    def enc_length(self) -> int:
        """Bytes of encapsulated key at the front of every ciphertext (32 or 1120)."""
        return self.kem.enc_length()

    @property
    def public_key_length(self) -> int:
        """Bytes of a serialized public key (32 or 1216)."""
        if self is Suite.MLKEM768_X25519:
            return _MLKEM768_PUBLIC_LEN + _X25519_PUBLIC_LEN
        return _X25519_PUBLIC_LEN

    @property
    def overhead(self) -> int:
        """Bytes a ciphertext adds to its plaintext (``enc_length + 16``)."""
        return self.enc_length + TAG_SIZE

    def cipher_suite(self) -> _hpke.Suite:
        """The ``cryptography`` HPKE suite object."""
        return _hpke.Suite(self.kem, _hpke.KDF.HKDF_SHA256, _hpke.AEAD.CHACHA20_POLY1305)


DEFAULT_SUITE = Suite.X25519_CHACHA20


@dataclass(frozen=True)
class KeyPair:
    """A recipient key pair and its wire-form public key."""

    suite: Suite
    private_key: PrivateKey
    public_bytes: bytes


def generate_keypair(suite: Suite = DEFAULT_SUITE) -> KeyPair:
    """Generate a fresh recipient key pair for ``suite``."""
    x_key = x25519.X25519PrivateKey.generate()
    x_public = x_key.public_key().public_bytes_raw()
    if suite is Suite.MLKEM768_X25519:
        m_key = mlkem.MLKEM768PrivateKey.generate()
        m_public = m_key.public_key().public_bytes_raw()
        hybrid = _hpke.MLKEM768X25519PrivateKey(m_key, x_key)
        return KeyPair(suite=suite, private_key=hybrid, public_bytes=m_public + x_public)
    return KeyPair(suite=suite, private_key=x_key, public_bytes=x_public)


def load_public_key(data: bytes, suite: Suite = DEFAULT_SUITE) -> PublicKey:
    """Load a wire-form public key of ``suite``.

    Raises:
        KeyFormatError: wrong length (X25519 keys are exactly 32 bytes, hybrid keys 1216) or an
            invalid ML-KEM key.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"a public key must be bytes, not {type(data).__name__}")
    raw = bytes(data)
    if len(raw) != suite.public_key_length:
        raise KeyFormatError(
            f"an HPKE {suite.value} public key is {suite.public_key_length} bytes, not {len(raw)}"
        )
    try:
        x_public = x25519.X25519PublicKey.from_public_bytes(raw[-_X25519_PUBLIC_LEN:])
        if suite is Suite.MLKEM768_X25519:
            m_public = mlkem.MLKEM768PublicKey.from_public_bytes(raw[:_MLKEM768_PUBLIC_LEN])
            return _hpke.MLKEM768X25519PublicKey(m_public, x_public)
    except ValueError:
        raise KeyFormatError(f"not a valid HPKE {suite.value} public key") from None
    return x_public


def seal(public_key_bytes: bytes, plaintext: bytes, *, suite: Suite = DEFAULT_SUITE) -> bytes:
    """Encrypt ``plaintext`` to a recipient's wire-form public key; return ``enc ‖ ciphertext``.

    Raises:
        KeyFormatError: the public key is malformed or unusable (e.g. a low-order X25519 point).
    """
    if not isinstance(plaintext, bytes | bytearray | memoryview):
        raise TypeError(f"plaintext must be bytes, not {type(plaintext).__name__}")
    public_key = load_public_key(public_key_bytes, suite)
    try:
        # info and aad stay empty (info=None, no aad), as pycape sends them (protocol.md step 3).
        return suite.cipher_suite().encrypt(plaintext, public_key)
    except ValueError:
        raise KeyFormatError(f"unusable HPKE {suite.value} public key") from None


def _suite_of(key: PrivateKey) -> Suite:
    if isinstance(key, _hpke.MLKEM768X25519PrivateKey):
        return Suite.MLKEM768_X25519
    if isinstance(key, x25519.X25519PrivateKey):
        return Suite.X25519_CHACHA20
    raise TypeError(f"expected an HPKE private key or KeyPair, not {type(key).__name__}")


def open(  # the spec's verb; shadows the builtin in this module only
    key: KeyPair | PrivateKey, ciphertext: bytes, *, suite: Suite | None = None
) -> bytes:
    """Decrypt ``enc ‖ ciphertext`` with a key pair or private key.

    ``suite`` defaults to the key's own suite (a KeyPair's ``suite``, or the one its private key
    type belongs to); passing a different one is a programming error (``ValueError``).

    Raises:
        MalformedEnvelopeError: shorter than ``suite.enc_length + 16`` bytes.
        DecryptionError: wrong key, wrong suite or tampered bytes (one generic message).
    """
    private_key = key.private_key if isinstance(key, KeyPair) else key
    key_suite = _suite_of(private_key)
    if suite is None:
        suite = key.suite if isinstance(key, KeyPair) else key_suite
    if suite is not key_suite:
        raise ValueError(f"suite {suite.value} does not match a {key_suite.value} key")
    if not isinstance(ciphertext, bytes | bytearray | memoryview):
        raise TypeError(f"a ciphertext must be bytes, not {type(ciphertext).__name__}")
    if len(ciphertext) < suite.overhead:
        raise MalformedEnvelopeError(
            f"HPKE ciphertext too short: {len(ciphertext)} bytes, need at least {suite.overhead}"
        )
    try:
        return suite.cipher_suite().decrypt(ciphertext, private_key)
    except (InvalidTag, ValueError):
        raise DecryptionError(DECRYPTION_FAILED) from None
