"""A software Nitro Secure Module for ``cape serve`` (simulated mode).

**No hardware guarantee.** Documents from this module are signed by keys that live in
ordinary process memory on the operator's machine, under a root certificate the operator
generated. They prove which code a ``cape serve`` platform *says* it runs, to clients that
trust that operator's root; they do not prove anything against that operator. Use a real
Nitro Enclave and the AWS root for that.

What it reproduces faithfully, so that the enclave runtime, the verifier and the KMS take the
same code paths as with a real NSM (``shared/spec/nitro-attestation.md`` §3):

- the NSM request and response CBOR (:mod:`cape.formats.nsm`) and its refusals
  (``InputTooLarge`` for fields over 1024 bytes, ``InvalidIndex``, ``ReadOnlyIndex``, ...);
- the document: untagged COSE_Sign1, ES384, a raw 96-byte r||s signature, the payload
  encoded exactly like the NSM's, the PCRs of :mod:`cape.enclave.measure`;
- the certificate chain's shape: a P-384 root (:class:`SimulatedAuthority`), then regional
  (pathLen 2, ~20 days), zonal (pathLen 1, ~5 days) and instance (pathLen 0, ~24 h) CAs
  (:class:`InstanceCredentials`, ``cabundle`` root first), then a ~3 h per-enclave leaf that,
  like AWS's, has no authority key identifier.

The root's private key stays inside :class:`SimulatedAuthority`, which the host keeps;
:class:`SimulatedSecureModule` only ever receives the instance CA's key and the chain, as a
Nitro host only ever sees what AWS provisions.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from cape._internal.timefile import as_utc, utc_now
from cape.enclave.measure import PCR_BYTES, extend, measure_runtime, simulated_pcrs
from cape.enclave.secure_module.base import SecureModule
from cape.errors import FormatError, SecureModuleError
from cape.formats.attestation import AttestationDocument, encode_attestation_payload
from cape.formats.cose import CoseSign1, encode_cose_sign1, es384_protected_header, sig_structure
from cape.formats.nsm import (
    MAX_ATTESTATION_FIELD_BYTES,
    MAX_REQUEST_BYTES,
    AttestationRequest,
    AttestationResponse,
    DescribeNSMRequest,
    DescribeNSMResponse,
    DescribePCRRequest,
    DescribePCRResponse,
    ErrorResponse,
    ExtendPCRRequest,
    ExtendPCRResponse,
    GetRandomRequest,
    GetRandomResponse,
    LockPCRRequest,
    LockPCRResponse,
    LockPCRsRequest,
    LockPCRsResponse,
    Request,
    Response,
    encode_response,
    parse_request,
)

__all__ = [
    "DEFAULT_REGION",
    "LEAF_LIFETIME",
    "LEAF_RENEW_BEFORE",
    "InstanceCredentials",
    "SimulatedAuthority",
    "SimulatedSecureModule",
]

DEFAULT_REGION = "local-1"
ROOT_LIFETIME = dt.timedelta(days=10957)  # 30 years, as AWS_NitroEnclaves_Root-G1
REGIONAL_LIFETIME = dt.timedelta(days=20)
ZONAL_LIFETIME = dt.timedelta(days=5)
INSTANCE_LIFETIME = dt.timedelta(hours=24)
LEAF_LIFETIME = dt.timedelta(hours=3)
#: A leaf with less than this left is replaced before it signs another document.
LEAF_RENEW_BEFORE = dt.timedelta(minutes=10)
#: notBefore lies this far before the issuing instant, so verifiers whose clocks run a little
#: behind the host's still accept a fresh certificate.
BACKDATE = dt.timedelta(minutes=1)

NSM_VERSION = (1, 0, 0)
MAX_PCRS = 32
FIRST_USER_PCR = 16
RANDOM_BYTES = 256

_ORGANIZATION = "Cape"
_UNIT = "Simulated Nitro"
_DOMAIN = "cape-simulated"
_NAME_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")
_INSTANCE_ID = re.compile(r"i-[0-9a-f]{8,32}")
_MODULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,47}")

Clock = Callable[[], dt.datetime]


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, _UNIT),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _ca_key_usage(*, crl_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=crl_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _issue_ca(
    *,
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    path_length: int,
    not_before: dt.datetime,
    not_after: dt.datetime,
    crl_sign: bool,
) -> x509.Certificate:
    issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_ca_key_usage(crl_sign=crl_sign), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA384())
    )


def _check_label(value: str, what: str) -> None:
    if not _NAME_LABEL.fullmatch(value):
        raise ValueError(f"{what} {value!r} must be a short lower-case DNS label")


def _instance_id(region: str, instance_id: str | None) -> str:
    """Check ``region`` and ``instance_id`` for an instance CA's name; a fresh id if ``None``."""
    _check_label(region, "region")
    instance_id = instance_id or f"i-{secrets.token_hex(9)[:17]}"
    if not _INSTANCE_ID.fullmatch(instance_id):
        raise ValueError(f"instance_id {instance_id!r} must look like i-<hex>")
    return instance_id


