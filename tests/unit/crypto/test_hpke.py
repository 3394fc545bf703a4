from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cape.crypto import hpke
from cape.crypto.envelope import DECRYPTION_FAILED
from cape.crypto.hpke import KeyPair, Suite
from cape.errors import DecryptionError, KeyFormatError, MalformedEnvelopeError

SETTINGS = settings(deadline=None, max_examples=50, suppress_health_check=[HealthCheck.too_slow])
CLASSIC = Suite.X25519_CHACHA20
PQ = Suite.MLKEM768_X25519


@pytest.fixture(scope="module")
def classic() -> KeyPair:
    return hpke.generate_keypair()


@pytest.fixture(scope="module")
def pq() -> KeyPair:
    return hpke.generate_keypair(PQ)


@pytest.fixture(scope="module")
def hybrid_pke() -> Any:
    return pytest.importorskip("hybrid_pke")


def assert_crypto_failure(exc: pytest.ExceptionInfo[DecryptionError]) -> None:
    assert type(exc.value) is DecryptionError
    assert str(exc.value) == DECRYPTION_FAILED


# -- suites and keys ----------------------------------------------------------------------------


def test_suite_sizes() -> None:
    assert CLASSIC.enc_length == 32
    assert CLASSIC.public_key_length == 32
    assert CLASSIC.overhead == 48
    assert PQ.enc_length == 1120
    assert PQ.public_key_length == 1184 + 32
    assert PQ.overhead == 1136
    assert hpke.DEFAULT_SUITE is CLASSIC


def test_suite_values_are_stable() -> None:
    assert CLASSIC.value == "x25519-hkdf-sha256-chacha20poly1305"
    assert Suite("mlkem768x25519-hkdf-sha256-chacha20poly1305") is PQ


def test_generate_keypair(classic: KeyPair, pq: KeyPair) -> None:
    assert classic.suite is CLASSIC
    assert isinstance(classic.private_key, x25519.X25519PrivateKey)
    assert classic.public_bytes == classic.private_key.public_key().public_bytes_raw()
    assert pq.suite is PQ
    assert len(pq.public_bytes) == 1216
    assert pq.public_bytes[-32:] != classic.public_bytes


def test_load_public_key(classic: KeyPair, pq: KeyPair) -> None:
    loaded = hpke.load_public_key(classic.public_bytes)
    assert isinstance(loaded, x25519.X25519PublicKey)
    assert loaded.public_bytes_raw() == classic.public_bytes
    assert hpke.load_public_key(pq.public_bytes, PQ) is not None


@pytest.mark.parametrize("length", [0, 31, 33, 64, 1216])
def test_load_public_key_refuses_wrong_x25519_length(length: int) -> None:
    with pytest.raises(KeyFormatError, match=f"is 32 bytes, not {length}"):
        hpke.load_public_key(bytes(length))


@pytest.mark.parametrize("length", [0, 32, 1184, 1215, 1217])
def test_load_public_key_refuses_wrong_pq_length(length: int) -> None:
    with pytest.raises(KeyFormatError, match=f"is 1216 bytes, not {length}"):
        hpke.load_public_key(bytes(length), PQ)


def test_load_public_key_refuses_invalid_mlkem_key(pq: KeyPair) -> None:
    # Coefficients must be < q = 3329; 0xFFF in every 12-bit slot is out of range.
    bad = b"\xff" * 1184 + pq.public_bytes[-32:]
    with pytest.raises(KeyFormatError, match="not a valid HPKE"):
        hpke.load_public_key(bad, PQ)


def test_seal_refuses_low_order_x25519_key() -> None:
    with pytest.raises(KeyFormatError, match="unusable HPKE"):
        hpke.seal(bytes(32), b"x")


# -- round trips and wire form ------------------------------------------------------------------


@SETTINGS
@given(plaintext=st.binary(max_size=2048))
def test_classic_round_trip(classic: KeyPair, plaintext: bytes) -> None:
    sealed = hpke.seal(classic.public_bytes, plaintext)
    assert len(sealed) == 32 + len(plaintext) + 16
    assert hpke.open(classic, sealed) == plaintext
    assert hpke.open(classic.private_key, sealed) == plaintext


