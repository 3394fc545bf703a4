"""The AWS Nitro Enclaves attestation document: payload model, parser and encoder.

Pure bytes <-> model. The rules are the table in ``shared/spec/nitro-attestation.md`` §3.2,
checked row by row in :func:`parse_attestation_payload`; anything that does not satisfy them
raises :class:`~cape.errors.FormatError`, so a parsed :class:`AttestationDocument` is always
structurally valid. Whether it is *trustworthy* is the verifier's job (``cape.verify``).

The encoder reproduces the Nitro Secure Module's bytes exactly: keys in NSM order, PCRs in
ascending index order, absent optional fields as CBOR ``null``. Re-encoding a parsed real
document gives back the identical payload.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import cbor2

from cape.errors import FormatError
from cape.formats.cose import (
    ALG_ES384,
    ES384_SIGNATURE_BYTES,
    CoseSign1,
    loads_cbor,
    parse_cose_sign1,
)

__all__ = [
    "DIGEST",
    "MAX_DOCUMENT_BYTES",
    "MAX_PAYLOAD_BYTES",
    "AttestationDocument",
    "SignedAttestation",
    "decode_document_bytes",
    "encode_attestation_payload",
    "parse_attestation",
    "parse_attestation_payload",
]

DIGEST = "SHA384"
MAX_PAYLOAD_BYTES = 16384
#: A COSE_Sign1 adds a few bytes of framing, the protected header and a 96-byte signature.
MAX_DOCUMENT_BYTES = MAX_PAYLOAD_BYTES + 1024
MAX_CERT_BYTES = 1024
MAX_PUBLIC_KEY_BYTES = 1024
#: The CDDL says 1024, the validation text 512; a real NSM emits 1024 (see the samples).
MAX_USER_DATA_BYTES = 1024
MAX_NONCE_BYTES = 1024
MAX_PCRS = 32
PCR_LENGTHS = frozenset({32, 48, 64})

FIELDS = (
    "module_id",
    "digest",
    "timestamp",
    "pcrs",
    "certificate",
    "cabundle",
    "public_key",
    "user_data",
    "nonce",
)


@dataclass(frozen=True)
class AttestationDocument:
    """The payload of a Nitro attestation document (``AttestationDoc`` in nsm-api)."""

    module_id: str
    timestamp: int
    """Milliseconds since the Unix epoch, UTC, as the NSM writes it."""
    pcrs: Mapping[int, bytes]
    certificate: bytes
    """DER of the certificate whose key signed the document."""
    cabundle: tuple[bytes, ...]
    """DER certificates ordered root first, then each intermediate down to the leaf's issuer."""
    public_key: bytes | None = None
    user_data: bytes | None = None
    nonce: bytes | None = None
    digest: str = DIGEST
    _frozen_pcrs: Mapping[int, bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        frozen = MappingProxyType(dict(sorted(self.pcrs.items())))
        object.__setattr__(self, "pcrs", frozen)
        object.__setattr__(self, "_frozen_pcrs", frozen)
        object.__setattr__(self, "cabundle", tuple(self.cabundle))

    @property
    def issued_at(self) -> dt.datetime:
        """``timestamp`` as an aware UTC datetime."""
        return dt.datetime.fromtimestamp(self.timestamp / 1000, tz=dt.UTC)

    @property
    def is_debug(self) -> bool:
        """True for a debug-mode enclave: PCR0 absent or all zeros.

        Nitro zeroes PCR0, PCR1 and PCR2 in debug mode but keeps PCR3 and PCR4, so "all PCRs
        zero" would be the wrong test.
        """
        pcr0 = self.pcrs.get(0)
        return pcr0 is None or not any(pcr0)


@dataclass(frozen=True)
class SignedAttestation:
    """A parsed COSE_Sign1 attestation document: the envelope and its decoded payload."""

    cose: CoseSign1
    document: AttestationDocument
    raw: bytes


def _check_bstr(value: Any, name: str, low: int, high: int) -> bytes:
    if not isinstance(value, bytes):
        raise FormatError(f"attestation field {name!r} must be a byte string")
    if not low <= len(value) <= high:
        raise FormatError(
            f"attestation field {name!r} is {len(value)} bytes; allowed {low}..{high}"
        )
    return value


def _check_optional_bstr(value: Any, name: str, low: int, high: int) -> bytes | None:
    if value is None:
        return None
    return _check_bstr(value, name, low, high)


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_attestation_payload(payload: bytes) -> AttestationDocument:
    """Decode and structurally validate the CBOR payload of an attestation document."""
    if not 1 <= len(payload) <= MAX_PAYLOAD_BYTES:
        raise FormatError(
            f"attestation payload is {len(payload)} bytes; allowed 1..{MAX_PAYLOAD_BYTES}"
        )
    item = loads_cbor(payload, "attestation payload")
    if not isinstance(item, dict):
        raise FormatError("attestation payload must be a CBOR map")
    missing = [name for name in FIELDS if name not in item]
    if missing:
        raise FormatError(f"attestation payload lacks field(s): {', '.join(missing)}")
    unknown = [repr(key) for key in item if key not in FIELDS]
    if unknown:
        raise FormatError(f"attestation payload has unknown field(s): {', '.join(unknown)}")

    module_id = item["module_id"]
    if not isinstance(module_id, str) or not module_id:
        raise FormatError("attestation field 'module_id' must be a non-empty text string")
    if item["digest"] != DIGEST:
        raise FormatError(f"attestation field 'digest' must be {DIGEST!r}")
    timestamp = item["timestamp"]
    if not _is_uint(timestamp) or timestamp == 0 or timestamp >= 2**64:
        raise FormatError("attestation field 'timestamp' must be a positive integer (ms)")

    pcrs = item["pcrs"]
    if not isinstance(pcrs, dict) or not 1 <= len(pcrs) <= MAX_PCRS:
        raise FormatError(f"attestation field 'pcrs' must be a map of 1..{MAX_PCRS} entries")
    for index, value in pcrs.items():
        if not _is_uint(index) or index >= MAX_PCRS:
            raise FormatError(f"PCR index {index!r} is outside 0..{MAX_PCRS - 1}")
        if not isinstance(value, bytes) or len(value) not in PCR_LENGTHS:
            raise FormatError(f"PCR{index} must be a byte string of 32, 48 or 64 bytes")

    certificate = _check_bstr(item["certificate"], "certificate", 1, MAX_CERT_BYTES)
    cabundle = item["cabundle"]
    if not isinstance(cabundle, list) or not cabundle:
        raise FormatError("attestation field 'cabundle' must be a non-empty array")
    bundle = tuple(
        _check_bstr(cert, f"cabundle[{i}]", 1, MAX_CERT_BYTES) for i, cert in enumerate(cabundle)
    )
    document = AttestationDocument(
        module_id=module_id,
        digest=DIGEST,
        timestamp=timestamp,
        pcrs=pcrs,
        certificate=certificate,
        cabundle=bundle,
        public_key=_check_optional_bstr(item["public_key"], "public_key", 1, MAX_PUBLIC_KEY_BYTES),
        user_data=_check_optional_bstr(item["user_data"], "user_data", 0, MAX_USER_DATA_BYTES),
        nonce=_check_optional_bstr(item["nonce"], "nonce", 0, MAX_NONCE_BYTES),
    )
    # One document, one encoding: refuse anything the NSM would not have written (CBOR tags
    # such as a bignum timestamp, non-minimal lengths, other key orders), so two parsers can
    # never read the same signed bytes differently.
    if _encode(document) != payload:
        raise FormatError("attestation payload is not in the canonical NSM encoding")
    return document


def _encode(document: AttestationDocument) -> bytes:
    body = {
        "module_id": document.module_id,
        "digest": document.digest,
        "timestamp": document.timestamp,
        "pcrs": dict(sorted(document.pcrs.items())),
        "certificate": document.certificate,
        "cabundle": list(document.cabundle),
        "public_key": document.public_key,
        "user_data": document.user_data,
        "nonce": document.nonce,
    }
    return bytes(cbor2.dumps(body))


def encode_attestation_payload(document: AttestationDocument) -> bytes:
    """Encode a document's payload exactly as the Nitro Secure Module does."""
    payload = _encode(document)
    # Round-trip through the parser so an encoder can never emit what a verifier would refuse.
    parse_attestation_payload(payload)
    return payload


def parse_attestation(data: bytes) -> SignedAttestation:
    """Parse a COSE_Sign1 attestation document (raw CBOR bytes) without trusting it.

    Checks the envelope (ES384 in the protected header, a 96-byte raw signature) and every
    payload rule; signature and chain are checked by ``cape.verify``.
    """
    if len(data) > MAX_DOCUMENT_BYTES:
        raise FormatError(
            f"attestation document is {len(data)} bytes; at most {MAX_DOCUMENT_BYTES} allowed"
        )
    cose = parse_cose_sign1(data)
    if cose.algorithm != ALG_ES384:
        raise FormatError("attestation document must be signed with ES384 (COSE alg -35)")
    if len(cose.signature) != ES384_SIGNATURE_BYTES:
        raise FormatError(
            f"ES384 signature must be {ES384_SIGNATURE_BYTES} bytes, got {len(cose.signature)}"
        )
    return SignedAttestation(cose=cose, document=parse_attestation_payload(cose.payload), raw=data)


def decode_document_bytes(data: bytes) -> bytes:
    """Accept a document as raw CBOR or as base64 text (as the API and files carry it).

    Raw COSE_Sign1 starts with ``0x84`` (array of 4) or ``0xd2`` (tag 18); anything else is
    read as standard base64, surrounding whitespace allowed.
    """
    if data[:1] in (b"\x84", b"\xd2"):
        return data
    text = b"".join(data.split())
    if not text:
        raise FormatError("attestation document is empty")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError("attestation document is neither CBOR nor valid base64") from None
