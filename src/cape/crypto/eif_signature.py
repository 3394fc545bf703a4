"""Signing an enclave image's measurement, and checking such a signature (PCR8).

An EIF signature is a COSE_Sign1 over ``{"register_index": 0, "register_value": PCR0}`` made
with the signer's EC key (ES256, ES384 or ES512 by curve), stored beside the signer's PEM
certificate in the signature section (:mod:`cape.formats.eif`). The enclave's PCR8 is then
``SHA384(0^48 ‖ SHA384(certificate DER))``: it names the signer, not the build, so key
policies bound to it survive upgrades that the same signer signs.

Signatures are deterministic (RFC 6979), so a signed build is as reproducible as an unsigned
one. The same functions sign the simulated runtime's measurement in ``cape serve``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import NameOID

from cape.errors import FormatError, SignatureError
from cape.formats.cose import (
    ALG_ES384,
    HEADER_ALG,
    CoseSign1,
    encode_cose_sign1,
    parse_cose_sign1,
    sig_structure,
)
from cape.formats.eif import (
    PcrSignatureEntry,
    decode_pcr_payload,
    decode_signature_section,
    encode_pcr_payload,
    encode_signature_section,
    pcr_value,
)

__all__ = ["ImageSigner", "SignerIdentity", "signer_pcr8", "verify_signature_section"]

ALG_ES256 = -7
ALG_ES512 = -36
_ALGORITHMS: dict[str, tuple[int, hashes.HashAlgorithm, int]] = {
    "secp256r1": (ALG_ES256, hashes.SHA256(), 32),
    "secp384r1": (ALG_ES384, hashes.SHA384(), 48),
    "secp521r1": (ALG_ES512, hashes.SHA512(), 66),
}
_BY_ALG = {alg: (curve, digest, size) for curve, (alg, digest, size) in _ALGORITHMS.items()}


def signer_pcr8(certificate: x509.Certificate) -> bytes:
    """PCR8 of an image signed with ``certificate``."""
    der = certificate.public_bytes(serialization.Encoding.DER)
    return pcr_value(hashlib.sha384(der).digest())


@dataclass(frozen=True)
class SignerIdentity:
    """Who signed an image: the certificate, its subject and the PCR8 it produces."""

    certificate: x509.Certificate
    pcr8: bytes

    @property
    def subject(self) -> str:
        return self.certificate.subject.rfc4514_string()

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def not_before(self) -> dt.datetime:
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc

    def validity_problem(self, now: dt.datetime | None = None) -> str | None:
        """Why nitro-cli would refuse to run an image signed with this certificate at ``now``
        (it checks the certificate's validity window before it boots a signed image), or
        ``None`` when the certificate is valid then. The signature itself stays valid."""
        moment = now or dt.datetime.now(dt.UTC)
        if moment < self.not_before:
            return f"the signing certificate is not valid before {self.not_before.isoformat()}"
        if moment > self.not_after:
            return f"the signing certificate expired on {self.not_after.isoformat()}"
        return None


class ImageSigner:
    """An EC private key and its certificate; signs PCR0 into a signature section."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise FormatError("an image signing key must be an EC key (P-256, P-384 or P-521)")
        if key.curve.name not in _ALGORITHMS:
            raise FormatError(f"image signing key curve {key.curve.name} is not supported")
        public = certificate.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or public.public_numbers() != (
            key.public_key().public_numbers()
        ):
            raise FormatError("the signing certificate does not belong to the signing key")
        self._key: ec.EllipticCurvePrivateKey | None = key
        self._curve: str = key.curve.name
        self._sign_digest: Callable[[bytes], bytes] | None = None
        self.certificate = certificate

    @classmethod
    def external(
        cls, certificate: x509.Certificate, sign_digest: Callable[[bytes], bytes]
    ) -> ImageSigner:
        """A signer whose private key lives elsewhere (an AWS KMS key: :mod:`cape.image.kms`).

        ``sign_digest`` gets the digest of the bytes to sign (SHA-256/384/512 by the
        certificate's curve) and returns a DER ECDSA signature; :meth:`sign_pcr0` checks it
        against ``certificate``, so a key that does not match the certificate is refused.
        Such signatures are usually randomized: the image's PCRs stay reproducible, its bytes
        (the signature section) then differ from build to build.
        """
        public = certificate.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or (
            public.curve.name not in _ALGORITHMS
        ):
            raise FormatError("the signing certificate's key must be EC P-256, P-384 or P-521")
        signer = cls.__new__(cls)
        signer._key = None
        signer._curve = public.curve.name
        signer._sign_digest = sign_digest
        signer.certificate = certificate
        return signer

    @classmethod
    def from_pem(cls, key_pem: bytes, cert_pem: bytes) -> ImageSigner:
        """Load a PEM private key (unencrypted) and a PEM certificate.

        Raises:
            FormatError: either does not parse, or they do not belong together.
        """
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            raise FormatError("the signing key is not an unencrypted PEM private key") from None
        try:
            certificate = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise FormatError("the signing certificate is not a PEM X.509 certificate") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise FormatError("an image signing key must be an EC key (P-256, P-384 or P-521)")
        return cls(key, certificate)

    @classmethod
    def generate(
        cls, common_name: str = "Cape image signer", *, now: dt.datetime | None = None
    ) -> ImageSigner:
        """A new P-384 key with a self-signed certificate (valid 10 years), as nitro-cli users
        make with ``openssl req -x509``. Only the certificate's DER matters (PCR8)."""
        key = ec.generate_private_key(ec.SECP384R1())
        start = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(minutes=1)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA384())
        )
        return cls(key, certificate)

    def private_key_pem(self) -> bytes:
        """The key as unencrypted PKCS#8 PEM (store it with mode 0600)."""
        if self._key is None:
            raise FormatError("this image signer's key is not held here (AWS KMS)")
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def identity(self) -> SignerIdentity:
        return SignerIdentity(self.certificate, signer_pcr8(self.certificate))

    def sign_pcr0(self, pcr0: bytes) -> bytes:
        """The signature section for an image whose PCR0 is ``pcr0``.

        Raises:
            SignatureError: an external signer's signature does not verify with the
                certificate (the key and the certificate do not belong together).
        """
        alg, digest, size = _ALGORITHMS[self._curve]
        protected = bytes(cbor2.dumps({HEADER_ALG: alg}))
        payload = encode_pcr_payload(0, pcr0)
        to_sign = sig_structure(protected, payload)
        if self._key is not None:
            der = self._key.sign(to_sign, ec.ECDSA(digest, deterministic_signing=True))
        else:
            assert self._sign_digest is not None
            hasher = hashes.Hash(digest)
            hasher.update(to_sign)
            der = self._sign_digest(hasher.finalize())
        try:
            r, s = decode_dss_signature(der)
        except ValueError:
            raise SignatureError("the image signer returned a malformed ECDSA signature") from None
        public = self.certificate.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        try:
            public.verify(der, to_sign, ec.ECDSA(digest))
        except InvalidSignature:
            raise SignatureError(
                "the image signature does not verify with the signing certificate "
                "(the key and the certificate do not belong together)"
            ) from None
        raw = r.to_bytes(size, "big") + s.to_bytes(size, "big")
        cose = encode_cose_sign1(CoseSign1(protected, {}, payload, raw))
        pem = self.certificate.public_bytes(serialization.Encoding.PEM)
        return encode_signature_section([PcrSignatureEntry(pem, cose)])


