"""AWS KMS as the key service: one RSA-4096 KMS key per owner, released with Nitro ``Recipient``.

**Not exercised against AWS here.** This workplace has no AWS account and no Nitro hardware;
the module is typed and unit-tested with ``botocore.stub.Stubber`` against the request and
response shapes of the KMS API model that boto3 ships (``shared/spec/nitro-attestation.md``
§3.6). Whether KMS accepts exactly this key policy text, and how ``GetKeyPolicy`` formats it
back, is unverified: check both on a real account before relying on them.

Mapping onto KMS:

- Each owner's key is found by the alias ``alias/cape/<owner>``; on first use
  :meth:`AwsKeyService.get_or_create_key` calls ``CreateKey(KeySpec=RSA_4096,
  KeyUsage=ENCRYPT_DECRYPT, Policy=key_policy_document(...),
  BypassPolicyLockoutSafetyCheck=True)`` and ``CreateAlias``. The policy grants nobody
  ``kms:PutKeyPolicy`` (it is immutable, as Cape's documentation promises), which is why the
  lockout check must be bypassed; nobody gets ``UpdateAlias``/``DeleteAlias`` either, so the
  alias cannot be moved to another key.
- Before a key is used, its metadata (RSA_4096, ENCRYPT_DECRYPT, ``Origin=AWS_KMS``: no
  imported key material) and its policy are checked: the policy must be exactly what
  :func:`key_policy_document` writes for some :class:`~cape.kms.base.KeyPolicy`. The host
  shares the enclave's IAM role, so it could pre-create ``alias/cape/<owner>`` for a key it
  controls; this check refuses such a key instead of handing its public half to clients.
- :meth:`~AwsKeyService.decrypt` is ``Decrypt`` with ``Recipient``; KMS checks the attestation
  against the key policy's ``kms:RecipientAttestation:PCR<N>`` conditions and answers with
  ``CiphertextForRecipient`` (BER CMS). A response that carries ``Plaintext`` is refused.
- :meth:`~AwsKeyService.generate_data_key`: KMS's ``GenerateDataKey`` works only with
  symmetric keys, and ``GenerateRandom`` with a ``Recipient`` would leave nobody able to wrap
  the key for the owner's RSA key. So the data key is drawn here (``os.urandom``), wrapped
  locally with the owner's public key (RSA-OAEP-SHA-256, what KMS's ``RSAES_OAEP_SHA_256``
  decrypts), and that blob goes through :meth:`decrypt`, so the CMS comes from KMS and only
  after KMS's attestation check. The plaintext key exists in this process for that moment:
  run this service inside the enclave (where the KMS calls originate anyway), never on the
  host.
- Checks KMS cannot make: it has no maximum document age (its freshness rule is unverified)
  and no notion of debug mode beyond the PCR values. :func:`key_policy_document` therefore
  refuses a policy that allows a zero PCR0 unless ``allow_debug`` is set.

Errors: ``AccessDeniedException`` on a release becomes :class:`~cape.errors.KeyReleaseDeniedError`,
``NotFoundException`` :class:`~cape.errors.KeyNotFoundError`, ``InvalidCiphertextException``
and ``IncorrectKeyException`` :class:`~cape.errors.DecryptionError`; every other AWS error is an
:class:`AwsKMSError` carrying the AWS error code.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import threading
from collections.abc import Mapping
from typing import Any

from cape.crypto.envelope import DECRYPTION_FAILED, DEK_SIZE, wrap_key
from cape.crypto.keys import CAPE_KEY_BITS, load_rsa_public_key
from cape.errors import (
    CapeError,
    DecryptionError,
    FormatError,
    KeyFormatError,
    KeyNotFoundError,
    KeyReleaseDeniedError,
)
from cape.kms.base import (
    KEY_ENCRYPTION_ALGORITHM,
    DataKey,
    KeyMetadata,
    KeyPolicy,
    KeyService,
    Recipient,
    check_key_encryption_algorithm,
    check_owner,
)

__all__ = [
    "ADMIN_ACTIONS",
    "ALIAS_PREFIX",
    "ENCLAVE_KEY_ACTIONS",
    "RELEASE_ACTIONS",
    "AwsKMSError",
    "AwsKeyService",
    "key_policy_document",
    "key_policy_from_document",
]

ALIAS_PREFIX = "alias/cape/"
KEY_SPEC = "RSA_4096"
KEY_USAGE = "ENCRYPT_DECRYPT"
POLICY_ID = "cape-key-policy-v1"
#: When two enclaves race to create one owner's key, the loser's key is deleted after this.
ORPHAN_DELETION_DAYS = 7

#: The operator's role manages the key's lifecycle, never its policy, aliases or plaintext.
ADMIN_ACTIONS = (
    "kms:CancelKeyDeletion",
    "kms:DescribeKey",
    "kms:DisableKey",
    "kms:EnableKey",
    "kms:GetKeyPolicy",
    "kms:GetPublicKey",
    "kms:ListResourceTags",
    "kms:ScheduleKeyDeletion",
    "kms:TagResource",
    "kms:UntagResource",
)
#: The enclave's role (which the parent instance, i.e. the host, also holds) reads the key.
ENCLAVE_KEY_ACTIONS = ("kms:CreateAlias", "kms:DescribeKey", "kms:GetKeyPolicy", "kms:GetPublicKey")
#: Operations that release key material; allowed only under attestation conditions.
RELEASE_ACTIONS = ("kms:Decrypt", "kms:GenerateDataKey*")
#: Denied to every principal unless each pinned PCR matches (defeats any other grant).
_DENIED_ACTIONS = ("kms:Decrypt", "kms:GenerateDataKey*", "kms:ReEncrypt*")

_ACCOUNT_ID = re.compile(r"\d{12}")
_ROLE_ARN = re.compile(r"arn:aws(?:-[a-z]+)*:iam::(\d{12}):role/[\w+=,.@/-]{1,512}")
_PCR_CONDITION = re.compile(r"kms:RecipientAttestation:PCR(\d{1,2})")
_RELEASE_SID = "CapeEnclaveReleasesOnlyToAttestedCode"


def _condition_key(index: int) -> str:
    return f"kms:RecipientAttestation:PCR{index}"


def _check_role(arn: str, account_id: str, what: str) -> None:
    match = _ROLE_ARN.fullmatch(arn) if isinstance(arn, str) else None
    if match is None:
        raise ValueError(f"{what} must be an IAM role ARN, got {arn!r}")
    if match.group(1) != account_id:
        raise ValueError(f"{what} {arn!r} is not in account {account_id}")


def key_policy_document(
    account_id: str, admin_role_arn: str, enclave_role_arn: str, policy: KeyPolicy
) -> dict[str, Any]:
    """The KMS key policy that enforces ``policy`` for one Cape key (a JSON-ready dict).

    Statements:

    1. the admin role manages the key (:data:`ADMIN_ACTIONS`): no decrypt, no policy or alias
       changes;
    2. the enclave role reads it and may name it (:data:`ENCLAVE_KEY_ACTIONS`);
    3. the enclave role may ``kms:Decrypt``/``kms:GenerateDataKey*`` only when every pinned
       ``kms:RecipientAttestation:PCR<N>`` equals (``StringEqualsIgnoreCase``, lower-case
       hex) one of its allowed values. These keys exist only when a ``Recipient`` is present,
       so a call without an attestation document matches nothing;
    4. one ``Deny`` per pinned PCR, for every principal, of decrypt, data-key and re-encrypt
       operations unless that PCR matches (``StringNotEqualsIgnoreCase``, true also when the
       key is absent). This is the guard against §3.6's pitfall: even a statement someone
       adds later that grants ``kms:Decrypt`` outright cannot bypass attestation.

    Raises:
        ValueError: a malformed account id or role ARN, a role outside the account, or a
            policy that would release keys to debug enclaves without ``allow_debug``.
    """
    if not isinstance(account_id, str) or not _ACCOUNT_ID.fullmatch(account_id):
        raise ValueError(f"account_id must be 12 digits, got {account_id!r}")
    _check_role(admin_role_arn, account_id, "admin_role_arn")
    _check_role(enclave_role_arn, account_id, "enclave_role_arn")
    if admin_role_arn == enclave_role_arn:
        raise ValueError("the admin and enclave roles must differ")
    if not policy.allow_debug and bytes(48) in policy.pcrs.get(0, frozenset()):
        raise ValueError(
            "the policy allows a zero PCR0: AWS KMS would release keys to debug enclaves"
        )
    pins = {
        _condition_key(index): sorted(value.hex() for value in values)
        for index, values in sorted(policy.pcrs.items())
    }
    statements: list[dict[str, Any]] = [
        {
            "Sid": "CapeAdminManagesKeyWithoutDecrypt",
            "Effect": "Allow",
            "Principal": {"AWS": admin_role_arn},
            "Action": list(ADMIN_ACTIONS),
            "Resource": "*",
        },
        {
            "Sid": "CapeEnclaveReadsKey",
            "Effect": "Allow",
            "Principal": {"AWS": enclave_role_arn},
            "Action": list(ENCLAVE_KEY_ACTIONS),
            "Resource": "*",
        },
        {
            "Sid": _RELEASE_SID,
            "Effect": "Allow",
            "Principal": {"AWS": enclave_role_arn},
            "Action": list(RELEASE_ACTIONS),
            "Resource": "*",
            "Condition": {"StringEqualsIgnoreCase": pins},
        },
    ]
    statements.extend(
        {
            "Sid": f"CapeDenyReleaseUnlessPCR{key.rsplit('PCR', 1)[1]}Matches",
            "Effect": "Deny",
            "Principal": {"AWS": "*"},
            "Action": list(_DENIED_ACTIONS),
            "Resource": "*",
            "Condition": {"StringNotEqualsIgnoreCase": {key: values}},
        }
        for key, values in pins.items()
    )
    return {"Version": "2012-10-17", "Id": POLICY_ID, "Statement": statements}


def _normalized(value: Any) -> Any:
    """Compare policies as IAM does: one-element lists equal their element, order is free."""
    if isinstance(value, Mapping):
        return {str(k): _normalized(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [_normalized(v) for v in value]
        if len(items) == 1:
            return items[0]
        return sorted(items, key=lambda item: json.dumps(item, sort_keys=True))
    return value


def key_policy_from_document(
    document: str | Mapping[str, Any],
    *,
    account_id: str,
    admin_role_arn: str,
    enclave_role_arn: str,
) -> KeyPolicy:
    """The :class:`KeyPolicy` a KMS key policy enforces, if it is exactly a Cape key policy.

    Reads the PCR pins of the release statement, rebuilds :func:`key_policy_document` from
    them and requires the two to be equal (modulo JSON formatting, list order and one-element
    lists), so an extra grant, a missing deny or another principal is refused.
    ``max_document_age`` is the default (KMS cannot express it); ``allow_debug`` is true when
    PCR0 may be zero.

    Raises:
        FormatError: not valid JSON, or not exactly the policy cape would have written.
    """
    refused = FormatError("the KMS key policy is not a Cape key policy (it was changed)")
    try:
        parsed = json.loads(document) if isinstance(document, str) else document
        (release,) = [s for s in parsed["Statement"] if s.get("Sid") == _RELEASE_SID]
        conditions = release["Condition"]["StringEqualsIgnoreCase"]
        pcrs: dict[int, frozenset[bytes]] = {}
        for key, values in conditions.items():
            match = _PCR_CONDITION.fullmatch(key)
            if match is None:
                raise refused
            listed = [values] if isinstance(values, str) else list(values)
            pcrs[int(match.group(1))] = frozenset(bytes.fromhex(v) for v in listed)
        allow_debug = bytes(48) in pcrs.get(0, frozenset())
        policy = KeyPolicy(pcrs=pcrs, allow_debug=allow_debug)
        expected = key_policy_document(account_id, admin_role_arn, enclave_role_arn, policy)
    except FormatError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError):
        raise refused from None
    if _normalized(parsed) != _normalized(expected):
        raise refused
    return policy


class AwsKMSError(CapeError):
    """AWS KMS answered with an error cape has no specific meaning for."""

    def __init__(self, operation: str, code: str) -> None:
        self.operation = operation
        self.code = code
        super().__init__(f"AWS KMS {operation} failed: {code}")


def _missing_aws_extra() -> CapeError:
    return CapeError(
        "the AWS key service needs boto3 and botocore: install cape with the 'aws' extra "
        "(pip install 'cape[aws]')"
    )


def _alias(owner: str) -> str:
    return ALIAS_PREFIX + owner


class AwsKeyService(KeyService):
    """The :class:`KeyService` over AWS KMS; see the module docstring.

    ``client`` is a boto3 KMS client; without one, ``boto3.client("kms",
    region_name=region_name)`` is made (boto3 is imported only then). ``account_id`` and the
    two role ARNs go into every key policy, ``default_policy`` into new keys.
    """

    def __init__(
        self,
        *,
        account_id: str,
        admin_role_arn: str,
        enclave_role_arn: str,
        default_policy: KeyPolicy,
        client: Any | None = None,
        region_name: str | None = None,
    ) -> None:
        # Validates the ARNs and the policy before anything talks to AWS.
        self._default_document = key_policy_document(
            account_id, admin_role_arn, enclave_role_arn, default_policy
        )
        self._account_id = account_id
        self._admin_role_arn = admin_role_arn
        self._enclave_role_arn = enclave_role_arn
        self._default_policy = default_policy
        try:
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError:
            raise _missing_aws_extra() from None
        self._client_error: type[Exception] = ClientError
        self._botocore_error: type[Exception] = BotoCoreError
        if client is None:
            try:
                import boto3
            except ImportError:
                raise _missing_aws_extra() from None
            client = boto3.client("kms", region_name=region_name)
        self._client = client
        self._lock = threading.Lock()
        self._keys: dict[str, KeyMetadata] = {}

    # --- KeyService ---------------------------------------------------------------------

    def get_or_create_key(self, owner: str) -> KeyMetadata:
        owner = check_owner(owner)
        try:
            return self._key(owner)
        except KeyNotFoundError:
            return self._create(owner)

    def get_public_key(self, owner: str) -> bytes:
        metadata = self._key(check_owner(owner))
        response = self._call("GetPublicKey", owner, KeyId=metadata.key_id)
        public_der = response.get("PublicKey")
        if (
            # KeySpec, or its deprecated twin CustomerMasterKeySpec (all moto sends)
            response.get("KeySpec", response.get("CustomerMasterKeySpec")) != KEY_SPEC
            or KEY_ENCRYPTION_ALGORITHM not in response.get("EncryptionAlgorithms", ())
            or not isinstance(public_der, bytes)
        ):
            raise FormatError(f"AWS KMS returned no RSA-4096 OAEP public key for {owner!r}")
        try:
            key = load_rsa_public_key(public_der)
        except KeyFormatError:
            raise FormatError(f"AWS KMS returned an unusable public key for {owner!r}") from None
        if key.key_size != CAPE_KEY_BITS:
            raise FormatError(f"AWS KMS returned a {key.key_size}-bit key for {owner!r}")
        return public_der

    def decrypt(self, owner: str, ciphertext_blob: bytes, *, recipient: Recipient) -> bytes:
        if not isinstance(ciphertext_blob, bytes):
            raise TypeError("ciphertext_blob must be bytes")
        check_key_encryption_algorithm(recipient)
        metadata = self._key(check_owner(owner))
        response = self._call(
            "Decrypt",
            owner,
            KeyId=metadata.key_id,
            CiphertextBlob=ciphertext_blob,
            EncryptionAlgorithm=KEY_ENCRYPTION_ALGORITHM,
            Recipient={
                "AttestationDocument": recipient.attestation_document,
                "KeyEncryptionAlgorithm": KEY_ENCRYPTION_ALGORITHM,
            },
        )
        if response.get("Plaintext"):
            raise FormatError(
                "AWS KMS answered with Plaintext instead of CiphertextForRecipient; "
                "refusing to use it"
            )
        sealed = response.get("CiphertextForRecipient")
        if not isinstance(sealed, bytes) or not sealed:
            raise FormatError("AWS KMS answered without CiphertextForRecipient")
        return sealed

    def generate_data_key(self, owner: str, *, recipient: Recipient) -> DataKey:
        check_key_encryption_algorithm(recipient)
        public_key = load_rsa_public_key(self.get_public_key(owner))
        blob = wrap_key(os.urandom(DEK_SIZE), public_key)
        sealed = self.decrypt(owner, blob, recipient=recipient)
        return DataKey(ciphertext_blob=blob, ciphertext_for_recipient=sealed)

    # --- internals --------------------------------------------------------------------

    def _call(self, operation: str, owner: str, **params: Any) -> dict[str, Any]:
        method = getattr(self._client, _snake(operation))
        try:
            response: dict[str, Any] = method(**params)
        except self._client_error as exc:
            raise _mapped(operation, owner, exc) from exc
        except self._botocore_error as exc:
            raise AwsKMSError(operation, type(exc).__name__) from exc
        return response

    def _key(self, owner: str) -> KeyMetadata:
        """The owner's verified key (cached: a checked alias cannot be moved)."""
        with self._lock:
            cached = self._keys.get(owner)
        if cached is not None:
            return cached
        response = self._call("DescribeKey", owner, KeyId=_alias(owner))
        described = response.get("KeyMetadata") or {}
        key_id = described.get("KeyId")
        created = described.get("CreationDate")
        if (
            not isinstance(key_id, str)
            or not isinstance(created, dt.datetime)
            or described.get("KeySpec") != KEY_SPEC
            or described.get("KeyUsage") != KEY_USAGE
            or described.get("Origin") != "AWS_KMS"
            or described.get("KeyManager", "CUSTOMER") != "CUSTOMER"
        ):
            raise FormatError(
                f"{_alias(owner)} does not name an RSA_4096 ENCRYPT_DECRYPT key with "
                "AWS-generated key material"
            )
        state = described.get("KeyState")
        if state != "Enabled":
            # Not cached: a disabled key may come back; one pending deletion must not be
            # handed to clients, whose data would become unrecoverable.
            raise AwsKMSError("DescribeKey", f"key {key_id} is in state {state}")
        policy_response = self._call("GetKeyPolicy", owner, KeyId=key_id, PolicyName="default")
        policy = key_policy_from_document(
            policy_response.get("Policy", ""),
            account_id=self._account_id,
            admin_role_arn=self._admin_role_arn,
            enclave_role_arn=self._enclave_role_arn,
        )
        metadata = KeyMetadata(owner=owner, key_id=key_id, created_at=_utc(created), policy=policy)
        with self._lock:
            self._keys[owner] = metadata
        return metadata

    def _create(self, owner: str) -> KeyMetadata:
        response = self._call(
            "CreateKey",
            owner,
            Policy=json.dumps(self._default_document, sort_keys=True),
            Description=f"Cape key of {owner}",
            KeyUsage=KEY_USAGE,
            KeySpec=KEY_SPEC,
            BypassPolicyLockoutSafetyCheck=True,
            Tags=[{"TagKey": "cape:owner", "TagValue": owner}],
        )
        created = response.get("KeyMetadata") or {}
        key_id = created.get("KeyId")
        if not isinstance(key_id, str):
            raise FormatError("AWS KMS CreateKey answered without a KeyId")
        try:
            self._call("CreateAlias", owner, AliasName=_alias(owner), TargetKeyId=key_id)
        except AwsKMSError as exc:
            if exc.code != "AlreadyExistsException":
                raise
            # Another enclave created this owner's key first: use theirs, retire ours.
            # An orphan key costs money, not safety: a failure to retire it is ignored.
            with contextlib.suppress(CapeError):
                self._call(
                    "ScheduleKeyDeletion",
                    owner,
                    KeyId=key_id,
                    PendingWindowInDays=ORPHAN_DELETION_DAYS,
                )
        return self._key(owner)


def _snake(operation: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", operation).lower()


def _utc(moment: dt.datetime) -> dt.datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC)


def _mapped(operation: str, owner: str, exc: Any) -> CapeError:
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", "Unknown"))
    if code == "NotFoundException":
        return KeyNotFoundError(f"no Cape key for owner {owner!r} ({_alias(owner)})")
    if code == "AccessDeniedException" and operation == "Decrypt":
        return KeyReleaseDeniedError(
            "AWS KMS refused the release: the recipient's attestation does not satisfy the "
            "key policy (AccessDeniedException)"
        )
    if code in ("InvalidCiphertextException", "IncorrectKeyException"):
        return DecryptionError(DECRYPTION_FAILED)
    return AwsKMSError(operation, code)
