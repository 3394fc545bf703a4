"""Cape's single-shot ``cape:`` envelope, byte-compatible with Cape's Go CLI, pycape and cape-js.

Raw envelope::

    RSA-OAEP(SHA-256, MGF1-SHA-256, empty label) of a fresh 32-byte DEK   (modulus bytes; 512)
    ‖ nonce                                                               (12 random bytes)
    ‖ AES-256-GCM(DEK, nonce, plaintext, no AAD)                          (len(plaintext) + 16)

A 5-byte plaintext under an RSA-4096 key gives 512 + 12 + 5 + 16 = 545 bytes.

- Text form: ASCII ``cape:`` + standard base64 (with padding) of the raw envelope.
- Binary form: ASCII ``cape:`` + the raw envelope.

:func:`parse` tells the forms apart: a ``str`` is always the text form; for ``bytes``, the part
after the prefix is the text form when its first 64 bytes (or all of it, if shorter) are
base64-alphabet characters (``A-Z a-z 0-9 + / =``), otherwise the binary form. A binary envelope
starts with RSA-OAEP output, which is uniformly random, so 64 alphabet bytes in a row happen with
probability below 2^-120. Text is decoded with ``base64.b64decode(validate=True)`` after trailing
ASCII whitespace (such as a final newline) is removed.

Decryption never needs the RSA private key itself: it takes an RSA private key or a
:data:`KeyUnwrapper` (for example a key service that performs the OAEP decryption). Every bad
ciphertext raises :class:`~cape.errors.DecryptionError`: structural problems as
:class:`~cape.errors.MalformedEnvelopeError` with a specific message, every cryptographic failure
with the single message :data:`DECRYPTION_FAILED`.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cape.crypto.keys import check_rsa_public_key
from cape.errors import CapeError, DecryptionError, MalformedEnvelopeError

__all__ = [
    "DECRYPTION_FAILED",
    "DEFAULT_WRAPPED_KEY_LEN",
    "DEK_SIZE",
    "NONCE_SIZE",
    "PREFIX",
    "TAG_SIZE",
    "Envelope",
    "KeyUnwrapper",
    "decrypt",
    "decrypt_in_place",
    "encrypt",
    "encrypt_into",
    "encrypt_text",
    "encrypt_text_bytes",
    "encrypt_text_into",
    "encrypted_size",
    "key_unwrapper",
    "open_envelope",
    "parse",
    "seal",
    "unwrap_key",
    "wrap_key",
]

PREFIX = b"cape:"
"""ASCII prefix of both envelope forms."""

DEK_SIZE = 32
"""Bytes in a data-encryption key (AES-256)."""

NONCE_SIZE = 12
"""Bytes in the AES-GCM nonce."""

TAG_SIZE = 16
"""Bytes in the AES-GCM tag."""

DEFAULT_WRAPPED_KEY_LEN = 512
"""Bytes in a wrapped DEK under an RSA-4096 Cape key."""

DECRYPTION_FAILED = "decryption failed: wrong key or corrupted ciphertext"
"""The one message of every cryptographic failure (so errors are not an oracle)."""

Plaintext = bytes | bytearray | memoryview
"""What the encrypting functions take: any bytes-like object (views are measured in bytes)."""

KeyUnwrapper = Callable[[bytes], bytes]
"""Takes a wrapped DEK (the RSA-OAEP ciphertext) and returns the 32-byte DEK.

