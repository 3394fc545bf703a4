"""The simulated NSM: its documents pass the real verifier, its chain has AWS's shape, and it
answers every NSM request the way the device does, refusals included."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import re
import types
from collections.abc import Iterator

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from cape.enclave.measure import measure_runtime
from cape.enclave.secure_module.simulated import (
    InstanceCredentials,
    SimulatedAuthority,
    SimulatedSecureModule,
)
from cape.errors import (
    CertificateExpiredError,
    ChainError,
    DebugEnclaveError,
    NSMError,
    SecureModuleError,
)
from cape.formats.attestation import AttestationDocument, parse_attestation
from cape.formats.cose import parse_cose_sign1
from cape.formats.nsm import DescribePCRResponse
from cape.verify.policy import DEFAULT_MAX_AGE, AttestationPolicy
from cape.verify.verifier import verify_attestation

T0 = dt.datetime(2025, 3, 1, 12, 0, 0, 250_000, tzinfo=dt.UTC)
PCRS = {i: hashlib.sha384(b"pcr%d" % i).digest() for i in range(16)}
NONCE = b"\x42" * 32
ZERO = bytes(48)


class Clock:
    """A settable clock for the module."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture(scope="module")
def authority() -> SimulatedAuthority:
    return SimulatedAuthority.generate(now=T0 - dt.timedelta(days=30))


@pytest.fixture(scope="module")
def credentials(authority: SimulatedAuthority) -> InstanceCredentials:
    return authority.issue_instance(T0, instance_id="i-0123456789abcdef0")


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def module(credentials: InstanceCredentials, clock: Clock) -> SimulatedSecureModule:
    return SimulatedSecureModule(credentials, pcrs=PCRS, clock=clock)


def verify(
    document: bytes,
    authority: SimulatedAuthority,
    at: dt.datetime,
    *,
    nonce: bytes | None = None,
    max_age: dt.timedelta | None = DEFAULT_MAX_AGE,
    allow_debug: bool = False,
) -> AttestationDocument:
    policy = AttestationPolicy(nonce=nonce, max_age=max_age, allow_debug=allow_debug)
    return verify_attestation(document, root=authority.root_certificate, now=at, policy=policy)


def nsm_error(excinfo: pytest.ExceptionInfo[NSMError]) -> str:
    return excinfo.value.code


# --- documents verify -----------------------------------------------------------------------


def test_document_verifies_against_the_authority_root(
    module: SimulatedSecureModule, authority: SimulatedAuthority
) -> None:
    document = module.attestation(nonce=NONCE)
    verified = verify(document, authority, T0, nonce=NONCE)
    assert verified.module_id == module.module_id
    assert verified.timestamp == 1_740_830_400_250  # T0 in ms
    assert dict(verified.pcrs) == PCRS
    assert verified.digest == "SHA384"


def test_document_has_the_nitro_envelope(module: SimulatedSecureModule) -> None:
    document = module.attestation()
    assert document.startswith(bytes.fromhex("84 44 a1 01 38 22 a0 59"))  # untagged, {1: -35}, {}
    cose = parse_cose_sign1(document)
    assert cose.unprotected == {}
    assert len(cose.signature) == 96
    payload = cbor2.loads(cose.payload)
    assert list(payload) == [
        "module_id",
        "digest",
        "timestamp",
        "pcrs",
        "certificate",
        "cabundle",
        "public_key",
        "user_data",
        "nonce",
    ]
    assert payload["public_key"] is None
    assert payload["user_data"] is None
    assert payload["nonce"] is None


def test_optional_fields_are_carried_verbatim(
    module: SimulatedSecureModule, authority: SimulatedAuthority
) -> None:
    user_data = b'{"func_checksum": "abc"}'
    public_key = b"\x30\x82\x01\x22" + b"\x07" * 290
    document = module.attestation(user_data=user_data, nonce=NONCE, public_key=public_key)
    verified = verify(document, authority, T0, nonce=NONCE)
    assert (verified.user_data, verified.nonce, verified.public_key) == (
        user_data,
        NONCE,
        public_key,
    )


