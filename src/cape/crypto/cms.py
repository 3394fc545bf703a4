"""CMS EnvelopedData for one RSA recipient: AWS KMS's ``CiphertextForRecipient`` format.

When a KMS call carries a ``Recipient`` (an attestation document with an RSA public key), the
answer is not plaintext but a CMS (RFC 5652) ``ContentInfo``/``EnvelopedData`` addressed to that
key (``shared/spec/nitro-attestation.md`` §3.6; ``aws-nitro-enclaves-sdk-c`` ``source/cms.c``)::

    ContentInfo { contentType id-envelopedData (1.2.840.113549.1.7.3),
      content [0] EXPLICIT EnvelopedData {
        version 2,
        recipientInfos SET SIZE (1) { KeyTransRecipientInfo {
          version 2,
          rid subjectKeyIdentifier [0] IMPLICIT OCTET STRING,
          keyEncryptionAlgorithm { id-RSAES-OAEP (1.2.840.113549.1.1.7),
            RSAES-OAEP-params { hashFunc [0] sha256, maskGenFunc [1] mgf1(sha256),
                                pSourceFunc absent (default: empty label) } },
          encryptedKey OCTET STRING (RSA-OAEP of a fresh 32-byte CEK) } },
        encryptedContentInfo { contentType id-data,
          contentEncryptionAlgorithm { aes256-CBC (2.16.840.1.101.3.4.1.42), IV OCTET STRING (16) },
          encryptedContent [0] IMPLICIT OCTET STRING (AES-256-CBC, PKCS#7 padding) } } }

- :func:`seal_for_recipient` (the KMS side) writes exactly that, in DER.
- :func:`open_for_recipient` (the enclave side) reads it in DER or BER. AWS sends BER:
  indefinite lengths and the encrypted content as a constructed string of OCTET STRING chunks;
  ``asn1crypto`` parses both. It accepts any ``rid``: the recipient has no certificate, and
  the private key either opens the message or it does not.
- Both directions interoperate with OpenSSL's ``cms`` command (tests/unit/crypto/test_cms.py),
  including its streaming BER output.

**Recipient identifier.** The recipient is an ephemeral key with no certificate, so
``issuerAndSerialNumber`` has nothing to name. We use ``subjectKeyIdentifier`` (which also
makes both version fields 2, the values AWS's parser insists on) and fill it with the
SHA-256 of the recipient's DER SubjectPublicKeyInfo: 32 bytes, computable by both sides from
the attestation document alone. (RFC 5280's method 1 hashes only the key's BIT STRING with
SHA-1; nothing here depends on the choice, since the opener does not check it.)

**No integrity on the content.** This is AWS's format, not our choice: AES-256-CBC carries no
MAC, so whoever relays the message (the untrusted host) can flip bits of the plaintext through
the IV without being noticed here. The CEK itself is OAEP-wrapped and cannot be changed. The
plaintext is a key, used at once with an AEAD (AES-GCM) whose tag catches a modified key. To
deny the relay a padding oracle, :func:`open_for_recipient` checks the unpadded length
against ``expected_length`` (default: 32, a DEK) and reports a padding error, a wrong length
and a wrong key with the same :class:`~cape.errors.DecryptionError` message. With a 32-byte
plaintext the only accepted ciphertext shape ends in a full block of padding, so a forger's
probe is a 128-bit guess, not a byte at a time.

Errors: malformed or unexpected structure raises :class:`~cape.errors.FormatError`
(algorithms not RSAES-OAEP/SHA-256/MGF1-SHA-256 and AES-256-CBC are named as found); a wrong
key, a tampered byte or a wrong length raise :class:`~cape.errors.DecryptionError` with
:data:`DECRYPTION_FAILED`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, ClassVar

from asn1crypto import algos, cms, core
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from cape.crypto.keys import load_rsa_public_key, public_key_der
from cape.errors import DecryptionError, FormatError, KeyFormatError

__all__ = [
    "CEK_SIZE",
    "DECRYPTION_FAILED",
    "DEFAULT_EXPECTED_LENGTH",
    "IV_SIZE",
    "MAX_CMS_BYTES",
    "open_for_recipient",
    "recipient_key_identifier",
    "seal_for_recipient",
]

CEK_SIZE = 32
"""Bytes in the content-encryption key (AES-256)."""

IV_SIZE = 16
"""Bytes in the AES-CBC IV (one block)."""

DEFAULT_EXPECTED_LENGTH = 32
"""What :func:`open_for_recipient` expects unless told otherwise: one 32-byte data key."""

MAX_CMS_BYTES = 65536
"""Largest message :func:`open_for_recipient` parses (KMS answers carry at most 4 KiB)."""

DECRYPTION_FAILED = "CMS decryption failed: wrong key or corrupted message"
"""The one message of every cryptographic failure (so errors are not an oracle)."""

_BLOCK_BITS = 128
_OAEP = padding.OAEP(
    mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
)
# Any decoding error asn1crypto can raise while reading a hostile message.
_DECODE_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError)


def recipient_key_identifier(recipient_spki_der: bytes) -> bytes:
    """The ``subjectKeyIdentifier`` we put in ``rid``: SHA-256 of the recipient's DER SPKI."""
    return hashlib.sha256(recipient_spki_der).digest()


