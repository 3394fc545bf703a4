"""Envelope encryption into caller buffers, and the text form encoded a block at a time."""

from __future__ import annotations

import array
import base64
import io
import mmap

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from cape.crypto import envelope, stream
from cape.errors import KeyFormatError

BLOCK = envelope._TEXT_BLOCK
HEAD = 512 + 12  # wrapped key and nonce, before the ciphertext in a raw envelope
# Sizes around the text form's block edges: the first block holds HEAD bytes of header.
EDGES = [
    0,
    1,
    2,
    3,
    100,
    BLOCK - HEAD - 17,
    BLOCK - HEAD - 16,
    BLOCK - HEAD - 15,
    BLOCK - HEAD - 1,
    BLOCK - HEAD,
    BLOCK - HEAD + 1,
    BLOCK,
    3 * BLOCK + 7,
]


def _text_raw(text: bytes) -> bytes:
    assert text.startswith(b"cape:")
    raw = base64.b64decode(text[5:], validate=True)
    assert text[5:] == base64.b64encode(raw)  # canonical padded base64, no line breaks
    return raw


@pytest.mark.parametrize("size", EDGES)
def test_text_form_encoded_by_blocks_is_base64_of_the_binary_form(
    cape_key: RSAPrivateKey, size: int
) -> None:
    plaintext = bytes(i % 251 for i in range(size))
    dek, nonce = bytes(range(32)), bytes(range(12))
    public = cape_key.public_key()
    binary = envelope._seal_with(plaintext, public, dek=dek, nonce=nonce)
    text = envelope._seal_with(plaintext, public, dek=dek, nonce=nonce, text=True)
    assert len(text) == envelope.encrypted_size(size, text=True)
    raw = _text_raw(text)
    # RSA-OAEP is randomized: everything after the wrapped key is identical.
    assert raw[512:] == binary[512:]
    assert envelope.decrypt(text, cape_key) == plaintext


@pytest.mark.parametrize("size", [0, 5, BLOCK + 1])
def test_encrypt_into_writes_the_binary_form_and_nothing_past_it(
    cape_key: RSAPrivateKey, size: int
) -> None:
    plaintext = bytes(size)
    need = envelope.encrypted_size(size)
    out = bytearray(b"\xee" * (need + 64))
    n = envelope.encrypt_into(plaintext, cape_key.public_key(), out)
    assert n == need
    assert out[need:] == b"\xee" * 64
    assert out[:5] == b"cape:"
    assert envelope.decrypt(bytes(out[:n]), cape_key) == plaintext


@pytest.mark.parametrize("size", [0, 5, BLOCK + 1])
def test_encrypt_text_into_writes_ascii_and_nothing_past_it(
    cape_key: RSAPrivateKey, size: int
) -> None:
    plaintext = b"t" * size
    need = envelope.encrypted_size(size, text=True)
    out = bytearray(b"\xee" * (need + 64))
    n = envelope.encrypt_text_into(plaintext, cape_key.public_key(), out)
    assert n == need
    assert out[need:] == b"\xee" * 64
    _text_raw(bytes(out[:n]))
    assert envelope.decrypt(bytes(out[:n]).decode("ascii"), cape_key) == plaintext


def test_a_buffer_is_reusable_across_messages(cape_key: RSAPrivateKey) -> None:
    out = mmap.mmap(-1, envelope.encrypted_size(4096, text=True))
    for message in (b"a" * 4096, b"b" * 10, b""):
        n = envelope.encrypt_into(message, cape_key.public_key(), out)
        assert envelope.decrypt(out[:n], cape_key) == message
        n = envelope.encrypt_text_into(message, cape_key.public_key(), memoryview(out))
        assert envelope.decrypt(out[:n], cape_key) == message


def test_text_bytes_and_str_forms_agree(cape_key: RSAPrivateKey) -> None:
    data = envelope.encrypt_text_bytes(b"hello", cape_key.public_key())
    assert isinstance(data, bytes)
    assert len(data) == envelope.encrypted_size(5, text=True) == 5 + 728
    assert envelope.decrypt(data, cape_key) == b"hello"
    text = envelope.encrypt_text(b"hello", cape_key.public_key())
    assert isinstance(text, str)
    assert len(text) == len(data)


def test_plaintext_views_of_wider_items_count_bytes(cape_key: RSAPrivateKey) -> None:
    words = array.array("I", range(1000))
    view = memoryview(words)
    for ciphertext in (
        envelope.encrypt(view, cape_key.public_key()),
        envelope.encrypt_text_bytes(view, cape_key.public_key()),
    ):
        assert envelope.decrypt(ciphertext, cape_key) == words.tobytes()


def test_encrypted_size_matches_both_forms_and_other_key_sizes() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for size in (0, 1, 2, 3, 1000):
        binary = envelope.encrypt(bytes(size), key.public_key())
        text = envelope.encrypt_text_bytes(bytes(size), key.public_key())
        assert len(binary) == envelope.encrypted_size(size, wrapped_key_len=256)
        assert len(text) == envelope.encrypted_size(size, text=True, wrapped_key_len=256)
    with pytest.raises(ValueError, match="negative"):
        envelope.encrypted_size(-1)


def test_bad_output_buffers_are_refused(cape_key: RSAPrivateKey) -> None:
    public = cape_key.public_key()
    need = envelope.encrypted_size(10)
    with pytest.raises(ValueError, match=f"needs {need}"):
        envelope.encrypt_into(bytes(10), public, bytearray(need - 1))
    small = bytearray(envelope.encrypted_size(10, text=True) - 1)
    with pytest.raises(ValueError, match="needs"):
        envelope.encrypt_text_into(bytes(10), public, small)
    assert small == bytes(len(small))  # refused before anything is written
    with pytest.raises(TypeError, match="read-only"):
        envelope.encrypt_into(b"x", public, bytes(need))
    with pytest.raises(TypeError, match="writable buffer"):
        envelope.encrypt_into(b"x", public, "not a buffer")
    with pytest.raises(TypeError, match="plaintext must be bytes"):
        envelope.encrypt_into("text", public, bytearray(need))  # type: ignore[arg-type]
    with pytest.raises(KeyFormatError):
        envelope.encrypt_into(b"x", "not a key", bytearray(need))  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 3 * 1024])
def test_stream_of_an_in_memory_input_reads_it_in_place(cape_key: RSAPrivateKey, size: int) -> None:

    plaintext = bytes(i % 253 for i in range(size))
    for source in (plaintext, bytearray(plaintext), memoryview(plaintext)):
        out = io.BytesIO()
        written = stream.encrypt_stream(source, out, cape_key.public_key(), chunk_size=1024)
        assert written == len(out.getvalue()) == stream.encrypted_stream_size(size, chunk_size=1024)
        assert stream.decrypt_stream_bytes(out.getvalue(), cape_key) == plaintext
