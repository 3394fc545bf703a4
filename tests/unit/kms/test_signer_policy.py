"""Keys bound to the image signer (PCR8) survive upgrades; ``rebind`` moves keys between
policies, audited, and the old runtime loses access at once — even in a service that had the
key cached (another process's rebind)."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from cape.crypto import envelope
from cape.crypto.cms import open_for_recipient
from cape.crypto.eif_signature import ImageSigner
from cape.crypto.keys import load_rsa_public_key
from cape.enclave.measure import RuntimeMeasurement, simulated_pcrs
from cape.enclave.secure_module.simulated import InstanceCredentials, SimulatedSecureModule
from cape.errors import KeyReleaseDeniedError
from cape.kms.base import KeyPolicy, KeyStoreError, Recipient
from cape.kms.local import DB_FILE, LocalKeyService
from tests.unit.kms.conftest import INSTANCE_ID, Clock

MASTER = b"\x42" * 32
MakeService = Callable[[KeyPolicy], LocalKeyService]
OWNER = "alice"


def _measurement(tag: bytes) -> RuntimeMeasurement:
    """A runtime build: distinct PCR0-2 per tag (as a new release would have)."""
    digest = hashlib.sha384(tag).digest()
    return RuntimeMeasurement(
        pcr0=hashlib.sha384(b"0" + digest).digest(),
        pcr1=hashlib.sha384(b"1" + digest).digest(),
        pcr2=hashlib.sha384(b"2" + digest).digest(),
        interpreter_manifest=b"",
        runtime_manifest=b"",
    )


OLD, NEW = _measurement(b"release 1"), _measurement(b"release 2")


@pytest.fixture(scope="module")
def signer() -> ImageSigner:
    return ImageSigner.generate("Cape release signer")


@pytest.fixture(scope="module")
def other_signer() -> ImageSigner:
    return ImageSigner.generate("Not the release signer")


def _document(
    credentials: InstanceCredentials,
    clock: Clock,
    spki: bytes,
    measurement: RuntimeMeasurement,
    signer: ImageSigner | None,
) -> Recipient:
    signature = signer.sign_pcr0(measurement.pcr0) if signer is not None else None
    pcrs = simulated_pcrs(measurement, instance_id=INSTANCE_ID, image_signature=signature)
    module = SimulatedSecureModule(credentials, pcrs=pcrs, clock=clock)
    return Recipient(module.attestation(public_key=spki))


@pytest.fixture
def make_service(
    tmp_path: Path, trusted_root: x509.Certificate, clock: Clock, fast_keys: list[RSAPrivateKey]
) -> Iterator[MakeService]:
    opened: list[LocalKeyService] = []

    def make(policy: KeyPolicy) -> LocalKeyService:
        service = LocalKeyService(
            tmp_path / DB_FILE,
            master_key=MASTER,
            trusted_root=trusted_root,
            default_policy=policy,
            clock=clock,
        )
        opened.append(service)
        return service

    yield make
    for service in opened:
        service.close()


def _release(service: LocalKeyService, recipient: Recipient, enclave_key: RSAPrivateKey) -> bytes:
    public = load_rsa_public_key(service.get_public_key(OWNER))
    parsed = envelope.parse(envelope.encrypt(b"cape: input", public))
    sealed = service.decrypt(OWNER, parsed.wrapped_key, recipient=recipient)
    return envelope.open_envelope(parsed, open_for_recipient(sealed, enclave_key))


def test_policy_kinds_and_json_round_trip(signer: ImageSigner) -> None:
    pcr8 = signer.identity.pcr8
    signed = KeyPolicy.signer(pcr8, pcr3=b"\x03" * 48)
    assert signed.kind == "signer" and set(signed.pcrs) == {3, 8}
    assert KeyPolicy.from_json(signed.to_json()) == signed
    measured = KeyPolicy.measurement(OLD.pcr0, OLD.pcr1, OLD.pcr2)
    assert measured.kind == "measurement" and set(measured.pcrs) == {0, 1, 2}
    with pytest.raises(ValueError, match="PCR8"):
        KeyPolicy.signer(bytes(48))  # an unsigned image's PCR8 identifies nothing


def test_signer_key_survives_an_upgrade_and_refuses_other_signers(
    make_service: MakeService,
    credentials: InstanceCredentials,
    clock: Clock,
    enclave_key: RSAPrivateKey,
    enclave_spki: bytes,
    signer: ImageSigner,
    other_signer: ImageSigner,
) -> None:
    service = make_service(KeyPolicy.signer(signer.identity.pcr8))
    service.get_or_create_key(OWNER)
    old = _document(credentials, clock, enclave_spki, OLD, signer)
    new = _document(credentials, clock, enclave_spki, NEW, signer)
    assert _release(service, old, enclave_key) == b"cape: input"
    assert _release(service, new, enclave_key) == b"cape: input"  # new PCR0, same signer
    for stranger in (other_signer, None):
        recipient = _document(credentials, clock, enclave_spki, NEW, stranger)
        with pytest.raises(KeyReleaseDeniedError, match="PCR8 does not match"):
            _release(service, recipient, enclave_key)


def test_a_signature_over_another_measurement_leaves_pcr8_zero(signer: ImageSigner) -> None:
    signature = signer.sign_pcr0(OLD.pcr0)
    assert simulated_pcrs(OLD, instance_id=INSTANCE_ID, image_signature=signature)[8] == (
        signer.identity.pcr8
    )
    assert simulated_pcrs(NEW, instance_id=INSTANCE_ID, image_signature=signature)[8] == bytes(48)
    assert simulated_pcrs(NEW, instance_id=INSTANCE_ID, image_signature=b"junk")[8] == bytes(48)


def test_rebind_moves_a_measurement_key_and_the_old_runtime_loses_access(
    make_service: MakeService,
    credentials: InstanceCredentials,
    clock: Clock,
    enclave_key: RSAPrivateKey,
    enclave_spki: bytes,
    signer: ImageSigner,
) -> None:
    measured = KeyPolicy.measurement(OLD.pcr0, OLD.pcr1, OLD.pcr2)
    server = make_service(measured)
    server.get_or_create_key(OWNER)
    old_unsigned = _document(credentials, clock, enclave_spki, OLD, None)
    new_signed = _document(credentials, clock, enclave_spki, NEW, signer)
    assert _release(server, old_unsigned, enclave_key) == b"cape: input"
    with pytest.raises(KeyReleaseDeniedError, match="PCR0 does not match"):
        _release(server, new_signed, enclave_key)  # the upgrade is locked out before rebind
    # The operator's rebind runs in another process: its own connection to the database.
    operator = make_service(measured)
    moved = operator.rebind(KeyPolicy.signer(signer.identity.pcr8), actor="ops", reason="release 2")
    assert [key.owner for key in moved] == [OWNER]
    # The running server had the key cached; it sees the new policy at its next request.
    assert _release(server, new_signed, enclave_key) == b"cape: input"
    with pytest.raises(KeyReleaseDeniedError, match="PCR8 does not match"):
        _release(server, old_unsigned, enclave_key)
    (entry,) = server.key_log()
    assert (entry.actor, entry.action, entry.owner, entry.reason) == (
        "ops",
        "rebind",
        OWNER,
        "release 2",
    )
    assert KeyPolicy.from_json(entry.old_policy) == measured
    assert KeyPolicy.from_json(entry.new_policy).kind == "signer"
    # Rebinding again changes nothing and logs nothing.
    assert operator.rebind(KeyPolicy.signer(signer.identity.pcr8), actor="ops", reason="x") == []
    assert len(server.key_log()) == 1


def test_rebind_to_a_new_measurement_and_kind_filter(
    make_service: MakeService,
    credentials: InstanceCredentials,
    clock: Clock,
    enclave_key: RSAPrivateKey,
    enclave_spki: bytes,
    signer: ImageSigner,
) -> None:
    service = make_service(KeyPolicy.measurement(OLD.pcr0, OLD.pcr1, OLD.pcr2))
    service.get_or_create_key(OWNER)
    signed_policy = KeyPolicy.signer(signer.identity.pcr8)
    assert service.rebind(signed_policy, actor="a", reason="r", only_kind="signer") == []
    service.rebind(KeyPolicy.measurement(NEW.pcr0, NEW.pcr1, NEW.pcr2), actor="a", reason="r")
    assert _release(service, _document(credentials, clock, enclave_spki, NEW, None), enclave_key)
    with pytest.raises(KeyReleaseDeniedError, match="PCR0 does not match"):
        _release(service, _document(credentials, clock, enclave_spki, OLD, None), enclave_key)


def test_rebound_row_stays_authenticated(
    make_service: MakeService, signer: ImageSigner, tmp_path: Path
) -> None:
    service = make_service(KeyPolicy.measurement(OLD.pcr0, OLD.pcr1, OLD.pcr2))
    service.get_or_create_key(OWNER)
    service.rebind(KeyPolicy.signer(signer.identity.pcr8), actor="a", reason="r")
    fresh = make_service(KeyPolicy.signer(signer.identity.pcr8))
    assert fresh.get_or_create_key(OWNER).policy.kind == "signer"
    # Editing the policy column without the master key is still caught.
    db = sqlite3.connect(tmp_path / DB_FILE)
    db.execute(
        "UPDATE keys SET policy_json = ?",
        (KeyPolicy.measurement(NEW.pcr0, NEW.pcr1, NEW.pcr2).to_json(),),
    )
    db.commit()
    db.close()
    with pytest.raises(KeyStoreError, match="integrity"):
        make_service(KeyPolicy.signer(signer.identity.pcr8)).get_or_create_key(OWNER)


def test_version_1_database_gains_the_log_table(
    tmp_path: Path, trusted_root: x509.Certificate, clock: Clock
) -> None:
    db = sqlite3.connect(tmp_path / DB_FILE)
    db.execute(
        "CREATE TABLE keys (owner TEXT PRIMARY KEY NOT NULL, key_id TEXT NOT NULL UNIQUE, "
        "public_der BLOB NOT NULL, wrapped_private BLOB NOT NULL, policy_json TEXT NOT NULL, "
        "created_at TEXT NOT NULL)"
    )
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    with LocalKeyService(
        tmp_path / DB_FILE,
        master_key=MASTER,
        trusted_root=trusted_root,
        default_policy=KeyPolicy.measurement(OLD.pcr0, OLD.pcr1, OLD.pcr2),
        clock=clock,
    ) as service:
        assert service.key_log() == []
