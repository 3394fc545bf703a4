"""Trust anchors for attestation documents.

A verifier trusts exactly one root that the caller pins, never the root a document brings in
its own ``cabundle``. The AWS Nitro Enclaves Root-G1 certificate is not shipped here; callers
load it (or the root of a simulated ``cape serve`` platform) from a file and this module
identifies it by its published SHA-256 fingerprint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cape.errors import FormatError

__all__ = [
    "AWS_NITRO_ROOT_G1_SHA256",
    "describe_root",
    "fingerprint",
    "load_root_certificate",
    "load_root_certificate_file",
]

#: SHA-256 of the DER of AWS_NitroEnclaves_Root-G1, as AWS publishes it.
AWS_NITRO_ROOT_G1_SHA256 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"


def fingerprint(cert: x509.Certificate) -> str:
    """Lower-case hex SHA-256 of the certificate's DER encoding."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def describe_root(cert: x509.Certificate) -> str:
    """A short human description: the subject, and a note when it is the AWS Nitro root."""
    name = cert.subject.rfc4514_string()
    if fingerprint(cert) == AWS_NITRO_ROOT_G1_SHA256:
        return f"{name} (AWS Nitro Enclaves Root-G1)"
    return name


def load_root_certificate(data: bytes) -> x509.Certificate:
    """Load a root certificate from PEM or DER bytes; :class:`FormatError` if neither."""
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise FormatError("attestation root is not a PEM or DER X.509 certificate") from None


def load_root_certificate_file(path: Path) -> x509.Certificate:
    """Read and load a root certificate file, with a clear error when it cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FormatError(f"cannot read attestation root {path}: {exc.strerror}") from None
    return load_root_certificate(data)
