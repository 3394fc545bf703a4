"""Verifier checks that need documents we can sign ourselves: a leaf that is a CA, a leaf
without digitalSignature, a non-P-384 leaf, a future timestamp, a forged chain that brings
its own root, and live documents from the simulated secure module."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from cape.enclave.secure_module.simulated import (
    InstanceCredentials,
    SimulatedAuthority,
    SimulatedSecureModule,
)
from cape.errors import (
    ChainError,
    DocumentExpiredError,
    DocumentTimestampError,
    NonceMismatchError,
    SignatureError,
)
from cape.formats.attestation import AttestationDocument, encode_attestation_payload
from cape.formats.cose import (
    CoseSign1,
    encode_cose_sign1,
    es384_protected_header,
    sig_structure,
)
from cape.verify.policy import AttestationPolicy
from cape.verify.verifier import verify_archived_attestation, verify_attestation

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
PCRS = {i: (b"\x5a" if i < 3 else b"\x00") * 48 for i in range(16)}


@pytest.fixture(scope="module")
def authority() -> SimulatedAuthority:
    return SimulatedAuthority.generate(now=NOW - dt.timedelta(days=1))


@pytest.fixture(scope="module")
def credentials(authority: SimulatedAuthority) -> InstanceCredentials:
    return authority.issue_instance(NOW - dt.timedelta(hours=1))


def _leaf(
    credentials: InstanceCredentials,
    *,
    key: ec.EllipticCurvePrivateKey | None = None,
    ca: bool = False,
    digital_signature: bool = True,
    basic_constraints: bool = True,
) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = key or ec.generate_private_key(ec.SECP384R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
        .issuer_name(credentials.instance_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=30))
        .not_valid_after(NOW + dt.timedelta(hours=2))
        .add_extension(
            x509.KeyUsage(
                digital_signature=digital_signature,
                content_commitment=True,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=False,
        )
    )
    if basic_constraints:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=None), critical=True
        )
    cert = builder.sign(credentials.instance_key, hashes.SHA384())
    return key, cert.public_bytes(serialization.Encoding.DER)


def _sign(
    key: ec.EllipticCurvePrivateKey,
    leaf_der: bytes,
    cabundle: tuple[bytes, ...],
    *,
    timestamp: dt.datetime = NOW,
    nonce: bytes | None = b"nonce",
) -> bytes:
    document = AttestationDocument(
        module_id="i-0123456789abcdef0-enc0123456789abcdef",
        timestamp=int(timestamp.timestamp() * 1000),
        pcrs=PCRS,
        certificate=leaf_der,
        cabundle=cabundle,
        public_key=b"\x07" * 32,
        user_data=None,
        nonce=nonce,
    )
    payload = encode_attestation_payload(document)
    protected = es384_protected_header()
    r, s = decode_dss_signature(
        key.sign(sig_structure(protected, payload), ec.ECDSA(hashes.SHA384()))
    )
    signature = r.to_bytes(48, "big") + s.to_bytes(48, "big")  # raw r || s, ES384 sizes
    return encode_cose_sign1(CoseSign1(protected, {}, payload, signature))


def test_well_formed_synthetic_document_verifies(
    authority: SimulatedAuthority, credentials: InstanceCredentials
) -> None:
    key, leaf = _leaf(credentials)
    doc = _sign(key, leaf, credentials.cabundle)
    policy = AttestationPolicy(nonce=b"nonce")
    verified = verify_attestation(doc, root=authority.root_certificate, now=NOW, policy=policy)
    assert verified.public_key == b"\x07" * 32


def test_leaf_that_is_a_ca_is_rejected(
    authority: SimulatedAuthority, credentials: InstanceCredentials
) -> None:
    key, leaf = _leaf(credentials, ca=True)
    with pytest.raises(ChainError):
        verify_attestation(
            _sign(key, leaf, credentials.cabundle), root=authority.root_certificate, now=NOW
        )


def test_leaf_without_digital_signature_is_rejected(
    authority: SimulatedAuthority, credentials: InstanceCredentials
) -> None:
    key, leaf = _leaf(credentials, digital_signature=False)
    with pytest.raises(ChainError, match="digitalSignature"):
        verify_attestation(
            _sign(key, leaf, credentials.cabundle), root=authority.root_certificate, now=NOW
        )


def test_leaf_without_basic_constraints_is_rejected(
    authority: SimulatedAuthority, credentials: InstanceCredentials
) -> None:
    key, leaf = _leaf(credentials, basic_constraints=False)
    with pytest.raises(ChainError, match="lacks a required extension"):
        verify_attestation(
            _sign(key, leaf, credentials.cabundle), root=authority.root_certificate, now=NOW
        )


def test_leaf_with_a_p256_key_is_rejected(
    authority: SimulatedAuthority, credentials: InstanceCredentials
) -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    _, leaf = _leaf(credentials, key=p256)
    with pytest.raises(SignatureError, match="P-384"):
        verify_attestation(
            _sign(p256, leaf, credentials.cabundle), root=authority.root_certificate, now=NOW
        )


def test_signature_by_another_key_is_rejected(
    authority: SimulatedAuthority, credentials: InstanceCredentials
) -> None:
    _, leaf = _leaf(credentials)
    impostor = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(SignatureError):
        verify_attestation(
            _sign(impostor, leaf, credentials.cabundle), root=authority.root_certificate, now=NOW
        )


def test_forged_chain_bringing_its_own_root_is_rejected(authority: SimulatedAuthority) -> None:
    """The bundle's root is never trusted on its own say-so: only the pinned root counts."""
    forger = SimulatedAuthority.generate(now=NOW - dt.timedelta(days=1))
    forged = forger.issue_instance(NOW - dt.timedelta(hours=1))
    key, leaf = _leaf(forged)
    doc = _sign(key, leaf, forged.cabundle)
    verify_attestation(doc, root=forger.root_certificate, now=NOW)  # self-consistent
    with pytest.raises(ChainError, match="pinned root"):
        verify_attestation(doc, root=authority.root_certificate, now=NOW)