# --- the operator's PKI ---------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceCredentials:
    """What the simulated "AWS" provisions to one host: an instance CA and its chain.

    ``cabundle`` is ``[root, regional, zonal, instance]`` as DER, root first like AWS's;
    ``instance_key`` is the private key of the last one. No root key is in here.
    """

    instance_id: str
    region: str
    instance_key: ec.EllipticCurvePrivateKey = field(repr=False)
    cabundle: tuple[bytes, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "cabundle", tuple(self.cabundle))
        if not _INSTANCE_ID.fullmatch(self.instance_id):
            raise ValueError(f"instance_id {self.instance_id!r} must look like i-<hex>")
        _check_label(self.region, "region")
        if len(self.cabundle) < 2:
            raise ValueError("cabundle must hold the root and at least the instance CA")
        public = self.instance_certificate.public_key()
        if public != self.instance_key.public_key():
            raise ValueError("instance_key does not belong to the last cabundle certificate")

    @cached_property
    def instance_certificate(self) -> x509.Certificate:
        """The instance CA certificate (``cabundle[-1]``), which issues enclave leaves."""
        return x509.load_der_x509_certificate(self.cabundle[-1])


class SimulatedAuthority:
    """Plays AWS's PKI for simulated mode: a P-384 root that certifies instance CAs.

    The host process keeps this object; enclaves get only :class:`InstanceCredentials` from
    :meth:`issue_instance`. The root private key never leaves it (there is no accessor).
    """

    def __init__(
        self, root_key: ec.EllipticCurvePrivateKey, root_certificate: x509.Certificate
    ) -> None:
        if not isinstance(root_key, ec.EllipticCurvePrivateKey) or not isinstance(
            root_key.curve, ec.SECP384R1
        ):
            raise ValueError("the simulated root key must be a P-384 private key")
        if root_certificate.public_key() != root_key.public_key():
            raise ValueError("the root key does not belong to the root certificate")
        self._root_key = root_key
        self._root_certificate = root_certificate

    @classmethod
    def generate(
        cls, *, now: dt.datetime | None = None, common_name: str = "cape-simulated-root"
    ) -> SimulatedAuthority:
        """A fresh root: self-signed, 30 years, CA without pathLen, like Root-G1."""
        start = as_utc(now, "times") if now is not None else utc_now()
        key = _new_key()
        name = _name(common_name)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - BACKDATE)
            .not_valid_after(start + ROOT_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_ca_key_usage(crl_sign=True), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA384())
        )
        return cls(key, certificate)

    @property
    def root_certificate(self) -> x509.Certificate:
        """The root verifiers pin for this platform."""
        return self._root_certificate

    def private_key_pem(self) -> bytes:
        """The root key as unencrypted PKCS#8 PEM, for the platform to persist (0600) so
        that restarts keep the root clients pinned. Nothing else should call this."""
        return self._root_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def root_pem(self) -> bytes:
        """:attr:`root_certificate` as PEM (what ``cape serve`` publishes)."""
        return self._root_certificate.public_bytes(serialization.Encoding.PEM)

    def issue_intermediate(
        self,
        request: x509.CertificateSigningRequest,
        now: dt.datetime,
        *,
        lifetime: dt.timedelta,
    ) -> x509.Certificate:
        """Certify a cluster node's own CA key (a P-384 key in a self-signed CSR whose common
        name is the node's DNS-label name): a CA with pathLen 1 under the root, valid for
        ``lifetime`` from ``now``. The node's secure modules issue their instance CAs under it
        (:class:`~cape.enclave.secure_module.cluster.NodeAuthority`); the node's key never
        comes here, the root key never leaves.

        Raises:
            ValueError: an unsigned or badly signed request, a key other than P-384, or a
                name that is not a short lower-case DNS label.
        """
        start = as_utc(now, "times")
        if not request.is_signature_valid:
            raise ValueError("the certificate request's signature does not verify")
        key = request.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
            key.curve, ec.SECP384R1
        ):
            raise ValueError("a node's CA key must be a P-384 key")
        names = request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        node = str(names[0].value) if len(names) == 1 else ""
        _check_label(node, "node name")
        root = self._root_certificate
        root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return (
            x509.CertificateBuilder()
            .subject_name(_name(f"{node}.node.{_DOMAIN}"))
            .issuer_name(root.subject)
            .public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - BACKDATE)
            .not_valid_after(min(start + lifetime, root.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(_ca_key_usage(crl_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski),
                critical=False,
            )
            .sign(self._root_key, hashes.SHA384())
        )

    def issue_instance(
        self,
        now: dt.datetime,
        *,
        region: str = DEFAULT_REGION,
        instance_id: str | None = None,
    ) -> InstanceCredentials:
        """Certify a new host: regional → zonal → instance CA, each ES384, valid from ``now``."""
        start = as_utc(now, "times")
        root = self._root_certificate
        if not root.not_valid_before_utc <= start < root.not_valid_after_utc:
            raise SecureModuleError(
                f"the simulated root is not valid at {start.isoformat()}; generate a new one"
            )
        instance_id = _instance_id(region, instance_id)

        not_before = start - BACKDATE
        regional_key, zonal_key, instance_key = _new_key(), _new_key(), _new_key()
        regional = _issue_ca(
            subject=_name(f"{secrets.token_hex(8)}.{region}.{_DOMAIN}"),
            key=regional_key,
            issuer=root,
            issuer_key=self._root_key,
            path_length=2,
            not_before=not_before,
            not_after=min(start + REGIONAL_LIFETIME, root.not_valid_after_utc),
            crl_sign=True,
        )
        zonal = _issue_ca(
            subject=_name(f"{secrets.token_hex(8)}.zonal.{region}.{_DOMAIN}"),
            key=zonal_key,
            issuer=regional,
            issuer_key=regional_key,
            path_length=1,
            not_before=not_before,
            not_after=start + ZONAL_LIFETIME,
            crl_sign=True,
        )
        instance = _issue_ca(
            subject=_name(f"{instance_id}.{region}.{_DOMAIN}"),
            key=instance_key,
            issuer=zonal,
            issuer_key=zonal_key,
            path_length=0,
            not_before=not_before,
            not_after=start + INSTANCE_LIFETIME,
            crl_sign=False,
        )
        der = serialization.Encoding.DER
        return InstanceCredentials(
            instance_id=instance_id,
            region=region,
            instance_key=instance_key,
            cabundle=tuple(c.public_bytes(der) for c in (root, regional, zonal, instance)),
        )


# --- the module -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Leaf:
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    certificate: x509.Certificate
    der: bytes


def _millis(moment: dt.datetime) -> int:
    return (moment - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(milliseconds=1)


class SimulatedSecureModule(SecureModule):
    """A software NSM: PCRs, PCR locking, entropy and signed attestation documents.

    ``pcrs`` gives PCR0-15 (48 bytes each; missing ones are zero); by default they are
    :func:`~cape.enclave.measure.simulated_pcrs` of the running runtime. PCR16-31 start as
    zeros and are the only ones :meth:`extend_pcr` may change. ``debug=True`` zeroes PCR0-2,
    the shape of a Nitro debug-mode enclave, which default verifier policies refuse.

    The per-enclave leaf key is generated here, certified by the instance CA for about
    3 hours and replaced when less than 10 minutes remain. Once the instance CA itself has
    expired, attestation raises :class:`~cape.errors.SecureModuleError`: the host must
    re-provision the enclave with new :class:`InstanceCredentials`.
    """

    waits = False  # signs in this process: the runtime calls it on its event loop

    def __init__(
        self,
        credentials: InstanceCredentials,
        *,
        pcrs: Mapping[int, bytes] | None = None,
        clock: Clock | None = None,
        module_id: str | None = None,
        debug: bool = False,
    ) -> None:
        self._credentials = credentials
        self._clock: Clock = clock or utc_now
        self._module_id = module_id or f"{credentials.instance_id}-enc{secrets.token_hex(8)}"
        if not _MODULE_ID.fullmatch(self._module_id):
            raise ValueError(
                f"module_id {self._module_id!r} must be 1-48 letters, digits, '.' or '-'"
            )
        if pcrs is None:
            pcrs = simulated_pcrs(measure_runtime(), instance_id=credentials.instance_id)
        self._pcrs = [bytes(PCR_BYTES)] * MAX_PCRS
        for index, value in pcrs.items():
            if not 0 <= index < FIRST_USER_PCR:
                raise ValueError(f"PCR{index}: only PCR0-15 can be given")
            if not isinstance(value, bytes) or len(value) != PCR_BYTES:
                raise ValueError(f"PCR{index} must be {PCR_BYTES} bytes")
            self._pcrs[index] = value
        if debug:
            for index in (0, 1, 2):
                self._pcrs[index] = bytes(PCR_BYTES)
        self._locked = set(range(FIRST_USER_PCR))
        self._leaf: _Leaf | None = None
        self._lock = threading.Lock()

    @property
    def module_id(self) -> str:
        """This enclave's NSM id, ``i-<instance>-enc<16 hex>`` by default."""
        return self._module_id

    # --- SecureModule ----------------------------------------------------------------------

    def process(self, request: bytes) -> bytes:
        """Serve one raw NSM request; malformed requests get an ``InvalidArgument`` response.

        Raises :class:`~cape.errors.SecureModuleError` only when the instance CA has expired.
        """
        return encode_response(self._serve(request))

    def _serve(self, raw: bytes) -> Response:
        if len(raw) > MAX_REQUEST_BYTES:
            return ErrorResponse("InputTooLarge")  # the driver's EMSGSIZE
        try:
            request = parse_request(raw)
        except FormatError:
            return ErrorResponse("InvalidArgument")
        with self._lock:
            return self._dispatch(request)

    def _dispatch(self, request: Request) -> Response:
        match request:
            case AttestationRequest():
                return self._attest(request)
            case DescribePCRRequest(index=index):
                if index >= MAX_PCRS:
                    return ErrorResponse("InvalidIndex")
                return DescribePCRResponse(lock=index in self._locked, data=self._pcrs[index])
            case ExtendPCRRequest(index=index, data=data):
                if index >= MAX_PCRS:
                    return ErrorResponse("InvalidIndex")
                if index in self._locked:
                    return ErrorResponse("ReadOnlyIndex")
                self._pcrs[index] = extend(self._pcrs[index], data)
                return ExtendPCRResponse(self._pcrs[index])
            case LockPCRRequest(index=index):
                if index >= MAX_PCRS:
                    return ErrorResponse("InvalidIndex")
                if index < FIRST_USER_PCR:
                    # Locked since boot; AWS's nsm-check expects an error here.
                    return ErrorResponse("ReadOnlyIndex")
                self._locked.add(index)
                return LockPCRResponse()
            case LockPCRsRequest(range=count):
                if count > MAX_PCRS:
                    return ErrorResponse("InvalidIndex")
                self._locked.update(range(count))
                return LockPCRsResponse()
            case DescribeNSMRequest():
                major, minor, patch = NSM_VERSION
                return DescribeNSMResponse(
                    version_major=major,
                    version_minor=minor,
                    version_patch=patch,
                    module_id=self._module_id,
                    max_pcrs=MAX_PCRS,
                    locked_pcrs=tuple(sorted(self._locked)),
                    digest="SHA384",
                )
            case GetRandomRequest():
                return GetRandomResponse(os.urandom(RANDOM_BYTES))
        raise TypeError(f"unhandled NSM request {type(request).__name__}")  # pragma: no cover

    # --- attestation -----------------------------------------------------------------------

    def _attest(self, request: AttestationRequest) -> Response:
        fields = (request.user_data, request.nonce, request.public_key)
        if any(v is not None and len(v) > MAX_ATTESTATION_FIELD_BYTES for v in fields):
            return ErrorResponse("InputTooLarge")
        if request.public_key == b"":
            return ErrorResponse("InvalidArgument")  # a document's public_key is 1..1024 bytes
        now = as_utc(self._clock(), "times")
        leaf = self._current_leaf(now)
        document = AttestationDocument(
            module_id=self._module_id,
            timestamp=_millis(now),
            # nsm-api: "Map of all locked PCRs at the moment the attestation document was
            # generated" -- PCR0-15 always, plus any user PCR locked since.
            pcrs={index: self._pcrs[index] for index in sorted(self._locked)},
            certificate=leaf.der,
            cabundle=self._credentials.cabundle,
            public_key=request.public_key,
            user_data=request.user_data,
            nonce=request.nonce,
        )
        payload = encode_attestation_payload(document)
        protected = es384_protected_header()
        der_signature = leaf.key.sign(sig_structure(protected, payload), ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(der_signature)
        signature = r.to_bytes(48, "big") + s.to_bytes(48, "big")
        cose = CoseSign1(protected=protected, unprotected={}, payload=payload, signature=signature)
        return AttestationResponse(encode_cose_sign1(cose))

    def _current_leaf(self, now: dt.datetime) -> _Leaf:
        instance = self._credentials.instance_certificate
        if not instance.not_valid_before_utc <= now < instance.not_valid_after_utc:
            raise SecureModuleError(
                f"the simulated instance CA is valid from "
                f"{instance.not_valid_before_utc.isoformat()} to "
                f"{instance.not_valid_after_utc.isoformat()}, not at {now.isoformat()}: "
                "the host must re-provision this enclave with new instance credentials"
            )
        leaf = self._leaf
        target_end = min(now + LEAF_LIFETIME, instance.not_valid_after_utc)
        if (
            leaf is None
            or not leaf.certificate.not_valid_before_utc
            <= now
            < leaf.certificate.not_valid_after_utc
            or (
                leaf.certificate.not_valid_after_utc - now < LEAF_RENEW_BEFORE
                and target_end > leaf.certificate.not_valid_after_utc
            )
        ):
            leaf = self._issue_leaf(now, target_end)
            self._leaf = leaf
        return leaf

    def _issue_leaf(self, now: dt.datetime, not_after: dt.datetime) -> _Leaf:
        credentials = self._credentials
        key = _new_key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{self._module_id}.{credentials.region}.cape"))
            .issuer_name(credentials.instance_certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(
                max(now - BACKDATE, credentials.instance_certificate.not_valid_before_utc)
            )
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=True,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=False,  # as on AWS leaves
            )
            # No authority key identifier, exactly like AWS's leaves.
            .sign(credentials.instance_key, hashes.SHA384())
        )
        der = certificate.public_bytes(serialization.Encoding.DER)
        return _Leaf(key=key, certificate=certificate, der=der)