# The building side writes DER directly: the message has one fixed shape, and only four fields
# vary (rid, encryptedKey, IV, encryptedContent). asn1crypto took ~5-12 ms to build it, longer
# than the RSA work of a release; tests/unit/crypto/test_cms.py checks these bytes against
# asn1crypto's encoding of the same fields and against OpenSSL's parser.
_ID_ENVELOPED_DATA = bytes.fromhex("06092a864886f70d010703")  # OID 1.2.840.113549.1.7.3
_ID_DATA = bytes.fromhex("06092a864886f70d010701")  # OID 1.2.840.113549.1.7.1
_ID_AES256_CBC = bytes.fromhex("060960864801650304012a")  # OID 2.16.840.1.101.3.4.1.42
_VERSION_2 = bytes.fromhex("020102")  # INTEGER 2
# AlgorithmIdentifier { id-RSAES-OAEP, RSAES-OAEP-params { [0] sha256 (NULL params),
#   [1] mgf1(sha256 (NULL params)) } }: the only key transport we write.
_RSAES_OAEP_SHA256 = bytes.fromhex(
    "303c06092a864886f70d010107302fa00f300d06096086480165030402010500"
    "a11c301a06092a864886f70d010108300d06096086480165030402010500"
)


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes((length,))
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(octets),)) + octets


def _tlv(tag: int, *contents: bytes) -> bytes:
    """One DER element: ``tag`` (a single identifier octet), definite length, ``contents``."""
    body = b"".join(contents)
    return bytes((tag,)) + _der_length(len(body)) + body


_SEQUENCE, _SET, _OCTET_STRING = 0x30, 0x31, 0x04
_CONTEXT_0_PRIMITIVE, _CONTEXT_0_CONSTRUCTED = 0x80, 0xA0


def _enveloped_data_der(
    subject_key_identifier: bytes, encrypted_key: bytes, iv: bytes, encrypted_content: bytes
) -> bytes:
    """The DER ``ContentInfo`` of the module docstring around these four fields."""
    recipient_info = _tlv(
        _SEQUENCE,
        _VERSION_2,
        _tlv(_CONTEXT_0_PRIMITIVE, subject_key_identifier),  # rid [0] IMPLICIT OCTET STRING
        _RSAES_OAEP_SHA256,
        _tlv(_OCTET_STRING, encrypted_key),
    )
    encrypted_content_info = _tlv(
        _SEQUENCE,
        _ID_DATA,
        _tlv(_SEQUENCE, _ID_AES256_CBC, _tlv(_OCTET_STRING, iv)),
        _tlv(_CONTEXT_0_PRIMITIVE, encrypted_content),  # [0] IMPLICIT OCTET STRING
    )
    enveloped = _tlv(_SEQUENCE, _VERSION_2, _tlv(_SET, recipient_info), encrypted_content_info)
    return _tlv(_SEQUENCE, _ID_ENVELOPED_DATA, _tlv(_CONTEXT_0_CONSTRUCTED, enveloped))


def _seal_with(plaintext: bytes, recipient_spki_der: bytes, *, cek: bytes, iv: bytes) -> bytes:
    """Seal with a caller-chosen CEK and IV. For tests only: never reuse a CEK/IV pair.

    RSA-OAEP is randomized, so ``encryptedKey`` still differs on every call.
    """
    if not isinstance(plaintext, bytes | bytearray | memoryview):
        raise TypeError(f"plaintext must be bytes, not {type(plaintext).__name__}")
    if len(cek) != CEK_SIZE or len(iv) != IV_SIZE:
        raise ValueError(f"the CEK is {CEK_SIZE} bytes and the IV {IV_SIZE}")
    spki = bytes(recipient_spki_der)
    recipient = load_rsa_public_key(spki)  # KeyFormatError: not RSA, or under 2048 bits
    if public_key_der(recipient) != spki:
        raise KeyFormatError("the recipient key must be a DER SubjectPublicKeyInfo")

    padder = sym_padding.PKCS7(_BLOCK_BITS).padder()
    padded = padder.update(bytes(plaintext)) + padder.finalize()
    encryptor = Cipher(algorithms.AES256(cek), modes.CBC(iv)).encryptor()
    encrypted_content = encryptor.update(padded) + encryptor.finalize()
    return _enveloped_data_der(
        recipient_key_identifier(spki), recipient.encrypt(cek, _OAEP), iv, encrypted_content
    )


