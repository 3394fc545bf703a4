"""The key service seam: one RSA-4096 Cape key per owner, released only to attested enclaves.

Shaped like AWS KMS with a Nitro ``Recipient`` (``shared/spec/nitro-attestation.md`` §3.6):
clients encrypt with the public half; :meth:`KeyService.decrypt` never returns plaintext, only
a CMS EnvelopedData (``CiphertextForRecipient``, :mod:`cape.crypto.cms`) addressed to the RSA
public key inside an attestation document that satisfies the key's :class:`KeyPolicy`.

Two implementations share this interface: :class:`~cape.kms.local.LocalKeyService` (the
built-in one, for ``cape serve``) and :class:`~cape.kms.aws.AwsKeyService` (AWS KMS).
Where the release check runs locally, it is :func:`check_recipient`.

A captured document is no use to anyone but its enclave: what it unlocks is CMS addressed to
the ephemeral public key inside it, whose private half never leaves that enclave. That is why
the key service needs no nonce of its own, only a bound on the document's age.

Owner names are the key's handle everywhere (database rows, ``alias/cape/<owner>``): one to
64 characters of ``a-z 0-9 _ -``, starting with a letter or digit. Cape's usernames are
GitHub logins, which are case-insensitive: callers lower-case them first.
"""

from __future__ import annotations

import abc
import datetime as dt
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from cape._internal.closeable import Closeable
from cape.crypto.keys import MIN_RSA_BITS, public_key_der
from cape.errors import (
    CapeError,
    CertificateExpiredError,
    ChainError,
    DebugEnclaveError,
    DocumentExpiredError,
    DocumentTimestampError,
    FormatError,
    KeyReleaseDeniedError,
    PCRMismatchError,
    SignatureError,
    VerificationError,
)
from cape.formats.attestation import MAX_DOCUMENT_BYTES
from cape.verify.policy import AttestationPolicy
from cape.verify.verifier import VerificationCache, verify_attestation

__all__ = [
    "BINDING_PCRS",
    "DEFAULT_MAX_DOCUMENT_AGE",
    "KEY_ENCRYPTION_ALGORITHM",
    "OWNER_PATTERN",
    "DataKey",
    "KeyMetadata",
    "KeyPolicy",
    "KeyService",
    "KeyStoreError",
    "Recipient",
    "check_key_encryption_algorithm",
    "check_owner",
    "check_recipient",
]

KEY_ENCRYPTION_ALGORITHM = "RSAES_OAEP_SHA_256"
"""The only ``Recipient.KeyEncryptionAlgorithm`` AWS KMS (and we) accept."""

OWNER_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
"""What an owner name must match in full."""

DEFAULT_MAX_DOCUMENT_AGE = dt.timedelta(minutes=5)
"""How old an attestation document may be when it asks for a key (Chainlink's audit value)."""

BINDING_PCRS = (0, 2, 8)
"""PCRs that identify code: the whole image, the application, the image's signer.

A key policy must pin at least one of them to non-zero values (PCR1 names only the kernel,
PCR3 and PCR4 the parent's IAM role and instance; a zero PCR0, PCR2 or PCR8 is a debug enclave
or an unsigned image, which identifies nothing)."""

_PCR_LENGTHS = frozenset({32, 48, 64})
_POLICY_JSON_VERSION = 1
_POLICY_JSON_KEYS = frozenset({"version", "pcrs", "allow_debug", "max_document_age_s"})


class KeyStoreError(CapeError):
    """The key store cannot be used: a bad master key, unsafe file modes, or a row that fails
    its integrity check. Says what is wrong and where, never key material."""


