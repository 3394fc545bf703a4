"""Verify an attestation document file and describe what it says (for auditors and the CLI)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import warnings
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from cape.errors import CapeError
from cape.formats.attestation import (
    AttestationDocument,
    SignedAttestation,
    decode_document_bytes,
    parse_attestation,
)
from cape.verify.policy import AttestationPolicy
from cape.verify.roots import describe_root, fingerprint
from cape.verify.verifier import verify_archived_attestation, verify_attestation

__all__ = ["AuditReport", "audit_document", "describe_document"]


@dataclass(frozen=True)
class AuditReport:
    """The outcome of verifying one document: what it says, and whether it is trusted."""

    document: AttestationDocument | None
    checked_at: dt.datetime | None
    root: x509.Certificate
    error: CapeError | None

    @property
    def valid(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "error": self.error.diagnostics() if self.error else None,
            "error_type": type(self.error).__name__ if self.error else None,
            "checked_at": _iso(self.checked_at) if self.checked_at else None,
            "root": {"subject": describe_root(self.root), "sha256": fingerprint(self.root)},
            "document": describe_document(self.document, full=True) if self.document else None,
        }


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _bytes_field(value: bytes | None, *, full: bool) -> Any:
    if value is None:
        return None
    if full:
        return {"length": len(value), "hex": value.hex()}
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.isprintable() and len(text) <= 200:
        return f"{text!r} ({len(value)} bytes)"
    shown = value[:24].hex()
    return f"{shown}{'…' if len(value) > 24 else ''} ({len(value)} bytes)"


def _certificate(der: bytes) -> dict[str, str]:
    try:
        with warnings.catch_warnings():  # describing, not trusting: tolerate RFC 5280 quirks
            warnings.simplefilter("ignore")
            cert = x509.load_der_x509_certificate(der)
        return {
            "subject": cert.subject.rfc4514_string(),
            "not_before": _iso(cert.not_valid_before_utc),
            "not_after": _iso(cert.not_valid_after_utc),
        }
    except ValueError:
        return {"subject": "(not a valid DER certificate)", "not_before": "", "not_after": ""}


def describe_document(document: AttestationDocument, *, full: bool) -> dict[str, Any]:
    """The decoded fields, as JSON-able values (``full`` keeps every byte as hex)."""
    user_data: Any = _bytes_field(document.user_data, full=full)
    if document.user_data:
        with contextlib.suppress(UnicodeDecodeError, ValueError):
            user_data = json.loads(document.user_data)
    return {
        "module_id": document.module_id,
        "digest": document.digest,
        "timestamp": document.timestamp,
        "issued_at": _iso(document.issued_at),
        "debug_mode": document.is_debug,
        "pcrs": {str(i): v.hex() for i, v in document.pcrs.items()},
        "certificate": _certificate(document.certificate),
        "cabundle": [_certificate(der)["subject"] for der in document.cabundle],
        "public_key": _bytes_field(document.public_key, full=full),
        "user_data": user_data,
        "nonce": _bytes_field(document.nonce, full=full),
    }


def audit_document(
    data: bytes,
    *,
    root: x509.Certificate,
    at: dt.datetime | None,
    archived: bool = False,
    policy: AttestationPolicy,
) -> AuditReport:
    """Verify ``data`` (raw CBOR or base64) and report; never raises for a bad document.

    ``archived`` checks at the document's own timestamp; otherwise at ``at`` (wall-clock time
    when ``None``).
    """
    document: AttestationDocument | None = None
    checked_at: dt.datetime | None = None
    try:
        signed: SignedAttestation = parse_attestation(decode_document_bytes(data))
        document = signed.document
        if archived:
            checked_at = document.issued_at
            verify_archived_attestation(signed, root=root, policy=policy)
        else:
            checked_at = at or dt.datetime.now(dt.UTC)
            verify_attestation(signed, root=root, now=checked_at, policy=policy)
    except CapeError as exc:
        return AuditReport(document=document, checked_at=checked_at, root=root, error=exc)
    return AuditReport(document=document, checked_at=checked_at, root=root, error=None)