def seal_for_recipient(plaintext: bytes, recipient_spki_der: bytes) -> bytes:
    """Encrypt ``plaintext`` to an RSA public key as DER CMS EnvelopedData (the KMS side).

    ``recipient_spki_der`` is the DER SubjectPublicKeyInfo from an attestation document's
    ``public_key``. A fresh CEK and IV are drawn for every call.

    Raises:
        KeyFormatError: the recipient key is not an RSA public key of at least 2048 bits.
    """
    return _seal_with(
        plaintext, recipient_spki_der, cek=os.urandom(CEK_SIZE), iv=os.urandom(IV_SIZE)
    )


@dataclass(frozen=True)
class _Parts:
    encrypted_key: bytes
    iv: bytes
    encrypted_content: bytes


# Reading specs. asn1crypto 1.5 cannot parse a CHOICE alternative in indefinite-length or
# constructed form (it re-reads the alternative without its end-of-contents octets), and
# RecipientInfo and RecipientIdentifier are CHOICEs. So the opener reads RecipientInfos as
# opaque elements, parses the one it accepts (a KeyTransRecipientInfo, a plain SEQUENCE) with
# the spec below, and keeps ``rid`` opaque. Every other part uses asn1crypto's own CMS specs.
class _KeyTransRecipientInfo(core.Sequence):  # type: ignore[misc]
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("version", cms.CMSVersion),
        ("rid", core.Any),
        ("key_encryption_algorithm", cms.KeyEncryptionAlgorithm),
        ("encrypted_key", core.OctetString),
    ]


class _RecipientInfos(core.SetOf):  # type: ignore[misc]
    _child_spec = core.Any


class _EnvelopedData(core.Sequence):  # type: ignore[misc]
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        (name, _RecipientInfos if name == "recipient_infos" else spec, *params)
        for name, spec, *params in cms.EnvelopedData._fields
    ]


class _ContentInfo(cms.ContentInfo):  # type: ignore[misc]
    _oid_specs: ClassVar[dict[str, type]] = {"enveloped_data": _EnvelopedData}


def _name(oid: object) -> str:
    """The name asn1crypto knows for an OID, or its dotted form."""
    native = getattr(oid, "native", None)
    return str(native) if native is not None else "absent"


def _check_oaep(key_algorithm: cms.KeyEncryptionAlgorithm) -> None:
    algorithm = _name(key_algorithm["algorithm"])
    if algorithm != "rsaes_oaep":
        raise FormatError(f"CMS key encryption algorithm is {algorithm}, expected rsaes_oaep")
    params = key_algorithm["parameters"]
    if not isinstance(params, algos.RSAESOAEPParams):
        # Absent parameters mean the SHA-1 defaults.
        raise FormatError("CMS RSAES-OAEP parameters are absent (sha1), expected sha256")
    digest = _name(params["hash_algorithm"]["algorithm"])
    if digest != "sha256":
        raise FormatError(f"CMS RSAES-OAEP hash is {digest}, expected sha256")
    mask = params["mask_gen_algorithm"]
    mask_name = _name(mask["algorithm"])
    if mask_name != "mgf1":
        raise FormatError(f"CMS RSAES-OAEP mask generation is {mask_name}, expected mgf1")
    mask_digest = _name(mask["parameters"]["algorithm"])
    if mask_digest != "sha256":
        raise FormatError(f"CMS RSAES-OAEP MGF1 hash is {mask_digest}, expected sha256")
    source = params["p_source_algorithm"]
    if _name(source["algorithm"]) != "p_specified" or source["parameters"].native != b"":
        raise FormatError("CMS RSAES-OAEP label is not empty")


def _key_trans_recipient(element: core.Any) -> _KeyTransRecipientInfo:
    try:
        ktri = element.parse(_KeyTransRecipientInfo)
    except _DECODE_ERRORS:
        try:
            kind = element.parse(cms.RecipientInfo).name
        except _DECODE_ERRORS:
            kind = None
        if kind is None or kind == "ktri":
            raise
        raise FormatError(f"CMS recipient is {kind}, expected ktri") from None
    if not isinstance(ktri, _KeyTransRecipientInfo):  # pragma: no cover - asn1crypto contract
        raise FormatError("CMS recipient is not a KeyTransRecipientInfo")
    return ktri


