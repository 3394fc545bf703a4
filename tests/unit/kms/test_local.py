"""LocalKeyService: keys created once, released only to attested enclaves, sealed at rest."""

from __future__ import annotations

import base64
import datetime as dt
import os
import shutil
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

import cape
from cape.crypto import envelope
from cape.crypto.cms import open_for_recipient
from cape.crypto.keys import load_rsa_public_key, public_key_der
from cape.enclave.measure import measure_runtime, simulated_pcrs
from cape.enclave.secure_module.simulated import (
    InstanceCredentials,
    SimulatedAuthority,
    SimulatedSecureModule,
)
from cape.errors import (
    CertificateExpiredError,
    ChainError,
    DebugEnclaveError,
    DecryptionError,
    DocumentExpiredError,
    FormatError,
    KeyNotFoundError,
    KeyReleaseDeniedError,
    PCRMismatchError,
    SignatureError,
)
from cape.kms.base import KeyPolicy, KeyStoreError, Recipient, check_recipient
from cape.kms.local import (
    DB_FILE,
    MASTER_KEY_ENV,
    MASTER_KEY_FILE,
    SCHEMA_VERSION,
    LocalKeyService,
    load_master_key,
)
from tests.unit.kms.conftest import INSTANCE_ID, T0, Clock

MASTER = bytes(range(32))
OWNER = "alice"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / DB_FILE


@pytest.fixture
def service(
    db_path: Path,
    trusted_root: x509.Certificate,
    key_policy: KeyPolicy,
    clock: Clock,
    fast_keys: list[RSAPrivateKey],
) -> Iterator[LocalKeyService]:
    with LocalKeyService(
        db_path,
        master_key=MASTER,
        trusted_root=trusted_root,
        default_policy=key_policy,
        clock=clock,
    ) as kms:
        yield kms


def reopen(
    db_path: Path, trusted_root: x509.Certificate, key_policy: KeyPolicy, clock: Clock
) -> LocalKeyService:
    return LocalKeyService(
        db_path,
        master_key=MASTER,
        trusted_root=trusted_root,
        default_policy=key_policy,
        clock=clock,
    )


def user_public_key(service: LocalKeyService, owner: str = OWNER) -> RSAPublicKey:
    service.get_or_create_key(owner)
    return load_rsa_public_key(service.get_public_key(owner))


def wrapped_dek(service: LocalKeyService, dek: bytes, owner: str = OWNER) -> bytes:
    """What a client does offline: wrap a DEK with the owner's public key."""
    return envelope.wrap_key(dek, user_public_key(service, owner))


# -- keys ---------------------------------------------------------------------------------


def test_key_is_created_on_first_request_and_only_once(
    service: LocalKeyService, fast_keys: list[RSAPrivateKey], clock: Clock
) -> None:
    with pytest.raises(KeyNotFoundError):
        service.get_public_key(OWNER)
    first = service.get_or_create_key(OWNER)
    clock.now += dt.timedelta(hours=1)
    again = service.get_or_create_key(OWNER)
    assert first == again
    assert first.owner == OWNER
    assert first.created_at == T0
    assert len(fast_keys) == 1
    assert service.get_public_key(OWNER) == public_key_der(fast_keys[0])


def test_public_key_is_rsa_4096_der_spki(
    db_path: Path, trusted_root: x509.Certificate, key_policy: KeyPolicy, clock: Clock
) -> None:
    # Real generation here (no pool), once.
    with reopen(db_path, trusted_root, key_policy, clock) as kms:
        kms.get_or_create_key(OWNER)
        der = kms.get_public_key(OWNER)
    key = serialization.load_der_public_key(der)
    assert isinstance(key, RSAPublicKey)
    assert key.key_size == 4096
    assert key.public_numbers().e == 65537
    assert public_key_der(key) == der


def test_each_owner_has_its_own_key(service: LocalKeyService) -> None:
    alice = service.get_or_create_key("alice")
    bob = service.get_or_create_key("bob")
    assert alice.key_id != bob.key_id
    assert service.get_public_key("alice") != service.get_public_key("bob")


def test_new_keys_carry_the_default_policy(service: LocalKeyService, key_policy: KeyPolicy) -> None:
    assert service.get_or_create_key(OWNER).policy == key_policy


def test_concurrent_first_requests_create_exactly_one_key(
    service: LocalKeyService, fast_keys: list[RSAPrivateKey]
) -> None:
    barrier = threading.Barrier(8)
    results: list[str] = []
    errors: list[BaseException] = []

    def request() -> None:
        try:
            barrier.wait()
            results.append(service.get_or_create_key(OWNER).key_id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=request) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 8
    assert len(set(results)) == 1
    assert len(fast_keys) == 1


