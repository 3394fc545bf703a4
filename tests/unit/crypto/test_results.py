"""The sealed-results channel: only the two attested parties derive it; order is enforced."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from cape.crypto import hpke, results
from cape.crypto.results import ResultChannel
from cape.crypto.session_keys import SessionKeys
from cape.errors import DecryptionError, KeyFormatError, MalformedEnvelopeError


def _pair() -> tuple[ResultChannel, ResultChannel, hpke.KeyPair, hpke.KeyPair]:
    session, response = hpke.generate_keypair(), hpke.generate_keypair()
    enclave = SessionKeys.for_enclave(session, response.public_bytes).results
    client = SessionKeys.for_client(response, session.public_bytes).results
    return enclave, client, session, response


def test_both_sides_derive_the_same_channel() -> None:
    enclave, client, _, _ = _pair()
    for sequence in range(3):
        sealed = enclave.seal(sequence, b"result %d" % sequence)
        assert client.open(sequence, sealed) == b"result %d" % sequence
    error = enclave.seal(3, b"ValueError: x", kind=results.ERROR)
    assert client.open(3, error, kind=results.ERROR) == b"ValueError: x"


def test_wrong_sequence_kind_or_bytes_do_not_open() -> None:
    enclave, client, _, _ = _pair()
    sealed = enclave.seal(0, b"reply")
    with pytest.raises(DecryptionError):
        client.open(1, sealed)  # replayed or reordered
    with pytest.raises(DecryptionError):
        client.open(0, sealed, kind=results.ERROR)  # a result passed off as an error
    tampered = bytearray(sealed)
    tampered[0] ^= 1
    with pytest.raises(DecryptionError):
        client.open(0, bytes(tampered))
    with pytest.raises(MalformedEnvelopeError):
        client.open(0, sealed[:15])


def test_someone_with_only_the_public_keys_cannot_seal_or_open() -> None:
    enclave, client, session, response = _pair()
    host = SessionKeys.derive(
        hpke.generate_keypair().private_key,
        response.public_bytes,
        session_public=session.public_bytes,
        response_public=response.public_bytes,
    ).results
    with pytest.raises(DecryptionError):
        client.open(0, host.seal(0, b"forged"))
    with pytest.raises(DecryptionError):
        host.open(0, enclave.seal(0, b"secret"))
    # The old construction (HPKE to the response key) is exactly what a host could forge.
    with pytest.raises(DecryptionError):
        client.open(0, hpke.seal(response.public_bytes, b"forged"))


def test_keys_are_bound_to_the_session() -> None:
    enclave, _, session, response = _pair()
    other = SessionKeys.derive(
        response.private_key,
        session.public_bytes,
        session_public=session.public_bytes,
        response_public=hpke.generate_keypair().public_bytes,  # another transcript
    ).results
    with pytest.raises(DecryptionError):
        other.open(0, enclave.seal(0, b"x"))


def test_bad_keys_are_refused() -> None:
    key = x25519.X25519PrivateKey.generate()
    with pytest.raises(KeyFormatError):
        SessionKeys.derive(key, b"\x00" * 32, session_public=b"", response_public=b"")
    with pytest.raises(KeyFormatError):
        SessionKeys.derive(key, b"short", session_public=b"", response_public=b"")
    with pytest.raises(KeyFormatError):
        SessionKeys.derive(
            hpke.generate_keypair(hpke.Suite.MLKEM768_X25519).private_key,
            b"\x01" * 32,
            session_public=b"",
            response_public=b"",
        )
    enclave, _, _, _ = _pair()
    with pytest.raises(ValueError, match="sequence"):
        enclave.seal(-1, b"x")
