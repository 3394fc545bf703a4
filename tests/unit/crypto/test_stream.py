from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cape.crypto import envelope, stream
from cape.crypto.envelope import DECRYPTION_FAILED
from cape.crypto.stream import STREAM_PREFIX
from cape.errors import DecryptionError, KeyFormatError, MalformedEnvelopeError

SETTINGS = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
KIB = 1024
HEADER_LEN = 15 + 2 + 512 + 16 + 4  # prefix, u16 length, wrapped key, salt, u32 chunk size
OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


# -- an independent implementation of the documented format, for cross-checks ---------------------


def _payload_key(dek: bytes, salt: bytes, header: bytes) -> bytes:
    hkdf = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=salt, info=b"cape-stream-v1 payload" + header
    )
    return hkdf.derive(dek)


def independent_decrypt(data: bytes, key: RSAPrivateKey) -> bytes:
    assert data[:15] == b"cape-stream-v1:"
    (wrapped_len,) = struct.unpack(">H", data[15:17])
    wrapped = data[17 : 17 + wrapped_len]
    salt = data[17 + wrapped_len : 33 + wrapped_len]
    (chunk_size,) = struct.unpack(">I", data[33 + wrapped_len : 37 + wrapped_len])
    header = data[: 37 + wrapped_len]
    aead = AESGCM(_payload_key(key.decrypt(wrapped, OAEP), salt, header))
    body = data[len(header) :]
    step = chunk_size + 16
    chunks = [body[i : i + step] for i in range(0, len(body), step)]
    out = []
    for index, chunk in enumerate(chunks):
        last = index == len(chunks) - 1
        out.append(aead.decrypt(index.to_bytes(11, "big") + bytes([last]), chunk, None))
    return b"".join(out)


def craft_stream(
    public_key: RSAPublicKey,
    chunks: list[tuple[bytes, bool]],
    *,
    chunk_size: int = KIB,
    dek: bytes = bytes(range(32)),
    salt: bytes = bytes(16),
) -> bytes:
    """Build a stream chunk by chunk (plaintext, last flag), following the documented format."""
    wrapped = public_key.encrypt(dek, OAEP)
    header = (
        b"cape-stream-v1:"
        + struct.pack(">H", len(wrapped))
        + wrapped
        + salt
        + struct.pack(">I", chunk_size)
    )
    aead = AESGCM(_payload_key(dek, salt, header))
    sealed = [
        aead.encrypt(i.to_bytes(11, "big") + bytes([last]), plaintext, None)
        for i, (plaintext, last) in enumerate(chunks)
    ]
    return header + b"".join(sealed)


def assert_crypto_failure(exc: pytest.ExceptionInfo[DecryptionError]) -> None:
    assert type(exc.value) is DecryptionError
    assert str(exc.value) == DECRYPTION_FAILED


def assert_malformed(exc: pytest.ExceptionInfo[DecryptionError], fragment: str) -> None:
    assert isinstance(exc.value, MalformedEnvelopeError)
    assert fragment in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.fixture(scope="module")
def three_chunks(cape_key: RSAPrivateKey) -> tuple[bytes, bytes]:
    """(plaintext, stream) with two full 1 KiB chunks and a 100-byte final chunk."""
    plaintext = bytes(range(256)) * 8 + b"z" * 100
    return plaintext, stream.encrypt_stream_bytes(plaintext, cape_key.public_key(), chunk_size=KIB)


def chunk_offsets(data: bytes, chunk_size: int = KIB) -> list[tuple[int, int]]:
    step = chunk_size + 16
    return [(i, min(i + step, len(data))) for i in range(HEADER_LEN, len(data), step)]


# -- format -------------------------------------------------------------------------------------


def test_prefix_is_not_the_envelope_prefix() -> None:
    assert STREAM_PREFIX == b"cape-stream-v1:"
    assert not STREAM_PREFIX.startswith(envelope.PREFIX)


def test_layout_matches_the_documented_format(
    cape_key: RSAPrivateKey, three_chunks: tuple[bytes, bytes]
) -> None:
    plaintext, data = three_chunks
    assert len(data) == HEADER_LEN + len(plaintext) + 3 * 16
    assert data[15:17] == b"\x02\x00"
    assert data[HEADER_LEN - 4 : HEADER_LEN] == struct.pack(">I", KIB)
    assert independent_decrypt(data, cape_key) == plaintext


