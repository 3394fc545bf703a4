from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cape.crypto import envelope
from cape.crypto.envelope import DECRYPTION_FAILED, Envelope
from cape.errors import (
    DecryptionError,
    FormatError,
    KeyFormatError,
    MalformedEnvelopeError,
    SecureModuleError,
)

SETTINGS = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
MIN_RAW = 512 + 12 + 16

# AES-256-GCM test case 14 of McGrew & Viega, "The Galois/Counter Mode of Operation" (2005):
# K = 0^256, IV = 0^96, P = 0^128.
GCM_TC14_CT_TAG = bytes.fromhex(
    "cea7403d4d606b6e074ec5d3baf39d18" + "d0d1c8a799996bf0265b98b5d48ab919"
)


def independent_open(raw: bytes, key: RSAPrivateKey) -> bytes:
    """Decode a raw envelope with cryptography primitives only, following cape-reference §5.1."""
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    dek = key.decrypt(raw[:512], oaep)
    assert len(dek) == 32
    return AESGCM(dek).decrypt(raw[512:524], raw[524:], None)


def assert_crypto_failure(exc: pytest.ExceptionInfo[DecryptionError]) -> None:
    assert type(exc.value) is DecryptionError
    assert str(exc.value) == DECRYPTION_FAILED
    # No library exception shows through (raised ``from None`` or outside any handler).
    assert exc.value.__cause__ is None
    assert exc.value.__context__ is None or exc.value.__suppress_context__


def assert_malformed(exc: pytest.ExceptionInfo[DecryptionError], fragment: str) -> None:
    assert isinstance(exc.value, MalformedEnvelopeError)
    assert isinstance(exc.value, FormatError)
    message = str(exc.value)
    assert fragment in message
    assert "\n" not in message


# -- layout -------------------------------------------------------------------------------------


def test_five_byte_plaintext_gives_545_byte_envelope(cape_key: RSAPrivateKey) -> None:
    raw = envelope.seal(b"hello", cape_key.public_key())
    assert len(raw) == 545
    assert independent_open(raw, cape_key) == b"hello"


def test_binary_form_is_prefix_and_raw(cape_key: RSAPrivateKey) -> None:
    data = envelope.encrypt(b"hello", cape_key.public_key())
    assert isinstance(data, bytes)
    assert data[:5] == b"cape:"
    assert len(data) == 550
    assert independent_open(data[5:], cape_key) == b"hello"


def test_text_form_is_prefix_and_padded_base64_of_raw(cape_key: RSAPrivateKey) -> None:
    text = envelope.encrypt_text(b"hello", cape_key.public_key())
    assert isinstance(text, str)
    assert text.startswith("cape:")
    raw = base64.b64decode(text[5:], validate=True)
    assert len(raw) == 545
    assert text == "cape:" + base64.b64encode(raw).decode("ascii")
    assert text.endswith("=")  # 545 bytes is not a multiple of 3: standard padding is kept
    assert independent_open(raw, cape_key) == b"hello"


def test_seal_with_seam_matches_the_gcm_spec_vector(cape_key: RSAPrivateKey) -> None:
    raw = envelope._seal_with(bytes(16), cape_key.public_key(), dek=bytes(32), nonce=bytes(12))
    assert raw[512:524] == bytes(12)
    assert raw[524:] == GCM_TC14_CT_TAG
    assert independent_open(raw, cape_key) == bytes(16)
    assert envelope.decrypt(b"cape:" + raw, cape_key) == bytes(16)


def test_fresh_dek_and_nonce_per_message(cape_key: RSAPrivateKey) -> None:
    a = envelope.seal(b"same", cape_key.public_key())
    b = envelope.seal(b"same", cape_key.public_key())
    assert a[:512] != b[:512]
    assert a[512:524] != b[512:524]
    assert a[524:] != b[524:]


def test_wrap_and_unwrap_key(cape_key: RSAPrivateKey) -> None:
    dek = bytes(range(32))
    wrapped = envelope.wrap_key(dek, cape_key.public_key())
    assert len(wrapped) == 512
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    assert cape_key.decrypt(wrapped, oaep) == dek
    assert envelope.unwrap_key(wrapped, cape_key) == dek
    assert envelope.unwrap_key(wrapped, envelope.key_unwrapper(cape_key)) == dek


def test_wrap_key_refuses_a_dek_of_the_wrong_size(cape_key: RSAPrivateKey) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        envelope.wrap_key(bytes(16), cape_key.public_key())