@settings(deadline=None, max_examples=15)
@given(plaintext=st.binary(max_size=2048))
def test_pq_round_trip(pq: KeyPair, plaintext: bytes) -> None:
    sealed = hpke.seal(pq.public_bytes, plaintext, suite=PQ)
    assert len(sealed) == 1120 + len(plaintext) + 16
    assert hpke.open(pq, sealed) == plaintext
    assert hpke.open(pq.private_key, sealed, suite=PQ) == plaintext


def test_empty_plaintext(classic: KeyPair, pq: KeyPair) -> None:
    assert hpke.open(classic, hpke.seal(classic.public_bytes, b"")) == b""
    assert hpke.open(pq, hpke.seal(pq.public_bytes, b"", suite=PQ)) == b""


def test_each_seal_uses_a_fresh_ephemeral_key(classic: KeyPair) -> None:
    a = hpke.seal(classic.public_bytes, b"same")
    b = hpke.seal(classic.public_bytes, b"same")
    assert a[:32] != b[:32]
    assert a[32:] != b[32:]


def test_suite_must_match_the_key(classic: KeyPair, pq: KeyPair) -> None:
    sealed = hpke.seal(classic.public_bytes, b"x")
    with pytest.raises(ValueError, match="does not match"):
        hpke.open(classic, sealed, suite=PQ)
    with pytest.raises(ValueError, match="does not match"):
        hpke.open(pq.private_key, sealed, suite=CLASSIC)
    inconsistent = KeyPair(suite=PQ, private_key=classic.private_key, public_bytes=b"")
    with pytest.raises(ValueError, match="does not match"):
        hpke.open(inconsistent, sealed)


# -- interop with hybrid_pke (pycape's HPKE) ----------------------------------------------------


def test_hybrid_pke_default_is_our_suite(hybrid_pke: Any) -> None:
    suite = hybrid_pke.default()
    assert suite.kem == hybrid_pke.Kem.DHKEM_X25519
    assert suite.kdf == hybrid_pke.Kdf.HKDF_SHA256
    assert suite.aead == hybrid_pke.Aead.CHACHA20_POLY1305
    assert suite.mode == hybrid_pke.Mode.BASE


@settings(deadline=None, max_examples=25)
@given(plaintext=st.binary(max_size=1024))
def test_pycape_seals_we_open(hybrid_pke: Any, plaintext: bytes) -> None:
    suite = hybrid_pke.default()
    private_raw, public_raw = suite.generate_key_pair()
    # pycape: encap, ct = hpke.seal(public_key, b"", b"", message); wire = encap + ct
    encap, ciphertext = suite.seal(public_raw, b"", b"", plaintext)
    private_key = x25519.X25519PrivateKey.from_private_bytes(bytes(private_raw))
    assert hpke.open(private_key, bytes(encap) + bytes(ciphertext)) == plaintext


# hybrid_pke 1.0.2 cannot open any empty-plaintext seal, not even its own (next test), so this
# direction starts at one byte. pycape never opens HPKE, so Cape compatibility is unaffected.
@settings(deadline=None, max_examples=25)
@given(plaintext=st.binary(min_size=1, max_size=1024))
def test_we_seal_pycape_opens(hybrid_pke: Any, classic: KeyPair, plaintext: bytes) -> None:
    suite = hybrid_pke.default()
    sealed = hpke.seal(classic.public_bytes, plaintext)
    private_raw = classic.private_key.private_bytes_raw()  # type: ignore[union-attr]
    opened = suite.open(sealed[:32], private_raw, b"", b"", sealed[32:])
    assert bytes(opened) == plaintext


def test_hybrid_pke_cannot_open_its_own_empty_seal(hybrid_pke: Any, classic: KeyPair) -> None:
    suite = hybrid_pke.default()
    private_raw, public_raw = suite.generate_key_pair()
    encap, ciphertext = suite.seal(public_raw, b"", b"", b"")
    with pytest.raises(hybrid_pke.errors.InvalidInput):
        suite.open(encap, private_raw, b"", b"", ciphertext)
    # ... while we open it (and our own empty seals) fine.
    private_key = x25519.X25519PrivateKey.from_private_bytes(bytes(private_raw))
    assert hpke.open(private_key, bytes(encap) + bytes(ciphertext)) == b""


