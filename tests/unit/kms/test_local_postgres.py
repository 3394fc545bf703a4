"""The built-in key service on PostgreSQL (``cape kms serve --database-url postgresql+psycopg://…``).

The same service as ``test_local.py`` with its rows in a real PostgreSQL server
(``tests/services.py``): keys made once and shared by every process using the database,
releases, rows authenticated under the master key, rebinds seen by the other processes, and
no private key in clear in the database.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from cape.crypto import envelope
from cape.crypto.cms import open_for_recipient
from cape.crypto.keys import load_rsa_public_key
from cape.kms.base import KeyPolicy, KeyStoreError, Recipient
from cape.kms.local import LocalKeyService
from tests.services import Postgres
from tests.unit.kms.conftest import Clock

MASTER = os.urandom(32)
OWNER = "alice"


@pytest.fixture
def database(postgres: Postgres) -> str:
    return postgres.new_database()


def _open(
    database: str, trusted_root: x509.Certificate, policy: KeyPolicy, clock: Clock
) -> LocalKeyService:
    return LocalKeyService(
        database, master_key=MASTER, trusted_root=trusted_root, default_policy=policy, clock=clock
    )


@pytest.fixture
def two(
    database: str,
    trusted_root: x509.Certificate,
    key_policy: KeyPolicy,
    clock: Clock,
    fast_keys: list[RSAPrivateKey],
) -> Iterator[tuple[LocalKeyService, LocalKeyService]]:
    """Two services on one database, as two processes (or a service and `cape kms rebind`)."""
    first = _open(database, trusted_root, key_policy, clock)
    second = _open(database, trusted_root, key_policy, clock)
    yield first, second
    first.close()
    second.close()


def test_a_key_is_made_once_and_shared(
    two: tuple[LocalKeyService, LocalKeyService], fast_keys: list[RSAPrivateKey]
) -> None:
    first, second = two
    made = first.get_or_create_key(OWNER)
    assert second.get_or_create_key(OWNER) == made
    assert first.get_public_key(OWNER) == second.get_public_key(OWNER)
    assert len(fast_keys) == 1
    first.ping()


def test_a_racing_creation_keeps_one_key(
    two: tuple[LocalKeyService, LocalKeyService], fast_keys: list[RSAPrivateKey]
) -> None:
    first, second = two
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda s=s: results.append(s.get_or_create_key("bob")))
        for s in (first, second)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0] == results[1]
    assert first.get_public_key("bob") == second.get_public_key("bob")


def test_a_release_through_one_of_what_the_other_made(
    two: tuple[LocalKeyService, LocalKeyService], document: bytes, enclave_key: RSAPrivateKey
) -> None:
    first, second = two
    first.get_or_create_key(OWNER)
    public = load_rsa_public_key(first.get_public_key(OWNER))
    parsed = envelope.parse(envelope.encrypt(b"the secret input", public))
    sealed = second.decrypt(OWNER, parsed.wrapped_key, recipient=Recipient(document))
    assert envelope.open_envelope(parsed, open_for_recipient(sealed, enclave_key)) == (
        b"the secret input"
    )


def test_rows_are_authenticated_and_never_hold_a_private_key_in_clear(
    two: tuple[LocalKeyService, LocalKeyService],
    database: str,
    postgres: Postgres,
    fast_keys: list[RSAPrivateKey],
    trusted_root: x509.Certificate,
    key_policy: KeyPolicy,
    clock: Clock,
) -> None:
    first, _ = two
    first.get_or_create_key(OWNER)
    pkcs8 = fast_keys[0].private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    dump = postgres.dump(database)
    assert OWNER.encode() in dump  # the search read the rows
    assert pkcs8 not in dump and pkcs8.hex().encode() not in dump
    name = database.rsplit("/", 1)[1]
    postgres.execute("UPDATE keys SET policy_json = replace(policy_json, '1', '2')", name)
    with (
        _open(database, trusted_root, key_policy, clock) as fresh,
        pytest.raises(KeyStoreError, match="fails its integrity check"),
    ):
        fresh.get_public_key(OWNER)


def test_a_rebind_is_seen_by_the_other_process_and_logged(
    two: tuple[LocalKeyService, LocalKeyService], runtime_pcrs: dict[int, bytes]
) -> None:
    first, second = two
    second.get_or_create_key(OWNER)
    assert second.get_or_create_key(OWNER).policy.kind == "measurement"  # cached now
    signer = KeyPolicy.signer(b"\x08" * 48)
    moved = first.rebind(signer, actor="ops", reason="upgrade")
    assert [key.owner for key in moved] == [OWNER]
    assert second.get_or_create_key(OWNER).policy == signer  # not the cached row
    (entry,) = second.key_log()
    assert (entry.actor, entry.action, entry.owner, entry.reason) == (
        "ops",
        "rebind",
        OWNER,
        "upgrade",
    )


def test_an_unreachable_database_is_one_clear_error_without_its_password(
    trusted_root: x509.Certificate, key_policy: KeyPolicy, clock: Clock
) -> None:
    url = "postgresql+psycopg://cape:hunter22@127.0.0.1:1/keys"  # nothing listens on port 1
    with pytest.raises(KeyStoreError) as raised:
        _open(url, trusted_root, key_policy, clock)
    assert str(raised.value).startswith(
        "the key database postgresql+psycopg://cape:***@127.0.0.1:1"
    )
    assert "hunter22" not in str(raised.value)