def test_parse_both_forms(cape_key: RSAPrivateKey) -> None:
    raw = envelope.seal(b"payload", cape_key.public_key())
    expected = Envelope(wrapped_key=raw[:512], nonce=raw[512:524], ciphertext=raw[524:])
    assert envelope.parse(b"cape:" + raw) == expected
    text = "cape:" + base64.b64encode(raw).decode()
    assert envelope.parse(text) == expected
    assert envelope.parse(text.encode()) == expected
    assert envelope.parse(text + "\n") == expected
    assert envelope.parse(text.encode() + b"\r\n") == expected
    assert len(expected.ciphertext) == len(b"payload") + 16


def test_open_envelope_with_unwrapped_dek(cape_key: RSAPrivateKey) -> None:
    env = envelope.parse(envelope.encrypt(b"payload", cape_key.public_key()))
    dek = envelope.unwrap_key(env.wrapped_key, cape_key)
    assert envelope.open_envelope(env, dek) == b"payload"
    with pytest.raises(DecryptionError) as exc:
        envelope.open_envelope(env, dek[:16])
    assert_crypto_failure(exc)
    with pytest.raises(DecryptionError) as exc:
        envelope.open_envelope(env, bytes(32))
    assert_crypto_failure(exc)


def test_rsa_2048_key_uses_256_byte_wrapped_key() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raw = envelope.seal(b"abc", key.public_key())
    assert len(raw) == 256 + 12 + 3 + 16
    assert envelope.decrypt(b"cape:" + raw, key) == b"abc"
    assert envelope.parse(b"cape:" + raw, wrapped_key_len=256).wrapped_key == raw[:256]


# -- round trips --------------------------------------------------------------------------------


@SETTINGS
@given(plaintext=st.binary(max_size=4096))
def test_binary_round_trip(cape_key: RSAPrivateKey, plaintext: bytes) -> None:
    data = envelope.encrypt(plaintext, cape_key.public_key())
    assert len(data) == 5 + 512 + 12 + len(plaintext) + 16
    assert envelope.decrypt(data, cape_key) == plaintext
    assert independent_open(data[5:], cape_key) == plaintext


@SETTINGS
@given(plaintext=st.binary(max_size=4096))
def test_text_round_trip(cape_key: RSAPrivateKey, plaintext: bytes) -> None:
    text = envelope.encrypt_text(plaintext, cape_key.public_key())
    assert envelope.decrypt(text, cape_key) == plaintext
    assert envelope.decrypt(text.encode("ascii"), cape_key) == plaintext


@SETTINGS
@given(plaintext=st.binary(max_size=1024))
def test_round_trip_through_an_unwrapper(cape_key: RSAPrivateKey, plaintext: bytes) -> None:
    calls: list[int] = []

    def unwrap(wrapped: bytes) -> bytes:
        calls.append(len(wrapped))
        return envelope.unwrap_key(wrapped, cape_key)

    assert envelope.decrypt(envelope.encrypt(plaintext, cape_key.public_key()), unwrap) == (
        plaintext
    )
    assert calls == [512]


def test_tolerates_bytearray_and_memoryview(cape_key: RSAPrivateKey) -> None:
    # Encryption is typed for any bytes-like input; decryption takes them too, typed as bytes.
    data = envelope.encrypt(bytearray(b"abc"), cape_key.public_key())
    assert envelope.decrypt(bytearray(data), cape_key) == b"abc"  # type: ignore[arg-type]
    assert envelope.decrypt(memoryview(data), cape_key) == b"abc"  # type: ignore[arg-type]


# -- encrypt-side errors ------------------------------------------------------------------------


def test_encrypt_refuses_non_rsa_keys() -> None:
    for public in (
        ec.generate_private_key(ec.SECP256R1()).public_key(),
        x25519.X25519PrivateKey.generate().public_key(),
    ):
        with pytest.raises(KeyFormatError, match="expected an RSA public key"):
            envelope.encrypt(b"x", public)  # type: ignore[arg-type]


def test_encrypt_refuses_a_private_key(cape_key: RSAPrivateKey) -> None:
    with pytest.raises(KeyFormatError, match="expected an RSA public key"):
        envelope.encrypt(b"x", cape_key)  # type: ignore[arg-type]


