"""The built-in key service for ``cape serve``: Cape keys in SQLite, sealed by a master key.

**Storage.** One SQLite database (WAL, ``synchronous=FULL`` so an acknowledged key survives a
crash), or PostgreSQL for ``cape kms serve`` (:mod:`cape.kms.store`), with two tables::

    keys(owner PRIMARY KEY, key_id, public_der, wrapped_private, policy_json, created_at)
    key_log(id, at, actor, action, owner, key_id, old_policy_json, new_policy_json, reason)

and the schema version in ``PRAGMA user_version`` (currently 2; version 1 databases gain the
log table on open). ``key_log`` is the operator audit trail: every :meth:`~LocalKeyService.rebind`
writes one row per key in the same transaction that changes the key's policy. ``wrapped_private`` is
``nonce(12) ‖ AES-256-GCM(master key, nonce, PKCS#8 DER, aad)`` with::

    aad = b"cape-kms-v1|" ‖ owner ‖ b"|" ‖ key_id ‖ b"|" ‖ created_at
          ‖ b"|" ‖ SHA-256(public_der) ‖ SHA-256(policy_json)

so every column of a row is authenticated: rows cannot be swapped between owners, and neither
the public key clients encrypt to nor the release policy can be edited without the master
key. (That binds more than the owner and key id: an edited ``policy_json`` would otherwise
let a modified runtime receive keys, and an edited ``public_der`` would send clients'
data keys to someone else.) A row that fails the check raises
:class:`~cape.kms.base.KeyStoreError`; the service reads and verifies a row before it uses
any column of it.

**Master key.** 32 bytes, from the environment variable ``CAPE_KMS_MASTER_KEY`` (standard
base64; it takes precedence) or the file ``<data_dir>/master.key`` (raw bytes), created on
first start with mode 0600 in a 0700 directory. :meth:`LocalKeyService.open` refuses to start
when the file is readable by group or others, or is not exactly 32 bytes.

**Release.** :meth:`~LocalKeyService.decrypt` and :meth:`~LocalKeyService.generate_data_key`
run :func:`~cape.kms.base.check_recipient` with the trusted root the service was given and the
key's stored policy, then answer with CMS for the document's public key. Plaintext keys are
never returned, logged or stored unsealed. A document (or a certificate chain) that already
verified is not verified again while its certificates are valid (a
:class:`~cape.verify.verifier.VerificationCache`); its age, PCRs and debug mode are checked
against the key's policy on every request.

**No hardware guarantee.** Whoever runs this process holds the master key; in simulated mode
that is the operator. It enforces the policy against everyone else, including clients and
tampered runtimes, not against the operator (see ``cape serve``'s banner).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import logging
import os
import stat
import threading
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cape._internal.timefile import fsync_dir, utc_now
from cape.crypto.cms import seal_for_recipient
from cape.crypto.envelope import DEK_SIZE, unwrap_key, wrap_key
from cape.crypto.keys import CAPE_KEY_BITS, generate_cape_key, public_key_der
from cape.errors import FormatError, KeyNotFoundError, KeyReleaseDeniedError
from cape.kms.base import (
    DataKey,
    KeyMetadata,
    KeyPolicy,
    KeyService,
    KeyStoreError,
    Recipient,
    check_owner,
    check_recipient,
)
from cape.kms.store import SCHEMA_VERSION, KeyRows, open_key_rows
from cape.verify.verifier import VerificationCache

__all__ = [
    "DB_FILE",
    "MASTER_KEY_BYTES",
    "MASTER_KEY_ENV",
    "MASTER_KEY_FILE",
    "SCHEMA_VERSION",
    "KeyLogEntry",
    "LocalKeyService",
    "load_master_key",
]

DB_FILE = "kms.sqlite3"
MASTER_KEY_FILE = "master.key"
MASTER_KEY_ENV = "CAPE_KMS_MASTER_KEY"
MASTER_KEY_BYTES = 32
AAD_PREFIX = b"cape-kms-v1|"
NONCE_BYTES = 12
TAG_BYTES = 16
#: Verified rows kept in memory (each holds a parsed RSA-4096 private key).
CACHE_ENTRIES = 1024
_CREATION_LOCKS = 64

Clock = Callable[[], dt.datetime]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyLogEntry:
    """One row of the operator audit log (``key_log``)."""

    at: dt.datetime
    actor: str
    action: str
    owner: str
    key_id: str
    old_policy: str
    new_policy: str
    reason: str


# --- the master key -----------------------------------------------------------------------


def _master_key_from_env(value: str) -> bytes:
    try:
        key = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != MASTER_KEY_BYTES:
        raise KeyStoreError(
            f"{MASTER_KEY_ENV} must be the standard base64 of {MASTER_KEY_BYTES} random bytes"
        )
    return key


def _read_master_key_file(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise KeyStoreError(f"cannot read the KMS master key {path}: {reason}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyStoreError(f"the KMS master key {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise KeyStoreError(
                f"the KMS master key {path} is accessible to group or others "
                f"(mode {mode:04o}); refusing to start: run chmod 600 {path}"
            )
        data = os.read(fd, MASTER_KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != MASTER_KEY_BYTES:
        found = "more" if len(data) > MASTER_KEY_BYTES else str(len(data))
        raise KeyStoreError(
            f"the KMS master key {path} must hold exactly {MASTER_KEY_BYTES} bytes, not {found}"
        )
    return data


def _create_master_key_file(path: Path) -> None:
    """Write a new key atomically (temp file, then link); a concurrent winner is kept."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.write(fd, os.urandom(MASTER_KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process created it first; use theirs
        else:
            fsync_dir(path.parent)
            _log.info("created a new KMS master key at %s", path)
    finally:
        temporary.unlink(missing_ok=True)


