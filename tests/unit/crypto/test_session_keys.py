"""Sealed inputs (ours, issue 16): the input key is the results key's twin from the same X25519
agreement; input *n* opens only as input *n* of its session, and only the two attested parties
can seal one.

The vectors below were computed once with ``cryptography`` 50.0.2 (X25519, HKDF-SHA256,
ChaCha20-Poly1305) from two fixed private keys (bytes 1..32: the enclave's session key, bytes
33..64: the client's response key); they pin the derivation in protocol.md "Sealed inputs".
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from cape.crypto import hpke, results
from cape.crypto.results import ResultChannel
from cape.crypto.session_keys import InputChannel, SessionKeys
from cape.errors import DecryptionError, KeyFormatError, MalformedEnvelopeError

SESSION_PRIVATE = bytes(range(1, 33))
RESPONSE_PRIVATE = bytes(range(33, 65))
SESSION_PUBLIC = "07a37cbc142093c8b755dc1b10e86cb426374ad16aa853ed0bdfc0b2b86d1c7c"
RESPONSE_PUBLIC = "5869aff450549732cbaaed5e5df9b30a6da31cb0e5742bad5ad4a1a768f1a67b"
INPUT_KEY = "15a06a081d1098e0d2671af93f6f88f32e4ad8dad94e161631d7710eb205a34c"
#: ChaCha20-Poly1305(INPUT_KEY, nonce = n as 12 bytes big-endian, aad = "input") of b"hello"
INPUT_0 = "07c38bb013e80d625a9d4aa328d7ce5ed7983928b9"
INPUT_1 = "e5513e5be78987577f563cac9e7fe8e96cd65e6349"
#: The results channel's reply 0 of b"hello" (its key: info "cape-results-v1"), unchanged.
RESULT_0 = "2163e6f28610a4d76dc3e2ca73411623bc67ec1726"


def _fixed() -> tuple[SessionKeys, SessionKeys]:
    session = x25519.X25519PrivateKey.from_private_bytes(SESSION_PRIVATE)
    response = x25519.X25519PrivateKey.from_private_bytes(RESPONSE_PRIVATE)
    session_public = session.public_key().public_bytes_raw()
    response_public = response.public_key().public_bytes_raw()
    assert (session_public.hex(), response_public.hex()) == (SESSION_PUBLIC, RESPONSE_PUBLIC)
    enclave = SessionKeys.derive(
        session, response_public, session_public=session_public, response_public=response_public
    )
    client = SessionKeys.derive(
        response, session_public, session_public=session_public, response_public=response_public
    )
    return enclave, client


def test_the_derivation_matches_its_vectors() -> None:
    enclave, client = _fixed()
    assert client.inputs.seal(0, b"hello").hex() == INPUT_0
    assert client.inputs.seal(1, b"hello").hex() == INPUT_1
    assert enclave.inputs.open(0, bytes.fromhex(INPUT_0)) == b"hello"
    # the documented construction, spelled out with cryptography's AEAD and the vector's key
    aead = ChaCha20Poly1305(bytes.fromhex(INPUT_KEY))
    assert aead.decrypt((1).to_bytes(12, "big"), bytes.fromhex(INPUT_1), b"input") == b"hello"
    # the results half is the channel sealed results always used
    assert enclave.results.seal(0, b"hello").hex() == RESULT_0
    session = x25519.X25519PrivateKey.from_private_bytes(SESSION_PRIVATE)
    alone = ResultChannel(
        results.channel_key(
            results.x25519_shared(session, bytes.fromhex(RESPONSE_PUBLIC)),
            results.INFO,
            bytes.fromhex(SESSION_PUBLIC),
            bytes.fromhex(RESPONSE_PUBLIC),
        )
    )
    assert alone.open(0, bytes.fromhex(RESULT_0)) == b"hello"


def test_both_sides_agree_from_their_key_pairs() -> None:
    session, response = hpke.generate_keypair(), hpke.generate_keypair()
    enclave = SessionKeys.for_enclave(session, response.public_bytes)
    client = SessionKeys.for_client(response, session.public_bytes)
    for sequence in range(3):
        data = b"input %d" % sequence
        assert enclave.inputs.open(sequence, client.inputs.seal(sequence, data)) == data
    assert client.results.open(0, enclave.results.seal(0, b"out")) == b"out"


def test_an_input_opens_only_as_itself() -> None:
    enclave, client = _fixed()
    first, second = client.inputs.seal(0, b"first"), client.inputs.seal(1, b"second")
    with pytest.raises(DecryptionError):
        enclave.inputs.open(0, second)  # reordered, or the first one dropped
    with pytest.raises(DecryptionError):
        enclave.inputs.open(1, first)  # replayed
    with pytest.raises(DecryptionError):
        enclave.inputs.open(0, first[:-1])  # truncated
    with pytest.raises(MalformedEnvelopeError):
        enclave.inputs.open(0, first[:15])
    with pytest.raises(DecryptionError):  # a result passed off as an input: other key, aad
        enclave.inputs.open(0, enclave.results.seal(0, b"first"))
    with pytest.raises(ValueError, match="sequence"):
        client.inputs.seal(-1, b"x")


def test_someone_with_only_the_public_keys_cannot_seal_an_input() -> None:
    session, response = hpke.generate_keypair(), hpke.generate_keypair()
    enclave = SessionKeys.for_enclave(session, response.public_bytes)
    with pytest.raises(DecryptionError):  # what base-mode HPKE lets anyone do
        enclave.inputs.open(0, hpke.seal(session.public_bytes, b"injected"))
    host = SessionKeys.derive(
        hpke.generate_keypair().private_key,
        session.public_bytes,
        session_public=session.public_bytes,
        response_public=response.public_bytes,
    )
    with pytest.raises(DecryptionError):
        enclave.inputs.open(0, host.inputs.seal(0, b"forged"))
    other = SessionKeys.for_client(response, hpke.generate_keypair().public_bytes)
    with pytest.raises(DecryptionError):  # another session's input
        enclave.inputs.open(0, other.inputs.seal(0, b"elsewhere"))


def test_bad_keys_are_refused() -> None:
    key = x25519.X25519PrivateKey.generate()
    with pytest.raises(KeyFormatError):
        SessionKeys.derive(key, b"\x00" * 32, session_public=b"", response_public=b"")
    with pytest.raises(KeyFormatError):
        SessionKeys.derive(
            hpke.generate_keypair(hpke.Suite.MLKEM768_X25519).private_key,
            b"\x01" * 32,
            session_public=b"",
            response_public=b"",
        )
    assert isinstance(InputChannel(bytes(32)).seal(0, b""), bytes)