def test_encrypt_refuses_small_rsa_keys() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(KeyFormatError, match="1024 bits"):
        envelope.encrypt_text(b"x", small.public_key())


def test_encrypt_requires_bytes(cape_key: RSAPrivateKey) -> None:
    with pytest.raises(TypeError):
        envelope.encrypt("text", cape_key.public_key())  # type: ignore[arg-type]


def test_decrypt_requires_a_key(cape_key: RSAPrivateKey) -> None:
    data = envelope.encrypt(b"x", cape_key.public_key())
    with pytest.raises(TypeError):
        envelope.decrypt(data, cape_key.public_key())  # type: ignore[arg-type]


# -- decrypt-side errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"cape",
        b"CAPE:abcd",
        b"cap:" + bytes(600),
        b"cape-stream-v1:" + bytes(600),
        "",
        "Cape:",
    ],
)
def test_wrong_prefix(cape_key: RSAPrivateKey, data: bytes | str) -> None:
    with pytest.raises(DecryptionError) as exc:
        envelope.decrypt(data, cape_key)
    assert_malformed(exc, "missing 'cape:' prefix")


@pytest.mark.parametrize(
    "body",
    [
        "!!!!",
        "QUJD RA==",
        "QUJDRA=",  # bad padding
        "QUJDR",  # bad length
        "QUJDRA==QUJD",  # data after padding
        "QUJD\nRA==",  # embedded newline
    ],
)
def test_bad_base64_text(cape_key: RSAPrivateKey, body: str) -> None:
    with pytest.raises(DecryptionError) as exc:
        envelope.decrypt("cape:" + body, cape_key)
    assert_malformed(exc, "bad base64")


def test_bad_base64_in_bytes_text_form(cape_key: RSAPrivateKey) -> None:
    text = envelope.encrypt_text(b"hello", cape_key.public_key()).encode()
    corrupted = text[:200] + b"*" + text[201:]
    with pytest.raises(DecryptionError) as exc:
        envelope.decrypt(corrupted, cape_key)
    assert_malformed(exc, "bad base64")


def test_non_ascii_text(cape_key: RSAPrivateKey) -> None:
    with pytest.raises(DecryptionError) as exc:
        envelope.decrypt("cape:QUJD\u00e9A==", cape_key)
    assert_malformed(exc, "ASCII")


@pytest.mark.parametrize("length", [0, 1, 511, 512, 513, 523, 524, 525, MIN_RAW - 1])
def test_too_short(cape_key: RSAPrivateKey, length: int) -> None:
    # A leading 0x00 keeps a very short binary body from looking like base64 text.
    raw = (b"\x00" + envelope.seal(b"hello", cape_key.public_key())[1:])[:length]
    for data in (b"cape:" + raw, "cape:" + base64.b64encode(raw).decode()):
        with pytest.raises(DecryptionError) as exc:
            envelope.decrypt(data, cape_key)
        assert_malformed(exc, f"envelope too short: {length} bytes, need at least {MIN_RAW}")


@pytest.mark.parametrize("length", [MIN_RAW, MIN_RAW + 1, 544])
def test_truncated_but_long_enough_is_a_crypto_failure(
    cape_key: RSAPrivateKey, length: int
) -> None:
    raw = envelope.seal(b"hello", cape_key.public_key())[:length]
    for data in (b"cape:" + raw, "cape:" + base64.b64encode(raw).decode()):
        with pytest.raises(DecryptionError) as exc:
            envelope.decrypt(data, cape_key)
        assert_crypto_failure(exc)


def test_too_short_with_rsa_2048_key_uses_its_modulus_length() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raw = envelope.seal(b"", key.public_key())
    assert envelope.decrypt(b"cape:" + raw, key) == b""
    with pytest.raises(MalformedEnvelopeError, match="need at least 284"):
        envelope.decrypt(b"cape:" + raw[:-1], key)


def test_wrong_key(cape_key: RSAPrivateKey, other_cape_key: RSAPrivateKey) -> None:
    for data in (
        envelope.encrypt(b"secret", cape_key.public_key()),
        envelope.encrypt_text(b"secret", cape_key.public_key()),
    ):
        with pytest.raises(DecryptionError) as exc:
            envelope.decrypt(data, other_cape_key)
        assert_crypto_failure(exc)
        assert "secret" not in str(exc.value)