def test_decrypts_an_independently_crafted_stream(cape_key: RSAPrivateKey) -> None:
    chunks = [(b"a" * KIB, False), (b"b" * KIB, False), (b"c" * 7, True)]
    data = craft_stream(cape_key.public_key(), chunks)
    assert stream.decrypt_stream_bytes(data, cape_key) == b"a" * KIB + b"b" * KIB + b"c" * 7


@pytest.mark.parametrize(
    ("size", "chunks"),
    [(0, 1), (1, 1), (KIB - 1, 1), (KIB, 1), (KIB + 1, 2), (2 * KIB, 2), (3 * KIB, 3)],
)
def test_chunking_at_boundaries(cape_key: RSAPrivateKey, size: int, chunks: int) -> None:
    plaintext = bytes(i % 251 for i in range(size))
    data = stream.encrypt_stream_bytes(plaintext, cape_key.public_key(), chunk_size=KIB)
    assert len(data) == HEADER_LEN + size + 16 * chunks
    assert len(data) == stream.encrypted_stream_size(size, chunk_size=KIB)
    assert stream.decrypt_stream_bytes(data, cape_key) == plaintext
    assert independent_decrypt(data, cape_key) == plaintext


def test_encrypted_stream_size_default_chunking() -> None:
    assert stream.encrypted_stream_size(0) == HEADER_LEN + 16
    assert stream.encrypted_stream_size(1 << 30) == HEADER_LEN + (1 << 30) + 1024 * 16
    assert stream.encrypted_stream_size((1 << 20) + 1) == HEADER_LEN + (1 << 20) + 1 + 32


def test_streams_return_byte_counts(cape_key: RSAPrivateKey) -> None:
    plaintext = b"q" * 5000
    out = io.BytesIO()
    written = stream.encrypt_stream(io.BytesIO(plaintext), out, cape_key.public_key())
    assert written == len(out.getvalue()) == stream.encrypted_stream_size(5000)
    back = io.BytesIO()
    assert stream.decrypt_stream(io.BytesIO(out.getvalue()), back, cape_key) == 5000
    assert back.getvalue() == plaintext


# -- round trips --------------------------------------------------------------------------------


@SETTINGS
@given(
    plaintext=st.binary(max_size=5 * KIB),
    chunk_size=st.sampled_from([KIB, KIB + 7, 2 * KIB, 4 * KIB]),
)
def test_round_trip(cape_key: RSAPrivateKey, plaintext: bytes, chunk_size: int) -> None:
    data = stream.encrypt_stream_bytes(plaintext, cape_key.public_key(), chunk_size=chunk_size)
    assert len(data) == stream.encrypted_stream_size(len(plaintext), chunk_size=chunk_size)
    assert stream.decrypt_stream_bytes(data, cape_key) == plaintext
    assert stream.decrypt_any(data, cape_key) == plaintext


class Trickle(io.RawIOBase):
    """A raw reader that returns at most ``step`` bytes per call (short reads)."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = memoryview(data)
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self._step, len(self._data))
        buffer[:n] = self._data[:n]
        self._data = self._data[n:]
        return n


class ReadOnly:
    """A reader with ``read`` but no ``readinto``."""

    def __init__(self, data: bytes) -> None:
        self._io = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._io.read(min(size, 333))


class ShortWriter(io.RawIOBase):
    """A raw writer that accepts at most 100 bytes per call."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        taken = bytes(b[:100])
        self.data += taken
        return len(taken)


@pytest.mark.parametrize("size", [0, 1, KIB, 3 * KIB + 5])
def test_short_reads_and_writes(cape_key: RSAPrivateKey, size: int) -> None:
    plaintext = bytes(i % 253 for i in range(size))
    sink = ShortWriter()
    written = stream.encrypt_stream(
        Trickle(plaintext, 37),  # type: ignore[arg-type]
        sink,  # type: ignore[arg-type]
        cape_key.public_key(),
        chunk_size=KIB,
    )
    data = bytes(sink.data)
    assert written == len(data)
    out = ShortWriter()
    assert stream.decrypt_stream(Trickle(data, 41), out, cape_key) == size  # type: ignore[arg-type]
    assert bytes(out.data) == plaintext
    back = io.BytesIO()
    stream.decrypt_stream(ReadOnly(data), back, cape_key)  # type: ignore[arg-type]
    assert back.getvalue() == plaintext
    again = io.BytesIO()
    stream.encrypt_stream(ReadOnly(plaintext), again, cape_key.public_key(), chunk_size=KIB)  # type: ignore[arg-type]
    assert stream.decrypt_stream_bytes(again.getvalue(), cape_key) == plaintext


