"""Sealing (ours, issue 16): a session's two channels under AES-256-GCM (v2) when the client asks
and the document confirms; keys from the same X25519 agreement as v1's, under their own HKDF
labels, so nothing sealed under one suite opens under the other.

The vectors were computed once with ``cryptography`` 50.0.2 from the fixed private keys of
``test_session_keys`` (bytes 1..32: the enclave's session key, bytes 33..64: the client's
response key); the first test spells the documented construction out with ``cryptography``'s
HKDF and AESGCM (protocol.md "Sealing").
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cape.crypto import hpke, results
from cape.crypto.session_keys import (
    AES_256_GCM,
    CHACHA20_POLY1305,
    SEALINGS,
    InputChannel,
    Sealing,
    SessionKeys,
)
from cape.errors import DecryptionError, MalformedEnvelopeError
from tests.unit.crypto.test_session_keys import (
    INPUT_0,
    RESPONSE_PRIVATE,
    RESPONSE_PUBLIC,
    RESULT_0,
    SESSION_PRIVATE,
    SESSION_PUBLIC,
)

INPUT_KEY_V2 = "85660c2ac3644020cf5514aaae1135ec92db79c7d868bb56e006775f920fde79"
RESULTS_KEY_V2 = "3b2b0864e5e1c11044d227df479bce5dd752fa4307e9282c8aaaec5fe00d520e"
#: AES-256-GCM(key, nonce = n as 12 bytes big-endian, aad = "input" / "result") of b"hello"
INPUT_0_V2 = "c9974f78ebc05e380a14e5093ea93f0371d70c1f64"
INPUT_1_V2 = "b79493ce5c0b36a8989cb5eba89fba250e396e0f22"
RESULT_0_V2 = "a8491d1ae999d8c7f9359c17519ad858f376f17996"


def _fixed(sealing: Sealing) -> tuple[SessionKeys, SessionKeys]:
    session = x25519.X25519PrivateKey.from_private_bytes(SESSION_PRIVATE)
    response = x25519.X25519PrivateKey.from_private_bytes(RESPONSE_PRIVATE)
    session_public, response_public = bytes.fromhex(SESSION_PUBLIC), bytes.fromhex(RESPONSE_PUBLIC)
    enclave = SessionKeys.derive(
        session,
        response_public,
        session_public=session_public,
        response_public=response_public,
        sealing=sealing,
    )
    client = SessionKeys.derive(
        response,
        session_public,
        session_public=session_public,
        response_public=response_public,
        sealing=sealing,
    )
    return enclave, client


def test_the_v2_derivation_matches_its_vectors_and_the_documented_construction() -> None:
    enclave, client = _fixed(AES_256_GCM)
    assert client.inputs.seal(0, b"hello").hex() == INPUT_0_V2
    assert client.inputs.seal(1, b"hello").hex() == INPUT_1_V2
    assert enclave.results.seal(0, b"hello").hex() == RESULT_0_V2
    assert enclave.inputs.open(1, bytes.fromhex(INPUT_1_V2)) == b"hello"
    assert client.results.open(0, bytes.fromhex(RESULT_0_V2)) == b"hello"
    # spelled out: HKDF-SHA256(shared, no salt, label ‖ session public ‖ response public)
    session = x25519.X25519PrivateKey.from_private_bytes(SESSION_PRIVATE)
    shared = session.exchange(
        x25519.X25519PublicKey.from_public_bytes(bytes.fromhex(RESPONSE_PUBLIC))
    )
    publics = bytes.fromhex(SESSION_PUBLIC) + bytes.fromhex(RESPONSE_PUBLIC)
    for label, key in ((b"cape-inputs-v2", INPUT_KEY_V2), (b"cape-results-v2", RESULTS_KEY_V2)):
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label + publics)
        assert hkdf.derive(shared).hex() == key
    nonce = (1).to_bytes(12, "big")
    opened = AESGCM(bytes.fromhex(INPUT_KEY_V2)).decrypt(nonce, bytes.fromhex(INPUT_1_V2), b"input")
    assert opened == b"hello"
    nonce = (0).to_bytes(12, "big")
    aead = AESGCM(bytes.fromhex(RESULTS_KEY_V2))
    assert aead.decrypt(nonce, bytes.fromhex(RESULT_0_V2), b"result") == b"hello"


def test_v1_is_unchanged_and_the_default() -> None:
    enclave, client = _fixed(CHACHA20_POLY1305)
    assert client.inputs.seal(0, b"hello").hex() == INPUT_0
    assert enclave.results.seal(0, b"hello").hex() == RESULT_0
    assert set(SEALINGS) == {"aes-256-gcm"}  # v1 is what a session gets without asking
    assert (CHACHA20_POLY1305.results_info, CHACHA20_POLY1305.inputs_info) == (
        results.INFO,
        b"cape-inputs-v1",
    )


def test_both_sides_agree_from_their_key_pairs_under_v2() -> None:
    session, response = hpke.generate_keypair(), hpke.generate_keypair()
    enclave = SessionKeys.for_enclave(session, response.public_bytes, AES_256_GCM)
    client = SessionKeys.for_client(response, session.public_bytes, AES_256_GCM)
    for sequence in range(3):
        data = b"input %d" % sequence
        assert enclave.inputs.open(sequence, client.inputs.seal(sequence, data)) == data
        sealed = enclave.results.seal(sequence, data, kind=results.ERROR)
        assert client.results.open(sequence, sealed, kind=results.ERROR) == data


def test_a_v1_key_never_opens_a_v2_seal_nor_the_reverse() -> None:
    """Same agreement, same channel, same number: only the suite differs (its label and its
    cipher), so a host cannot move a message between the two."""
    v1_enclave, v1_client = _fixed(CHACHA20_POLY1305)
    v2_enclave, v2_client = _fixed(AES_256_GCM)
    with pytest.raises(DecryptionError):
        v2_enclave.inputs.open(0, bytes.fromhex(INPUT_0))
    with pytest.raises(DecryptionError):
        v1_enclave.inputs.open(0, bytes.fromhex(INPUT_0_V2))
    with pytest.raises(DecryptionError):
        v2_client.results.open(0, bytes.fromhex(RESULT_0))
    with pytest.raises(DecryptionError):
        v1_client.results.open(0, bytes.fromhex(RESULT_0_V2))
    # nor does either cipher under the other suite's key (one label, the other cipher)
    v1_key_under_aes = InputChannel(
        results.channel_key(
            results.x25519_shared(
                x25519.X25519PrivateKey.from_private_bytes(SESSION_PRIVATE),
                bytes.fromhex(RESPONSE_PUBLIC),
            ),
            CHACHA20_POLY1305.inputs_info,
            bytes.fromhex(SESSION_PUBLIC),
            bytes.fromhex(RESPONSE_PUBLIC),
        ),
        AESGCM,
    )
    with pytest.raises(DecryptionError):  # the labels alone keep the keys apart
        v1_key_under_aes.open(0, v2_client.inputs.seal(0, b"hello"))


def test_a_v2_message_opens_only_as_itself() -> None:
    enclave, client = _fixed(AES_256_GCM)
    first, second = client.inputs.seal(0, b"first"), client.inputs.seal(1, b"second")
    with pytest.raises(DecryptionError):
        enclave.inputs.open(0, second)  # reordered, or the first one dropped
    with pytest.raises(DecryptionError):
        enclave.inputs.open(1, first)  # replayed
    with pytest.raises(DecryptionError):
        enclave.inputs.open(0, first[:-1])  # cut
    with pytest.raises(MalformedEnvelopeError):
        enclave.inputs.open(0, first[:15])
    with pytest.raises(DecryptionError):  # a result passed off as an input: other key, aad
        enclave.inputs.open(0, enclave.results.seal(0, b"first"))
    reply = enclave.results.seal(0, b"out")
    with pytest.raises(DecryptionError):
        client.results.open(1, reply)  # replayed as the next reply
    with pytest.raises(DecryptionError):
        client.results.open(0, reply, kind=results.ERROR)  # a result passed off as an error
    with pytest.raises(MalformedEnvelopeError):
        client.results.open(0, reply[:15])


def test_channels_seal_buffers_and_views_in_place() -> None:
    """A bytearray or a memoryview (a frame's body) seals as its bytes do: nothing asks for
    a ``bytes`` copy first."""
    enclave, client = _fixed(AES_256_GCM)
    data = bytearray(b"x" * 1000)
    sealed = client.inputs.seal(0, memoryview(data)[10:])
    assert enclave.inputs.open(0, sealed) == bytes(data[10:])
    assert client.results.open(0, memoryview(enclave.results.seal(0, data))) == bytes(data)