@SETTINGS
@given(data=st.data())
def test_any_tampered_byte_is_detected(cape_key: RSAPrivateKey, data: st.DataObject) -> None:
    sealed = envelope.encrypt(b"attack at dawn", cape_key.public_key())
    position = data.draw(st.integers(min_value=5, max_value=len(sealed) - 1), label="position")
    mask = data.draw(st.integers(min_value=1, max_value=255), label="mask")
    tampered = bytearray(sealed)
    tampered[position] ^= mask
    with pytest.raises(DecryptionError) as exc:
        envelope.decrypt(bytes(tampered), cape_key)
    assert_crypto_failure(exc)


@pytest.mark.parametrize("position", [0, 100, 511, 512, 523, 524, 540])
def test_tampered_text_form_is_detected(cape_key: RSAPrivateKey, position: int) -> None:
    raw = bytearray(envelope.seal(b"attack at dawn", cape_key.public_key()))
    raw[position] ^= 0x01
    with pytest.raises(DecryptionError) as exc:
        envelope.decrypt("cape:" + base64.b64encode(raw).decode(), cape_key)
    assert_crypto_failure(exc)


@SETTINGS
@given(
    data=st.one_of(
        st.binary(max_size=700),
        st.binary(max_size=700).map(lambda b: b"cape:" + b),
        st.text(max_size=700),
        st.text(alphabet="ABCDEFabcdef0123456789+/=", max_size=900).map(lambda s: "cape:" + s),
        st.binary(min_size=540, max_size=600).map(lambda b: "cape:" + base64.b64encode(b).decode()),
    )
)
def test_garbage_raises_only_decryption_errors(cape_key: RSAPrivateKey, data: bytes | str) -> None:
    with pytest.raises(DecryptionError):
        envelope.decrypt(data, cape_key)


# -- unwrappers ---------------------------------------------------------------------------------


def test_unwrapper_returning_a_short_dek_is_a_crypto_failure(cape_key: RSAPrivateKey) -> None:
    data = envelope.encrypt(b"x", cape_key.public_key())
    with pytest.raises(DecryptionError) as exc:
        envelope.decrypt(data, lambda wrapped: envelope.unwrap_key(wrapped, cape_key)[:31])
    assert_crypto_failure(exc)


def test_unwrapper_returning_a_wrong_dek_is_a_crypto_failure(cape_key: RSAPrivateKey) -> None:
    data = envelope.encrypt(b"x", cape_key.public_key())
    with pytest.raises(DecryptionError) as exc:
        envelope.decrypt(data, lambda wrapped: bytes(32))
    assert_crypto_failure(exc)


@pytest.mark.parametrize(
    "error",
    [ValueError("Decryption failed"), DecryptionError("kms said: key 1234 is not yours")],
)
def test_unwrapper_failures_become_the_generic_error(
    cape_key: RSAPrivateKey, error: Exception
) -> None:
    data = envelope.encrypt(b"x", cape_key.public_key())

    def unwrap(wrapped: bytes) -> bytes:
        raise error

    with pytest.raises(DecryptionError) as exc:
        envelope.decrypt(data, unwrap)
    assert_crypto_failure(exc)


def test_unwrapper_infrastructure_errors_propagate(cape_key: RSAPrivateKey) -> None:
    data = envelope.encrypt(b"x", cape_key.public_key())

    def down(wrapped: bytes) -> bytes:
        raise SecureModuleError("key service unavailable")

    with pytest.raises(SecureModuleError, match="key service unavailable"):
        envelope.decrypt(data, down)

    def broken(wrapped: bytes) -> bytes:
        raise ConnectionError("refused")

    with pytest.raises(ConnectionError):
        envelope.decrypt(data, broken)


def test_unwrapper_returning_non_bytes_is_a_programming_error(cape_key: RSAPrivateKey) -> None:
    data = envelope.encrypt(b"x", cape_key.public_key())
    with pytest.raises(TypeError):
        envelope.decrypt(data, lambda wrapped: 32)  # type: ignore[arg-type,return-value]


def test_unwrapper_sees_512_byte_wrapped_keys_by_default(cape_key: RSAPrivateKey) -> None:
    seen: list[bytes] = []

    def unwrap(wrapped: bytes) -> bytes:
        seen.append(wrapped)
        return envelope.unwrap_key(wrapped, cape_key)

    raw = envelope.seal(b"x", cape_key.public_key())
    assert envelope.decrypt(b"cape:" + raw, unwrap) == b"x"
    assert seen == [raw[:512]]