def _parse(data: bytes) -> _Parts:
    content_info = _ContentInfo.load(data, strict=True)
    content_type = _name(content_info["content_type"])
    if content_type != "enveloped_data":
        raise FormatError(f"CMS content type is {content_type}, expected enveloped_data")
    enveloped = content_info["content"]
    if not isinstance(enveloped, _EnvelopedData):
        raise FormatError("CMS ContentInfo holds no EnvelopedData")
    if enveloped["version"].native not in ("v0", "v2"):
        raise FormatError(f"CMS EnvelopedData version is {enveloped['version'].native}")

    infos = enveloped["recipient_infos"]
    if len(infos) != 1:
        raise FormatError(f"CMS EnvelopedData has {len(infos)} recipients, expected 1")
    ktri = _key_trans_recipient(infos[0])
    if ktri["version"].native not in ("v0", "v2"):
        raise FormatError(f"CMS KeyTransRecipientInfo version is {ktri['version'].native}")
    _check_oaep(ktri["key_encryption_algorithm"])
    encrypted_key = ktri["encrypted_key"].native
    if not isinstance(encrypted_key, bytes) or not encrypted_key:
        raise FormatError("CMS recipient carries no encrypted key")

    encrypted_info = enveloped["encrypted_content_info"]
    inner_type = _name(encrypted_info["content_type"])
    if inner_type != "data":
        raise FormatError(f"CMS encrypted content type is {inner_type}, expected data")
    content_algorithm = encrypted_info["content_encryption_algorithm"]
    cipher = _name(content_algorithm["algorithm"])
    if cipher != "aes256_cbc":
        raise FormatError(f"CMS content encryption is {cipher}, expected aes256_cbc")
    iv = content_algorithm["parameters"].native
    if not isinstance(iv, bytes) or len(iv) != IV_SIZE:
        raise FormatError(f"CMS AES-256-CBC IV must be {IV_SIZE} bytes")
    encrypted_content = encrypted_info["encrypted_content"].native
    if not isinstance(encrypted_content, bytes) or not encrypted_content:
        raise FormatError("CMS EnvelopedData carries no encrypted content")
    if len(encrypted_content) % IV_SIZE:
        raise FormatError("CMS encrypted content is not a whole number of AES blocks")
    return _Parts(encrypted_key=encrypted_key, iv=iv, encrypted_content=encrypted_content)


def open_for_recipient(
    cms_der: bytes,
    private_key: RSAPrivateKey,
    *,
    expected_length: int | None = DEFAULT_EXPECTED_LENGTH,
) -> bytes:
    """Decrypt a CMS EnvelopedData addressed to ``private_key`` (the enclave side).

    Accepts DER or BER (AWS KMS sends BER). ``expected_length`` is the exact plaintext length
    the caller expects, 32 (a data key) by default; pass ``None`` only for plaintexts of
    unknown length, knowing that AES-CBC has no integrity (see the module docstring).

    Raises:
        FormatError: not a single-recipient EnvelopedData, or algorithms other than
            RSAES-OAEP (SHA-256, MGF1-SHA-256) and AES-256-CBC (the message names them).
        DecryptionError: wrong key, tampered ciphertext, bad padding or a plaintext of the
            wrong length, always with :data:`DECRYPTION_FAILED`.
    """
    if not isinstance(private_key, RSAPrivateKey):
        raise TypeError(f"expected an RSA private key, not {type(private_key).__name__}")
    if not isinstance(cms_der, bytes | bytearray | memoryview):
        raise TypeError(f"a CMS message must be bytes, not {type(cms_der).__name__}")
    data = bytes(cms_der)
    if not data:
        raise FormatError("CMS message is empty")
    if len(data) > MAX_CMS_BYTES:
        raise FormatError(f"CMS message is {len(data)} bytes; at most {MAX_CMS_BYTES} allowed")
    try:
        parts = _parse(data)
    except FormatError:
        raise
    except (*_DECODE_ERRORS, RecursionError):
        raise FormatError("CMS message is not a valid BER/DER ContentInfo") from None

    try:
        cek = private_key.decrypt(parts.encrypted_key, _OAEP)
    except ValueError:
        raise DecryptionError(DECRYPTION_FAILED) from None
    if len(cek) != CEK_SIZE:
        raise DecryptionError(DECRYPTION_FAILED)
    decryptor = Cipher(algorithms.AES256(cek), modes.CBC(parts.iv)).decryptor()
    padded = decryptor.update(parts.encrypted_content) + decryptor.finalize()
    unpadder = sym_padding.PKCS7(_BLOCK_BITS).unpadder()
    try:
        plaintext = unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise DecryptionError(DECRYPTION_FAILED) from None
    if expected_length is not None and len(plaintext) != expected_length:
        raise DecryptionError(DECRYPTION_FAILED)
    return plaintext