def load_master_key(data_dir: Path, *, environ: Mapping[str, str] | None = None) -> bytes:
    """The master key: ``$CAPE_KMS_MASTER_KEY`` if set, else ``data_dir/master.key``.

    The file is created (mode 0600, 32 random bytes) when missing; ``data_dir`` is created
    with mode 0700 when missing.

    Raises:
        KeyStoreError: the variable is not base64 of 32 bytes; the file is accessible to
            group or others, not a regular file, or not exactly 32 bytes.
    """
    env = os.environ if environ is None else environ
    value = env.get(MASTER_KEY_ENV)
    if value is not None:
        return _master_key_from_env(value)
    directory = Path(data_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / MASTER_KEY_FILE
    if not path.exists() and not path.is_symlink():
        _create_master_key_file(path)
    return _read_master_key_file(path)


# --- rows ---------------------------------------------------------------------------------


def _row_aad(owner: str, key_id: str, created_at: str, public_der: bytes, policy: str) -> bytes:
    return b"".join(
        (
            AAD_PREFIX,
            owner.encode(),
            b"|",
            key_id.encode(),
            b"|",
            created_at.encode(),
            b"|",
            hashlib.sha256(public_der).digest(),
            hashlib.sha256(policy.encode()).digest(),
        )
    )


@dataclass(frozen=True)
class _KeyRecord:
    """A verified row: every field authenticated by the master key."""

    metadata: KeyMetadata
    public_der: bytes
    private_key: RSAPrivateKey = field(repr=False)


class LocalKeyService(KeyService):
    """Cape keys in a local SQLite database; see the module docstring.

    Thread-safe: one lock guards the connection, and first requests for the same owner
    wait for a single key generation. Several processes may share one database: a racing
    insert is ignored and everyone reads the row that won.
    """

    def __init__(
        self,
        db_path: Path | str,
        *,
        master_key: bytes,
        trusted_root: x509.Certificate,
        default_policy: KeyPolicy,
        clock: Clock | None = None,
    ) -> None:
        if not isinstance(master_key, bytes) or len(master_key) != MASTER_KEY_BYTES:
            raise ValueError(f"the master key must be {MASTER_KEY_BYTES} bytes")
        if not isinstance(trusted_root, x509.Certificate):
            raise TypeError("trusted_root must be an x509.Certificate")
        if not isinstance(default_policy, KeyPolicy):
            raise TypeError("default_policy must be a KeyPolicy")
        self._aead = AESGCM(master_key)
        self._root = trusted_root
        self._default_policy = default_policy
        self._clock: Clock = clock or utc_now
        self._lock = threading.Lock()
        self._creation_locks = tuple(threading.Lock() for _ in range(_CREATION_LOCKS))
        self._cache: dict[str, _KeyRecord] = {}
        self._documents = VerificationCache(CACHE_ENTRIES)
        self._db: KeyRows = open_key_rows(db_path)
        self._data_version: object = None

    @classmethod
    def open(
        cls,
        data_dir: Path,
        *,
        trusted_root: x509.Certificate,
        default_policy: KeyPolicy,
        clock: Clock | None = None,
    ) -> LocalKeyService:
        """The service over ``data_dir/kms.sqlite3`` with the master key of
        :func:`load_master_key` (environment first, then ``data_dir/master.key``)."""
        directory = Path(data_dir)
        master_key = load_master_key(directory)
        return cls(
            directory / DB_FILE,
            master_key=master_key,
            trusted_root=trusted_root,
            default_policy=default_policy,
            clock=clock,
        )

    # --- lifecycle --------------------------------------------------------------------

    def close(self) -> None:
        """Close the database connection (the service is unusable afterwards)."""
        with self._lock:
            self._cache.clear()
            self._db.close()

    def ping(self) -> None:
        """Raise :class:`KeyStoreError` when the database does not answer (readiness)."""
        with self._lock:
            self._db.ping()

    # --- KeyService ---------------------------------------------------------------------

    def get_or_create_key(self, owner: str) -> KeyMetadata:
        owner = check_owner(owner)
        record = self._load(owner)
        if record is not None:
            return record.metadata
        with self._creation_locks[zlib.crc32(owner.encode()) % _CREATION_LOCKS]:
            record = self._load(owner)
            if record is None:
                record = self._create(owner)
        return record.metadata

    def get_public_key(self, owner: str) -> bytes:
        return self._require(owner).public_der

    def decrypt(self, owner: str, ciphertext_blob: bytes, *, recipient: Recipient) -> bytes:
        if not isinstance(ciphertext_blob, bytes):
            raise TypeError("ciphertext_blob must be bytes")
        record = self._require(owner)
        recipient_key = self._check(record, recipient, "decrypt")
        dek = unwrap_key(ciphertext_blob, record.private_key)  # DecryptionError, one message
        return seal_for_recipient(dek, public_key_der(recipient_key))

    def generate_data_key(self, owner: str, *, recipient: Recipient) -> DataKey:
        record = self._require(owner)
        recipient_key = self._check(record, recipient, "generate_data_key")
        dek = os.urandom(DEK_SIZE)
        return DataKey(
            ciphertext_blob=wrap_key(dek, record.private_key.public_key()),
            ciphertext_for_recipient=seal_for_recipient(dek, public_key_der(recipient_key)),
        )

    # --- operator actions (audited) ----------------------------------------------------

    def rebind(
        self,
        policy: KeyPolicy,
        *,
        actor: str,
        reason: str,
        owners: list[str] | None = None,
        only_kind: str | None = None,
    ) -> list[KeyMetadata]:
        """Give keys a new release policy; log each change in ``key_log``; return the keys moved.

        ``owners`` limits it to those keys (each must exist); ``only_kind`` to keys whose
        current policy is of that kind (``"measurement"`` or ``"signer"``). Keys that already
        have ``policy`` are left alone and not logged. Every row is re-sealed under the
        master key (the policy is part of its authenticated data) and changed in one
        transaction with its log row, so a crash leaves either the old or the new policy.

        Proving that the new policy names the right code is the caller's job
        (:func:`cape.platform.operator.rebind_keys` does it); this method only records who
        asked and why.

        Raises:
            KeyNotFoundError: an owner in ``owners`` has no key.
            KeyStoreError: a row fails its integrity check.
        """
        if not isinstance(policy, KeyPolicy):
            raise TypeError("policy must be a KeyPolicy")
        if not actor or not reason:
            raise ValueError("a rebind needs an actor and a reason for the log")
        if owners is None:
            with self._lock:
                owners = self._db.owners()
        moved: list[KeyMetadata] = []
        new_json = policy.to_json()
        for owner in owners:
            record = self._require(owner)
            old = record.metadata.policy
            if old == policy or (only_kind is not None and old.kind != only_kind):
                continue
            meta = record.metadata
            created_at = meta.created_at.isoformat()
            pkcs8 = record.private_key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            nonce = os.urandom(NONCE_BYTES)
            aad = _row_aad(owner, meta.key_id, created_at, record.public_der, new_json)
            wrapped = nonce + self._aead.encrypt(nonce, pkcs8, aad)
            log_row = (
                self._now().isoformat(),
                actor,
                "rebind",
                owner,
                meta.key_id,
                old.to_json(),
                new_json,
                reason,
            )
            with self._lock:
                if not self._db.rebind(
                    owner, meta.key_id, old.to_json(), wrapped, new_json, log_row
                ):
                    raise KeyStoreError(
                        f"the key of owner {owner!r} changed during the rebind; run it again"
                    )
                self._cache.pop(owner, None)
            _log.info("rebound Cape key %s of %s to a %s policy", meta.key_id, owner, policy.kind)
            moved.append(KeyMetadata(owner, meta.key_id, meta.created_at, policy))
        return moved

    def key_log(self) -> list[KeyLogEntry]:
        """The operator audit log, oldest first."""
        with self._lock:
            rows = self._db.log()
        return [
            KeyLogEntry(dt.datetime.fromisoformat(at), actor, action, owner, key_id, old, new, why)
            for at, actor, action, owner, key_id, old, new, why in rows
        ]

    # --- internals --------------------------------------------------------------------

    def _now(self) -> dt.datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the key service clock must return timezone-aware datetimes")
        return now.astimezone(dt.UTC)

    def _check(self, record: _KeyRecord, recipient: Recipient, operation: str) -> RSAPublicKey:
        try:
            return check_recipient(
                recipient,
                root=self._root,
                policy=record.metadata.policy,
                now=self._now(),
                cache=self._documents,
            )
        except KeyReleaseDeniedError as exc:
            _log.info("KMS %s for owner %s refused: %s", operation, record.metadata.owner, exc)
            raise

    def _require(self, owner: str) -> _KeyRecord:
        record = self._load(check_owner(owner))
        if record is None:
            raise KeyNotFoundError(f"no Cape key for owner {owner!r}")
        return record

    def _load(self, owner: str) -> _KeyRecord | None:
        with self._lock:
            # Another process (``cape kms rebind``) may have changed rows.
            version = self._db.data_version()
            if version != self._data_version:
                self._cache.clear()
                self._data_version = version
            cached = self._cache.get(owner)
            if cached is not None:
                return cached
            row = self._db.select(owner)
        if row is None:
            return None
        record = self._open_row(owner, row)
        with self._lock:
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.pop(next(iter(self._cache)))
            self._cache[owner] = record
        return record

    def _open_row(self, owner: str, row: tuple[object, ...]) -> _KeyRecord:
        failure = KeyStoreError(
            f"the stored key of owner {owner!r} fails its integrity check "
            "(a tampered row, or the wrong master key)"
        )
        row_owner, key_id, public_der, wrapped, policy_json, created_at = row
        if not (
            row_owner == owner
            and isinstance(key_id, str)
            and isinstance(public_der, bytes)
            and isinstance(wrapped, bytes)
            and isinstance(policy_json, str)
            and isinstance(created_at, str)
            and len(wrapped) > NONCE_BYTES + TAG_BYTES
        ):
            raise failure
        aad = _row_aad(owner, key_id, created_at, public_der, policy_json)
        try:
            pkcs8 = self._aead.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], aad)
        except InvalidTag:
            raise failure from None
        # Authenticated from here on: a failure below is a bug or a wrong writer, not an attack.
        try:
            policy = KeyPolicy.from_json(policy_json)
            created = dt.datetime.fromisoformat(created_at)
            private_key = serialization.load_der_private_key(
                pkcs8, password=None, unsafe_skip_rsa_key_validation=True
            )
        except (FormatError, ValueError, TypeError, UnsupportedAlgorithm):
            raise failure from None
        if (
            not isinstance(private_key, RSAPrivateKey)
            or private_key.key_size != CAPE_KEY_BITS
            or public_key_der(private_key) != public_der
            or created.tzinfo is None
        ):
            raise failure
        metadata = KeyMetadata(owner=owner, key_id=key_id, created_at=created, policy=policy)
        return _KeyRecord(metadata=metadata, public_der=public_der, private_key=private_key)

    def _create(self, owner: str) -> _KeyRecord:
        private_key = generate_cape_key()
        key_id = str(uuid.uuid4())
        created_at = self._now().isoformat()
        public_der = public_key_der(private_key)
        policy_json = self._default_policy.to_json()
        pkcs8 = private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        nonce = os.urandom(NONCE_BYTES)
        aad = _row_aad(owner, key_id, created_at, public_der, policy_json)
        wrapped = nonce + self._aead.encrypt(nonce, pkcs8, aad)
        with self._lock:
            inserted = self._db.insert(
                (owner, key_id, public_der, wrapped, policy_json, created_at)
            )
        if inserted:
            _log.info("created Cape key %s for owner %s", key_id, owner)
        record = self._load(owner)
        if record is None:  # pragma: no cover - the row was just inserted or already there
            raise KeyStoreError(f"the key of owner {owner!r} vanished right after creation")
        return record
