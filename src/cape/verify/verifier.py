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

**Caching.** Steps 0-2 depend only on the bytes (and, through certificate validity, on the
check time); steps 3-6 depend on the time and the policy. A :class:`VerificationCache` passed
to :func:`verify_attestation` remembers, by SHA-256 of the exact bytes and the pinned root, a
document that passed steps 0-2 and a certificate chain that passed step 2, together with the
window in which every certificate involved (leaf, cabundle, root) is valid. A hit inside that
window skips those steps; steps 3-6 always run with the caller's time and policy. A key
service releasing several keys to one enclave session (the same document each time, or
documents of one enclave instance, which share a chain) thus pays the ECDSA and the chain
verification once. A chain's entry also holds its leaf's public key, loaded from those exact
leaf bytes, so a new document on a known chain pays only its own signature (step 1), and
``VerificationCache(documents=False)`` (the SDK's: every session's document is new) keeps
chains only. The pinned root's SHA-256, part of every key, is computed once per root.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

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

__all__ = ["VerificationCache", "verify_archived_attestation", "verify_attestation"]

_MAX_CHAIN_DEPTH = 8
_V = TypeVar("_V")


def _load_der(der: bytes, what: str) -> x509.Certificate:
    # cryptography still loads a few RFC 5280 violations (a non-positive serial number) with a
    # deprecation warning; for a trust decision those are malformed certificates.
    with warnings.catch_warnings():
        warnings.simplefilter("error", CryptographyDeprecationWarning)
        try:
            return x509.load_der_x509_certificate(der)
        except (ValueError, CryptographyDeprecationWarning):
            raise FormatError(f"{what} is not a valid DER X.509 certificate") from None


def _signing_key(leaf: x509.Certificate) -> ec.EllipticCurvePublicKey:
    try:
        key = leaf.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise SignatureError("document certificate holds an unusable public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise SignatureError("document certificate does not hold a P-384 ECDSA key")
    return key


def _verify_signature(signed: SignedAttestation, key: ec.EllipticCurvePublicKey) -> None:
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


@dataclass(frozen=True)
class _Window:
    """When every certificate of a verified chain is valid (both ends inclusive)."""

    start: dt.datetime
    end: dt.datetime

    @classmethod
    def of(cls, certificates: Iterable[x509.Certificate]) -> _Window:
        certs = list(certificates)
        return cls(
            max(c.not_valid_before_utc for c in certs), min(c.not_valid_after_utc for c in certs)
        )

    def __contains__(self, at: object) -> bool:
        return isinstance(at, dt.datetime) and self.start <= at <= self.end


class _Lru(Generic[_V]):
    """A bounded, thread-safe map; the least recently used entry goes first."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, _V] = OrderedDict()

    def get(self, key: bytes) -> _V | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: bytes, value: _V) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)


@functools.lru_cache(maxsize=16)
def _root_fingerprint(root: x509.Certificate) -> bytes:
    """SHA-256 of the root's DER (certificates compare and hash by their DER bytes)."""
    return root.fingerprint(hashes.SHA256())


@dataclass(frozen=True)
class _Chain:
    """A chain that passed step 2: its window, and its leaf's (P-384) public key."""

    window: _Window
    key: ec.EllipticCurvePublicKey


class VerificationCache:
    """Documents that passed steps 0-2 and chains that passed step 2, with their validity
    windows (see the module docstring). Thread-safe; least recently used entries go first.

    ``documents=False`` remembers chains only: for a verifier whose every document is new
    (each session's carries its own nonce), where remembering documents would cost a digest
    of each and hold entries that are never asked for again."""

    def __init__(self, max_entries: int = 1024, *, documents: bool = True) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._documents: _Lru[tuple[AttestationDocument, _Window]] | None = (
            _Lru(max_entries) if documents else None
        )
        self._chains: _Lru[_Chain] = _Lru(max_entries)
        self.hits = 0
        """Documents answered from the cache (steps 0-2 skipped); for tests and figures."""

    @staticmethod
    def _key(root: x509.Certificate, *parts: bytes) -> bytes:
        digest = hashlib.sha256(_root_fingerprint(root))
        for part in parts:  # length-prefixed, so no two sequences of parts collide
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
        return digest.digest()

    def document(
        self, data: bytes, root: x509.Certificate, at: dt.datetime
    ) -> AttestationDocument | None:
        """The parsed document if these exact bytes passed steps 0-2 and ``at`` is in the
        window of its certificates."""
        if self._documents is None:
            return None
        entry = self._documents.get(self._key(root, data))
        if entry is None or at not in entry[1]:
            return None
        self.hits += 1
        return entry[0]

    def add_document(
        self, data: bytes, root: x509.Certificate, document: AttestationDocument, window: _Window
    ) -> None:
        if self._documents is not None:
            self._documents.put(self._key(root, data), (document, window))

    def chain(self, document: AttestationDocument, root: x509.Certificate) -> _Chain | None:
        """The window and leaf key of this leaf + cabundle + root if that exact chain passed
        step 2 before."""
        return self._chains.get(self._key(root, document.certificate, *document.cabundle))

    def add_chain(
        self,
        document: AttestationDocument,
        root: x509.Certificate,
        window: _Window,
        key: ec.EllipticCurvePublicKey,
    ) -> None:
        self._chains.put(
            self._key(root, document.certificate, *document.cabundle), _Chain(window, key)
        )


def _chain_window(
    document: AttestationDocument, leaf: x509.Certificate, root: x509.Certificate
) -> _Window:
    bundle = [_load_der(der, f"cabundle[{i}]") for i, der in enumerate(document.cabundle)]
    return _Window.of([leaf, root, *bundle])


def verify_attestation(
    data: bytes | SignedAttestation,
    *,
    root: x509.Certificate,
    now: dt.datetime,
    policy: AttestationPolicy | None = None,
    cache: VerificationCache | None = None,
) -> AttestationDocument:
    """Verify a document (raw COSE bytes or already parsed) as of ``now``.

    With a ``cache``, steps 0-2 of raw bytes already verified (and chains already verified)
    are not repeated while every certificate involved is valid at ``now``; steps 3-6 always run.

    Returns the verified payload; raises a :class:`~cape.errors.VerificationError` subclass
    or :class:`~cape.errors.FormatError` naming the first failed step.
    """
    policy = policy or AttestationPolicy()
    at = as_utc(now, "check time")
    raw = None if isinstance(data, SignedAttestation) else bytes(data)
    cached = cache.document(raw, root, at) if cache is not None and raw is not None else None
    if cached is not None:
        document = cached
    else:
        signed = data if isinstance(data, SignedAttestation) else parse_attestation(data)  # 0
        document = signed.document
        chain = cache.chain(document, root) if cache is not None else None
        window: _Window | None
        if chain is not None and at in chain.window:  # these exact certificates passed step 2
            _verify_signature(signed, chain.key)  # step 1
            window = chain.window
        else:
            leaf = _load_der(document.certificate, "document certificate")
            key = _signing_key(leaf)
            _verify_signature(signed, key)  # step 1
            _verify_chain(document, leaf, root, at)  # step 2
            window = None
            if cache is not None:
                window = _chain_window(document, leaf, root)
                cache.add_chain(document, root, window, key)
        if cache is not None and raw is not None and window is not None:
            cache.add_document(raw, root, document, window)
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