An unwrapper signals a bad wrapped key by raising :class:`~cape.errors.DecryptionError`,
``ValueError`` or ``InvalidTag`` (all reported as :data:`DECRYPTION_FAILED`). Any other
exception (another CapeError, an I/O error, a key service that is down) propagates unchanged.
"""

_OAEP = padding.OAEP(
    mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
)
_TEXT_PROBE = 64
_B64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
_WHITESPACE = b" \t\r\n"
_AES_BLOCK = 16


@dataclass(frozen=True)
class Envelope:
    """The three parts of a raw envelope."""

    wrapped_key: bytes
    nonce: bytes
    ciphertext: bytes
    """AES-GCM ciphertext followed by the 16-byte tag."""


# -- key wrapping -------------------------------------------------------------------------------


def wrap_key(dek: bytes, public_key: RSAPublicKey) -> bytes:
    """RSA-OAEP(SHA-256, MGF1-SHA-256, empty label) encryption of a 32-byte DEK.

    Raises:
        KeyFormatError: ``public_key`` is not an RSA public key of at least 2048 bits.
    """
    if len(dek) != DEK_SIZE:
        raise ValueError(f"a DEK is {DEK_SIZE} bytes, not {len(dek)}")
    return check_rsa_public_key(public_key).encrypt(bytes(dek), _OAEP)


def key_unwrapper(private_key: RSAPrivateKey) -> KeyUnwrapper:
    """A :data:`KeyUnwrapper` that performs the OAEP decryption with ``private_key``."""
    if not isinstance(private_key, RSAPrivateKey):
        raise TypeError(f"expected an RSA private key, not {type(private_key).__name__}")

    def unwrap(wrapped: bytes) -> bytes:
        return private_key.decrypt(wrapped, _OAEP)

    return unwrap


def unwrap_key(wrapped: bytes, key: RSAPrivateKey | KeyUnwrapper) -> bytes:
    """Recover the 32-byte DEK from a wrapped key, with an RSA private key or an unwrapper.

    Raises:
        DecryptionError: the key does not unwrap (wrong key, corrupted bytes, a DEK that is not
            32 bytes), always with the message :data:`DECRYPTION_FAILED`.
    """
    unwrap = _as_unwrapper(key)
    try:
        dek = unwrap(bytes(wrapped))
    except DecryptionError:
        raise DecryptionError(DECRYPTION_FAILED) from None
    except CapeError:
        raise
    except (ValueError, InvalidTag):
        raise DecryptionError(DECRYPTION_FAILED) from None
    if not isinstance(dek, bytes | bytearray | memoryview):
        raise TypeError(f"a key unwrapper must return bytes, not {type(dek).__name__}")
    if len(dek) != DEK_SIZE:
        raise DecryptionError(DECRYPTION_FAILED)
    return bytes(dek)


def _as_unwrapper(key: RSAPrivateKey | KeyUnwrapper) -> KeyUnwrapper:
    if isinstance(key, RSAPrivateKey):
        return key_unwrapper(key)
    if callable(key):
        return key
    raise TypeError(f"expected an RSA private key or a key unwrapper, not {type(key).__name__}")


def _wrapped_key_len(key: RSAPrivateKey | KeyUnwrapper) -> int:
    if isinstance(key, RSAPrivateKey):
        return (key.key_size + 7) // 8
    return DEFAULT_WRAPPED_KEY_LEN


# -- encryption ---------------------------------------------------------------------------------


def _require_plaintext(plaintext: object) -> None:
    if not isinstance(plaintext, bytes | bytearray | memoryview):
        raise TypeError(f"plaintext must be bytes, not {type(plaintext).__name__}")


_TEXT_BLOCK = 3 << 15
"""Raw bytes base64-encoded per step of the text form (96 KiB → 128 KiB of text): a multiple of
3, so the pieces join into one base64 string, and small enough to stay in the CPU cache."""


def encrypted_size(
    plaintext_len: int, *, text: bool = False, wrapped_key_len: int = DEFAULT_WRAPPED_KEY_LEN
) -> int:
    """Exact bytes of the binary (or, with ``text``, the text) form of a ``plaintext_len``-byte
    input; ``wrapped_key_len`` is the Cape key's modulus in bytes (512 for RSA-4096)."""
    if plaintext_len < 0:
        raise ValueError("plaintext_len must not be negative")
    raw = wrapped_key_len + NONCE_SIZE + plaintext_len + TAG_SIZE
    return len(PREFIX) + (4 * -(-raw // 3) if text else raw)


def _writable(out: object, need: int) -> memoryview:
    """A flat byte view of ``out``, checked to be writable and at least ``need`` bytes."""
    try:
        view = memoryview(out)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"out must be a writable buffer, not {type(out).__name__}") from None
    if view.readonly:
        raise TypeError("out must be a writable buffer, not a read-only one")
    view = view.cast("B")
    if len(view) < need:
        raise ValueError(f"out holds {len(view)} bytes; this envelope needs {need}")
    return view


def _fresh(total: int, fill: Callable[[memoryview], int]) -> bytes:
    """A new ``total``-byte ``bytes`` written by ``fill`` (given a view of its buffer).

    ``BytesIO.getvalue()`` hands over its buffer without a copy when nothing else holds it, so
    this costs one allocation and no copy (about half the time of building with ``+``).
    """
    buf = io.BytesIO()
    buf.seek(total - 1)
    buf.write(b"\0")
    with buf.getbuffer() as view:
        fill(view)
    return buf.getvalue()


def _check_nonce(nonce: bytes) -> None:
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"a nonce is {NONCE_SIZE} bytes, not {len(nonce)}")


