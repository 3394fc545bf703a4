"""CMS EnvelopedData for one RSA recipient (AWS KMS's CiphertextForRecipient shape).

Cross-checked three ways: asn1crypto's own CMS specs read our DER field by field; OpenSSL's
``cms`` command opens what we seal and seals what we open (DER and its streaming BER form);
and a test-only re-encoder turns our DER into the BER AWS sends (indefinite lengths, the
encrypted content as a constructed string of OCTET STRING chunks).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from asn1crypto import algos, cms, parser
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cape.crypto.cms import (
    DECRYPTION_FAILED,
    MAX_CMS_BYTES,
    _enveloped_data_der,
    _seal_with,
    open_for_recipient,
    recipient_key_identifier,
    seal_for_recipient,
)
from cape.crypto.keys import public_key_der, public_key_pem
from cape.errors import DecryptionError, FormatError, KeyFormatError

DEK = bytes(range(32))
OID_ENVELOPED_DATA = "1.2.840.113549.1.7.3"
OID_DATA = "1.2.840.113549.1.7.1"
OID_RSAES_OAEP = "1.2.840.113549.1.1.7"
OID_MGF1 = "1.2.840.113549.1.1.8"
OID_SHA256 = "2.16.840.1.101.3.4.2.1"
OID_AES256_CBC = "2.16.840.1.101.3.4.1.42"

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl CLI")


@pytest.fixture(scope="module")
def key() -> RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key() -> RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def spki(key: RSAPrivateKey) -> bytes:
    return public_key_der(key)


@pytest.fixture(scope="module")
def sealed(spki: bytes) -> bytes:
    return seal_for_recipient(DEK, spki)


def assert_crypto_failure(exc: pytest.ExceptionInfo[DecryptionError]) -> None:
    assert type(exc.value) is DecryptionError
    assert str(exc.value) == DECRYPTION_FAILED
    assert exc.value.__cause__ is None
    assert exc.value.__context__ is None or exc.value.__suppress_context__


def rebuild(sealed: bytes, change: Callable[[cms.ContentInfo], None]) -> bytes:
    """Parse our DER, let ``change`` edit it, and re-encode (asn1crypto, never by hand)."""
    content_info = cms.ContentInfo.load(sealed)
    change(content_info)
    return bytes(content_info.dump(force=True))


def to_aws_ber(der: bytes, *, chunk: int = 7) -> bytes:
    """Re-encode DER as BER: every constructed element with an indefinite length, and every
    primitive context-specific [0] (the rid and the encrypted content, both OCTET STRINGs)
    as a constructed string of OCTET STRING chunks. Reads with asn1crypto's parser, writes
    headers with its ``emit``; only the indefinite-length header (tag, 0x80) and the
    end-of-contents octets are spelled out, as asn1crypto cannot emit them."""
    out = b""
    rest = der
    while rest:
        size = parser.peek(rest)
        element, rest = rest[:size], rest[size:]
        class_, method, tag, _header, contents, _trailer = parser.parse(element)
        assert tag < 31
        constructed_id = bytes([(class_ << 6) | 0x20 | tag])
        if method == 1:
            out += constructed_id + b"\x80" + to_aws_ber(contents, chunk=chunk) + b"\x00\x00"
        elif class_ == 2 and tag == 0 and contents:
            pieces = b"".join(
                parser.emit(0, 0, 4, contents[i : i + chunk])
                for i in range(0, len(contents), chunk)
            )
            out += constructed_id + b"\x80" + pieces + b"\x00\x00"
        else:
            out += element
    return out


# -- round trip and structure -----------------------------------------------------------


def test_round_trip_of_a_data_key(key: RSAPrivateKey, sealed: bytes) -> None:
    assert open_for_recipient(sealed, key) == DEK


@pytest.mark.parametrize("length", [0, 1, 15, 16, 17, 31, 33, 1024])
def test_round_trip_of_any_length_when_no_length_is_expected(
    key: RSAPrivateKey, spki: bytes, length: int
) -> None:
    plaintext = bytes(range(256)) * 4
    sealed = seal_for_recipient(plaintext[:length], spki)
    assert open_for_recipient(sealed, key, expected_length=None) == plaintext[:length]
    assert open_for_recipient(sealed, key, expected_length=length) == plaintext[:length]


def test_every_seal_uses_fresh_cek_and_iv(spki: bytes) -> None:
    first = cms.ContentInfo.load(seal_for_recipient(DEK, spki))["content"]
    second = cms.ContentInfo.load(seal_for_recipient(DEK, spki))["content"]
    info = "encrypted_content_info"
    assert (
        first[info]["content_encryption_algorithm"]["parameters"].native
        != second[info]["content_encryption_algorithm"]["parameters"].native
    )
    assert first[info]["encrypted_content"].native != second[info]["encrypted_content"].native


def test_structure_is_enveloped_data_with_oaep_sha256_and_aes256_cbc(
    sealed: bytes, spki: bytes
) -> None:
    content_info = cms.ContentInfo.load(sealed, strict=True)
    assert content_info["content_type"].dotted == OID_ENVELOPED_DATA
    enveloped = content_info["content"]
    assert isinstance(enveloped, cms.EnvelopedData)
    assert enveloped["version"].native == "v2"  # what AWS's cms.c insists on
    assert enveloped["originator_info"].native is None
    assert enveloped["unprotected_attrs"].native is None

    (recipient,) = enveloped["recipient_infos"]
    assert recipient.name == "ktri"
    ktri = recipient.chosen
    assert ktri["version"].native == "v2"
    assert ktri["rid"].name == "subject_key_identifier"
    assert ktri["rid"].native == hashlib.sha256(spki).digest() == recipient_key_identifier(spki)

    algorithm = ktri["key_encryption_algorithm"]
    assert algorithm["algorithm"].dotted == OID_RSAES_OAEP
    params = algorithm["parameters"]
    assert params["hash_algorithm"]["algorithm"].dotted == OID_SHA256
    assert params["mask_gen_algorithm"]["algorithm"].dotted == OID_MGF1
    assert params["mask_gen_algorithm"]["parameters"]["algorithm"].dotted == OID_SHA256
    assert params["p_source_algorithm"].native["parameters"] == b""  # the default: no label
    assert len(ktri["encrypted_key"].native) == 256  # one RSA-2048 block

    encrypted = enveloped["encrypted_content_info"]
    assert encrypted["content_type"].dotted == OID_DATA
    assert encrypted["content_encryption_algorithm"]["algorithm"].dotted == OID_AES256_CBC
    assert len(encrypted["content_encryption_algorithm"]["parameters"].native) == 16
    assert len(encrypted["encrypted_content"].native) == 48  # 32 bytes + a full padding block


def test_output_is_der(sealed: bytes) -> None:
    # Re-encoding from the parsed values (force=True) gives identical bytes only for DER.
    assert rebuild(sealed, lambda _: None) == sealed
    assert sealed[:2] == b"\x30\x82"  # definite length


def test_fixed_cek_and_iv_give_the_expected_content(key: RSAPrivateKey, spki: bytes) -> None:
    sealed = _seal_with(DEK, spki, cek=bytes(32), iv=bytes(16))
    content = cms.ContentInfo.load(sealed)["content"]["encrypted_content_info"]
    # AES-256-CBC with an all-zero key and IV over the PKCS#7-padded DEK.
    padder = sym_padding.PKCS7(128).padder()
    padded = padder.update(DEK) + padder.finalize()
    encryptor = Cipher(algorithms.AES256(bytes(32)), modes.CBC(bytes(16))).encryptor()
    assert content["encrypted_content"].native == encryptor.update(padded) + encryptor.finalize()
    assert open_for_recipient(sealed, key) == DEK


def asn1crypto_enveloped_data(
    skid: bytes, encrypted_key: bytes, iv: bytes, encrypted_content: bytes
) -> bytes:
    """The reference encoding of the same four fields, built with asn1crypto's CMS specs (what
    seal_for_recipient used before it wrote the fixed DER itself)."""
    oaep = algos.RSAESOAEPParams(
        {
            "hash_algorithm": {"algorithm": "sha256"},
            "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
        }
    )
    recipient = cms.KeyTransRecipientInfo(
        {
            "version": "v2",
            "rid": cms.RecipientIdentifier(name="subject_key_identifier", value=skid),
            "key_encryption_algorithm": {"algorithm": "rsaes_oaep", "parameters": oaep},
            "encrypted_key": encrypted_key,
        }
    )
    enveloped = cms.EnvelopedData(
        {
            "version": "v2",
            "recipient_infos": [cms.RecipientInfo(name="ktri", value=recipient)],
            "encrypted_content_info": {
                "content_type": "data",
                "content_encryption_algorithm": {"algorithm": "aes256_cbc", "parameters": iv},
                "encrypted_content": encrypted_content,
            },
        }
    )
    return bytes(cms.ContentInfo({"content_type": "enveloped_data", "content": enveloped}).dump())


@pytest.mark.parametrize("key_bits", [2048, 3072, 4096])
@pytest.mark.parametrize("length", [0, 32, 100, 111, 112, 200, 300, 5000, 70000])
def test_fixed_der_equals_asn1cryptos_encoding_of_the_same_fields(
    key_bits: int, length: int
) -> None:
    # Lengths cross every DER length-of-length step (short form, 0x81, 0x82, 0x83).
    encrypted_key = bytes(range(256)) * (key_bits // 2048) + bytes(key_bits % 2048 // 8)
    content = bytes(i % 251 for i in range(length))
    skid, iv = hashlib.sha256(b"spki").digest(), bytes(range(16))
    ours = _enveloped_data_der(skid, encrypted_key, iv, content)
    assert ours == asn1crypto_enveloped_data(skid, encrypted_key, iv, content)


def test_sealed_message_equals_asn1cryptos_encoding(key: RSAPrivateKey, spki: bytes) -> None:
    sealed = _seal_with(DEK, spki, cek=bytes(32), iv=bytes(16))
    ktri = cms.ContentInfo.load(sealed)["content"]["recipient_infos"][0].chosen
    content = cms.ContentInfo.load(sealed)["content"]["encrypted_content_info"]
    reference = asn1crypto_enveloped_data(
        recipient_key_identifier(spki),
        ktri["encrypted_key"].native,
        bytes(16),
        content["encrypted_content"].native,
    )
    assert sealed == reference
    assert open_for_recipient(sealed, key) == DEK


# -- BER, as AWS sends it -----------------------------------------------------------------


def test_ber_with_indefinite_lengths_and_chunked_content_is_accepted(
    key: RSAPrivateKey, sealed: bytes
) -> None:
    ber = to_aws_ber(sealed)
    assert ber != sealed
    assert ber.startswith(b"\x30\x80")  # indefinite-length SEQUENCE
    assert ber.count(b"\x00\x00") >= 8
    assert open_for_recipient(ber, key) == DEK


def test_ber_with_definite_recipient_infos_is_accepted(key: RSAPrivateKey, sealed: bytes) -> None:
    """AWS's own parser reads RecipientInfos with DER-only calls; that mix must work too."""
    content_info = cms.ContentInfo.load(sealed)
    enveloped = content_info["content"]
    infos_der = enveloped["recipient_infos"].dump()
    ber = to_aws_ber(sealed)
    ber_infos = to_aws_ber(infos_der)
    mixed = ber.replace(ber_infos, infos_der)
    assert mixed != ber
    assert open_for_recipient(mixed, key) == DEK