def test_empty_user_data_and_nonce_are_kept(module: SimulatedSecureModule) -> None:
    signed = parse_attestation(module.attestation(user_data=b"", nonce=b""))
    assert signed.document.user_data == b""
    assert signed.document.nonce == b""


def test_1024_byte_fields_are_accepted(
    module: SimulatedSecureModule, authority: SimulatedAuthority
) -> None:
    big = b"\x01" * 1024
    document = module.attestation(user_data=big, nonce=big, public_key=big)
    verified = verify(document, authority, T0, nonce=big)
    assert verified.user_data == verified.public_key == big


@pytest.mark.parametrize("field", ["user_data", "nonce", "public_key"])
def test_1025_byte_field_is_input_too_large(module: SimulatedSecureModule, field: str) -> None:
    with pytest.raises(NSMError) as caught:
        module.attestation(**{field: b"\x01" * 1025})
    assert nsm_error(caught) == "InputTooLarge"


def test_empty_public_key_is_invalid_argument(module: SimulatedSecureModule) -> None:
    with pytest.raises(NSMError) as caught:
        module.attestation(public_key=b"")
    assert nsm_error(caught) == "InvalidArgument"


def test_document_from_another_authority_fails_the_chain(
    authority: SimulatedAuthority, clock: Clock
) -> None:
    other = SimulatedAuthority.generate(now=T0)
    stranger = SimulatedSecureModule(other.issue_instance(T0), pcrs=PCRS, clock=clock)
    document = stranger.attestation(nonce=NONCE)
    verify(document, other, T0, nonce=NONCE)  # fine under its own root
    with pytest.raises(ChainError):
        verify(document, authority, T0, nonce=NONCE)


# --- chain shape ----------------------------------------------------------------------------


def _certificates(document: bytes) -> tuple[list[x509.Certificate], x509.Certificate]:
    signed = parse_attestation(document)
    bundle = [x509.load_der_x509_certificate(der) for der in signed.document.cabundle]
    return bundle, x509.load_der_x509_certificate(signed.document.certificate)


def _ext(
    cert: x509.Certificate, kind: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(kind)


def test_chain_has_the_aws_shape(
    module: SimulatedSecureModule, authority: SimulatedAuthority
) -> None:
    bundle, leaf = _certificates(module.attestation())
    assert len(bundle) == 4
    root, *_, instance = bundle
    assert root == authority.root_certificate
    assert root.subject.rfc4514_string() == "CN=cape-simulated-root,OU=Simulated Nitro,O=Cape"

    for cert, path_length in zip(bundle, (None, 2, 1, 0), strict=True):
        constraints = _ext(cert, x509.BasicConstraints)
        assert constraints.critical
        assert constraints.value == x509.BasicConstraints(ca=True, path_length=path_length)
        usage = _ext(cert, x509.KeyUsage)
        assert usage.critical
        assert isinstance(usage.value, x509.KeyUsage)
        assert usage.value.key_cert_sign
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA384)
    # AKI of each CA names its issuer's SKI.
    for issuer, cert in itertools.pairwise(bundle):
        aki = _ext(cert, x509.AuthorityKeyIdentifier).value
        ski = _ext(issuer, x509.SubjectKeyIdentifier).value
        assert isinstance(aki, x509.AuthorityKeyIdentifier)
        assert isinstance(ski, x509.SubjectKeyIdentifier)
        assert aki.key_identifier == ski.digest
        assert cert.issuer == issuer.subject
    assert instance.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == (
        "i-0123456789abcdef0.local-1.cape-simulated"
    )

    # The leaf: CA=false (critical), digitalSignature + nonRepudiation, no AKI, like AWS.
    assert _ext(leaf, x509.BasicConstraints).critical
    assert _ext(leaf, x509.BasicConstraints).value == x509.BasicConstraints(
        ca=False, path_length=None
    )
    leaf_usage = _ext(leaf, x509.KeyUsage).value
    assert isinstance(leaf_usage, x509.KeyUsage)
    assert leaf_usage.digital_signature
    assert leaf_usage.content_commitment
    assert not leaf_usage.key_cert_sign
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA384)
    with pytest.raises(x509.ExtensionNotFound):
        leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert leaf.issuer == instance.subject
    public = leaf.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP384R1)
    assert leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == (
        f"{module.module_id}.local-1.cape"
    )