def _binary_into(
    out: memoryview, plaintext: Plaintext, wrapped: bytes, dek: bytes, nonce: bytes, prefix: bytes
) -> int:
    """Write ``prefix`` ‖ wrapped ‖ nonce ‖ AES-GCM(dek, nonce, plaintext) into ``out``."""
    head = len(prefix) + len(wrapped) + NONCE_SIZE
    out[: len(prefix)] = prefix
    out[len(prefix) : head - NONCE_SIZE] = wrapped
    out[head - NONCE_SIZE : head] = nonce
    end = head + len(plaintext) + TAG_SIZE
    AESGCM(dek).encrypt_into(nonce, plaintext, None, out[head:end])
    return end


def _text_into(
    out: memoryview, plaintext: Plaintext, wrapped: bytes, dek: bytes, nonce: bytes
) -> int:
    """Write ``cape:`` ‖ base64(wrapped ‖ nonce ‖ AES-GCM(…)) into ``out``, a block at a time.

    The raw envelope never exists in full: each step encrypts the next plaintext block into a
    small staging buffer (GCM streams, so its output equals the one-shot encryption), and
    base64-encodes a multiple of 3 bytes of it straight to its place in ``out``. An envelope
    that fits in one block is encoded in one step.
    """
    head = wrapped + nonce
    pos = len(PREFIX)
    out[:pos] = PREFIX
    if len(head) + len(plaintext) + TAG_SIZE <= _TEXT_BLOCK:  # small: one step, no stage
        raw = head + AESGCM(dek).encrypt(nonce, plaintext, None)
        encoded = binascii.b2a_base64(raw, newline=False)
        out[pos : pos + len(encoded)] = encoded
        return pos + len(encoded)
    encryptor = Cipher(algorithms.AES256(dek), modes.GCM(nonce)).encryptor()
    source = memoryview(plaintext).cast("B")
    stage = bytearray(_TEXT_BLOCK + _AES_BLOCK + 2)
    view = memoryview(stage)
    view[: len(head)] = head
    held = len(head)  # raw bytes in ``stage`` not yet encoded
    offset = 0
    while True:
        # ``held`` < _TEXT_BLOCK here: fill the stage up to one block with ciphertext.
        take = min(_TEXT_BLOCK - held, len(source) - offset)
        if take:
            held += encryptor.update_into(
                source[offset : offset + take], view[held : held + take + _AES_BLOCK - 1]
            )
            offset += take
        last = offset == len(source)
        if last:
            encryptor.finalize()
            view[held : held + TAG_SIZE] = encryptor.tag
            held += TAG_SIZE
        ready = held if last else held - held % 3
        encoded = binascii.b2a_base64(view[:ready], newline=False)
        out[pos : pos + len(encoded)] = encoded
        pos += len(encoded)
        if last:
            return pos
        view[: held - ready] = view[ready:held]
        held -= ready