def test_decrypt_through_an_unwrapper(
    cape_key: RSAPrivateKey, three_chunks: tuple[bytes, bytes]
) -> None:
    plaintext, data = three_chunks
    unwrap = envelope.key_unwrapper(cape_key)
    assert stream.decrypt_stream_bytes(data, unwrap) == plaintext
    assert stream.decrypt_any(data, unwrap) == plaintext


# -- encrypt-side errors ------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [0, 1, KIB - 1, (16 << 20) + 1])
def test_encrypt_refuses_chunk_sizes_out_of_range(cape_key: RSAPrivateKey, chunk_size: int) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        stream.encrypt_stream_bytes(b"x", cape_key.public_key(), chunk_size=chunk_size)


def test_encrypt_accepts_the_largest_chunk_size(cape_key: RSAPrivateKey) -> None:
    data = stream.encrypt_stream_bytes(b"x", cape_key.public_key(), chunk_size=16 << 20)
    assert stream.decrypt_stream_bytes(data, cape_key) == b"x"


def test_encrypt_refuses_non_rsa_keys() -> None:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(KeyFormatError):
        stream.encrypt_stream_bytes(b"x", public)  # type: ignore[arg-type]


def test_encrypt_writes_nothing_for_a_bad_key() -> None:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    out = io.BytesIO()
    with pytest.raises(KeyFormatError):
        stream.encrypt_stream(io.BytesIO(b"x"), out, public)  # type: ignore[arg-type]
    assert out.getvalue() == b""


# -- decrypt-side errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data", [b"", b"x", b"cape:" + bytes(600), b"cape-stream-v2:" + bytes(600), b"CAPE-STREAM-V1:"]
)
def test_wrong_prefix(cape_key: RSAPrivateKey, data: bytes) -> None:
    with pytest.raises(DecryptionError) as exc:
        stream.decrypt_stream_bytes(data, cape_key)
    assert_malformed(exc, "missing 'cape-stream-v1:' prefix")


@pytest.mark.parametrize(
    ("cut", "where"),
    [
        (1, "prefix"),
        (14, "prefix"),
        (15, "wrapped-key length"),
        (16, "wrapped-key length"),
        (17, "wrapped key"),
        (528, "wrapped key"),
        (529, "salt"),
        (544, "salt"),
        (545, "chunk size"),
        (548, "chunk size"),
    ],
)
def test_truncated_header(
    cape_key: RSAPrivateKey, three_chunks: tuple[bytes, bytes], cut: int, where: str
) -> None:
    with pytest.raises(DecryptionError) as exc:
        stream.decrypt_stream_bytes(three_chunks[1][:cut], cape_key)
    assert_malformed(exc, f"truncated stream: the header ends inside the {where}")


def test_header_without_chunks(cape_key: RSAPrivateKey, three_chunks: tuple[bytes, bytes]) -> None:
    with pytest.raises(DecryptionError) as exc:
        stream.decrypt_stream_bytes(three_chunks[1][:HEADER_LEN], cape_key)
    assert_malformed(exc, "no chunk follows the header")


@pytest.mark.parametrize("keep", [1, 15])
def test_incomplete_final_chunk(
    cape_key: RSAPrivateKey, three_chunks: tuple[bytes, bytes], keep: int
) -> None:
    data = three_chunks[1]
    start = chunk_offsets(data)[-1][0]
    with pytest.raises(DecryptionError) as exc:
        stream.decrypt_stream_bytes(data[: start + keep], cape_key)
    assert_malformed(exc, "the last chunk is incomplete")


@pytest.mark.parametrize("drop", [1, 16, 17, 100])
def test_truncated_inside_the_final_chunk(
    cape_key: RSAPrivateKey, three_chunks: tuple[bytes, bytes], drop: int
) -> None:
    with pytest.raises(DecryptionError) as exc:
        stream.decrypt_stream_bytes(three_chunks[1][:-drop], cape_key)
    assert isinstance(exc.value, DecryptionError)