# -- interoperability with OpenSSL ----------------------------------------------------------


@pytest.fixture(scope="module")
def openssl_files(tmp_path_factory: pytest.TempPathFactory, key: RSAPrivateKey) -> Path:
    directory = tmp_path_factory.mktemp("openssl")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cape-cms-test")])
    start = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=36500))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    (directory / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return directory


def openssl_cms(*args: str | Path) -> bytes:
    result = subprocess.run(["openssl", "cms", *map(str, args)], capture_output=True, check=True)
    return result.stdout


def openssl_seal(files: Path, *options: str) -> bytes:
    (files / "dek").write_bytes(DEK)
    recipient = ("-in", files / "dek", "-recip", files / "cert.pem")
    return openssl_cms("-encrypt", "-binary", "-outform", "DER", "-aes256", *recipient, *options)


OAEP_SHA256 = ("-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256")
MGF1_SHA256 = ("-keyopt", "rsa_mgf1_md:sha256")


@needs_openssl
def test_openssl_opens_what_we_seal(openssl_files: Path, sealed: bytes) -> None:
    (openssl_files / "ours.der").write_bytes(sealed)
    opened = openssl_cms(
        "-decrypt", "-binary", "-inform", "DER", "-in", openssl_files / "ours.der",
        "-inkey", openssl_files / "key.pem",
    )  # fmt: skip
    assert opened == DEK


@needs_openssl
@pytest.mark.parametrize(
    ("options", "ber"),
    [
        ([], False),  # rid issuerAndSerialNumber: we must not require a particular rid
        (["-keyid"], False),  # rid subjectKeyIdentifier
        (["-stream", "-indef"], True),  # streaming BER, indefinite lengths
    ],
    ids=["issuer-serial", "key-id", "streaming-ber"],
)
def test_we_open_what_openssl_seals(
    openssl_files: Path, key: RSAPrivateKey, options: list[str], ber: bool
) -> None:
    sealed = openssl_seal(openssl_files, *OAEP_SHA256, *MGF1_SHA256, *options)
    assert sealed.startswith(b"\x30\x80") is ber
    assert open_for_recipient(sealed, key) == DEK


@needs_openssl
def test_openssl_default_oaep_sha1_is_refused_by_name(
    openssl_files: Path, key: RSAPrivateKey
) -> None:
    sealed = openssl_seal(openssl_files, "-keyopt", "rsa_padding_mode:oaep")
    with pytest.raises(FormatError, match="sha1"):
        open_for_recipient(sealed, key)


# -- wrong key and tampering ----------------------------------------------------------------


def test_wrong_key_is_a_decryption_error(other_key: RSAPrivateKey, sealed: bytes) -> None:
    with pytest.raises(DecryptionError) as exc:
        open_for_recipient(sealed, other_key)
    assert_crypto_failure(exc)


def _flip_encrypted_key(content_info: cms.ContentInfo) -> None:
    ktri = content_info["content"]["recipient_infos"][0].chosen
    wrapped = bytearray(ktri["encrypted_key"].native)
    wrapped[100] ^= 1
    ktri["encrypted_key"] = bytes(wrapped)


def _flip_last_block(content_info: cms.ContentInfo) -> None:
    info = content_info["content"]["encrypted_content_info"]
    content = bytearray(info["encrypted_content"].native)
    content[-1] ^= 1
    info["encrypted_content"] = bytes(content)


def _truncate_a_block(content_info: cms.ContentInfo) -> None:
    info = content_info["content"]["encrypted_content_info"]
    info["encrypted_content"] = info["encrypted_content"].native[:-16]


def _flip_second_block(content_info: cms.ContentInfo) -> None:
    # Garbles the padding block's decryption: the classic padding-oracle probe.
    info = content_info["content"]["encrypted_content_info"]
    content = bytearray(info["encrypted_content"].native)
    content[31] ^= 0x01
    info["encrypted_content"] = bytes(content)


@pytest.mark.parametrize(
    "tamper", [_flip_encrypted_key, _flip_last_block, _truncate_a_block, _flip_second_block]
)
def test_tampering_is_one_generic_decryption_error(
    key: RSAPrivateKey, sealed: bytes, tamper: Callable[[cms.ContentInfo], None]
) -> None:
    with pytest.raises(DecryptionError) as exc:
        open_for_recipient(rebuild(sealed, tamper), key)
    assert_crypto_failure(exc)


def test_unexpected_length_is_the_same_generic_error(key: RSAPrivateKey, spki: bytes) -> None:
    for plaintext in (DEK[:31], DEK + b"!", DEK[:16]):
        with pytest.raises(DecryptionError) as exc:
            open_for_recipient(seal_for_recipient(plaintext, spki), key)
        assert_crypto_failure(exc)


def test_iv_tampering_is_undetected_by_cbc_as_documented(key: RSAPrivateKey, sealed: bytes) -> None:
    """AWS's format has no MAC: a relay can flip plaintext bits through the IV. The result is
    a different key, which the AES-GCM data it unlocks then rejects (documented limitation)."""

    def flip_iv(content_info: cms.ContentInfo) -> None:
        algorithm = content_info["content"]["encrypted_content_info"][
            "content_encryption_algorithm"
        ]
        iv = bytearray(algorithm["parameters"].native)
        iv[0] ^= 0xFF
        algorithm["parameters"] = bytes(iv)

    opened = open_for_recipient(rebuild(sealed, flip_iv), key)
    assert opened != DEK
    assert opened[0] == DEK[0] ^ 0xFF
    assert opened[1:] == DEK[1:]


# -- malformed input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"garbage that is not ASN.1 at all",
        b"\x30\x03\x02\x01\x00",  # a SEQUENCE, but not a ContentInfo
        b"\x30\x80",  # indefinite length, never ended
    ],
)
def test_garbage_is_a_format_error(key: RSAPrivateKey, data: bytes) -> None:
    with pytest.raises(FormatError):
        open_for_recipient(data, key)