def _sealer(
    plaintext: Plaintext,
    public_key: RSAPublicKey,
    *,
    dek: bytes,
    nonce: bytes,
    prefix: bytes = PREFIX,
    text: bool = False,
) -> tuple[int, Callable[[memoryview], int]]:
    """The envelope's size and the function that writes it into a view (wrapping the DEK now)."""
    _require_plaintext(plaintext)
    if isinstance(plaintext, memoryview):
        plaintext = plaintext.cast("B")  # lengths in bytes
    _check_nonce(nonce)
    wrapped = wrap_key(dek, public_key)
    size = encrypted_size(len(plaintext), text=text, wrapped_key_len=len(wrapped))
    if not text:
        size += len(prefix) - len(PREFIX)

    def fill(view: memoryview) -> int:
        if text:
            return _text_into(view, plaintext, wrapped, dek, nonce)
        return _binary_into(view, plaintext, wrapped, dek, nonce, prefix)

    return size, fill


def _seal_with(
    plaintext: Plaintext,
    public_key: RSAPublicKey,
    *,
    dek: bytes,
    nonce: bytes,
    prefix: bytes = b"",
    text: bool = False,
) -> bytes:
    """Seal with a caller-chosen DEK and nonce. For test vectors only: never reuse a DEK/nonce.

    Binary: ``prefix`` ‖ raw envelope; ``text``: ``cape:`` ‖ base64(raw envelope). RSA-OAEP is
    randomized, so only the part after the wrapped key is deterministic.
    """
    size, fill = _sealer(plaintext, public_key, dek=dek, nonce=nonce, prefix=prefix, text=text)
    return _fresh(size, fill)


def _seal_into(
    out: object,
    plaintext: Plaintext,
    public_key: RSAPublicKey,
    *,
    dek: bytes,
    nonce: bytes,
    text: bool = False,
) -> int:
    """Like :func:`_seal_with` (with the ``cape:`` prefix), written into ``out``; its length."""
    size, fill = _sealer(plaintext, public_key, dek=dek, nonce=nonce, text=text)
    with _writable(out, size) as view:
        return fill(view)


def _fresh_key() -> tuple[bytes, bytes]:
    return AESGCM.generate_key(256), os.urandom(NONCE_SIZE)


def seal(plaintext: Plaintext, public_key: RSAPublicKey) -> bytes:
    """Encrypt ``plaintext`` to a raw envelope (no prefix) under a fresh DEK and nonce.

    Raises:
        KeyFormatError: ``public_key`` is not an RSA public key of at least 2048 bits.
    """
    dek, nonce = _fresh_key()
    return _seal_with(plaintext, public_key, dek=dek, nonce=nonce)


def encrypt(plaintext: Plaintext, public_key: RSAPublicKey) -> bytes:
    """Encrypt ``plaintext`` to the binary form: ``cape:`` ‖ raw envelope."""
    dek, nonce = _fresh_key()
    return _seal_with(plaintext, public_key, dek=dek, nonce=nonce, prefix=PREFIX)


def encrypt_into(plaintext: Plaintext, public_key: RSAPublicKey, out: object) -> int:
    """Encrypt ``plaintext`` to the binary form, written at the start of ``out``; its length.

    ``out`` is any writable buffer (a ``bytearray``, a ``memoryview``, an ``mmap``) of at least
    :func:`encrypted_size` bytes; reusing one for many messages avoids allocating (and
    page-faulting) a fresh output per message, which costs more than the cipher for large ones.
    ``out`` must not overlap ``plaintext``.

    Raises:
        KeyFormatError: ``public_key`` is not an RSA public key of at least 2048 bits.
        TypeError: ``out`` is not a writable buffer.
        ValueError: ``out`` is too small.
    """
    dek, nonce = _fresh_key()
    return _seal_into(out, plaintext, public_key, dek=dek, nonce=nonce)


def encrypt_text(plaintext: Plaintext, public_key: RSAPublicKey) -> str:
    """Encrypt ``plaintext`` to the text form: ``cape:`` ‖ base64(raw envelope)."""
    return encrypt_text_bytes(plaintext, public_key).decode("ascii")