def test_pycape_refuses_a_tampered_seal(hybrid_pke: Any, classic: KeyPair) -> None:
    suite = hybrid_pke.default()
    sealed = bytearray(hpke.seal(classic.public_bytes, b"payload"))
    sealed[-1] ^= 1
    private_raw = classic.private_key.private_bytes_raw()  # type: ignore[union-attr]
    with pytest.raises(hybrid_pke.errors.OpenError):
        suite.open(bytes(sealed[:32]), private_raw, b"", b"", bytes(sealed[32:]))


# -- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", [CLASSIC, PQ])
def test_too_short(classic: KeyPair, pq: KeyPair, suite: Suite) -> None:
    keypair = classic if suite is CLASSIC else pq
    sealed = hpke.seal(keypair.public_bytes, b"", suite=suite)
    for length in (0, 1, suite.enc_length, suite.overhead - 1):
        with pytest.raises(DecryptionError) as exc:
            hpke.open(keypair, sealed[:length])
        assert isinstance(exc.value, MalformedEnvelopeError)
        assert str(exc.value) == (
            f"HPKE ciphertext too short: {length} bytes, need at least {suite.overhead}"
        )
    assert hpke.open(keypair, sealed) == b""


@pytest.mark.parametrize("drop", [1, 5, 16])
def test_truncated_but_long_enough(classic: KeyPair, drop: int) -> None:
    sealed = hpke.seal(classic.public_bytes, b"sixteen bytes!!!")
    with pytest.raises(DecryptionError) as exc:
        hpke.open(classic, sealed[:-drop])
    assert_crypto_failure(exc)


def test_wrong_key(classic: KeyPair) -> None:
    other = hpke.generate_keypair()
    with pytest.raises(DecryptionError) as exc:
        hpke.open(other, hpke.seal(classic.public_bytes, b"secret"))
    assert_crypto_failure(exc)
    assert "secret" not in str(exc.value)


def test_wrong_pq_key(pq: KeyPair) -> None:
    other = hpke.generate_keypair(PQ)
    with pytest.raises(DecryptionError) as exc:
        hpke.open(other, hpke.seal(pq.public_bytes, b"secret", suite=PQ))
    assert_crypto_failure(exc)


@settings(deadline=None, max_examples=100)
@given(data=st.data())
def test_any_flipped_byte_is_detected(classic: KeyPair, data: st.DataObject) -> None:
    sealed = bytearray(hpke.seal(classic.public_bytes, b"attack at dawn"))
    position = data.draw(st.integers(min_value=0, max_value=len(sealed) - 1))
    sealed[position] ^= data.draw(st.integers(min_value=1, max_value=255))
    with pytest.raises(DecryptionError) as exc:
        hpke.open(classic, bytes(sealed))
    assert_crypto_failure(exc)


@pytest.mark.parametrize("position", [0, 500, 1119, 1120, 1140])
def test_flipped_pq_byte_is_detected(pq: KeyPair, position: int) -> None:
    sealed = bytearray(hpke.seal(pq.public_bytes, b"attack at dawn", suite=PQ))
    sealed[position] ^= 0x01
    with pytest.raises(DecryptionError) as exc:
        hpke.open(pq, bytes(sealed))
    assert_crypto_failure(exc)


def test_pq_ciphertext_does_not_open_under_the_classic_suite(classic: KeyPair, pq: KeyPair) -> None:
    sealed = hpke.seal(pq.public_bytes, b"post-quantum", suite=PQ)
    with pytest.raises(DecryptionError) as exc:
        hpke.open(classic, sealed)
    assert_crypto_failure(exc)


def test_classic_ciphertext_does_not_open_under_the_pq_suite(classic: KeyPair, pq: KeyPair) -> None:
    short = hpke.seal(classic.public_bytes, b"classic")
    with pytest.raises(MalformedEnvelopeError):
        hpke.open(pq, short)
    long = hpke.seal(classic.public_bytes, b"c" * 2000)
    with pytest.raises(DecryptionError) as exc:
        hpke.open(pq, long)
    assert_crypto_failure(exc)


@settings(deadline=None, max_examples=100)
@given(data=st.binary(max_size=300))
def test_garbage_raises_only_decryption_errors(classic: KeyPair, data: bytes) -> None:
    with pytest.raises(DecryptionError):
        hpke.open(classic, data)


def test_open_rejects_non_keys() -> None:
    with pytest.raises(TypeError):
        hpke.open(b"\x00" * 32, b"\x00" * 64)  # type: ignore[arg-type]
