"""The verification cache: steps 0-2 skipped for bytes (and chains) already verified, only
inside their certificates' validity window; steps 3-6 always run with the caller's policy."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509

from cape.enclave.secure_module.simulated import SimulatedAuthority, SimulatedSecureModule
from cape.errors import (
    CertificateExpiredError,
    ChainError,
    DebugEnclaveError,
    DocumentExpiredError,
    NonceMismatchError,
    PCRMismatchError,
    SignatureError,
)
from cape.formats.attestation import parse_attestation
from cape.verify import verifier
from cape.verify.policy import AttestationPolicy
from cape.verify.verifier import VerificationCache, verify_attestation

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
PCRS = {i: bytes([0x5A + i]) * 48 for i in range(16)}


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture(scope="module")
def authority() -> SimulatedAuthority:
    return SimulatedAuthority.generate(now=NOW - dt.timedelta(days=1))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def module(authority: SimulatedAuthority, clock: Clock) -> SimulatedSecureModule:
    return SimulatedSecureModule(
        authority.issue_instance(NOW - dt.timedelta(hours=1)), pcrs=PCRS, clock=clock
    )


@pytest.fixture
def root(authority: SimulatedAuthority) -> x509.Certificate:
    return authority.root_certificate


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of the expensive steps actually run (signature, chain)."""
    counts = {"signature": 0, "chain": 0}
    signature, chain = verifier._verify_signature, verifier._verify_chain

    def count_signature(*args: object) -> None:
        counts["signature"] += 1
        signature(*args)  # type: ignore[arg-type]

    def count_chain(*args: object) -> None:
        counts["chain"] += 1
        chain(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(verifier, "_verify_signature", count_signature)
    monkeypatch.setattr(verifier, "_verify_chain", count_chain)
    return counts


def test_same_bytes_skip_signature_and_chain(
    module: SimulatedSecureModule, root: x509.Certificate, calls: dict[str, int]
) -> None:
    cache = VerificationCache()
    data = module.attestation(nonce=b"n", public_key=b"\x01" * 32)
    first = verify_attestation(data, root=root, now=NOW, cache=cache)
    second = verify_attestation(data, root=root, now=NOW + dt.timedelta(seconds=1), cache=cache)
    assert second == first
    assert cache.hits == 1
    assert calls == {"signature": 1, "chain": 1}
    verify_attestation(data, root=root, now=NOW)  # no cache: everything runs
    assert calls == {"signature": 2, "chain": 2}


def test_documents_sharing_a_chain_skip_only_the_chain(
    module: SimulatedSecureModule, root: x509.Certificate, calls: dict[str, int]
) -> None:
    cache = VerificationCache()
    for nonce in (b"a", b"b", b"c"):
        data = module.attestation(nonce=nonce, public_key=b"\x01" * 32)
        verify_attestation(data, root=root, now=NOW, cache=cache)
    assert cache.hits == 0
    assert calls == {"signature": 3, "chain": 1}


def test_a_forged_signature_on_a_cached_chain_is_still_refused(
    module: SimulatedSecureModule, root: x509.Certificate
) -> None:
    cache = VerificationCache()
    data = module.attestation(nonce=b"a", public_key=b"\x01" * 32)
    verify_attestation(data, root=root, now=NOW, cache=cache)
    forged = bytearray(data)
    forged[-5] ^= 1  # inside the signature, at the end of the COSE array
    for _ in range(2):
        with pytest.raises(SignatureError):
            verify_attestation(bytes(forged), root=root, now=NOW, cache=cache)


def test_policy_checks_run_on_every_hit(
    module: SimulatedSecureModule, root: x509.Certificate
) -> None:
    cache = VerificationCache()
    data = module.attestation(nonce=b"n", public_key=b"\x01" * 32)
    verify_attestation(data, root=root, now=NOW, cache=cache)
    with pytest.raises(NonceMismatchError):
        verify_attestation(
            data, root=root, now=NOW, cache=cache, policy=AttestationPolicy(nonce=b"other")
        )
    with pytest.raises(PCRMismatchError):
        verify_attestation(
            data,
            root=root,
            now=NOW,
            cache=cache,
            policy=AttestationPolicy(pcrs={0: frozenset({bytes(48)})}),
        )
    with pytest.raises(DocumentExpiredError):
        verify_attestation(data, root=root, now=NOW + dt.timedelta(minutes=6), cache=cache)
    assert cache.hits == 3


def test_debug_documents_stay_refused_after_caching(
    authority: SimulatedAuthority, root: x509.Certificate, clock: Clock
) -> None:
    debug = SimulatedSecureModule(
        authority.issue_instance(NOW - dt.timedelta(hours=1)), debug=True, clock=clock
    )
    cache = VerificationCache()
    data = debug.attestation(nonce=b"n", public_key=b"\x01" * 32)
    allowed = AttestationPolicy(allow_debug=True)
    verify_attestation(data, root=root, now=NOW, cache=cache, policy=allowed)
    with pytest.raises(DebugEnclaveError):
        verify_attestation(data, root=root, now=NOW, cache=cache)


def test_outside_the_certificates_window_everything_runs_again(
    module: SimulatedSecureModule, root: x509.Certificate, calls: dict[str, int]
) -> None:
    cache = VerificationCache()
    data = module.attestation(nonce=b"n", public_key=b"\x01" * 32)
    verify_attestation(data, root=root, now=NOW, cache=cache)
    leaf = parse_attestation(data).document.certificate
    expiry = x509.load_der_x509_certificate(leaf).not_valid_after_utc
    no_age_limit = AttestationPolicy(max_age=None)
    with pytest.raises(CertificateExpiredError):
        verify_attestation(
            data, root=root, now=expiry + dt.timedelta(seconds=1), cache=cache, policy=no_age_limit
        )
    assert cache.hits == 0
    assert calls == {"signature": 2, "chain": 2}


def test_another_root_does_not_hit(module: SimulatedSecureModule, root: x509.Certificate) -> None:
    cache = VerificationCache()
    data = module.attestation(nonce=b"n", public_key=b"\x01" * 32)
    verify_attestation(data, root=root, now=NOW, cache=cache)
    other = SimulatedAuthority.generate(now=NOW - dt.timedelta(days=1)).root_certificate
    with pytest.raises(ChainError):
        verify_attestation(data, root=other, now=NOW, cache=cache)
    assert cache.hits == 0


def test_failures_are_not_cached(
    module: SimulatedSecureModule, root: x509.Certificate, calls: dict[str, int]
) -> None:
    cache = VerificationCache()
    other = SimulatedAuthority.generate(now=NOW - dt.timedelta(days=1)).root_certificate
    data = module.attestation(nonce=b"n", public_key=b"\x01" * 32)
    for _ in range(2):
        with pytest.raises(ChainError):
            verify_attestation(data, root=other, now=NOW, cache=cache)
    assert calls == {"signature": 2, "chain": 2}


def test_the_cache_is_bounded(module: SimulatedSecureModule, root: x509.Certificate) -> None:
    cache = VerificationCache(max_entries=1)
    first = module.attestation(nonce=b"1", public_key=b"\x01" * 32)
    second = module.attestation(nonce=b"2", public_key=b"\x01" * 32)
    verify_attestation(first, root=root, now=NOW, cache=cache)
    verify_attestation(second, root=root, now=NOW, cache=cache)
    verify_attestation(first, root=root, now=NOW, cache=cache)  # evicted by the second
    assert cache.hits == 0
    verify_attestation(first, root=root, now=NOW, cache=cache)
    assert cache.hits == 1
    with pytest.raises(ValueError, match="at least 1"):
        VerificationCache(max_entries=0)


def test_a_chain_only_cache_keeps_no_documents_and_still_skips_the_chain(
    module: SimulatedSecureModule, root: x509.Certificate, calls: dict[str, int]
) -> None:
    cache = VerificationCache(documents=False)
    data = module.attestation(nonce=b"n", public_key=b"\x01" * 32)
    for _ in range(2):  # the same bytes: no document is remembered, so no hit
        verify_attestation(data, root=root, now=NOW, cache=cache)
    verify_attestation(
        module.attestation(nonce=b"m", public_key=b"\x01" * 32), root=root, now=NOW, cache=cache
    )
    assert cache.hits == 0
    assert calls == {"signature": 3, "chain": 1}


def test_a_cached_chain_never_lends_its_key_to_another_leaf(
    authority: SimulatedAuthority, root: x509.Certificate, clock: Clock
) -> None:
    # Two enclaves of one host share every certificate but the leaf. A document that shows
    # one's leaf but is signed with the other's key fails, whichever chains are cached.
    credentials = authority.issue_instance(NOW - dt.timedelta(hours=1))
    one = SimulatedSecureModule(credentials, pcrs=PCRS, clock=clock)
    two = SimulatedSecureModule(credentials, pcrs=PCRS, clock=clock)
    cache = VerificationCache(documents=False)
    verify_attestation(two.attestation(nonce=b"2"), root=root, now=NOW, cache=cache)
    verify_attestation(one.attestation(nonce=b"1"), root=root, now=NOW, cache=cache)
    leaf_one, leaf_two = one._current_leaf(NOW), two._current_leaf(NOW)
    assert leaf_one.der != leaf_two.der
    one._leaf = type(leaf_one)(key=leaf_one.key, certificate=leaf_two.certificate, der=leaf_two.der)
    forged = one.attestation(nonce=b"3")  # shows two's leaf, signed with one's key
    with pytest.raises(SignatureError):
        verify_attestation(forged, root=root, now=NOW, cache=cache)


def test_a_cached_chain_whose_intermediate_expired_is_verified_again_and_refused(
    authority: SimulatedAuthority,
    root: x509.Certificate,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cape.enclave.secure_module import simulated

    monkeypatch.setattr(simulated, "ZONAL_LIFETIME", dt.timedelta(hours=1))
    credentials = authority.issue_instance(NOW - dt.timedelta(minutes=50))  # zonal: +10 min
    module = SimulatedSecureModule(credentials, pcrs=PCRS, clock=clock)
    cache = VerificationCache(documents=False)
    first = module.attestation(nonce=b"a")
    verify_attestation(first, root=root, now=NOW, cache=cache)
    clock.now = NOW + dt.timedelta(minutes=20)  # the same leaf, still valid; zonal expired
    later = module.attestation(nonce=b"b")
    leaf = parse_attestation(later).document.certificate
    assert leaf == parse_attestation(first).document.certificate
    with pytest.raises(ChainError, match="not valid at validation time"):
        verify_attestation(later, root=root, now=clock.now, cache=cache)
