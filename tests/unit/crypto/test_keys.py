from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from cape.crypto import keys
from cape.errors import KeyFormatError

Enc = serialization.Encoding
PubFmt = serialization.PublicFormat
PrivFmt = serialization.PrivateFormat


@pytest.fixture(scope="module")
def small_rsa_key() -> RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


def _assert_one_line(exc: pytest.ExceptionInfo[KeyFormatError]) -> str:
    message = str(exc.value)
    assert message
    assert "\n" not in message
    # Never the library's own wording.
    assert "Could not deserialize" not in message
    assert "cryptography.io" not in message
    return message


def test_generated_cape_key_is_rsa_4096_e65537(cape_key: RSAPrivateKey) -> None:
    assert keys.CAPE_KEY_BITS == 4096
    assert cape_key.key_size == 4096
    assert cape_key.private_numbers().public_numbers.e == 65537


def test_public_key_der_is_spki(cape_key: RSAPrivateKey) -> None:
    expected = cape_key.public_key().public_bytes(Enc.DER, PubFmt.SubjectPublicKeyInfo)
    assert keys.public_key_der(cape_key) == expected
    assert keys.public_key_der(cape_key.public_key()) == expected


def test_public_key_pem_is_spki(cape_key: RSAPrivateKey) -> None:
    pem = keys.public_key_pem(cape_key)
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----\n")
    assert pem == cape_key.public_key().public_bytes(Enc.PEM, PubFmt.SubjectPublicKeyInfo)


@pytest.mark.parametrize(
    ("encoding", "fmt"),
    [
        (Enc.DER, PubFmt.SubjectPublicKeyInfo),
        (Enc.PEM, PubFmt.SubjectPublicKeyInfo),
        (Enc.PEM, PubFmt.PKCS1),
        (Enc.DER, PubFmt.PKCS1),
    ],
)
def test_loads_public_key_forms(
    cape_key: RSAPrivateKey, encoding: serialization.Encoding, fmt: serialization.PublicFormat
) -> None:
    data = cape_key.public_key().public_bytes(encoding, fmt)
    loaded = keys.load_rsa_public_key(data)
    assert loaded.public_numbers() == cape_key.public_key().public_numbers()


def test_pkcs1_pem_has_the_rsa_public_key_label(cape_key: RSAPrivateKey) -> None:
    data = cape_key.public_key().public_bytes(Enc.PEM, PubFmt.PKCS1)
    assert data.startswith(b"-----BEGIN RSA PUBLIC KEY-----")
    assert keys.load_rsa_public_key(data).key_size == 4096


def test_loads_pem_with_leading_whitespace(cape_key: RSAPrivateKey) -> None:
    data = b"\n  " + keys.public_key_pem(cape_key)
    assert keys.load_rsa_public_key(data).key_size == 4096


@pytest.mark.parametrize(
    "make",
    [
        lambda: ec.generate_private_key(ec.SECP256R1()).public_key(),
        lambda: ed25519.Ed25519PrivateKey.generate().public_key(),
    ],
    ids=["p256", "ed25519"],
)
@pytest.mark.parametrize("encoding", [Enc.DER, Enc.PEM])
def test_refuses_non_rsa_public_keys(
    make: Callable[[], ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey],
    encoding: serialization.Encoding,
) -> None:
    data = make().public_bytes(encoding, PubFmt.SubjectPublicKeyInfo)
    with pytest.raises(KeyFormatError) as exc:
        keys.load_rsa_public_key(data)
    assert "expected an RSA public key" in _assert_one_line(exc)


@pytest.mark.parametrize("encoding", [Enc.DER, Enc.PEM])
def test_refuses_small_rsa_public_key(
    small_rsa_key: RSAPrivateKey, encoding: serialization.Encoding
) -> None:
    data = small_rsa_key.public_key().public_bytes(encoding, PubFmt.SubjectPublicKeyInfo)
    with pytest.raises(KeyFormatError) as exc:
        keys.load_rsa_public_key(data)
    assert _assert_one_line(exc) == "RSA key is 1024 bits; at least 2048 bits are required"


@pytest.mark.parametrize(
    ("data", "form"),
    [
        (b"", "DER"),
        (b"garbage", "DER"),
        (b"\x30\x82\x02\x22\x30", "DER"),
        (b"-----BEGIN PUBLIC KEY-----\nnot base64!\n-----END PUBLIC KEY-----\n", "PEM"),
        (b"-----BEGIN PUBLIC KEY-----\n", "PEM"),
    ],
)
def test_refuses_garbage_public_key(data: bytes, form: str) -> None:
    with pytest.raises(KeyFormatError) as exc:
        keys.load_rsa_public_key(data)
    assert f"not a valid {form} public key" in _assert_one_line(exc)


def test_refuses_truncated_der_public_key(cape_key: RSAPrivateKey) -> None:
    der = keys.public_key_der(cape_key)
    with pytest.raises(KeyFormatError):
        keys.load_rsa_public_key(der[:-1])