def test_dropped_final_chunk(cape_key: RSAPrivateKey, three_chunks: tuple[bytes, bytes]) -> None:
    data = three_chunks[1]
    start = chunk_offsets(data)[-1][0]
    with pytest.raises(DecryptionError) as exc:
        stream.decrypt_stream_bytes(data[:start], cape_key)
    assert_malformed(exc, "it ends without a final chunk")


def test_dropped_final_chunk_of_an_exact_multiple(cape_key: RSAPrivateKey) -> None:
    data = stream.encrypt_stream_bytes(b"m" * 2 * KIB, cape_key.public_key(), chunk_size=KIB)
    with pytest.raises(DecryptionError) as exc:
        stream.decrypt_stream_bytes(data[: HEADER_LEN + KIB + 16], cape_key)
    assert_malformed(exc, "it ends without a final chunk")


def test_reordered_chunks(cape_key: RSAPrivateKey, three_chunks: tuple[bytes, bytes]) -> None:
    data = three_chunks[1]
    (a0, a1), (b0, b1), _ = chunk_offsets(data)
    swapped = data[:a0] + data[b0:b1] + data[a0:a1] + data[b1:]
    assert len(swapped) == len(data)
    with pytest.raises(DecryptionError) as exc:
        stream.decrypt_stream_bytes(swapped, cape_key)
    assert_crypto_failure(exc)


def test_duplicated_chunk(cape_key: RSAPrivateKey, three_chunks: tuple[bytes, bytes]) -> None:
    data = three_chunks[1]
    (a0, a1), _, _ = chunk_offsets(data)
    with pytest.raises(DecryptionError) as exc:
        stream.decrypt_stream_bytes(data[:a1] + data[a0:], cape_key)
    assert_crypto_failure(exc)


def test_trailing_data_after_a_full_final_chunk(cape_key: RSAPrivateKey) -> None:
    data = stream.encrypt_stream_bytes(b"f" * 2 * KIB, cape_key.public_key(), chunk_size=KIB)
    for garbage in (b"\x00", b"x" * 100, data[-(KIB + 16) :]):
        with pytest.raises(DecryptionError) as exc:
            stream.decrypt_stream_bytes(data + garbage, cape_key)
        assert_malformed(exc, "data follows the final chunk")


@pytest.mark.parametrize("garbage", [b"\x00", b"g" * 16, b"g" * 5000])
def test_trailing_data_after_a_short_final_chunk(
    cape_key: RSAPrivateKey, three_chunks: tuple[bytes, bytes], garbage: bytes
) -> None:
    with pytest.raises(DecryptionError):
        stream.decrypt_stream_bytes(three_chunks[1] + garbage, cape_key)


def test_empty_final_chunk_after_data(cape_key: RSAPrivateKey) -> None:
    data = craft_stream(cape_key.public_key(), [(b"a" * KIB, False), (b"", True)])
    with pytest.raises(DecryptionError) as exc:
        stream.decrypt_stream_bytes(data, cape_key)
    assert_malformed(exc, "empty final chunk after data")


def test_non_final_empty_chunk(cape_key: RSAPrivateKey) -> None:
    data = craft_stream(cape_key.public_key(), [(b"", False), (b"a" * 10, True)])
    with pytest.raises(DecryptionError) as exc:
        stream.decrypt_stream_bytes(data, cape_key)
    assert_crypto_failure(exc)


def test_short_non_final_chunk(cape_key: RSAPrivateKey) -> None:
    data = craft_stream(cape_key.public_key(), [(b"a" * 10, False), (b"b" * 10, True)])
    with pytest.raises(DecryptionError) as exc:
        stream.decrypt_stream_bytes(data, cape_key)
    assert_crypto_failure(exc)


def test_empty_plaintext_is_one_empty_final_chunk(cape_key: RSAPrivateKey) -> None:
    data = craft_stream(cape_key.public_key(), [(b"", True)])
    assert stream.decrypt_stream_bytes(data, cape_key) == b""


