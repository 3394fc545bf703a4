"""Fixtures for the key services: a simulated Nitro PKI, real attestation documents of the
running runtime's measurement at a fixed time, ephemeral enclave keys, and a pool of
pre-generated RSA-4096 Cape keys (generation takes up to a second each)."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from cape.crypto.keys import generate_cape_key, public_key_der
from cape.enclave.measure import measure_runtime, simulated_pcrs
from cape.enclave.secure_module.simulated import (
    InstanceCredentials,
    SimulatedAuthority,
    SimulatedSecureModule,
)
from cape.kms.base import KeyPolicy

T0 = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
INSTANCE_ID = "i-0123456789abcdef0"


class Clock:
    """A settable clock."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture(scope="session")
def authority() -> SimulatedAuthority:
    return SimulatedAuthority.generate(now=T0 - dt.timedelta(days=30))


@pytest.fixture(scope="session")
def other_authority() -> SimulatedAuthority:
    return SimulatedAuthority.generate(now=T0 - dt.timedelta(days=30))


@pytest.fixture(scope="session")
def trusted_root(authority: SimulatedAuthority) -> x509.Certificate:
    return authority.root_certificate


@pytest.fixture(scope="session")
def credentials(authority: SimulatedAuthority) -> InstanceCredentials:
    return authority.issue_instance(T0 - dt.timedelta(hours=1), instance_id=INSTANCE_ID)


@pytest.fixture(scope="session")
def runtime_pcrs() -> dict[int, bytes]:
    """PCR0-15 of the installed runtime on the test host."""
    return simulated_pcrs(measure_runtime(), instance_id=INSTANCE_ID)


@pytest.fixture(scope="session")
def key_policy(runtime_pcrs: dict[int, bytes]) -> KeyPolicy:
    """The policy new keys get: this runtime's PCR0 and PCR2."""
    return KeyPolicy(pcrs={0: frozenset({runtime_pcrs[0]}), 2: frozenset({runtime_pcrs[2]})})


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def module(
    credentials: InstanceCredentials, runtime_pcrs: dict[int, bytes], clock: Clock
) -> SimulatedSecureModule:
    """The genuine enclave's secure module, on the shared clock."""
    return SimulatedSecureModule(credentials, pcrs=runtime_pcrs, clock=clock)


@pytest.fixture(scope="session")
def enclave_key() -> RSAPrivateKey:
    """The enclave's ephemeral key pair (RSA-2048, as kmstool uses)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def enclave_spki(enclave_key: RSAPrivateKey) -> bytes:
    return public_key_der(enclave_key)


@pytest.fixture
def document(module: SimulatedSecureModule, enclave_spki: bytes) -> bytes:
    """A fresh document from the genuine enclave carrying its ephemeral public key."""
    return module.attestation(public_key=enclave_spki, nonce=b"\x01" * 32)


@pytest.fixture(scope="session")
def cape_key_pool() -> tuple[RSAPrivateKey, ...]:
    return tuple(generate_cape_key() for _ in range(3))


KeyFactory = Callable[[], RSAPrivateKey]


@pytest.fixture
def fast_keys(
    monkeypatch: pytest.MonkeyPatch, cape_key_pool: tuple[RSAPrivateKey, ...]
) -> list[RSAPrivateKey]:
    """Replace Cape key generation in cape.kms.local by the pool (distinct keys in turn).

    Returns the list of keys handed out, in order, so tests can count generations.
    """
    handed: list[RSAPrivateKey] = []
    keys = itertools.cycle(cape_key_pool)

    def generate() -> RSAPrivateKey:
        key = next(keys)
        handed.append(key)
        return key

    monkeypatch.setattr("cape.kms.local.generate_cape_key", generate)
    return handed