def test_public_loader_refuses_a_private_key(cape_key: RSAPrivateKey) -> None:
    pem = cape_key.private_bytes(Enc.PEM, PrivFmt.PKCS8, serialization.NoEncryption())
    with pytest.raises(KeyFormatError) as exc:
        keys.load_rsa_public_key(pem)
    _assert_one_line(exc)
    assert b"PRIVATE" not in str(exc.value).encode()


def test_public_loader_rejects_str() -> None:
    with pytest.raises(TypeError):
        keys.load_rsa_public_key("-----BEGIN PUBLIC KEY-----")  # type: ignore[arg-type]


def test_loads_public_key_file(cape_key: RSAPrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "cape.pub.pem"
    path.write_bytes(keys.public_key_pem(cape_key))
    assert keys.load_rsa_public_key_file(path).key_size == 4096
    der_path = tmp_path / "cape.der"
    der_path.write_bytes(keys.public_key_der(cape_key))
    assert keys.load_rsa_public_key_file(der_path).key_size == 4096


def test_missing_key_file_is_a_key_format_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.pem"
    with pytest.raises(KeyFormatError) as exc:
        keys.load_rsa_public_key_file(path)
    message = _assert_one_line(exc)
    assert message.startswith(f"cannot read key file {path}: ")
    assert "No such file" in message


def test_directory_key_file_is_a_key_format_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFormatError) as exc:
        keys.load_rsa_public_key_file(tmp_path)
    assert _assert_one_line(exc).startswith("cannot read key file")


def test_bad_key_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.pem"
    path.write_bytes(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(KeyFormatError) as exc:
        keys.load_rsa_public_key_file(path)
    assert _assert_one_line(exc).startswith(f"{path}: not a valid PEM public key")


@pytest.mark.parametrize(
    ("encoding", "fmt"),
    [(Enc.PEM, PrivFmt.PKCS8), (Enc.DER, PrivFmt.PKCS8), (Enc.PEM, PrivFmt.TraditionalOpenSSL)],
)
def test_loads_private_key_forms(
    cape_key: RSAPrivateKey, encoding: serialization.Encoding, fmt: serialization.PrivateFormat
) -> None:
    data = cape_key.private_bytes(encoding, fmt, serialization.NoEncryption())
    loaded = keys.load_rsa_private_key(data)
    assert loaded.private_numbers() == cape_key.private_numbers()


@pytest.mark.parametrize("encoding", [Enc.PEM, Enc.DER])
def test_refuses_encrypted_private_key(
    small_rsa_key: RSAPrivateKey, encoding: serialization.Encoding
) -> None:
    data = small_rsa_key.private_bytes(
        encoding, PrivFmt.PKCS8, serialization.BestAvailableEncryption(b"secret")
    )
    with pytest.raises(KeyFormatError) as exc:
        keys.load_rsa_private_key(data)
    assert "encrypted" in _assert_one_line(exc)


def test_refuses_non_rsa_private_key() -> None:
    data = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        Enc.PEM, PrivFmt.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(KeyFormatError) as exc:
        keys.load_rsa_private_key(data)
    assert "expected an RSA private key" in _assert_one_line(exc)


def test_refuses_small_rsa_private_key(small_rsa_key: RSAPrivateKey) -> None:
    data = small_rsa_key.private_bytes(Enc.DER, PrivFmt.PKCS8, serialization.NoEncryption())
    with pytest.raises(KeyFormatError) as exc:
        keys.load_rsa_private_key(data)
    assert "1024 bits" in _assert_one_line(exc)


@pytest.mark.parametrize(
    ("data", "form"),
    [
        (b"", "DER"),
        (b"\x00\x01\x02", "DER"),
        # A PEM frame around garbage, spelled in parts so no key-shaped text sits in git.
        (b"-----BEGIN PRIVATE " + b"KEY-----\nAAAA\n-----END PRIVATE " + b"KEY-----\n", "PEM"),
    ],
)
def test_refuses_garbage_private_key(data: bytes, form: str) -> None:
    with pytest.raises(KeyFormatError) as exc:
        keys.load_rsa_private_key(data)
    assert f"not a valid {form} private key" in _assert_one_line(exc)


def test_private_loader_refuses_a_public_key(cape_key: RSAPrivateKey) -> None:
    with pytest.raises(KeyFormatError):
        keys.load_rsa_private_key(keys.public_key_pem(cape_key))


def test_check_rsa_public_key(cape_key: RSAPrivateKey, small_rsa_key: RSAPrivateKey) -> None:
    public = cape_key.public_key()
    assert keys.check_rsa_public_key(public) is public
    with pytest.raises(KeyFormatError, match="expected an RSA public key, got RSAPrivateKey"):
        keys.check_rsa_public_key(cape_key)
    with pytest.raises(KeyFormatError, match="1024 bits"):
        keys.check_rsa_public_key(small_rsa_key.public_key())