@pytest.mark.parametrize("chunk_size", [0, 512, KIB - 1, (16 << 20) + 1, 0xFFFFFFFF])
def test_chunk_size_out_of_range(cape_key: RSAPrivateKey, chunk_size: int) -> None:
    data = craft_stream(cape_key.public_key(), [(b"abc", True)], chunk_size=chunk_size)
    with pytest.raises(DecryptionError) as exc:
        stream.decrypt_stream_bytes(data, cape_key)
    assert_malformed(exc, f"chunk size {chunk_size} is outside [1024, 16777216]")


def test_chunk_size_rewritten_in_header(
    cape_key: RSAPrivateKey, three_chunks: tuple[bytes, bytes]
) -> None:
    data = bytearray(three_chunks[1])
    data[HEADER_LEN - 4 : HEADER_LEN] = struct.pack(">I", 2 * KIB)
    with pytest.raises(DecryptionError) as exc:
        stream.decrypt_stream_bytes(bytes(data), cape_key)
    assert_crypto_failure(exc)


def test_empty_wrapped_key(cape_key: RSAPrivateKey) -> None:
    data = b"cape-stream-v1:" + b"\x00\x00" + bytes(16) + struct.pack(">I", KIB) + bytes(32)
    with pytest.raises(DecryptionError) as exc:
        stream.decrypt_stream_bytes(data, cape_key)
    assert_malformed(exc, "the wrapped key is empty")


def test_wrong_key(
    cape_key: RSAPrivateKey, other_cape_key: RSAPrivateKey, three_chunks: tuple[bytes, bytes]
) -> None:
    with pytest.raises(DecryptionError) as exc:
        stream.decrypt_stream_bytes(three_chunks[1], other_cape_key)
    assert_crypto_failure(exc)


@SETTINGS
@given(data=st.data())
def test_flipped_header_byte(
    cape_key: RSAPrivateKey, three_chunks: tuple[bytes, bytes], data: st.DataObject
) -> None:
    position = data.draw(st.integers(min_value=0, max_value=HEADER_LEN - 1), label="position")
    mask = data.draw(st.integers(min_value=1, max_value=255), label="mask")
    tampered = bytearray(three_chunks[1])
    tampered[position] ^= mask
    with pytest.raises(DecryptionError):
        stream.decrypt_stream_bytes(bytes(tampered), cape_key)


@pytest.mark.parametrize("position", [HEADER_LEN - 10, HEADER_LEN - 20, 300])
def test_flipped_salt_or_wrapped_key_byte_is_a_crypto_failure(
    cape_key: RSAPrivateKey, three_chunks: tuple[bytes, bytes], position: int
) -> None:
    tampered = bytearray(three_chunks[1])
    tampered[position] ^= 0x80
    with pytest.raises(DecryptionError) as exc:
        stream.decrypt_stream_bytes(bytes(tampered), cape_key)
    assert_crypto_failure(exc)


@SETTINGS
@given(data=st.data())
def test_flipped_payload_byte(
    cape_key: RSAPrivateKey, three_chunks: tuple[bytes, bytes], data: st.DataObject
) -> None:
    sealed = three_chunks[1]
    position = data.draw(st.integers(min_value=HEADER_LEN, max_value=len(sealed) - 1))
    mask = data.draw(st.integers(min_value=1, max_value=255))
    tampered = bytearray(sealed)
    tampered[position] ^= mask
    with pytest.raises(DecryptionError) as exc:
        stream.decrypt_stream_bytes(bytes(tampered), cape_key)
    assert_crypto_failure(exc)


@SETTINGS
@given(body=st.binary(max_size=3000))
def test_garbage_after_the_prefix_raises_only_decryption_errors(
    cape_key: RSAPrivateKey, body: bytes
) -> None:
    with pytest.raises(DecryptionError):
        stream.decrypt_stream_bytes(STREAM_PREFIX + body, cape_key)


def test_earlier_plaintext_is_released_before_a_later_failure(
    cape_key: RSAPrivateKey, three_chunks: tuple[bytes, bytes]
) -> None:
    plaintext, data = three_chunks
    tampered = bytearray(data)
    tampered[-1] ^= 0x01
    out = io.BytesIO()
    with pytest.raises(DecryptionError):
        stream.decrypt_stream(io.BytesIO(bytes(tampered)), out, cape_key)
    assert out.getvalue() == plaintext[: 2 * KIB]