def verify_signature_section(section: bytes, pcr0: bytes) -> SignerIdentity:
    """Check that ``section`` signs ``pcr0``; return the signer.

    Only the first entry counts, as on Nitro. The certificate names the signer, it is not a
    chain to a root, and its validity dates are not checked here (a signature does not expire);
    :meth:`SignerIdentity.validity_problem` reports them, since nitro-cli refuses to boot an
    image whose certificate is outside its validity window.

    Raises:
        FormatError: the section, certificate or COSE structure is malformed.
        SignatureError: the signature does not verify, or signs another PCR0.
    """
    entry = decode_signature_section(section)[0]
    try:
        certificate = x509.load_pem_x509_certificate(entry.signing_certificate)
    except ValueError:
        raise FormatError("EIF signature: the signing certificate is not PEM X.509") from None
    cose = parse_cose_sign1(entry.signature)
    alg = cose.algorithm
    if alg not in _BY_ALG:
        raise FormatError(f"EIF signature: unsupported COSE algorithm {alg}")
    curve, digest, size = _BY_ALG[alg]
    public = certificate.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != curve:
        raise FormatError(f"EIF signature: the certificate's key is not on {curve}")
    if len(cose.signature) != 2 * size:
        raise SignatureError("EIF signature has the wrong length for its algorithm")
    r = int.from_bytes(cose.signature[:size], "big")
    s = int.from_bytes(cose.signature[size:], "big")
    try:
        public.verify(encode_dss_signature(r, s), cose.to_be_signed(), ec.ECDSA(digest))
    except InvalidSignature:
        raise SignatureError("EIF signature does not verify with its certificate") from None
    index, value = decode_pcr_payload(cose.payload)
    if index != 0 or value != pcr0:
        raise SignatureError("EIF signature signs another image (its PCR0 differs)")
    return SignerIdentity(certificate, signer_pcr8(certificate))