def test_every_truncation_is_a_format_error(key: RSAPrivateKey, sealed: bytes) -> None:
    for length in range(len(sealed)):
        with pytest.raises(FormatError):
            open_for_recipient(sealed[:length], key)


def test_trailing_bytes_are_a_format_error(key: RSAPrivateKey, sealed: bytes) -> None:
    with pytest.raises(FormatError):
        open_for_recipient(sealed + b"\x00", key)


def test_oversized_input_is_refused_before_parsing(key: RSAPrivateKey) -> None:
    with pytest.raises(FormatError, match="at most"):
        open_for_recipient(b"\x30" * (MAX_CMS_BYTES + 1), key)


def test_other_content_type_is_named(key: RSAPrivateKey) -> None:
    data = cms.ContentInfo({"content_type": "data", "content": b"hello"}).dump()
    with pytest.raises(FormatError, match="content type is data"):
        open_for_recipient(data, key)


def _set_oaep_hash(name: str) -> Callable[[cms.ContentInfo], None]:
    def change(content_info: cms.ContentInfo) -> None:
        ktri = content_info["content"]["recipient_infos"][0].chosen
        ktri["key_encryption_algorithm"] = {
            "algorithm": "rsaes_oaep",
            "parameters": {
                "hash_algorithm": {"algorithm": name},
                "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
            },
        }

    return change