def encrypt_text_bytes(plaintext: Plaintext, public_key: RSAPublicKey) -> bytes:
    """The text form as ASCII ``bytes`` (what goes on the wire; one copy fewer than ``str``)."""
    dek, nonce = _fresh_key()
    return _seal_with(plaintext, public_key, dek=dek, nonce=nonce, text=True)


def encrypt_text_into(plaintext: Plaintext, public_key: RSAPublicKey, out: object) -> int:
    """The text form as ASCII, written at the start of ``out`` (as :func:`encrypt_into`)."""
    dek, nonce = _fresh_key()
    return _seal_into(out, plaintext, public_key, dek=dek, nonce=nonce, text=True)


# -- decryption ---------------------------------------------------------------------------------


def _looks_like_text(body: bytes | memoryview) -> bool:
    return all(b in _B64_ALPHABET for b in body[:_TEXT_PROBE])


def _check_length(length: int, wrapped_key_len: int) -> None:
    minimum = wrapped_key_len + NONCE_SIZE + TAG_SIZE
    if length < minimum:
        raise MalformedEnvelopeError(f"envelope too short: {length} bytes, need at least {minimum}")


def _split_raw(raw: bytes | memoryview, wrapped_key_len: int) -> tuple[bytes, bytes, memoryview]:
    """Split a raw envelope into wrapped key, nonce and a zero-copy view of the ciphertext."""
    _check_length(len(raw), wrapped_key_len)
    view = memoryview(raw)
    nonce_end = wrapped_key_len + NONCE_SIZE
    return bytes(view[:wrapped_key_len]), bytes(view[wrapped_key_len:nonce_end]), view[nonce_end:]


def _raw_from(data: bytes | str) -> bytes | memoryview:
    """Strip the prefix and undo base64 if needed; returns the raw envelope."""
    if isinstance(data, str):
        if not data.startswith("cape:"):
            raise MalformedEnvelopeError("not a cape envelope: missing 'cape:' prefix")
        try:
            ascii_data = data.encode("ascii")
        except UnicodeEncodeError:
            raise MalformedEnvelopeError(
                "invalid cape envelope: the text form must be ASCII base64"
            ) from None
        return _b64decode(ascii_data[len(PREFIX) :])
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"a ciphertext must be bytes or str, not {type(data).__name__}")
    view = memoryview(data)
    if view[: len(PREFIX)] != PREFIX:
        raise MalformedEnvelopeError("not a cape envelope: missing 'cape:' prefix")
    body = view[len(PREFIX) :]
    if _looks_like_text(body):
        return _b64decode(bytes(body))
    return body


def _b64decode(text: bytes | bytearray) -> bytes:
    try:
        return base64.b64decode(text.rstrip(_WHITESPACE), validate=True)
    except (binascii.Error, ValueError):
        raise MalformedEnvelopeError("invalid cape envelope: bad base64 in the text form") from None


def parse(data: bytes | str, *, wrapped_key_len: int = DEFAULT_WRAPPED_KEY_LEN) -> Envelope:
    """Parse the text or binary form (see the module docstring for how they are told apart).

    Raises:
        MalformedEnvelopeError: missing prefix, bad base64, or shorter than
            ``wrapped_key_len + 12 + 16`` bytes.
    """
    wrapped, nonce, ciphertext = _split_raw(_raw_from(data), wrapped_key_len)
    return Envelope(wrapped_key=wrapped, nonce=nonce, ciphertext=bytes(ciphertext))


def _open(nonce: bytes, ciphertext: bytes | memoryview, dek: bytes) -> bytes:
    if len(dek) != DEK_SIZE:
        raise DecryptionError(DECRYPTION_FAILED)
    try:
        return AESGCM(dek).decrypt(nonce, ciphertext, None)
    except (InvalidTag, ValueError):
        raise DecryptionError(DECRYPTION_FAILED) from None


