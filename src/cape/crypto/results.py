"""The sealed-results channel (protocol.md, "Our extension: results sealed to the client").

Sealing results with HPKE base mode to the client's response key hides them from the host
but proves nothing about their origin: the response key travels in the clear, so the host
could seal a forged result to it. Results are therefore sealed under a key only the client and
the attested enclave can derive:

    shared = X25519(enclave session key, client response key)        (either side's private half)
    key    = HKDF-SHA256(shared, salt = none,
                         info = "cape-results-v1" ‖ session public key ‖ response public key)
    reply n (0, 1, 2, … in the session) = ChaCha20-Poly1305(key, nonce = n as 12 bytes big-endian,
                                                              aad = "result" or "error")

The session key is the one in the attestation document, so a result that opens came from
the enclave that document describes; the counter makes dropped, replayed or reordered replies
fail to open. Every reply to an input (result or function error) takes the next number. All
primitives come from ``cryptography``.

A client that asks for it gets the same channel under AES-256-GCM instead, with its own HKDF
label (``cape-results-v2``; :class:`cape.crypto.session_keys.Sealing`).
"""

from __future__ import annotations

from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cape.crypto.envelope import DECRYPTION_FAILED
from cape.errors import DecryptionError, KeyFormatError, MalformedEnvelopeError

__all__ = [
    "AEAD",
    "ERROR",
    "INFO",
    "RESULT",
    "SEALED_ERROR_TEXT",
    "ResultChannel",
    "channel_key",
    "sequence_nonce",
    "x25519_shared",
]

INFO: Final = b"cape-results-v1"
AEAD = type[ChaCha20Poly1305] | type[AESGCM]
"""A channel's cipher: ChaCha20-Poly1305 (v1, the default) or AES-256-GCM (v2)."""
_TAG = 16
_MAX_SEQUENCE = (1 << 96) - 1
RESULT: Final = b"result"
ERROR: Final = b"error"
#: What the host sees (and relays as ``{"error"}``) when a call fails in a sealed session; the
#: real message travels sealed beside it.
SEALED_ERROR_TEXT: Final = "the function call failed (the details are sealed to the client)"


def _public(data: bytes, what: str) -> x25519.X25519PublicKey:
    try:
        return x25519.X25519PublicKey.from_public_bytes(bytes(data))
    except ValueError:
        raise KeyFormatError(f"the {what} is not an X25519 public key") from None


def x25519_shared(private_key: x25519.X25519PrivateKey, peer_public: bytes) -> bytes:
    """The session's one X25519 agreement (the enclave's session key with the client's response
    key), from either side; sealed results and inputs (``session_keys``) derive their keys
    from it."""
    if not isinstance(private_key, x25519.X25519PrivateKey):
        raise KeyFormatError("sealed results need an X25519 session key")
    try:
        return private_key.exchange(_public(peer_public, "session or response key"))
    except ValueError:  # a low-order point gives the all-zero secret
        raise KeyFormatError("unusable X25519 key for sealed results") from None


def channel_key(shared: bytes, info: bytes, session_public: bytes, response_public: bytes) -> bytes:
    """HKDF-SHA256(shared, salt = none, info = info ‖ session public key ‖ response public key)."""
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=info + bytes(session_public) + bytes(response_public),
    ).derive(shared)


def sequence_nonce(sequence: int) -> bytes:
    """Message ``sequence`` (0, 1, 2, …) of a session's channel as a 12-byte big-endian nonce."""
    if not 0 <= sequence <= _MAX_SEQUENCE:
        raise ValueError("sequence number out of range")
    return sequence.to_bytes(12, "big")


class ResultChannel:
    """One session's result key; ``seal``/``open`` take the reply's sequence number. Derived
    with the session's input key by :class:`cape.crypto.session_keys.SessionKeys`."""

    def __init__(self, key: bytes, cipher: AEAD = ChaCha20Poly1305) -> None:
        self._aead = cipher(key)

    def seal(
        self, sequence: int, data: bytes | bytearray | memoryview, *, kind: bytes = RESULT
    ) -> bytes:
        """Seal reply ``sequence``; ``data`` is read in place (a view or buffer is not copied)."""
        return self._aead.encrypt(sequence_nonce(sequence), data, kind)

    def open(self, sequence: int, data: bytes | memoryview, *, kind: bytes = RESULT) -> bytes:
        """Open reply ``sequence``; ``data`` may be a view (of a binary result frame): it is
        not copied."""
        if len(data) < _TAG:
            raise MalformedEnvelopeError("a sealed reply is shorter than its tag")
        try:
            return self._aead.decrypt(sequence_nonce(sequence), data, kind)
        except InvalidTag:
            raise DecryptionError(DECRYPTION_FAILED) from None
