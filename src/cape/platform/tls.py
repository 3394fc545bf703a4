"""TLS for ``cape serve``: a local CA and a server certificate, made once under the data dir.

``DIR/tls/ca.pem`` is what clients trust (``--ca-file``, ``CAPE_CA_FILE``, or
``SSL_CERT_FILE``/``REQUESTS_CA_BUNDLE`` for pycape); ``ca.key`` never leaves the directory
(0600). The server certificate (ECDSA P-256, 397 days, SANs for localhost, 127.0.0.1, ::1 and
the served host) is re-issued from the same CA when it is close to expiry or the host changes,
so clients keep trusting the same CA across restarts.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cape._internal.timefile import utc_now, write_private
from cape.errors import KeyFormatError

__all__ = ["TlsFiles", "ensure_pinned_certificate", "ensure_tls", "load_ec_private_key"]

CA_LIFETIME: Final = dt.timedelta(days=3650)
SERVER_LIFETIME: Final = dt.timedelta(days=397)
RENEW_BEFORE: Final = dt.timedelta(days=30)
BACKDATE: Final = dt.timedelta(minutes=5)
PINNED_LIFETIME: Final = dt.timedelta(days=3650)
DEFAULT_NAMES: Final = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS: Final = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 - names, not a bind


@dataclass(frozen=True)
class TlsFiles:
    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_ec_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """An unencrypted PEM EC key that only its owner may read (else KeyFormatError)."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyFormatError(f"{path} is readable by other users (mode {mode:o}); chmod 600 it")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFormatError(f"{path} is not an EC private key")
    return key


def _new_ca(
    files: TlsFiles, now: dt.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Cape (local)"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"cape serve local CA {now:%Y-%m-%d}"),
        ]
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(files.ca_key, _key_pem(key))
    write_private(files.ca_cert, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    return key, certificate


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _server_ok(
    files: TlsFiles, ca: x509.Certificate, san: x509.SubjectAlternativeName, now: dt.datetime
) -> bool:
    if not files.server_cert.exists() or not files.server_key.exists():
        return False
    try:
        certificate = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
        current = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        load_ec_private_key(files.server_key)
    except (ValueError, x509.ExtensionNotFound, KeyFormatError):
        return False
    return (
        certificate.issuer == ca.subject
        and set(current) == set(san)
        and certificate.not_valid_after_utc - RENEW_BEFORE > now
    )


def ensure_tls(directory: Path, host: str, *, now: dt.datetime | None = None) -> TlsFiles:
    """The CA and a current server certificate for ``host`` under ``directory``."""
    now = now or utc_now()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    files = TlsFiles(directory)
    if files.ca_cert.exists() and files.ca_key.exists():
        ca_key = load_ec_private_key(files.ca_key)
        ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        if ca.public_key() != ca_key.public_key():
            raise KeyFormatError(f"{files.ca_key} does not belong to {files.ca_cert}")
    else:
        ca_key, ca = _new_ca(files, now)
    names = DEFAULT_NAMES if host in WILDCARD_HOSTS else (*DEFAULT_NAMES, host)
    san = _san(names)
    if _server_ok(files, ca, san, now):
        return files
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[-1])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + SERVER_LIFETIME, ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(digital_signature=True),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(san, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    write_private(files.server_key, _key_pem(key))
    write_private(files.server_cert, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    return files


def ensure_pinned_certificate(
    directory: Path, host: str, *, now: dt.datetime | None = None
) -> tuple[Path, Path]:
    """A self-signed certificate that peers pin by fingerprint (``cape kms serve`` without
    an operator certificate): ``directory/pinned.pem`` and ``pinned.key``, made once and
    never re-issued, since a new certificate would break every pin. Returns (cert, key)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = directory / "pinned.pem", directory / "pinned.key"
    if cert_path.exists() and key_path.exists():
        key = load_ec_private_key(key_path)
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if certificate.public_key() != key.public_key():
            raise KeyFormatError(f"{key_path} does not belong to {cert_path}")
        return cert_path, key_path
    now = now or utc_now()
    names = DEFAULT_NAMES if host in WILDCARD_HOSTS else (*DEFAULT_NAMES, host)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cape key service")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + PINNED_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(key_path, _key_pem(key))
    write_private(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path