def test_chain_lifetimes_match_aws(module: SimulatedSecureModule) -> None:
    bundle, leaf = _certificates(module.attestation())
    root, regional, zonal, instance = bundle
    expected = [
        (regional, dt.timedelta(days=20)),
        (zonal, dt.timedelta(days=5)),
        (instance, dt.timedelta(hours=24)),
        (leaf, dt.timedelta(hours=3)),
    ]
    for cert, lifetime in expected:
        assert abs(cert.not_valid_after_utc - (T0 + lifetime)) < dt.timedelta(seconds=1)
        assert cert.not_valid_before_utc <= T0
    assert root.not_valid_after_utc - root.not_valid_before_utc > dt.timedelta(days=30 * 365)


def test_module_id_and_instance_id_look_like_aws(authority: SimulatedAuthority) -> None:
    credentials = authority.issue_instance(T0)
    assert re.fullmatch(r"i-[0-9a-f]{17}", credentials.instance_id)
    module = SimulatedSecureModule(credentials, pcrs=PCRS, clock=Clock(T0))
    assert re.fullmatch(rf"{credentials.instance_id}-enc[0-9a-f]{{16}}", module.module_id)


# --- leaf lifetime --------------------------------------------------------------------------


def test_leaf_is_reused_then_renewed_near_expiry(
    module: SimulatedSecureModule, authority: SimulatedAuthority, clock: Clock
) -> None:
    first = parse_attestation(module.attestation()).document.certificate
    clock.now = T0 + dt.timedelta(hours=2)
    assert parse_attestation(module.attestation()).document.certificate == first
    clock.now = T0 + dt.timedelta(hours=2, minutes=55)  # 5 minutes left: renew
    document = module.attestation(nonce=NONCE)
    second = parse_attestation(document).document.certificate
    assert second != first
    later = T0 + dt.timedelta(hours=3, minutes=30)
    clock.now = later
    third_document = module.attestation(nonce=NONCE)
    assert parse_attestation(third_document).document.certificate == second
    verify(third_document, authority, later, nonce=NONCE)


def test_leaf_past_its_window_is_replaced(
    module: SimulatedSecureModule, authority: SimulatedAuthority, clock: Clock
) -> None:
    old = module.attestation(nonce=NONCE)
    later = T0 + dt.timedelta(hours=5)
    clock.now = later
    fresh = module.attestation(nonce=NONCE)
    verify(fresh, authority, later, nonce=NONCE, max_age=None)
    with pytest.raises(CertificateExpiredError):
        verify(old, authority, later, nonce=NONCE, max_age=None)


def test_leaf_never_outlives_the_instance_ca(
    module: SimulatedSecureModule, credentials: InstanceCredentials, clock: Clock
) -> None:
    clock.now = T0 + dt.timedelta(hours=23)
    _, leaf = _certificates(module.attestation())
    end = credentials.instance_certificate.not_valid_after_utc
    assert leaf.not_valid_after_utc == end
    # Still the same leaf a minute later: no renewal storm once the instance CA caps it.
    clock.now = T0 + dt.timedelta(hours=23, minutes=55)
    _, again = _certificates(module.attestation())
    assert again == leaf


def test_expired_instance_ca_asks_the_host_to_reprovision(
    module: SimulatedSecureModule, clock: Clock
) -> None:
    clock.now = T0 + dt.timedelta(hours=24, seconds=1)
    with pytest.raises(SecureModuleError, match="re-provision") as caught:
        module.attestation()
    assert not isinstance(caught.value, NSMError)
    # Other requests still work; only signing needs the chain.
    assert len(module.get_random()) == 256


# --- debug mode -----------------------------------------------------------------------------