def open_envelope(env: Envelope, dek: bytes) -> bytes:
    """AES-256-GCM-open a parsed envelope with its (already unwrapped) DEK.

    Raises:
        DecryptionError: wrong DEK or tampered ciphertext (message :data:`DECRYPTION_FAILED`).
    """
    return _open(env.nonce, env.ciphertext, dek)


def decrypt(data: bytes | str, key: RSAPrivateKey | KeyUnwrapper) -> bytes:
    """Decrypt the text or binary form: parse, unwrap the DEK, AES-GCM-open.

    With an RSA private key the wrapped key is as long as its modulus; with an unwrapper it is
    512 bytes (RSA-4096).

    Raises:
        MalformedEnvelopeError: structural problem (prefix, base64, length).
        DecryptionError: any cryptographic failure (message :data:`DECRYPTION_FAILED`).
    """
    wrapped, nonce, ciphertext = _split_raw(_raw_from(data), _wrapped_key_len(key))
    dek = unwrap_key(wrapped, key)
    return _open(nonce, ciphertext, dek)


def decrypt_in_place(buffer: bytearray, key: RSAPrivateKey | KeyUnwrapper) -> memoryview:
    """Like :func:`decrypt`, but for a large binary-form envelope held in a ``bytearray``.

    The plaintext is written over the ciphertext inside ``buffer`` (AES-GCM keeps lengths), so
    at most one copy of the data exists at any time. Returns a view of the plaintext inside
    ``buffer``; release it before resizing the buffer. The text form cannot be opened in place:
    it is base64-decoded into a new ``bytearray`` first, and the view points into that one.

    Once the structure checks pass, any failure (a :class:`~cape.errors.DecryptionError`, or an
    error from the key unwrapper) zeroes the buffer: it may have held unauthenticated plaintext
    and must not be used.

    Raises:
        MalformedEnvelopeError: structural problem (prefix, base64, length), as :func:`decrypt`;
            the buffer is unchanged.
        DecryptionError: any cryptographic failure (message :data:`DECRYPTION_FAILED`).
    """
    if not isinstance(buffer, bytearray):
        raise TypeError(f"decrypt_in_place needs a bytearray, not {type(buffer).__name__}")
    # Structure first, on small copies: no view of the buffer outlives an error.
    if buffer[: len(PREFIX)] != PREFIX:
        raise MalformedEnvelopeError("not a cape envelope: missing 'cape:' prefix")
    start = len(PREFIX)
    if _looks_like_text(bytes(buffer[start : start + _TEXT_PROBE])):
        buffer = bytearray(_b64decode(buffer[start:]))  # the text form: a decoded copy
        start = 0
    wrapped_len = _wrapped_key_len(key)
    _check_length(len(buffer) - start, wrapped_len)
    nonce_start = start + wrapped_len
    wrapped = bytes(buffer[start:nonce_start])
    nonce = bytes(buffer[nonce_start : nonce_start + NONCE_SIZE])
    view = memoryview(buffer)
    ciphertext = view[nonce_start + NONCE_SIZE :]
    plaintext = view[nonce_start + NONCE_SIZE : len(buffer) - TAG_SIZE]
    try:
        dek = unwrap_key(wrapped, key)
        try:
            AESGCM(dek).decrypt_into(nonce, ciphertext, None, plaintext)
        except (InvalidTag, ValueError):
            raise DecryptionError(DECRYPTION_FAILED) from None
    except BaseException:
        plaintext.release()
        ciphertext.release()
        _zero(view)
        view.release()
        raise
    ciphertext.release()
    view.release()
    return plaintext


_ZERO_CHUNK = 1 << 20


def _zero(view: memoryview) -> None:
    """Overwrite ``view`` with zeros, a megabyte at a time (no full-size temporary)."""
    zeros = bytes(min(_ZERO_CHUNK, len(view)))
    for offset in range(0, len(view), _ZERO_CHUNK):
        end = min(offset + _ZERO_CHUNK, len(view))
        view[offset:end] = zeros[: end - offset]