# -- either form --------------------------------------------------------------------------------


def test_decrypt_any_accepts_every_form(cape_key: RSAPrivateKey) -> None:
    public = cape_key.public_key()
    text = envelope.encrypt_text(b"t", public)
    assert stream.decrypt_any(text, cape_key) == b"t"
    assert stream.decrypt_any(text.encode(), cape_key) == b"t"
    assert stream.decrypt_any(envelope.encrypt(b"b", public), cape_key) == b"b"
    assert stream.decrypt_any(stream.encrypt_stream_bytes(b"s", public), cape_key) == b"s"
    sealed = bytearray(envelope.encrypt(b"b", public))
    assert stream.decrypt_any(sealed, cape_key) == b"b"  # type: ignore[arg-type]


@pytest.mark.parametrize("data", [b"", b"hello", b"cape", b"cape-stream", "plain text", ""])
def test_decrypt_any_refuses_other_data(cape_key: RSAPrivateKey, data: bytes | str) -> None:
    with pytest.raises(DecryptionError) as exc:
        stream.decrypt_any(data, cape_key)
    assert_malformed(exc, "not a cape ciphertext: it starts with neither")


def test_decrypt_any_refuses_a_text_stream(cape_key: RSAPrivateKey) -> None:
    with pytest.raises(DecryptionError) as exc:
        stream.decrypt_any("cape-stream-v1:AAAA", cape_key)
    assert_malformed(exc, "the stream form is binary")


def test_decrypt_any_reports_errors_of_the_form_found(
    cape_key: RSAPrivateKey, other_cape_key: RSAPrivateKey
) -> None:
    with pytest.raises(DecryptionError) as exc:
        stream.decrypt_any(b"cape:" + b"\x00" * 10, cape_key)
    assert_malformed(exc, "envelope too short")
    with pytest.raises(DecryptionError) as exc:
        stream.decrypt_any(STREAM_PREFIX + b"\x00", cape_key)
    assert_malformed(exc, "truncated stream")
    with pytest.raises(DecryptionError) as exc:
        stream.decrypt_any(stream.encrypt_stream_bytes(b"s", cape_key.public_key()), other_cape_key)
    assert_crypto_failure(exc)


def test_is_ciphertext() -> None:
    assert stream.is_ciphertext(b"cape:abc")
    assert stream.is_ciphertext(b"cape-stream-v1:")
    assert stream.is_ciphertext("cape:abc")
    assert not stream.is_ciphertext(b"cape")
    assert not stream.is_ciphertext(b"cape-stream-v1")
    assert not stream.is_ciphertext(b"")
    assert not stream.is_ciphertext(b"CAPE:abc")


# -- bounded memory -----------------------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent(
    """
    import io, json, os, resource, sys, threading
    from cape.crypto import stream
    from cape.crypto.keys import load_rsa_private_key

    TOTAL = 1 << 30
    PATTERN = bytes(range(256)) * 4096  # 1 MiB
    VIEW = memoryview(PATTERN)
    key = load_rsa_private_key(sys.stdin.buffer.read())

    class Synthetic(io.RawIOBase):
        # Yields TOTAL bytes of the repeated pattern without ever holding them.
        def __init__(self):
            self.remaining = TOTAL
            self.pos = 0
        def readable(self):
            return True
        def readinto(self, b):
            n = min(len(b), self.remaining, len(PATTERN) - self.pos)
            b[:n] = VIEW[self.pos:self.pos + n]
            self.pos = (self.pos + n) % len(PATTERN)
            self.remaining -= n
            return n

    class Sink(io.RawIOBase):
        # Counts bytes; with check=True also compares them with the pattern.
        def __init__(self, check):
            self.count = 0
            self.check = check
            self.ok = True
        def writable(self):
            return True
        def write(self, b):
            b = memoryview(b)
            if self.check:
                done = 0
                while done < len(b):
                    pos = (self.count + done) % len(PATTERN)
                    k = min(len(b) - done, len(PATTERN) - pos)
                    if bytes(b[done:done + k]) != PATTERN[pos:pos + k]:
                        self.ok = False
                    done += k
            self.count += len(b)
            return len(b)

    def peak_kib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    result = {"before": peak_kib()}
    sink = Sink(check=False)
    result["encrypt_returned"] = stream.encrypt_stream(Synthetic(), sink, key.public_key())
    result["encrypt_written"] = sink.count
    result["after_encrypt"] = peak_kib()

    read_fd, write_fd = os.pipe()
    errors = []
    def produce():
        try:
            with open(write_fd, "wb") as dst:
                stream.encrypt_stream(Synthetic(), dst, key.public_key())
        except BaseException as exc:
            errors.append(repr(exc))
    producer = threading.Thread(target=produce)
    producer.start()
    out = Sink(check=True)
    with open(read_fd, "rb") as src:
        result["decrypt_returned"] = stream.decrypt_stream(src, out, key)
    producer.join()
    result["decrypt_written"] = out.count
    result["decrypt_matches"] = out.ok
    result["producer_errors"] = errors
    result["after_decrypt"] = peak_kib()
    print(json.dumps(result))
    """
)