def test_chain_missing_an_intermediate_is_rejected(
    authority: SimulatedAuthority, credentials: InstanceCredentials
) -> None:
    key, leaf = _leaf(credentials)
    root, _regional, zonal, instance = credentials.cabundle
    with pytest.raises(ChainError):
        verify_attestation(
            _sign(key, leaf, (root, zonal, instance)), root=authority.root_certificate, now=NOW
        )


def test_future_timestamp_is_rejected_beyond_clock_skew(
    authority: SimulatedAuthority, credentials: InstanceCredentials
) -> None:
    key, leaf = _leaf(credentials)
    root = authority.root_certificate
    slightly = _sign(key, leaf, credentials.cabundle, timestamp=NOW + dt.timedelta(seconds=30))
    verify_attestation(slightly, root=root, now=NOW)  # within the default 60 s skew
    far = _sign(key, leaf, credentials.cabundle, timestamp=NOW + dt.timedelta(minutes=10))
    with pytest.raises(DocumentTimestampError):
        verify_attestation(far, root=root, now=NOW)


def test_max_age_is_enforced_and_configurable(
    authority: SimulatedAuthority, credentials: InstanceCredentials
) -> None:
    key, leaf = _leaf(credentials)
    root = authority.root_certificate
    doc = _sign(key, leaf, credentials.cabundle, timestamp=NOW - dt.timedelta(minutes=6))
    with pytest.raises(DocumentExpiredError):
        verify_attestation(doc, root=root, now=NOW)
    loose = AttestationPolicy(max_age=dt.timedelta(minutes=10))
    verify_attestation(doc, root=root, now=NOW, policy=loose)
    verify_archived_attestation(doc, root=root)


def test_live_simulated_module_document(authority: SimulatedAuthority) -> None:
    clock_time = dt.datetime.now(dt.UTC)
    module = SimulatedSecureModule(authority.issue_instance(clock_time))
    document = module.attestation(nonce=b"client nonce", public_key=b"\x01" * 32)
    root = authority.root_certificate
    verified = verify_attestation(
        document, root=root, now=clock_time, policy=AttestationPolicy(nonce=b"client nonce")
    )
    assert verified.module_id == module.module_id
    with pytest.raises(NonceMismatchError):
        verify_attestation(
            document, root=root, now=clock_time, policy=AttestationPolicy(nonce=b"other")
        )