def test_debug_documents_are_refused_by_default(
    credentials: InstanceCredentials, authority: SimulatedAuthority
) -> None:
    module = SimulatedSecureModule(credentials, pcrs=PCRS, clock=Clock(T0), debug=True)
    document = module.attestation(nonce=NONCE)
    pcrs = parse_attestation(document).document.pcrs
    assert pcrs[0] == pcrs[1] == pcrs[2] == ZERO
    assert pcrs[4] == PCRS[4]  # Nitro keeps PCR3/PCR4 in debug mode
    with pytest.raises(DebugEnclaveError):
        verify(document, authority, T0, nonce=NONCE)
    verify(document, authority, T0, nonce=NONCE, allow_debug=True)


# --- PCRs -----------------------------------------------------------------------------------


def test_default_pcrs_are_the_runtime_measurement(credentials: InstanceCredentials) -> None:
    module = SimulatedSecureModule(credentials, clock=Clock(T0))
    measurement = measure_runtime()
    pcrs = parse_attestation(module.attestation()).document.pcrs
    assert sorted(pcrs) == list(range(16))
    assert (pcrs[0], pcrs[1], pcrs[2]) == (measurement.pcr0, measurement.pcr1, measurement.pcr2)
    assert pcrs[4] == hashlib.sha384(ZERO + b"i-0123456789abcdef0").digest()
    assert pcrs[3] == pcrs[8] == ZERO


def test_describe_pcr(module: SimulatedSecureModule) -> None:
    assert module.describe_pcr(0).lock is True
    assert module.describe_pcr(0).data == PCRS[0]
    assert module.describe_pcr(16).lock is False
    assert module.describe_pcr(31).data == ZERO
    for index in (32, 65535):
        with pytest.raises(NSMError) as caught:
            module.describe_pcr(index)
        assert nsm_error(caught) == "InvalidIndex"


def test_extend_pcr_chains_sha384(module: SimulatedSecureModule) -> None:
    once = module.extend_pcr(16, b"abc")
    assert once == hashlib.sha384(ZERO + b"abc").digest()
    twice = module.extend_pcr(16, b"def")
    assert twice == hashlib.sha384(once + b"def").digest()
    assert module.describe_pcr(16).data == twice
    assert module.describe_pcr(17).data == ZERO


@pytest.mark.parametrize(
    ("index", "code"), [(0, "ReadOnlyIndex"), (15, "ReadOnlyIndex"), (32, "InvalidIndex")]
)
def test_extend_pcr_refuses_boot_pcrs_and_bad_indices(
    module: SimulatedSecureModule, index: int, code: str
) -> None:
    with pytest.raises(NSMError) as caught:
        module.extend_pcr(index, b"x")
    assert nsm_error(caught) == code


def test_lock_pcr_freezes_a_user_pcr_and_adds_it_to_documents(
    module: SimulatedSecureModule,
) -> None:
    value = module.extend_pcr(16, b"config")
    module.lock_pcr(16)
    assert module.describe_pcr(16) == DescribePCRResponse(lock=True, data=value)
    with pytest.raises(NSMError) as caught:
        module.extend_pcr(16, b"more")
    assert nsm_error(caught) == "ReadOnlyIndex"
    module.lock_pcr(16)  # locking again is harmless
    # nsm-api: a document carries "all locked PCRs".
    pcrs = parse_attestation(module.attestation()).document.pcrs
    assert sorted(pcrs) == [*range(16), 16]
    assert pcrs[16] == value


@pytest.mark.parametrize(("index", "code"), [(3, "ReadOnlyIndex"), (32, "InvalidIndex")])
def test_lock_pcr_refusals(module: SimulatedSecureModule, index: int, code: str) -> None:
    with pytest.raises(NSMError) as caught:
        module.lock_pcr(index)
    assert nsm_error(caught) == code


def test_lock_pcrs_locks_a_prefix(module: SimulatedSecureModule) -> None:
    module.lock_pcrs(20)
    assert module.describe_nsm().locked_pcrs == tuple(range(20))
    assert module.describe_pcr(19).lock is True
    assert module.describe_pcr(20).lock is False
    module.lock_pcrs(32)
    assert module.describe_nsm().locked_pcrs == tuple(range(32))
    with pytest.raises(NSMError) as caught:
        module.lock_pcrs(33)
    assert nsm_error(caught) == "InvalidIndex"