def _set_mgf1_hash(content_info: cms.ContentInfo) -> None:
    ktri = content_info["content"]["recipient_infos"][0].chosen
    ktri["key_encryption_algorithm"] = {
        "algorithm": "rsaes_oaep",
        "parameters": {
            "hash_algorithm": {"algorithm": "sha256"},
            "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha1"}},
        },
    }


def _set_oaep_label(content_info: cms.ContentInfo) -> None:
    ktri = content_info["content"]["recipient_infos"][0].chosen
    ktri["key_encryption_algorithm"] = {
        "algorithm": "rsaes_oaep",
        "parameters": {
            "hash_algorithm": {"algorithm": "sha256"},
            "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
            "p_source_algorithm": {"algorithm": "p_specified", "parameters": b"label"},
        },
    }


def _drop_oaep_parameters(content_info: cms.ContentInfo) -> None:
    ktri = content_info["content"]["recipient_infos"][0].chosen
    ktri["key_encryption_algorithm"] = {"algorithm": "rsaes_oaep"}


def _use_pkcs1v15(content_info: cms.ContentInfo) -> None:
    ktri = content_info["content"]["recipient_infos"][0].chosen
    ktri["key_encryption_algorithm"] = {"algorithm": "rsaes_pkcs1v15"}


def _set_cipher(name: str) -> Callable[[cms.ContentInfo], None]:
    def change(content_info: cms.ContentInfo) -> None:
        info = content_info["content"]["encrypted_content_info"]
        iv = info["content_encryption_algorithm"]["parameters"].native
        info["content_encryption_algorithm"] = {"algorithm": name, "parameters": iv}

    return change


