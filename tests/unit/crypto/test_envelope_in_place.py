"""``envelope.decrypt_in_place``: same answers and errors as ``decrypt``, one buffer."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cape.crypto import envelope
from cape.crypto.envelope import DECRYPTION_FAILED
from cape.errors import DecryptionError, MalformedEnvelopeError

SETTINGS = settings(deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow])
HEADER = len(envelope.PREFIX) + 512 + envelope.NONCE_SIZE


def _outcome(call: object) -> tuple[type[BaseException], str] | bytes:
    assert callable(call)
    try:
        return bytes(call())
    except DecryptionError as exc:
        return type(exc), str(exc)


@SETTINGS
@given(plaintext=st.binary(max_size=4096))
def test_round_trip_in_the_same_buffer(cape_key: RSAPrivateKey, plaintext: bytes) -> None:
    buffer = bytearray(envelope.encrypt(plaintext, cape_key.public_key()))
    address = memoryview(buffer)
    view = envelope.decrypt_in_place(buffer, cape_key)
    assert view.obj is buffer  # a view into the caller's buffer, not a copy
    assert view.readonly is False
    assert bytes(view) == plaintext
    assert bytes(buffer[HEADER : HEADER + len(plaintext)]) == plaintext
    view.release()
    address.release()


def test_round_trip_of_a_large_bundle_through_an_unwrapper(cape_key: RSAPrivateKey) -> None:
    plaintext = bytes(range(256)) * 8192  # 2 MiB
    buffer = bytearray(envelope.encrypt(plaintext, cape_key.public_key()))
    with envelope.decrypt_in_place(buffer, envelope.key_unwrapper(cape_key)) as view:
        assert view == plaintext


def test_text_form_round_trips(cape_key: RSAPrivateKey) -> None:
    text = envelope.encrypt_text(b"hello in place", cape_key.public_key())
    with envelope.decrypt_in_place(bytearray(text.encode("ascii")), cape_key) as view:
        assert bytes(view) == b"hello in place"


def test_requires_a_bytearray(cape_key: RSAPrivateKey) -> None:
    sealed = envelope.encrypt(b"x", cape_key.public_key())
    with pytest.raises(TypeError):
        envelope.decrypt_in_place(sealed, cape_key)  # type: ignore[arg-type]


@SETTINGS
@given(data=st.data())
def test_any_tampered_byte_fails_exactly_like_decrypt(
    cape_key: RSAPrivateKey, data: st.DataObject
) -> None:
    sealed = envelope.encrypt(b"a bundle that must not open", cape_key.public_key())
    position = data.draw(st.integers(min_value=0, max_value=len(sealed) - 1))
    mask = data.draw(st.integers(min_value=1, max_value=255))
    tampered = bytearray(sealed)
    tampered[position] ^= mask
    expected = _outcome(lambda: envelope.decrypt(bytes(tampered), cape_key))
    assert _outcome(lambda: envelope.decrypt_in_place(tampered, cape_key)) == expected
    assert not isinstance(expected, bytes)


@pytest.mark.parametrize(
    "where",
    [
        pytest.param(lambda n: n - 1, id="tag"),
        pytest.param(lambda n: HEADER + 3, id="ciphertext"),
        pytest.param(lambda n: HEADER - 1, id="nonce"),
        pytest.param(lambda n: len(envelope.PREFIX) + 7, id="wrapped-key"),
    ],
)
def test_crypto_failure_raises_the_generic_error_and_zeroes_the_buffer(
    cape_key: RSAPrivateKey, where: object
) -> None:
    sealed = envelope.encrypt(b"secret bundle bytes " * 100, cape_key.public_key())
    assert callable(where)
    buffer = bytearray(sealed)
    buffer[where(len(buffer))] ^= 0x01
    with pytest.raises(DecryptionError) as exc:
        envelope.decrypt_in_place(buffer, cape_key)
    assert type(exc.value) is DecryptionError
    assert str(exc.value) == DECRYPTION_FAILED
    assert exc.value.__cause__ is None
    assert exc.value.__context__ is None or exc.value.__suppress_context__
    assert buffer == bytearray(len(sealed))  # nothing (unauthenticated plaintext) is left
    buffer.clear()  # no view of the buffer outlives the failure


def test_wrong_key_fails_like_decrypt(
    cape_key: RSAPrivateKey, other_cape_key: RSAPrivateKey
) -> None:
    buffer = bytearray(envelope.encrypt(b"x", cape_key.public_key()))
    with pytest.raises(DecryptionError, match=DECRYPTION_FAILED):
        envelope.decrypt_in_place(buffer, other_cape_key)
    assert not any(buffer)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"nope:" + bytes(600), id="prefix"),
        pytest.param(b"cape:" + bytes(100), id="too-short"),
        pytest.param(b"cape:" + b"A" * 70 + b"!", id="bad-base64"),
    ],
)
def test_structural_errors_match_decrypt_and_leave_the_buffer(
    cape_key: RSAPrivateKey, data: bytes
) -> None:
    with pytest.raises(MalformedEnvelopeError) as expected:
        envelope.decrypt(data, cape_key)
    buffer = bytearray(data)
    with pytest.raises(MalformedEnvelopeError) as exc:
        envelope.decrypt_in_place(buffer, cape_key)
    assert str(exc.value) == str(expected.value)
    assert buffer == data
    buffer.clear()  # not left exported


def test_unwrapper_infrastructure_errors_propagate(cape_key: RSAPrivateKey) -> None:
    def down(wrapped: bytes) -> bytes:
        raise ConnectionError("key service down")

    buffer = bytearray(envelope.encrypt(b"x", cape_key.public_key()))
    with pytest.raises(ConnectionError):
        envelope.decrypt_in_place(buffer, down)
    buffer.clear()