def test_describe_nsm(module: SimulatedSecureModule) -> None:
    description = module.describe_nsm()
    assert (description.version_major, description.version_minor, description.version_patch) == (
        1,
        0,
        0,
    )
    assert description.module_id == module.module_id
    assert description.max_pcrs == 32
    assert description.locked_pcrs == tuple(range(16))
    assert description.digest == "SHA384"


def test_get_random_returns_fresh_256_bytes(module: SimulatedSecureModule) -> None:
    first, second = module.get_random(), module.get_random()
    assert len(first) == len(second) == 256
    assert first != second


# --- malformed requests never raise ---------------------------------------------------------

INVALID_ARGUMENT = bytes.fromhex("a1 65 4572726f72 6f 496e76616c6964417267756d656e74")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"garbage",
        b"",
        bytes(cbor2.dumps("Reboot")),
        bytes(cbor2.dumps({"Attestation": {"document": b"x"}})),
        bytes(cbor2.dumps({"DescribePCR": {"index": 65536}})),
        bytes(cbor2.dumps({"DescribePCR": {"index": 1}})) + b"\x00",
    ],
    ids=["garbage", "empty", "unknown", "response-shaped", "u16-overflow", "trailing"],
)
def test_malformed_request_gets_an_invalid_argument_response(
    module: SimulatedSecureModule, request_bytes: bytes
) -> None:
    assert module.process(request_bytes) == INVALID_ARGUMENT


def test_oversized_request_gets_input_too_large(module: SimulatedSecureModule) -> None:
    response = module.process(bytes(4097))
    assert response == bytes.fromhex("a1 65 4572726f72 6d 496e707574546f6f4c61726765")


# --- the root key stays with the authority --------------------------------------------------


def _reachable(obj: object, seen: set[int] | None = None) -> Iterator[object]:
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    yield obj
    children: list[object] = []
    if isinstance(obj, dict):
        children = [*obj.keys(), *obj.values()]
    elif isinstance(obj, list | tuple | set | frozenset):
        children = list(obj)
    elif isinstance(obj, types.FunctionType):
        children = [cell.cell_contents for cell in obj.__closure__ or ()]
    elif hasattr(obj, "__dict__") and not isinstance(obj, type | types.ModuleType):
        children = list(vars(obj).values())
    for child in children:
        yield from _reachable(child, seen)


def _holds_root_key(obj: object, authority: SimulatedAuthority) -> bool:
    root_public = authority.root_certificate.public_key()
    return any(
        isinstance(item, ec.EllipticCurvePrivateKey) and item.public_key() == root_public
        for item in _reachable(obj)
    )


def test_module_does_not_hold_the_root_private_key(
    module: SimulatedSecureModule, authority: SimulatedAuthority
) -> None:
    module.attestation()  # with a leaf issued, too
    assert not _holds_root_key(module, authority)
    assert _holds_root_key(authority, authority)  # the walk does find it where it is


def test_credentials_hold_the_instance_key_only(
    credentials: InstanceCredentials, authority: SimulatedAuthority
) -> None:
    assert not _holds_root_key(credentials, authority)
    assert credentials.instance_key.public_key() == credentials.instance_certificate.public_key()
    assert "instance_key" not in repr(credentials)


# --- misuse ---------------------------------------------------------------------------------


def test_constructor_refuses_bad_pcrs(credentials: InstanceCredentials) -> None:
    with pytest.raises(ValueError, match="PCR16"):
        SimulatedSecureModule(credentials, pcrs={16: ZERO})
    with pytest.raises(ValueError, match="48 bytes"):
        SimulatedSecureModule(credentials, pcrs={0: bytes(32)})


def test_authority_refuses_a_key_that_is_not_the_roots(authority: SimulatedAuthority) -> None:
    with pytest.raises(ValueError, match="does not belong"):
        SimulatedAuthority(ec.generate_private_key(ec.SECP384R1()), authority.root_certificate)


def test_root_pem_is_the_root_certificate(authority: SimulatedAuthority) -> None:
    assert x509.load_pem_x509_certificate(authority.root_pem) == authority.root_certificate
