"""RSA Cape keys: load, check, generate and serialize.

A Cape key is an RSA-4096 key (e = 65537) whose public half clients use to wrap envelope keys.
Loaders accept keys of at least :data:`MIN_RSA_BITS` bits and turn every parse problem into a
:class:`~cape.errors.KeyFormatError` with a one-line message; they never let a library exception
escape.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from cape.errors import KeyFormatError

__all__ = [
    "CAPE_KEY_BITS",
    "CAPE_KEY_EXPONENT",
    "MIN_RSA_BITS",
    "check_rsa_public_key",
    "generate_cape_key",
    "load_rsa_private_key",
    "load_rsa_public_key",
    "load_rsa_public_key_file",
    "public_key_der",
    "public_key_pem",
]

CAPE_KEY_BITS = 4096
"""Modulus size of a Cape key."""

CAPE_KEY_EXPONENT = 65537
"""Public exponent of a Cape key."""

MIN_RSA_BITS = 2048
"""Smallest RSA modulus the loaders and the encrypting side accept."""

_PEM_MARKER = b"-----BEGIN"


def _kind(key: object) -> str:
    """A short, secret-free name for a key's type, for error messages."""
    return type(key).__name__.lstrip("_")


def check_rsa_public_key(key: object) -> RSAPublicKey:
    """Return ``key`` if it is an RSA public key of at least MIN_RSA_BITS bits.

    Raises:
        KeyFormatError: ``key`` is not an RSA public key, or is too small.
    """
    if not isinstance(key, RSAPublicKey):
        raise KeyFormatError(f"expected an RSA public key, got {_kind(key)}")
    if key.key_size < MIN_RSA_BITS:
        raise KeyFormatError(
            f"RSA key is {key.key_size} bits; at least {MIN_RSA_BITS} bits are required"
        )
    return key


def _check_rsa_private_key(key: object) -> RSAPrivateKey:
    if not isinstance(key, RSAPrivateKey):
        raise KeyFormatError(f"expected an RSA private key, got {_kind(key)}")
    if key.key_size < MIN_RSA_BITS:
        raise KeyFormatError(
            f"RSA key is {key.key_size} bits; at least {MIN_RSA_BITS} bits are required"
        )
    return key


def _require_bytes(data: object) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"key data must be bytes, not {type(data).__name__}")
    return bytes(data)


def load_rsa_public_key(data: bytes) -> RSAPublicKey:
    """Load an RSA public key from DER or PEM.

    Accepts DER SubjectPublicKeyInfo, PEM ``PUBLIC KEY`` and PEM/DER PKCS#1 ``RSA PUBLIC KEY``.

    Raises:
        KeyFormatError: the data is not a public key, not RSA, or smaller than MIN_RSA_BITS.
    """
    raw = _require_bytes(data)
    is_pem = raw.lstrip().startswith(_PEM_MARKER)
    try:
        if is_pem:
            key: object = serialization.load_pem_public_key(raw)
        else:
            key = serialization.load_der_public_key(raw)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        form = "PEM" if is_pem else "DER"
        raise KeyFormatError(
            f"not a valid {form} public key (expected SubjectPublicKeyInfo or PKCS#1 RSA)"
        ) from None
    return check_rsa_public_key(key)


def load_rsa_public_key_file(path: Path) -> RSAPublicKey:
    """Load an RSA public key from a DER or PEM file.

    Raises:
        KeyFormatError: the file cannot be read or does not hold a usable RSA public key.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise KeyFormatError(f"cannot read key file {path}: {reason}") from None
    try:
        return load_rsa_public_key(data)
    except KeyFormatError as exc:
        raise KeyFormatError(f"{path}: {exc}") from None


def load_rsa_private_key(data: bytes) -> RSAPrivateKey:
    """Load an unencrypted RSA private key from PEM (PKCS#8 or PKCS#1) or DER PKCS#8.

    Raises:
        KeyFormatError: the data is not an unencrypted private key, not RSA, or too small.
    """
    raw = _require_bytes(data)
    is_pem = raw.lstrip().startswith(_PEM_MARKER)
    try:
        if is_pem:
            key: object = serialization.load_pem_private_key(raw, password=None)
        else:
            key = serialization.load_der_private_key(raw, password=None)
    except TypeError:
        raise KeyFormatError("private key is encrypted; an unencrypted key is required") from None
    except (ValueError, UnsupportedAlgorithm):
        form = "PEM" if is_pem else "DER"
        raise KeyFormatError(f"not a valid {form} private key (expected PKCS#8)") from None
    return _check_rsa_private_key(key)


def generate_cape_key() -> RSAPrivateKey:
    """Generate a fresh Cape key: RSA-4096 with e = 65537 (takes about a second)."""
    return rsa.generate_private_key(public_exponent=CAPE_KEY_EXPONENT, key_size=CAPE_KEY_BITS)


def _public(key: RSAPrivateKey | RSAPublicKey) -> RSAPublicKey:
    if isinstance(key, RSAPrivateKey):
        return key.public_key()
    if isinstance(key, RSAPublicKey):
        return key
    raise TypeError(f"expected an RSA key, not {type(key).__name__}")


def public_key_der(key: RSAPrivateKey | RSAPublicKey) -> bytes:
    """The DER SubjectPublicKeyInfo of ``key`` (or of its public half)."""
    return _public(key).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_key_pem(key: RSAPrivateKey | RSAPublicKey) -> bytes:
    """The PEM (``BEGIN PUBLIC KEY``) SubjectPublicKeyInfo of ``key`` (or of its public half)."""
    return _public(key).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