def test_two_services_on_one_database_agree_on_the_key(
    db_path: Path,
    trusted_root: x509.Certificate,
    key_policy: KeyPolicy,
    clock: Clock,
    fast_keys: list[RSAPrivateKey],
) -> None:
    """Like two processes: both generate, INSERT OR IGNORE keeps one, both read the winner."""
    first = reopen(db_path, trusted_root, key_policy, clock)
    second = reopen(db_path, trusted_root, key_policy, clock)
    barrier = threading.Barrier(2)
    results: dict[int, tuple[str, bytes]] = {}

    def request(index: int, kms: LocalKeyService) -> None:
        barrier.wait()
        metadata = kms.get_or_create_key(OWNER)
        results[index] = (metadata.key_id, kms.get_public_key(OWNER))

    threads = [threading.Thread(target=request, args=pair) for pair in enumerate((first, second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first.close()
    second.close()
    assert len(results) == 2
    assert results[0] == results[1]
    assert len(fast_keys) in (1, 2)  # one generation each at most


@pytest.mark.parametrize("owner", ["", "Alice", "-alice", "al ice", "a" * 65, "al/ice", "ålice"])
def test_invalid_owner_names_are_refused(service: LocalKeyService, owner: str) -> None:
    with pytest.raises(FormatError, match="invalid key owner"):
        service.get_or_create_key(owner)
    with pytest.raises(FormatError):
        service.get_public_key(owner)


def test_valid_owner_names(service: LocalKeyService) -> None:
    for owner in ("a", "0", "alice_1-x", "a" * 64):
        assert service.get_or_create_key(owner).owner == owner


# -- release --------------------------------------------------------------------------------


def test_full_release_flow_gives_the_enclave_the_dek(
    service: LocalKeyService, document: bytes, enclave_key: RSAPrivateKey
) -> None:
    # Client, offline: encrypt a secret with a cape: envelope to the owner's key.
    ciphertext = envelope.encrypt(b"the secret input", user_public_key(service))
    parsed = envelope.parse(ciphertext)
    # Enclave: ask the KMS to release the DEK to the key inside its attestation document.
    sealed = service.decrypt(OWNER, parsed.wrapped_key, recipient=Recipient(document))
    dek = open_for_recipient(sealed, enclave_key)
    assert envelope.open_envelope(parsed, dek) == b"the secret input"


def test_decrypt_answers_with_cms_not_plaintext(
    service: LocalKeyService, document: bytes, enclave_key: RSAPrivateKey
) -> None:
    dek = os.urandom(32)
    sealed = service.decrypt(OWNER, wrapped_dek(service, dek), recipient=Recipient(document))
    assert dek not in sealed
    assert sealed[:1] == b"\x30"
    assert open_for_recipient(sealed, enclave_key) == dek


def test_generate_data_key_round_trip(
    service: LocalKeyService, document: bytes, enclave_key: RSAPrivateKey
) -> None:
    service.get_or_create_key(OWNER)
    data_key = service.generate_data_key(OWNER, recipient=Recipient(document))
    dek = open_for_recipient(data_key.ciphertext_for_recipient, enclave_key)
    assert len(dek) == 32
    assert len(data_key.ciphertext_blob) == 512
    # The blob is a wrapped DEK under the owner's key: it comes back through decrypt.
    again = service.decrypt(OWNER, data_key.ciphertext_blob, recipient=Recipient(document))
    assert open_for_recipient(again, enclave_key) == dek
    assert dek not in repr(data_key).encode()


def test_generate_data_key_gives_fresh_keys(
    service: LocalKeyService, document: bytes, enclave_key: RSAPrivateKey
) -> None:
    service.get_or_create_key(OWNER)
    keys = {
        open_for_recipient(
            service.generate_data_key(
                OWNER, recipient=Recipient(document)
            ).ciphertext_for_recipient,
            enclave_key,
        )
        for _ in range(3)
    }
    assert len(keys) == 3


def test_unknown_owner_is_key_not_found(service: LocalKeyService, document: bytes) -> None:
    with pytest.raises(KeyNotFoundError):
        service.decrypt("nobody", bytes(512), recipient=Recipient(document))
    with pytest.raises(KeyNotFoundError):
        service.generate_data_key("nobody", recipient=Recipient(document))


def test_wrong_blob_is_a_generic_decryption_error(
    service: LocalKeyService, document: bytes, cape_key_pool: tuple[RSAPrivateKey, ...]
) -> None:
    service.get_or_create_key(OWNER)
    foreign = envelope.wrap_key(bytes(32), cape_key_pool[2].public_key())
    for blob in (bytes(512), os.urandom(512), b"", b"short", foreign):
        with pytest.raises(DecryptionError) as exc:
            service.decrypt(OWNER, blob, recipient=Recipient(document))
        assert str(exc.value) == envelope.DECRYPTION_FAILED


def test_blob_wrapping_a_non_dek_is_refused(service: LocalKeyService, document: bytes) -> None:
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    blob = user_public_key(service).encrypt(b"sixteen byte key", oaep)
    with pytest.raises(DecryptionError):
        service.decrypt(OWNER, blob, recipient=Recipient(document))


def test_a_document_verified_once_is_still_checked_against_each_keys_policy(
    service: LocalKeyService, document: bytes, enclave_key: RSAPrivateKey, clock: Clock
) -> None:
    dek = os.urandom(32)
    blob = wrapped_dek(service, dek)
    for _ in range(2):  # the second release skips the signature and chain checks
        sealed = service.decrypt(OWNER, blob, recipient=Recipient(document))
        assert open_for_recipient(sealed, enclave_key) == dek
    assert service._documents.hits == 1
    # The cached document still meets the age limit and the policy on every request.
    service.rebind(
        KeyPolicy(pcrs={0: frozenset({b"\x11" * 48})}), actor="test", reason="another build"
    )
    with pytest.raises(KeyReleaseDeniedError, match="PCR0"):
        service.decrypt(OWNER, blob, recipient=Recipient(document))
    assert service._documents.hits == 2
    clock.now += dt.timedelta(minutes=6)
    with pytest.raises(KeyReleaseDeniedError, match="too old"):
        service.decrypt(OWNER, blob, recipient=Recipient(document))


# -- refusals -------------------------------------------------------------------------------


def _module(
    credentials: InstanceCredentials, pcrs: dict[int, bytes], clock: Clock, *, debug: bool = False
) -> SimulatedSecureModule:
    return SimulatedSecureModule(credentials, pcrs=pcrs, clock=clock, debug=debug)


def refusal(service: LocalKeyService, recipient: Recipient) -> KeyReleaseDeniedError:
    """Both release operations refuse ``recipient`` with the same message; returns it."""
    dek_blob = wrapped_dek(service, bytes(32))
    with pytest.raises(KeyReleaseDeniedError) as exc:
        service.decrypt(OWNER, dek_blob, recipient=recipient)
    with pytest.raises(KeyReleaseDeniedError) as generated:
        service.generate_data_key(OWNER, recipient=recipient)
    assert str(generated.value) == str(exc.value)
    return exc.value


def test_document_from_another_root_is_refused(
    service: LocalKeyService,
    other_authority: SimulatedAuthority,
    runtime_pcrs: dict[int, bytes],
    clock: Clock,
    enclave_spki: bytes,
) -> None:
    rogue = other_authority.issue_instance(T0 - dt.timedelta(hours=1), instance_id=INSTANCE_ID)
    document = _module(rogue, runtime_pcrs, clock).attestation(public_key=enclave_spki)
    error = refusal(service, Recipient(document))
    assert str(error) == "attestation document does not chain to the trusted root"
    assert isinstance(error.__cause__, ChainError)


def test_old_document_is_refused(
    service: LocalKeyService, module: SimulatedSecureModule, clock: Clock, enclave_spki: bytes
) -> None:
    clock.now = T0 - dt.timedelta(minutes=5, seconds=1)
    document = module.attestation(public_key=enclave_spki)
    clock.now = T0
    error = refusal(service, Recipient(document))
    assert str(error) == "attestation document is too old"
    assert isinstance(error.__cause__, DocumentExpiredError)


def test_document_just_inside_the_age_limit_is_accepted(
    service: LocalKeyService,
    module: SimulatedSecureModule,
    clock: Clock,
    enclave_spki: bytes,
    enclave_key: RSAPrivateKey,
) -> None:
    clock.now = T0 - dt.timedelta(minutes=4, seconds=59)
    document = module.attestation(public_key=enclave_spki)
    clock.now = T0
    sealed = service.decrypt(OWNER, wrapped_dek(service, b"k" * 32), recipient=Recipient(document))
    assert open_for_recipient(sealed, enclave_key) == b"k" * 32


def test_document_with_an_expired_certificate_is_refused(
    service: LocalKeyService, document: bytes, clock: Clock
) -> None:
    service.get_or_create_key(OWNER)
    clock.now = T0 + dt.timedelta(hours=4)
    error = refusal(service, Recipient(document))
    assert str(error) == "attestation document certificate is not valid at this time"
    assert isinstance(error.__cause__, CertificateExpiredError)


def _copy_runtime(tmp_path: Path) -> Path:
    source = Path(cape.__file__).parent
    target = tmp_path / "cape"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def test_modified_runtime_is_refused_and_the_original_allowed(
    tmp_path: Path,
    trusted_root: x509.Certificate,
    credentials: InstanceCredentials,
    clock: Clock,
    enclave_spki: bytes,
    enclave_key: RSAPrivateKey,
    fast_keys: list[RSAPrivateKey],
) -> None:
    """The simulated enclave's PCRs measure the runtime's code: one changed byte in the
    package gives another PCR0, and the KMS refuses that runtime."""
    genuine_root = _copy_runtime(tmp_path / "genuine")
    genuine = simulated_pcrs(measure_runtime(genuine_root), instance_id=INSTANCE_ID)
    tampered_root = _copy_runtime(tmp_path / "tampered")
    target = tampered_root / "kms" / "base.py"
    code = bytearray(target.read_bytes())
    code[-1] ^= 0x01  # one byte: the final newline becomes a vertical tab
    target.write_bytes(bytes(code))
    tampered = simulated_pcrs(measure_runtime(tampered_root), instance_id=INSTANCE_ID)
    assert tampered[0] != genuine[0]
    assert tampered[2] != genuine[2]
    assert tampered[1] == genuine[1]  # same interpreter

    policy = KeyPolicy(pcrs={0: frozenset({genuine[0]})})
    with LocalKeyService(
        tmp_path / DB_FILE,
        master_key=MASTER,
        trusted_root=trusted_root,
        default_policy=policy,
        clock=clock,
    ) as kms:
        blob = wrapped_dek(kms, b"d" * 32)

        bad = _module(credentials, tampered, clock).attestation(public_key=enclave_spki)
        with pytest.raises(KeyReleaseDeniedError) as exc:
            kms.decrypt(OWNER, blob, recipient=Recipient(bad))
        assert str(exc.value) == "attestation PCR0 does not match the key policy"
        assert isinstance(exc.value.__cause__, PCRMismatchError)
        assert exc.value.__cause__.actual == tampered[0]

        good = _module(credentials, genuine, clock).attestation(public_key=enclave_spki)
        sealed = kms.decrypt(OWNER, blob, recipient=Recipient(good))
        assert open_for_recipient(sealed, enclave_key) == b"d" * 32


def test_installed_runtime_measurement_matches_the_default_policy(
    service: LocalKeyService, document: bytes, enclave_key: RSAPrivateKey
) -> None:
    sealed = service.decrypt(OWNER, wrapped_dek(service, b"e" * 32), recipient=Recipient(document))
    assert open_for_recipient(sealed, enclave_key) == b"e" * 32


def test_pcr2_mismatch_is_named(
    service: LocalKeyService,
    credentials: InstanceCredentials,
    runtime_pcrs: dict[int, bytes],
    clock: Clock,
    enclave_spki: bytes,
) -> None:
    pcrs = dict(runtime_pcrs)
    pcrs[2] = bytes([7]) * 48
    document = _module(credentials, pcrs, clock).attestation(public_key=enclave_spki)
    assert str(refusal(service, Recipient(document))) == (
        "attestation PCR2 does not match the key policy"
    )


def test_debug_document_is_refused(
    service: LocalKeyService,
    credentials: InstanceCredentials,
    runtime_pcrs: dict[int, bytes],
    clock: Clock,
    enclave_spki: bytes,
) -> None:
    document = _module(credentials, runtime_pcrs, clock, debug=True).attestation(
        public_key=enclave_spki
    )
    error = refusal(service, Recipient(document))
    assert str(error) == "attestation document comes from a debug-mode enclave"
    assert isinstance(error.__cause__, DebugEnclaveError)


def test_document_without_public_key_is_refused(
    service: LocalKeyService, module: SimulatedSecureModule
) -> None:
    error = refusal(service, Recipient(module.attestation(nonce=b"n" * 16)))
    assert str(error) == "attestation document carries no recipient public key"


def test_x25519_public_key_is_refused(
    service: LocalKeyService, module: SimulatedSecureModule
) -> None:
    raw = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
    assert len(raw) == 32
    error = refusal(service, Recipient(module.attestation(public_key=raw)))
    assert str(error) == "recipient public key is not an RSA key (not a DER SubjectPublicKeyInfo)"


def test_x25519_spki_is_refused_by_type(
    service: LocalKeyService, module: SimulatedSecureModule
) -> None:
    spki = (
        x25519.X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    error = refusal(service, Recipient(module.attestation(public_key=spki)))
    assert str(error) == "recipient public key is not an RSA key (X25519PublicKey)"


def test_small_or_pkcs1_rsa_public_key_is_refused(
    service: LocalKeyService, module: SimulatedSecureModule, enclave_key: RSAPrivateKey
) -> None:
    small = public_key_der(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    error = refusal(service, Recipient(module.attestation(public_key=small)))
    assert str(error) == "recipient public key is 1024 bits; at least 2048 required"
    pkcs1 = enclave_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1
    )
    error = refusal(service, Recipient(module.attestation(public_key=pkcs1)))
    assert "not a DER SubjectPublicKeyInfo" in str(error)


@pytest.mark.parametrize("algorithm", ["RSAES_OAEP_SHA_1", "SYMMETRIC_DEFAULT", "", "rsaes_oaep"])
def test_wrong_key_encryption_algorithm_is_refused(
    service: LocalKeyService, document: bytes, algorithm: str
) -> None:
    error = refusal(service, Recipient(document, key_encryption_algorithm=algorithm))
    assert str(error) == (
        f"key encryption algorithm {algorithm!r} is not supported; only RSAES_OAEP_SHA_256 is"
    )


def test_tampered_document_signature_is_refused(service: LocalKeyService, document: bytes) -> None:
    tampered = bytearray(document)
    tampered[-1] ^= 0x01  # inside the ES384 signature
    error = refusal(service, Recipient(bytes(tampered)))
    assert str(error) == "attestation document signature does not verify"
    assert isinstance(error.__cause__, SignatureError)


def test_tampered_document_payload_is_refused(
    service: LocalKeyService, document: bytes, enclave_spki: bytes
) -> None:
    # Replace the public key inside the signed payload with another of the same size.
    other = public_key_der(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    assert document.count(enclave_spki) == 1
    error = refusal(service, Recipient(document.replace(enclave_spki, other)))
    assert str(error) == "attestation document signature does not verify"


@pytest.mark.parametrize("data", [b"", b"\xa0", b"not cbor at all", b"\x84" + b"\x40" * 4])
def test_malformed_document_is_refused(service: LocalKeyService, data: bytes) -> None:
    error = refusal(service, Recipient(data))
    assert str(error) == "attestation document is malformed"
    assert isinstance(error.__cause__, FormatError)


def test_oversized_document_is_refused(service: LocalKeyService) -> None:
    error = refusal(service, Recipient(b"\x00" * 20000))
    assert "larger than" in str(error)


def test_refusal_messages_are_distinct_and_free_of_key_material(
    service: LocalKeyService,
    document: bytes,
    module: SimulatedSecureModule,
    clock: Clock,
    enclave_spki: bytes,
) -> None:
    messages = set()
    tampered = bytearray(document)
    tampered[-1] ^= 1
    for recipient in (
        Recipient(document, key_encryption_algorithm="RSAES_OAEP_SHA_1"),
        Recipient(bytes(tampered)),
        Recipient(b"junk"),
        Recipient(module.attestation()),
    ):
        messages.add(str(refusal(service, recipient)))
    clock.now = T0 + dt.timedelta(minutes=10)
    messages.add(str(refusal(service, Recipient(document))))
    assert len(messages) == 5
    private_der = service._load(OWNER).private_key.private_bytes(  # type: ignore[union-attr]
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    for message in messages:
        assert enclave_spki.hex() not in message
        assert private_der.hex()[:32] not in message


def test_check_recipient_is_usable_on_its_own(
    trusted_root: x509.Certificate,
    key_policy: KeyPolicy,
    document: bytes,
    enclave_key: RSAPrivateKey,
) -> None:
    key = check_recipient(Recipient(document), root=trusted_root, policy=key_policy, now=T0)
    assert key.public_numbers() == enclave_key.public_key().public_numbers()


def test_service_uses_the_key_policy_stored_with_the_key(
    db_path: Path,
    trusted_root: x509.Certificate,
    key_policy: KeyPolicy,
    clock: Clock,
    document: bytes,
    enclave_key: RSAPrivateKey,
    fast_keys: list[RSAPrivateKey],
) -> None:
    """Changing the default policy later does not loosen or tighten existing keys."""
    with reopen(db_path, trusted_root, key_policy, clock) as kms:
        blob = wrapped_dek(kms, b"p" * 32)
    strict = KeyPolicy(pcrs={0: frozenset({bytes([9]) * 48})})
    with LocalKeyService(
        db_path, master_key=MASTER, trusted_root=trusted_root, default_policy=strict, clock=clock
    ) as kms:
        sealed = kms.decrypt(OWNER, blob, recipient=Recipient(document))
        assert open_for_recipient(sealed, enclave_key) == b"p" * 32
        assert kms.get_or_create_key("newcomer").policy == strict


# -- durability and storage -----------------------------------------------------------------


def test_keys_survive_a_restart(
    db_path: Path,
    trusted_root: x509.Certificate,
    key_policy: KeyPolicy,
    clock: Clock,
    document: bytes,
    enclave_key: RSAPrivateKey,
    fast_keys: list[RSAPrivateKey],
) -> None:
    with reopen(db_path, trusted_root, key_policy, clock) as kms:
        metadata = kms.get_or_create_key(OWNER)
        public = kms.get_public_key(OWNER)
        blob = envelope.wrap_key(b"r" * 32, load_rsa_public_key(public))
    with reopen(db_path, trusted_root, key_policy, clock) as kms:
        assert kms.get_or_create_key(OWNER) == metadata
        assert kms.get_public_key(OWNER) == public
        sealed = kms.decrypt(OWNER, blob, recipient=Recipient(document))
        assert open_for_recipient(sealed, enclave_key) == b"r" * 32
    assert len(fast_keys) == 1


def test_schema_is_versioned_and_in_wal_mode(service: LocalKeyService, db_path: Path) -> None:
    service.get_or_create_key(OWNER)
    db = sqlite3.connect(db_path)
    try:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        columns = [row[1] for row in db.execute("PRAGMA table_info(keys)")]
        assert columns == [
            "owner",
            "key_id",
            "public_der",
            "wrapped_private",
            "policy_json",
            "created_at",
        ]
    finally:
        db.close()


def test_newer_schema_is_refused(
    db_path: Path, trusted_root: x509.Certificate, key_policy: KeyPolicy, clock: Clock
) -> None:
    db = sqlite3.connect(db_path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(KeyStoreError, match=f"schema version {SCHEMA_VERSION + 1}"):
        reopen(db_path, trusted_root, key_policy, clock)


def test_database_file_is_private(service: LocalKeyService, db_path: Path) -> None:
    assert stat.S_IMODE(db_path.stat().st_mode) & 0o077 == 0


def test_private_key_is_never_in_the_database_in_clear(
    service: LocalKeyService, db_path: Path
) -> None:
    service.get_or_create_key(OWNER)
    service.get_or_create_key("bob")
    raw = b"".join(
        path.read_bytes() for path in db_path.parent.iterdir() if path.name.startswith(DB_FILE)
    )
    assert len(raw) > 0
    for owner in (OWNER, "bob"):
        private_key = service._load(owner).private_key  # type: ignore[union-attr]  # test hook
        pkcs8 = private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        numbers = private_key.private_numbers()
        assert pkcs8 not in raw
        for secret in (numbers.d, numbers.p, numbers.q):
            chunk = secret.to_bytes((secret.bit_length() + 7) // 8, "big")[:32]
            assert chunk not in raw
        assert service.get_public_key(owner) in raw  # the public half is stored as is


def _tamper(db_path: Path, sql: str, *params: object) -> None:
    db = sqlite3.connect(db_path)
    try:
        db.execute(sql, params)
        db.commit()
    finally:
        db.close()


def _flip_wrapped(db_path: Path) -> None:
    db = sqlite3.connect(db_path)
    (wrapped,) = db.execute("SELECT wrapped_private FROM keys WHERE owner = 'alice'").fetchone()
    flipped = bytearray(wrapped)
    flipped[40] ^= 1
    db.execute("UPDATE keys SET wrapped_private = ? WHERE owner = 'alice'", (bytes(flipped),))
    db.commit()
    db.close()


def _swap_wrapped(db_path: Path) -> None:
    db = sqlite3.connect(db_path)
    (bobs,) = db.execute("SELECT wrapped_private FROM keys WHERE owner = 'bob'").fetchone()
    db.execute("UPDATE keys SET wrapped_private = ? WHERE owner = 'alice'", (bobs,))
    db.commit()
    db.close()


def _swap_public(db_path: Path) -> None:
    db = sqlite3.connect(db_path)
    (bobs,) = db.execute("SELECT public_der FROM keys WHERE owner = 'bob'").fetchone()
    db.execute("UPDATE keys SET public_der = ? WHERE owner = 'alice'", (bobs,))
    db.commit()
    db.close()


def _loosen_policy(db_path: Path) -> None:
    loose = KeyPolicy(pcrs={0: frozenset({bytes(48)})}, allow_debug=True).to_json()
    _tamper(db_path, "UPDATE keys SET policy_json = ? WHERE owner = 'alice'", loose)


def _rename_owner(db_path: Path) -> None:
    _tamper(db_path, "DELETE FROM keys WHERE owner = 'alice'")
    _tamper(db_path, "UPDATE keys SET owner = 'alice' WHERE owner = 'bob'")


@pytest.mark.parametrize(
    "tamper",
    [
        _flip_wrapped,
        _swap_wrapped,
        _swap_public,
        _loosen_policy,
        _rename_owner,
        lambda p: _tamper(p, "UPDATE keys SET key_id = 'x' WHERE owner = 'alice'"),
        lambda p: _tamper(p, "UPDATE keys SET created_at = '2020-01-01T00:00:00+00:00'"),
        lambda p: _tamper(p, "UPDATE keys SET wrapped_private = X'00' WHERE owner = 'alice'"),
        lambda p: _tamper(p, "UPDATE keys SET public_der = 'text' WHERE owner = 'alice'"),
    ],
    ids=[
        "flip-wrapped",
        "swap-wrapped",
        "swap-public",
        "loosen-policy",
        "rename-owner",
        "key-id",
        "created-at",
        "short-wrapped",
        "wrong-type",
    ],
)
def test_tampered_rows_are_refused(
    db_path: Path,
    trusted_root: x509.Certificate,
    key_policy: KeyPolicy,
    clock: Clock,
    fast_keys: list[RSAPrivateKey],
    tamper: Callable[[Path], None],
) -> None:
    with reopen(db_path, trusted_root, key_policy, clock) as kms:
        kms.get_or_create_key("alice")
        kms.get_or_create_key("bob")
    tamper(db_path)
    with reopen(db_path, trusted_root, key_policy, clock) as kms:
        with pytest.raises(KeyStoreError, match="fails its integrity check") as exc:
            kms.get_public_key("alice")
        assert "alice" in str(exc.value)
        with pytest.raises(KeyStoreError):
            kms.get_or_create_key("alice")


def test_wrong_master_key_is_refused(
    db_path: Path,
    trusted_root: x509.Certificate,
    key_policy: KeyPolicy,
    clock: Clock,
    fast_keys: list[RSAPrivateKey],
) -> None:
    with reopen(db_path, trusted_root, key_policy, clock) as kms:
        kms.get_or_create_key(OWNER)
    with (
        LocalKeyService(
            db_path,
            master_key=bytes(32),
            trusted_root=trusted_root,
            default_policy=key_policy,
            clock=clock,
        ) as kms,
        pytest.raises(KeyStoreError, match="wrong master key"),
    ):
        kms.get_public_key(OWNER)


# -- the master key -------------------------------------------------------------------------


def test_master_key_file_is_created_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    key = load_master_key(data_dir, environ={})
    path = data_dir / MASTER_KEY_FILE
    assert len(key) == 32
    assert path.read_bytes() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) & 0o077 == 0
    assert load_master_key(data_dir, environ={}) == key  # stable across starts
    assert [p.name for p in data_dir.iterdir()] == [MASTER_KEY_FILE]  # no temp files left


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_readable_master_key_file_is_refused(tmp_path: Path, mode: int) -> None:
    load_master_key(tmp_path, environ={})
    path = tmp_path / MASTER_KEY_FILE
    path.chmod(mode)
    with pytest.raises(KeyStoreError, match="chmod 600") as exc:
        load_master_key(tmp_path, environ={})
    assert f"{mode:04o}" in str(exc.value)


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_master_key_file_of_the_wrong_length_is_refused(tmp_path: Path, length: int) -> None:
    path = tmp_path / MASTER_KEY_FILE
    path.write_bytes(b"k" * length)
    path.chmod(0o600)
    with pytest.raises(KeyStoreError, match="exactly 32 bytes"):
        load_master_key(tmp_path, environ={})


def test_master_key_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.write_bytes(b"k" * 32)
    real.chmod(0o600)
    (tmp_path / MASTER_KEY_FILE).symlink_to(real)
    with pytest.raises(KeyStoreError, match="cannot read"):
        load_master_key(tmp_path, environ={})


def test_environment_master_key_takes_precedence(tmp_path: Path) -> None:
    load_master_key(tmp_path, environ={})  # a file exists too
    chosen = os.urandom(32)
    environ = {MASTER_KEY_ENV: base64.b64encode(chosen).decode()}
    assert load_master_key(tmp_path, environ=environ) == chosen
    fresh = tmp_path / "fresh"
    assert load_master_key(fresh, environ=environ) == chosen
    assert not fresh.exists()  # nothing written when the environment supplies the key


@pytest.mark.parametrize("value", ["", "not base64!", base64.b64encode(b"k" * 31).decode()])
def test_bad_environment_master_key_is_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(KeyStoreError, match=MASTER_KEY_ENV):
        load_master_key(tmp_path, environ={MASTER_KEY_ENV: value})


def test_open_uses_the_data_directory(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    trusted_root: x509.Certificate,
    key_policy: KeyPolicy,
    clock: Clock,
    document: bytes,
    enclave_key: RSAPrivateKey,
    fast_keys: list[RSAPrivateKey],
) -> None:
    monkeypatch.delenv(MASTER_KEY_ENV, raising=False)
    data_dir = tmp_path / "kms"
    with LocalKeyService.open(
        data_dir, trusted_root=trusted_root, default_policy=key_policy, clock=clock
    ) as kms:
        blob = wrapped_dek(kms, b"o" * 32)
    assert (data_dir / DB_FILE).exists()
    assert stat.S_IMODE((data_dir / MASTER_KEY_FILE).stat().st_mode) == 0o600
    with LocalKeyService.open(
        data_dir, trusted_root=trusted_root, default_policy=key_policy, clock=clock
    ) as kms:
        sealed = kms.decrypt(OWNER, blob, recipient=Recipient(document))
        assert open_for_recipient(sealed, enclave_key) == b"o" * 32

    # With the environment's key instead, the same database fails its integrity check.
    monkeypatch.setenv(MASTER_KEY_ENV, base64.b64encode(bytes(32)).decode())
    with (
        LocalKeyService.open(
            data_dir, trusted_root=trusted_root, default_policy=key_policy, clock=clock
        ) as kms,
        pytest.raises(KeyStoreError),
    ):
        kms.get_public_key(OWNER)


def test_open_refuses_a_readable_master_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    trusted_root: x509.Certificate,
    key_policy: KeyPolicy,
) -> None:
    monkeypatch.delenv(MASTER_KEY_ENV, raising=False)
    (tmp_path / MASTER_KEY_FILE).write_bytes(b"k" * 32)
    (tmp_path / MASTER_KEY_FILE).chmod(0o644)
    with pytest.raises(KeyStoreError, match="refusing to start"):
        LocalKeyService.open(tmp_path, trusted_root=trusted_root, default_policy=key_policy)
    assert not (tmp_path / DB_FILE).exists()


def test_constructor_checks_its_arguments(
    db_path: Path, trusted_root: x509.Certificate, key_policy: KeyPolicy
) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        LocalKeyService(
            db_path, master_key=b"short", trusted_root=trusted_root, default_policy=key_policy
        )
    with pytest.raises(TypeError):
        LocalKeyService(
            db_path,
            master_key=MASTER,
            trusted_root=trusted_root,
            default_policy={0: {b"x"}},  # type: ignore[arg-type]
        )


# -- KeyPolicy ------------------------------------------------------------------------------


def test_key_policy_json_round_trip(key_policy: KeyPolicy) -> None:
    text = key_policy.to_json()
    assert KeyPolicy.from_json(text) == key_policy
    assert KeyPolicy.from_json(text).to_json() == text
    assert " " not in text


def test_key_policy_and_metadata_are_hashable(
    service: LocalKeyService, key_policy: KeyPolicy
) -> None:
    metadata = service.get_or_create_key(OWNER)
    assert len({metadata, service.get_or_create_key(OWNER)}) == 1
    same = KeyPolicy.from_json(key_policy.to_json())
    assert hash(same) == hash(key_policy)
    assert len({key_policy, same}) == 1


def test_key_policy_must_bind_the_key_to_code() -> None:
    value = bytes([5]) * 48
    with pytest.raises(ValueError, match="PCR0, PCR2 or PCR8"):
        KeyPolicy(pcrs={})
    with pytest.raises(ValueError, match="PCR0, PCR2 or PCR8"):
        KeyPolicy(pcrs={1: frozenset({value}), 3: frozenset({value}), 4: frozenset({value})})
    with pytest.raises(ValueError, match="PCR0, PCR2 or PCR8"):
        KeyPolicy(pcrs={0: frozenset({bytes(48)})})  # zero PCR0: a debug enclave
    with pytest.raises(ValueError, match="PCR0, PCR2 or PCR8"):
        KeyPolicy(pcrs={8: frozenset({bytes(48), value})})  # zero PCR8: any unsigned image
    assert KeyPolicy(pcrs={8: frozenset({value})}).pcrs[8] == {value}
    assert KeyPolicy(pcrs={0: frozenset({bytes(48)})}, allow_debug=True).allow_debug
    # A zero pin next to a binding one is a legitimate AND ("unsigned image, this PCR0").
    KeyPolicy(pcrs={0: frozenset({value}), 8: frozenset({bytes(48)})})


@pytest.mark.parametrize(
    "pcrs",
    [
        {32: frozenset({bytes(48)})},
        {-1: frozenset({bytes(48)})},
        {0: frozenset()},
        {0: frozenset({b"short"})},
    ],
)
def test_key_policy_rejects_bad_pcrs(pcrs: dict[int, frozenset[bytes]]) -> None:
    with pytest.raises(ValueError):
        KeyPolicy(pcrs=pcrs)


def test_key_policy_rejects_non_positive_age(key_policy: KeyPolicy) -> None:
    with pytest.raises(ValueError, match="positive"):
        KeyPolicy(pcrs=key_policy.pcrs, max_document_age=dt.timedelta(0))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        "{}",
        '{"version":1}',
        '{"allow_debug":false,"max_document_age_s":300,"pcrs":{},"version":1}',
        '{"allow_debug":0,"max_document_age_s":300,"pcrs":{"0":["' + "ab" * 48 + '"]},"version":1}',
        '{"allow_debug":false,"max_document_age_s":true,"pcrs":{"0":["'
        + "ab" * 48
        + '"]},"version":1}',
        '{"allow_debug":false,"max_document_age_s":300,"pcrs":{"zero":["'
        + "ab" * 48
        + '"]},"version":1}',
        '{"allow_debug":false,"max_document_age_s":300,"pcrs":{"0":["zz"]},"version":1}',
        '{"allow_debug":false,"max_document_age_s":300,"pcrs":{"0":"ab"},"version":1}',
        '{"allow_debug":false,"max_document_age_s":300,"pcrs":{"0":["' + "ab" * 48 + '"]},'
        '"version":2}',
        '{"allow_debug":false,"extra":1,"max_document_age_s":300,"pcrs":{},"version":1}',
        '{"allow_debug":false,"max_document_age_s":1e400,"pcrs":{"0":["'
        + "ab" * 48
        + '"]},"version":1}',
    ],
)
def test_key_policy_from_json_is_strict(text: str) -> None:
    with pytest.raises(FormatError):
        KeyPolicy.from_json(text)


def test_recipient_checks_types() -> None:
    with pytest.raises(TypeError):
        Recipient("a document")  # type: ignore[arg-type]
    assert "attestation_document" not in repr(Recipient(b"doc"))