def check_owner(owner: object) -> str:
    """Return ``owner`` if it is a valid owner name (see the module docstring).

    Raises:
        FormatError: ``owner`` is not a string matching :data:`OWNER_PATTERN`.
    """
    if not isinstance(owner, str) or not OWNER_PATTERN.fullmatch(owner):
        shown = repr(owner)[:80] if isinstance(owner, str) else type(owner).__name__
        raise FormatError(
            f"invalid key owner {shown}: use 1-64 characters of a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )
    return owner


def _is_zero(value: bytes) -> bool:
    return not any(value)


@dataclass(frozen=True)
class KeyPolicy:
    """Which attested enclaves may receive a key's data keys.

    - ``pcrs``: allow-lists ``{index: {values}}``; every listed PCR must hold one of its
      values. A policy must bind the key to code: at least one of :data:`BINDING_PCRS` pinned
      to non-zero values only, otherwise the constructor raises ``ValueError``.
    - ``allow_debug``: release to debug-mode enclaves (PCR0 zero). Development only; it is
      also what makes a zero value in a binding allow-list acceptable.
    - ``max_document_age``: the oldest document accepted, relative to the service's clock.
      AWS KMS cannot express it in a key policy (its own freshness rule is unverified).
    """

    pcrs: Mapping[int, frozenset[bytes]]
    allow_debug: bool = False
    max_document_age: dt.timedelta = DEFAULT_MAX_DOCUMENT_AGE

    def __post_init__(self) -> None:
        if not isinstance(self.allow_debug, bool):
            raise TypeError("allow_debug must be a bool")
        if not isinstance(self.max_document_age, dt.timedelta):
            raise TypeError("max_document_age must be a timedelta")
        if self.max_document_age <= dt.timedelta(0):
            raise ValueError("max_document_age must be positive")
        pcrs: dict[int, frozenset[bytes]] = {}
        for index, values in self.pcrs.items():
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 32:
                raise ValueError(f"PCR index {index!r} is outside 0..31")
            if isinstance(values, bytes | bytearray):
                raise TypeError(f"PCR{index} needs a collection of allowed values, not bytes")
            allowed = frozenset(bytes(v) for v in values)
            if not allowed:
                raise ValueError(f"PCR{index} allow-list is empty")
            for value in allowed:
                if len(value) not in _PCR_LENGTHS:
                    raise ValueError(f"PCR{index} values must be 32, 48 or 64 bytes")
            pcrs[index] = allowed
        binding = [
            index
            for index in BINDING_PCRS
            if index in pcrs and (self.allow_debug or not any(map(_is_zero, pcrs[index])))
        ]
        if not binding:
            raise ValueError(
                "a key policy must pin PCR0, PCR2 or PCR8 to non-zero measurements: "
                "a key has to be bound to the code that may use it"
            )
        object.__setattr__(self, "pcrs", MappingProxyType(dict(sorted(pcrs.items()))))

    @classmethod
    def measurement(cls, pcr0: bytes, pcr1: bytes, pcr2: bytes) -> KeyPolicy:
        """Kind ``measurement``: only the one build whose PCR0-2 these are."""
        return cls(pcrs={0: frozenset({pcr0}), 1: frozenset({pcr1}), 2: frozenset({pcr2})})

    @classmethod
    def signer(cls, pcr8: bytes, *, pcr3: bytes | None = None) -> KeyPolicy:
        """Kind ``signer``: any image signed by the certificate whose PCR8 this is, and, with
        ``pcr3``, only on parents holding that IAM role. Upgrades the signer signs keep access."""
        pcrs = {8: frozenset({pcr8})}
        if pcr3 is not None:
            pcrs[3] = frozenset({pcr3})
        return cls(pcrs=pcrs)

    @property
    def kind(self) -> str:
        """``"signer"`` when the policy pins PCR8 (the image signer), else ``"measurement"``."""
        return "signer" if 8 in self.pcrs else "measurement"

    def __hash__(self) -> int:
        pins = tuple((index, tuple(sorted(values))) for index, values in self.pcrs.items())
        return hash((pins, self.allow_debug, self.max_document_age))

    def attestation_policy(self) -> AttestationPolicy:
        """The verifier policy that enforces this key policy."""
        return AttestationPolicy(
            pcrs=self.pcrs, max_age=self.max_document_age, allow_debug=self.allow_debug
        )

    def to_json(self) -> str:
        """Canonical JSON: sorted keys and allow-lists, lower-case hex, no spaces."""
        document = {
            "version": _POLICY_JSON_VERSION,
            "pcrs": {str(i): sorted(v.hex() for v in values) for i, values in self.pcrs.items()},
            "allow_debug": self.allow_debug,
            "max_document_age_s": self.max_document_age.total_seconds(),
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> KeyPolicy:
        """Parse :meth:`to_json` output strictly.

        Raises:
            FormatError: not that JSON shape, unknown keys, bad hex, or a policy the
                constructor refuses.
        """
        try:
            document = json.loads(text)
        except (ValueError, TypeError):
            raise FormatError("key policy is not valid JSON") from None
        if not isinstance(document, dict) or set(document) != _POLICY_JSON_KEYS:
            raise FormatError(f"key policy JSON must have exactly {sorted(_POLICY_JSON_KEYS)}")
        if document["version"] != _POLICY_JSON_VERSION:
            raise FormatError(f"unsupported key policy version {document['version']!r}")
        allow_debug = document["allow_debug"]
        age = document["max_document_age_s"]
        raw_pcrs = document["pcrs"]
        if not isinstance(allow_debug, bool):
            raise FormatError("key policy allow_debug must be true or false")
        if isinstance(age, bool) or not isinstance(age, int | float):
            raise FormatError("key policy max_document_age_s must be a number")
        if not isinstance(raw_pcrs, dict):
            raise FormatError("key policy pcrs must be an object")
        pcrs: dict[int, frozenset[bytes]] = {}
        for key, values in raw_pcrs.items():
            if not (isinstance(key, str) and key.isdigit() and key.isascii()):
                raise FormatError(f"key policy PCR index {key!r} is not a decimal number")
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise FormatError(f"key policy PCR{key} must be a list of hex strings")
            try:
                pcrs[int(key)] = frozenset(bytes.fromhex(v) for v in values)
            except ValueError:
                raise FormatError(f"key policy PCR{key} holds a value that is not hex") from None
        try:
            return cls(
                pcrs=pcrs,
                allow_debug=allow_debug,
                max_document_age=dt.timedelta(seconds=age),
            )
        except (ValueError, TypeError, OverflowError) as exc:
            raise FormatError(f"invalid key policy: {exc}") from None


@dataclass(frozen=True)
class Recipient:
    """AWS KMS's ``RecipientInfo``: who receives the key, and how it is wrapped for them.

    ``key_encryption_algorithm`` is checked by the service (``RSAES_OAEP_SHA_256`` is the only
    valid value), so a wrong one is a refusal, not a constructor error.
    """

    attestation_document: bytes = field(repr=False)
    key_encryption_algorithm: str = KEY_ENCRYPTION_ALGORITHM

    def __post_init__(self) -> None:
        if not isinstance(self.attestation_document, bytes):
            raise TypeError("attestation_document must be bytes")
        if not isinstance(self.key_encryption_algorithm, str):
            raise TypeError("key_encryption_algorithm must be a str")


@dataclass(frozen=True)
class KeyMetadata:
    """A Cape key's public facts (like KMS's ``KeyMetadata``)."""

    owner: str
    key_id: str
    created_at: dt.datetime
    policy: KeyPolicy


@dataclass(frozen=True)
class DataKey:
    """A fresh 32-byte data key in its two wrapped forms, never in plaintext.

    - ``ciphertext_blob``: RSA-OAEP-SHA-256 under the owner's Cape key (the ``wrapped_key``
      of a ``cape:`` envelope); store it next to the data.
    - ``ciphertext_for_recipient``: CMS EnvelopedData for the attested recipient.
    """

    ciphertext_blob: bytes = field(repr=False)
    ciphertext_for_recipient: bytes = field(repr=False)


class KeyService(Closeable, abc.ABC):
    """One RSA-4096 Cape key per owner; data keys go only to attested recipients."""

    @abc.abstractmethod
    def get_or_create_key(self, owner: str) -> KeyMetadata:
        """The owner's key, created (RSA-4096, the service's default policy) on first use.

        Concurrent first requests for one owner create exactly one key.
        """

    @abc.abstractmethod
    def get_public_key(self, owner: str) -> bytes:
        """The owner's public key as DER SubjectPublicKeyInfo.

        Raises:
            KeyNotFoundError: the owner has no key.
        """

    @abc.abstractmethod
    def decrypt(self, owner: str, ciphertext_blob: bytes, *, recipient: Recipient) -> bytes:
        """Unwrap a data key and return it re-encrypted for ``recipient`` (CMS DER/BER).

        Raises:
            KeyNotFoundError: the owner has no key.
            KeyReleaseDeniedError: the recipient fails the key policy (names the check).
            DecryptionError: the blob does not unwrap under the owner's key.
        """

    @abc.abstractmethod
    def generate_data_key(self, owner: str, *, recipient: Recipient) -> DataKey:
        """A fresh 32-byte data key, wrapped for the owner's key and for ``recipient``.

        Raises:
            KeyNotFoundError: the owner has no key.
            KeyReleaseDeniedError: the recipient fails the key policy.
        """

    def close(self) -> None:
        """Release resources (database connections); the default does nothing."""


def _denial(exc: CapeError) -> str:
    """A refusal message for a failed verification step, without key material."""
    match exc:
        case PCRMismatchError():
            return f"attestation PCR{exc.index} does not match the key policy"
        case DocumentExpiredError():
            return "attestation document is too old"
        case DocumentTimestampError():
            return "attestation document is dated in the future"
        case DebugEnclaveError():
            return "attestation document comes from a debug-mode enclave"
        case CertificateExpiredError():
            return "attestation document certificate is not valid at this time"
        case ChainError():
            return "attestation document does not chain to the trusted root"
        case SignatureError():
            return "attestation document signature does not verify"
        case FormatError():
            return "attestation document is malformed"
        case _:
            return "attestation document failed verification"


def _recipient_public_key(public_key: bytes | None) -> RSAPublicKey:
    if public_key is None:
        raise KeyReleaseDeniedError("attestation document carries no recipient public key")
    try:
        key = serialization.load_der_public_key(public_key)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyReleaseDeniedError(
            "recipient public key is not an RSA key (not a DER SubjectPublicKeyInfo)"
        ) from None
    if not isinstance(key, RSAPublicKey):
        kind = type(key).__name__.lstrip("_")
        raise KeyReleaseDeniedError(f"recipient public key is not an RSA key ({kind})")
    if public_key_der(key) != public_key:
        raise KeyReleaseDeniedError(
            "recipient public key is not a DER SubjectPublicKeyInfo (PKCS#1 or non-canonical)"
        )
    if key.key_size < MIN_RSA_BITS:
        raise KeyReleaseDeniedError(
            f"recipient public key is {key.key_size} bits; at least {MIN_RSA_BITS} required"
        )
    return key


def check_key_encryption_algorithm(recipient: Recipient) -> None:
    """Refuse every ``KeyEncryptionAlgorithm`` but ``RSAES_OAEP_SHA_256`` (as AWS KMS does).

    Raises:
        KeyReleaseDeniedError: another algorithm was asked for.
    """
    if not isinstance(recipient, Recipient):
        raise TypeError(f"expected a Recipient, not {type(recipient).__name__}")
    if recipient.key_encryption_algorithm != KEY_ENCRYPTION_ALGORITHM:
        shown = recipient.key_encryption_algorithm[:40]
        raise KeyReleaseDeniedError(
            f"key encryption algorithm {shown!r} is not supported; "
            f"only {KEY_ENCRYPTION_ALGORITHM} is"
        )


def check_recipient(
    recipient: Recipient,
    *,
    root: x509.Certificate,
    policy: KeyPolicy,
    now: dt.datetime,
    cache: VerificationCache | None = None,
) -> RSAPublicKey:
    """The release check: may ``recipient`` receive a key governed by ``policy`` at ``now``?

    In order: the key encryption algorithm is ``RSAES_OAEP_SHA_256``; the document verifies
    against the service's trusted ``root`` (signature, chain, age, debug mode, PCR allow-lists
    from ``policy``); it carries a ``public_key`` that is a DER RSA SubjectPublicKeyInfo of at
    least 2048 bits. Returns that key. With a ``cache``, a document (or chain) that verified
    before skips the signature and chain checks while its certificates are valid; the policy
    checks always run (see :mod:`cape.verify.verifier`).

    Raises:
        KeyReleaseDeniedError: naming the failed check; a verification failure is chained as
            ``__cause__`` for logs.
    """
    check_key_encryption_algorithm(recipient)
    if len(recipient.attestation_document) > MAX_DOCUMENT_BYTES:
        raise KeyReleaseDeniedError(
            f"attestation document is larger than {MAX_DOCUMENT_BYTES} bytes"
        )
    try:
        document = verify_attestation(
            recipient.attestation_document,
            root=root,
            now=now,
            policy=policy.attestation_policy(),
            cache=cache,
        )
    except (VerificationError, FormatError) as exc:
        raise KeyReleaseDeniedError(_denial(exc)) from exc
    return _recipient_public_key(document.public_key)