def _short_iv(content_info: cms.ContentInfo) -> None:
    info = content_info["content"]["encrypted_content_info"]
    info["content_encryption_algorithm"] = {"algorithm": "aes256_cbc", "parameters": b"\x00" * 8}


def _drop_content(content_info: cms.ContentInfo) -> None:
    info = content_info["content"]["encrypted_content_info"]
    info["encrypted_content"] = None


def _ragged_content(content_info: cms.ContentInfo) -> None:
    info = content_info["content"]["encrypted_content_info"]
    info["encrypted_content"] = info["encrypted_content"].native[:-1]


def _inner_type(content_info: cms.ContentInfo) -> None:
    content_info["content"]["encrypted_content_info"]["content_type"] = "signed_data"


def _two_recipients(content_info: cms.ContentInfo) -> None:
    infos = content_info["content"]["recipient_infos"]
    first = infos[0]
    content_info["content"]["recipient_infos"] = [first, first]


def _no_recipients(content_info: cms.ContentInfo) -> None:
    content_info["content"]["recipient_infos"] = []


def _kekri(content_info: cms.ContentInfo) -> None:
    kekri = cms.KEKRecipientInfo(
        {
            "version": "v4",
            "kekid": {"key_identifier": b"k"},
            "key_encryption_algorithm": {"algorithm": "aes256_wrap"},
            "encrypted_key": bytes(40),
        }
    )
    content_info["content"]["recipient_infos"] = [cms.RecipientInfo(name="kekri", value=kekri)]


