"""The verifier against the three real AWS-signed documents, at times inside their windows.

Every check is also shown to fail: outside the window, with another root, after any
single-field tamper, and after flipping any byte.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cape.errors import (
    CapeError,
    CertificateExpiredError,
    ChainError,
    DebugEnclaveError,
    DocumentExpiredError,
    FormatError,
    NonceMismatchError,
    PCRMismatchError,
    SignatureError,
    VerificationError,
)
from cape.formats.attestation import parse_attestation
from cape.formats.cose import CoseSign1, encode_cose_sign1
from cape.verify.policy import AttestationPolicy
from cape.verify.roots import AWS_NITRO_ROOT_G1_SHA256, fingerprint, load_root_certificate
from cape.verify.verifier import verify_archived_attestation, verify_attestation
from tests.samples import ROOT_PEM, SAMPLE_IDS, SAMPLES, Sample, read_sample, requires_samples

pytestmark = requires_samples

PROD = SAMPLES[0]
DEBUG = SAMPLES[1]
ANJUNA = SAMPLES[2]
AUDIT = AttestationPolicy(max_age=None)  # audit at a chosen time: no live-age limit


@pytest.fixture(scope="module")
def aws_root() -> x509.Certificate:
    root = load_root_certificate(ROOT_PEM.read_bytes())
    assert fingerprint(root) == AWS_NITRO_ROOT_G1_SHA256
    return root


@pytest.fixture(scope="module")
def other_root() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aws.nitro-enclaves")])
    now = dt.datetime(2019, 10, 28, tzinfo=dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=365 * 30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA384())
    )


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_real_document_verifies_inside_its_window(
    sample: Sample, aws_root: x509.Certificate
) -> None:
    policy = AttestationPolicy(max_age=None, allow_debug=sample.debug)
    doc = verify_attestation(
        read_sample(sample), root=aws_root, now=sample.check_time, policy=policy
    )
    assert doc.module_id == sample.module_id


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_live_check_one_minute_after_issue_passes_default_max_age(
    sample: Sample, aws_root: x509.Certificate
) -> None:
    now = dt.datetime.fromtimestamp(sample.timestamp_ms / 1000, dt.UTC) + dt.timedelta(minutes=1)
    policy = AttestationPolicy(allow_debug=sample.debug)
    verify_attestation(read_sample(sample), root=aws_root, now=now, policy=policy)


def test_default_max_age_rejects_a_stale_document(aws_root: x509.Certificate) -> None:
    with pytest.raises(DocumentExpiredError, match="more than 300 s"):
        verify_attestation(read_sample(PROD), root=aws_root, now=PROD.check_time)


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_archived_document_verifies_at_its_own_timestamp(
    sample: Sample, aws_root: x509.Certificate
) -> None:
    policy = AttestationPolicy(allow_debug=sample.debug)
    doc = verify_archived_attestation(read_sample(sample), root=aws_root, policy=policy)
    assert doc.timestamp == sample.timestamp_ms


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
@pytest.mark.parametrize("side", ["before", "after"])
def test_rejected_outside_its_window(sample: Sample, side: str, aws_root: x509.Certificate) -> None:
    at = (
        sample.leaf_not_before - dt.timedelta(seconds=1)
        if side == "before"
        else sample.leaf_not_after + dt.timedelta(seconds=1)
    )
    policy = AttestationPolicy(max_age=None, allow_debug=True)
    with pytest.raises(CertificateExpiredError):
        verify_attestation(read_sample(sample), root=aws_root, now=at, policy=policy)


def test_rejected_at_wall_clock_time(aws_root: x509.Certificate) -> None:
    with pytest.raises(CertificateExpiredError):
        verify_attestation(read_sample(PROD), root=aws_root, now=dt.datetime.now(dt.UTC))


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_rejected_with_another_root(sample: Sample, other_root: x509.Certificate) -> None:
    policy = AttestationPolicy(max_age=None, allow_debug=True)
    with pytest.raises(ChainError, match="pinned root"):
        verify_attestation(
            read_sample(sample), root=other_root, now=sample.check_time, policy=policy
        )


def test_debug_document_rejected_unless_allowed(aws_root: x509.Certificate) -> None:
    with pytest.raises(DebugEnclaveError):
        verify_attestation(read_sample(DEBUG), root=aws_root, now=DEBUG.check_time, policy=AUDIT)


def test_nonce_must_match_exactly(aws_root: x509.Certificate) -> None:
    raw = read_sample(PROD)
    good = AttestationPolicy(max_age=None, nonce=b"\x01" * 1024)
    verify_attestation(raw, root=aws_root, now=PROD.check_time, policy=good)
    for nonce in (b"\x01" * 1023, b"\x01" * 1023 + b"\x02", b""):
        bad = AttestationPolicy(max_age=None, nonce=nonce)
        with pytest.raises(NonceMismatchError):
            verify_attestation(raw, root=aws_root, now=PROD.check_time, policy=bad)
    # A document without a nonce never satisfies a verifier that sent one.
    with pytest.raises(NonceMismatchError):
        verify_attestation(
            read_sample(ANJUNA),
            root=aws_root,
            now=ANJUNA.check_time,
            policy=AttestationPolicy(max_age=None, nonce=b"n"),
        )


def test_pcr_allow_lists(aws_root: x509.Certificate) -> None:
    raw = read_sample(PROD)
    doc = parse_attestation(raw).document
    pcr0 = doc.pcrs[0]
    ok = AttestationPolicy(max_age=None, pcrs={0: {b"\x00" * 48, pcr0}, 4: {doc.pcrs[4]}})
    verify_attestation(raw, root=aws_root, now=PROD.check_time, policy=ok)
    with pytest.raises(PCRMismatchError) as wrong:
        verify_attestation(
            raw,
            root=aws_root,
            now=PROD.check_time,
            policy=AttestationPolicy(max_age=None, pcrs={0: {b"\x11" * 48}}),
        )
    assert wrong.value.index == 0 and wrong.value.actual == pcr0
    with pytest.raises(PCRMismatchError) as absent:
        verify_attestation(
            raw,
            root=aws_root,
            now=PROD.check_time,
            policy=AttestationPolicy(max_age=None, pcrs={20: {b"\x00" * 48}}),
        )
    assert absent.value.actual is None


def test_naive_check_time_is_a_programming_error(aws_root: x509.Certificate) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_attestation(read_sample(PROD), root=aws_root, now=dt.datetime(2024, 9, 7, 15))


# --- single-field tampering --------------------------------------------------------------


def _retamper(raw: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """Re-encode the payload with one field changed, keeping the original signature."""
    cose = parse_attestation(raw).cose
    payload = dict(cbor2.loads(cose.payload))
    change(payload)
    tampered = CoseSign1(
        cose.protected, cose.unprotected, bytes(cbor2.dumps(payload)), cose.signature
    )
    return encode_cose_sign1(tampered)


def _flip(value: bytes) -> bytes:
    return bytes([value[0] ^ 0x01]) + value[1:]


TAMPERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "module_id": lambda p: p.update(module_id=p["module_id"][:-1] + "0"),
    "digest": lambda p: p.update(digest="SHA512"),
    "timestamp": lambda p: p.update(timestamp=p["timestamp"] + 1),
    "pcrs-value": lambda p: p.update(pcrs={**p["pcrs"], 2: _flip(p["pcrs"][2])}),
    "pcrs-extra": lambda p: p.update(pcrs={**p["pcrs"], 16: b"\x00" * 48}),
    "pcrs-removed": lambda p: p.update(pcrs={k: v for k, v in p["pcrs"].items() if k != 4}),
    "certificate": lambda p: p.update(certificate=p["cabundle"][-1]),
    "cabundle-order": lambda p: p.update(cabundle=list(reversed(p["cabundle"]))),
    "cabundle-dropped": lambda p: p.update(cabundle=p["cabundle"][:-1]),
    "cabundle-byte": lambda p: p.update(cabundle=[*p["cabundle"][:-1], _flip(p["cabundle"][-1])]),
    "public_key": lambda p: p.update(public_key=b"\x02" * 32),
    "public_key-presence": lambda p: p.update(public_key=None if p["public_key"] else b"k"),
    "user_data": lambda p: p.update(user_data=b'{"func_checksum": "forged"}'),
    "user_data-presence": lambda p: p.update(user_data=None if p["user_data"] else b""),
    "nonce": lambda p: p.update(nonce=b"attacker nonce"),
    "nonce-presence": lambda p: p.update(nonce=None if p["nonce"] else b""),
}


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
@pytest.mark.parametrize("field", list(TAMPERS))
def test_single_field_tamper_is_rejected(
    sample: Sample, field: str, aws_root: x509.Certificate
) -> None:
    tampered = _retamper(read_sample(sample), TAMPERS[field])
    policy = AttestationPolicy(max_age=None, allow_debug=True)
    with pytest.raises((SignatureError, FormatError)):
        verify_attestation(tampered, root=aws_root, now=sample.check_time, policy=policy)


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_envelope_tamper_is_rejected(sample: Sample, aws_root: x509.Certificate) -> None:
    cose = parse_attestation(read_sample(sample)).cose
    policy = AttestationPolicy(max_age=None, allow_debug=True)
    variants = {
        "signature": CoseSign1(cose.protected, {}, cose.payload, _flip(cose.signature)),
        "signature-s": CoseSign1(
            cose.protected, {}, cose.payload, cose.signature[:48] + _flip(cose.signature[48:])
        ),
        "protected": CoseSign1(
            bytes(cbor2.dumps({1: -35, 4: b"kid"})), {}, cose.payload, cose.signature
        ),
    }
    for name, variant in variants.items():
        with pytest.raises(SignatureError):
            (
                verify_attestation(
                    encode_cose_sign1(variant), root=aws_root, now=sample.check_time, policy=policy
                ),
                name,
            )


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_every_single_byte_flip_is_rejected(sample: Sample, aws_root: x509.Certificate) -> None:
    """Flip each byte of a whole real document in turn: none may verify, and every failure
    is a CapeError (never a raw library exception)."""
    raw = read_sample(sample)
    policy = AttestationPolicy(max_age=None, allow_debug=sample.debug)
    verify_attestation(raw, root=aws_root, now=sample.check_time, policy=policy)
    kinds: set[type[CapeError]] = set()
    for position in range(len(raw)):
        mutated = bytearray(raw)
        mutated[position] ^= 0x80
        try:
            verify_attestation(bytes(mutated), root=aws_root, now=sample.check_time, policy=policy)
        except CapeError as exc:
            kinds.add(type(exc))
        else:
            pytest.fail(f"flipping byte {position} still verified")
    assert SignatureError in kinds and FormatError in kinds
    assert all(issubclass(k, VerificationError | FormatError) for k in kinds)
