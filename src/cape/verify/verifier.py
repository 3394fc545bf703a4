"""Verify an AWS Nitro (or simulated) attestation document against a pinned root.

One pipeline, in this order; each step raises its own exception type:

0. Parse: COSE_Sign1, ES384, every payload rule of nitro-attestation.md §3.2 (FormatError).
1. Signature: ECDSA P-384/SHA-384 over ``Sig_structure`` with the key of ``certificate``
   (SignatureError).
2. Chain: ``certificate`` → ``cabundle`` (reversed) → the *pinned* root, every certificate
   valid at the check time (CertificateExpiredError for the leaf's window, ChainError
   otherwise). The CA extension policy is WebPKI's; the end-entity policy is relaxed because
   AWS leaves carry no authority key identifier, so the leaf's basicConstraints (CA=false)
   and keyUsage (digitalSignature) are checked here instead.
3. Time: ``timestamp`` no later than the check time plus clock skew (DocumentTimestampError)
   and no older than ``max_age`` (DocumentExpiredError).
4. Debug mode: PCR0 zero is refused unless allowed (DebugEnclaveError).
5. Nonce: byte equality with the verifier's nonce (NonceMismatchError).
6. PCR allow-lists (PCRMismatchError).

The check time is always a parameter; :func:`verify_archived_attestation` uses the
document's own signed timestamp, so archived documents with long-expired 3-hour leaves still
verify.
"""

from __future__ import annotations

import datetime as dt
import hmac
import warnings

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509 import verification

from cape._internal.timefile import as_utc
from cape.errors import (
    CertificateExpiredError,
    ChainError,
    DebugEnclaveError,
    DocumentExpiredError,
    DocumentTimestampError,
    FormatError,
    NonceMismatchError,
    PCRMismatchError,
    SignatureError,
)
from cape.formats.attestation import AttestationDocument, SignedAttestation, parse_attestation
from cape.verify.policy import AttestationPolicy

__all__ = ["verify_archived_attestation", "verify_attestation"]

_MAX_CHAIN_DEPTH = 8


def _load_der(der: bytes, what: str) -> x509.Certificate:
    # cryptography still loads a few RFC 5280 violations (a non-positive serial number) with a
    # deprecation warning; for a trust decision those are malformed certificates.
    with warnings.catch_warnings():
        warnings.simplefilter("error", CryptographyDeprecationWarning)
        try:
            return x509.load_der_x509_certificate(der)
        except (ValueError, CryptographyDeprecationWarning):
            raise FormatError(f"{what} is not a valid DER X.509 certificate") from None


def _verify_signature(signed: SignedAttestation, leaf: x509.Certificate) -> None:
    try:
        key = leaf.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise SignatureError("document certificate holds an unusable public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise SignatureError("document certificate does not hold a P-384 ECDSA key")
    half = len(signed.cose.signature) // 2
    r = int.from_bytes(signed.cose.signature[:half], "big")
    s = int.from_bytes(signed.cose.signature[half:], "big")
    try:
        key.verify(
            encode_dss_signature(r, s), signed.cose.to_be_signed(), ec.ECDSA(hashes.SHA384())
        )
    except InvalidSignature:
        raise SignatureError(
            "COSE signature does not verify with the document certificate"
        ) from None


def _verify_chain(
    document: AttestationDocument,
    leaf: x509.Certificate,
    root: x509.Certificate,
    at: dt.datetime,
) -> None:
    if not leaf.not_valid_before_utc <= at <= leaf.not_valid_after_utc:
        raise CertificateExpiredError(
            f"document certificate is valid from {leaf.not_valid_before_utc.isoformat()} "
            f"to {leaf.not_valid_after_utc.isoformat()}, not at {at.isoformat()}"
        )
    intermediates = [_load_der(der, f"cabundle[{i}]") for i, der in enumerate(document.cabundle)]
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([root]))
        .time(at)
        .max_chain_depth(_MAX_CHAIN_DEPTH)
        .extension_policies(
            ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=verification.ExtensionPolicy.permit_all(),
        )
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, intermediates)
    except verification.VerificationError as exc:
        raise ChainError(
            f"certificate chain does not lead to the pinned root at {at.isoformat()}: {exc}"
        ) from None

    # The relaxed end-entity policy skipped these; check them ourselves.
    try:
        constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise ChainError(f"document certificate lacks a required extension: {exc}") from None
    except ValueError:
        raise ChainError("document certificate has malformed extensions") from None
    if constraints.ca:
        raise ChainError("document certificate is a CA certificate (basicConstraints CA=true)")
    if not usage.digital_signature:
        raise ChainError("document certificate keyUsage lacks digitalSignature")


def _verify_time(document: AttestationDocument, at: dt.datetime, policy: AttestationPolicy) -> None:
    issued = document.issued_at
    if issued > at + policy.clock_skew:
        raise DocumentTimestampError(
            f"document timestamp {issued.isoformat()} is after the check time {at.isoformat()}"
        )
    if policy.max_age is not None and at - issued > policy.max_age:
        raise DocumentExpiredError(
            f"document was issued at {issued.isoformat()}, more than "
            f"{policy.max_age.total_seconds():g} s before the check time {at.isoformat()}"
        )


def _verify_claims(document: AttestationDocument, policy: AttestationPolicy) -> None:
    if document.is_debug and not policy.allow_debug:
        raise DebugEnclaveError("document comes from a debug-mode enclave (PCR0 is zero)")
    if policy.nonce is not None and (
        document.nonce is None or not hmac.compare_digest(document.nonce, policy.nonce)
    ):
        raise NonceMismatchError("document does not carry the expected nonce")
    for index, allowed in sorted(policy.pcrs.items()):
        actual = document.pcrs.get(index)
        if actual is None or actual not in allowed:
            raise PCRMismatchError(index, sorted(allowed), actual)


def verify_attestation(
    data: bytes | SignedAttestation,
    *,
    root: x509.Certificate,
    now: dt.datetime,
    policy: AttestationPolicy | None = None,
) -> AttestationDocument:
    """Verify a document (raw COSE bytes or already parsed) as of ``now``.

    Returns the verified payload; raises a :class:`~cape.errors.VerificationError` subclass
    or :class:`~cape.errors.FormatError` naming the first failed step.
    """
    policy = policy or AttestationPolicy()
    at = as_utc(now, "check time")
    signed = data if isinstance(data, SignedAttestation) else parse_attestation(data)  # step 0
    document = signed.document
    leaf = _load_der(document.certificate, "document certificate")
    _verify_signature(signed, leaf)  # step 1
    _verify_chain(document, leaf, root, at)  # step 2
    _verify_time(document, at, policy)  # step 3
    _verify_claims(document, policy)  # steps 4-6
    return document


def verify_archived_attestation(
    data: bytes | SignedAttestation,
    *,
    root: x509.Certificate,
    policy: AttestationPolicy | None = None,
) -> AttestationDocument:
    """Verify a stored document at its own signed ``timestamp`` (audit records, key docs).

    The age limit is meaningless at that instant and is not applied; every other check is.
    """
    signed = data if isinstance(data, SignedAttestation) else parse_attestation(data)
    base = policy or AttestationPolicy()
    archived = AttestationPolicy(
        nonce=base.nonce,
        pcrs=base.pcrs,
        max_age=None,
        clock_skew=base.clock_skew,
        allow_debug=base.allow_debug,
    )
    return verify_attestation(signed, root=root, now=signed.document.issued_at, policy=archived)