def _bad_version(content_info: cms.ContentInfo) -> None:
    content_info["content"]["version"] = "v3"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (_set_oaep_hash("sha1"), "hash is sha1"),
        (_set_oaep_hash("sha384"), "hash is sha384"),
        (_set_mgf1_hash, "MGF1 hash is sha1"),
        (_set_oaep_label, "label is not empty"),
        (_drop_oaep_parameters, "absent"),
        (_use_pkcs1v15, "rsaes_pkcs1v15"),
        (_set_cipher("aes128_cbc"), "aes128_cbc"),
        (_set_cipher("aes256_ofb"), "aes256_ofb"),
        (_set_cipher("tripledes_3key"), "tripledes_3key"),
        (_short_iv, "IV must be 16 bytes"),
        (_drop_content, "no encrypted content"),
        (_ragged_content, "whole number of AES blocks"),
        (_inner_type, "encrypted content type is signed_data"),
        (_two_recipients, "2 recipients"),
        (_no_recipients, "0 recipients"),
        (_kekri, "recipient is kekri"),
        (_bad_version, "version is v3"),
    ],
)
def test_wrong_structure_or_algorithm_is_a_format_error_naming_it(
    key: RSAPrivateKey, sealed: bytes, change: Callable[[cms.ContentInfo], None], named: str
) -> None:
    with pytest.raises(FormatError) as exc:
        open_for_recipient(rebuild(sealed, change), key)
    assert named in str(exc.value)
    assert not isinstance(exc.value, DecryptionError)


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutations_raise_only_cape_errors(
    key: RSAPrivateKey, sealed: bytes, data: st.DataObject
) -> None:
    mutated = bytearray(sealed)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(mutated) - 1))
        mutated[position] = data.draw(st.integers(0, 255))
    try:
        opened = open_for_recipient(bytes(mutated), key)
    except (FormatError, DecryptionError):
        return
    # Only IV changes, or changes that leave the meaning intact, may still open.
    assert len(opened) == 32


# -- the sealing side -----------------------------------------------------------------------


def test_seal_refuses_keys_that_are_not_der_rsa_spki(key: RSAPrivateKey) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pkcs1 = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1
    )
    bad = [
        public_key_der(small),
        public_key_pem(key),
        pkcs1,
        x25519.X25519PrivateKey.generate().public_key().public_bytes_raw(),
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
    ]
    for candidate in bad:
        with pytest.raises(KeyFormatError):
            seal_for_recipient(DEK, candidate)


def test_open_requires_an_rsa_private_key(sealed: bytes) -> None:
    with pytest.raises(TypeError):
        open_for_recipient(sealed, ec.generate_private_key(ec.SECP256R1()))  # type: ignore[arg-type]