@pytest.mark.slow
def test_one_gib_streams_in_bounded_memory(cape_key: RSAPrivateKey) -> None:
    pem = cape_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT],
        input=pem,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    result = json.loads(proc.stdout)
    total = 1 << 30
    expected = HEADER_LEN + total + (total // (1 << 20)) * 16
    assert result["encrypt_returned"] == result["encrypt_written"] == expected
    assert result["decrypt_returned"] == result["decrypt_written"] == total
    assert result["decrypt_matches"] is True
    assert result["producer_errors"] == []
    limit_kib = 64 * 1024
    assert result["after_encrypt"] - result["before"] < limit_kib, result
    assert result["after_decrypt"] - result["before"] < limit_kib, result


# -- reused buffers (chunks after the first two are read and opened into reused memory) --------


@pytest.fixture(scope="module")
def six_chunks(cape_key: RSAPrivateKey) -> tuple[bytes, bytes]:
    """(plaintext, stream) with six full 1 KiB chunks: an exact multiple, past the plain reads."""
    plaintext = bytes(i % 241 for i in range(6 * KIB))
    return plaintext, stream.encrypt_stream_bytes(plaintext, cape_key.public_key(), chunk_size=KIB)


def test_long_streams_round_trip_from_every_source(
    cape_key: RSAPrivateKey, six_chunks: tuple[bytes, bytes]
) -> None:
    plaintext, data = six_chunks
    assert independent_decrypt(data, cape_key) == plaintext
    for source in (data, bytearray(data), memoryview(data)):
        assert stream.decrypt_stream_bytes(source, cape_key) == plaintext
    for reader in (io.BytesIO(data), Trickle(data, 300), ReadOnly(data)):
        out = io.BytesIO()
        assert stream.decrypt_stream(reader, out, cape_key) == len(plaintext)  # type: ignore[arg-type]
        assert out.getvalue() == plaintext
    again = io.BytesIO()
    stream.encrypt_stream(Trickle(plaintext, 700), again, cape_key.public_key(), chunk_size=KIB)  # type: ignore[arg-type]
    assert independent_decrypt(again.getvalue(), cape_key) == plaintext


def test_late_chunk_failures_keep_their_errors(
    cape_key: RSAPrivateKey, six_chunks: tuple[bytes, bytes]
) -> None:
    _, data = six_chunks
    offsets = chunk_offsets(data)
    start, end = offsets[4]
    tampered = bytearray(data)
    tampered[start + 3] ^= 1
    dropped = data[: offsets[5][0]]  # the final chunk is gone: chunk 4 is not marked last
    swapped = data[:start] + data[offsets[3][0] : offsets[3][1]] + data[end:]
    for source in (bytes(tampered), swapped):
        with pytest.raises(DecryptionError) as exc:
            stream.decrypt_stream_bytes(source, cape_key)
        assert_crypto_failure(exc)
        with pytest.raises(DecryptionError) as exc:
            stream.decrypt_stream(io.BytesIO(source), io.BytesIO(), cape_key)
        assert_crypto_failure(exc)
    for run in (
        lambda: stream.decrypt_stream_bytes(dropped, cape_key),
        lambda: stream.decrypt_stream(io.BytesIO(dropped), io.BytesIO(), cape_key),
    ):
        with pytest.raises(MalformedEnvelopeError, match="ends without a final chunk"):
            run()
