"""AwsKeyService against botocore's Stubber: exact requests, recorded-shape responses.

No network and no AWS account: a real boto3 KMS client validates every request against the
KMS API model, and the Stubber checks the parameters and feeds responses of the documented
shape (CiphertextForRecipient is CMS from our own sealer, as KMS would send it).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.stub import ANY, Stubber
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from cape.crypto import envelope
from cape.crypto.cms import open_for_recipient, seal_for_recipient
from cape.crypto.keys import public_key_der
from cape.errors import (
    CapeError,
    DecryptionError,
    FormatError,
    KeyNotFoundError,
    KeyReleaseDeniedError,
)
from cape.kms.aws import (
    ADMIN_ACTIONS,
    AwsKeyService,
    AwsKMSError,
    key_policy_document,
    key_policy_from_document,
)
from cape.kms.base import KeyPolicy, Recipient

ACCOUNT = "123456789012"
ADMIN = f"arn:aws:iam::{ACCOUNT}:role/cape-admin"
ENCLAVE = f"arn:aws:iam::{ACCOUNT}:role/cape-enclave"
KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"
KEY_ARN = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/{KEY_ID}"
ALIAS = "alias/cape/alice"
CREATED = dt.datetime(2025, 2, 1, 8, 30, tzinfo=dt.UTC)
PCR0 = bytes.fromhex("ab" * 48)
PCR2 = bytes.fromhex("CD" * 48)
DOCUMENT = b"\x84COSE attestation document bytes"
POLICY = KeyPolicy(pcrs={0: frozenset({PCR0}), 2: frozenset({PCR2, bytes([1]) * 48})})


@pytest.fixture
def client() -> Any:
    return boto3.client(
        "kms", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )


@pytest.fixture
def stubber(client: Any) -> Iterator[Stubber]:
    with Stubber(client) as stub:
        yield stub
        stub.assert_no_pending_responses()


@pytest.fixture
def service(client: Any, stubber: Stubber) -> AwsKeyService:
    return AwsKeyService(
        account_id=ACCOUNT,
        admin_role_arn=ADMIN,
        enclave_role_arn=ENCLAVE,
        default_policy=POLICY,
        client=client,
    )


def policy_text(policy: KeyPolicy = POLICY) -> str:
    return json.dumps(key_policy_document(ACCOUNT, ADMIN, ENCLAVE, policy), sort_keys=True)


def key_metadata(**changes: Any) -> dict[str, Any]:
    metadata = {
        "AWSAccountId": ACCOUNT,
        "KeyId": KEY_ID,
        "Arn": KEY_ARN,
        "CreationDate": CREATED,
        "Enabled": True,
        "KeyUsage": "ENCRYPT_DECRYPT",
        "KeyState": "Enabled",
        "Origin": "AWS_KMS",
        "KeyManager": "CUSTOMER",
        "KeySpec": "RSA_4096",
        "CustomerMasterKeySpec": "RSA_4096",
        "EncryptionAlgorithms": ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"],
    }
    metadata.update(changes)
    return metadata


def expect_existing_key(stubber: Stubber, *, policy: str | None = None, **changes: Any) -> None:
    stubber.add_response("describe_key", {"KeyMetadata": key_metadata(**changes)}, {"KeyId": ALIAS})
    stubber.add_response(
        "get_key_policy",
        {"Policy": policy if policy is not None else policy_text(), "PolicyName": "default"},
        {"KeyId": KEY_ID, "PolicyName": "default"},
    )


def expect_public_key(stubber: Stubber, key: RSAPrivateKey) -> None:
    stubber.add_response(
        "get_public_key",
        {
            "KeyId": KEY_ARN,
            "PublicKey": public_key_der(key),
            "KeySpec": "RSA_4096",
            "KeyUsage": "ENCRYPT_DECRYPT",
            "EncryptionAlgorithms": ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"],
        },
        {"KeyId": KEY_ID},
    )


def decrypt_request(blob: Any = ANY) -> dict[str, Any]:
    return {
        "KeyId": KEY_ID,
        "CiphertextBlob": blob,
        "EncryptionAlgorithm": "RSAES_OAEP_SHA_256",
        "Recipient": {
            "AttestationDocument": DOCUMENT,
            "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
        },
    }


# -- the key policy -------------------------------------------------------------------------


def test_policy_document_shape() -> None:
    document = key_policy_document(ACCOUNT, ADMIN, ENCLAVE, POLICY)
    assert document["Version"] == "2012-10-17"
    statements = {s["Sid"]: s for s in document["Statement"]}
    admin = statements["CapeAdminManagesKeyWithoutDecrypt"]
    assert admin["Principal"] == {"AWS": ADMIN}
    assert admin["Action"] == list(ADMIN_ACTIONS)
    assert "kms:GetPublicKey" in admin["Action"]
    reads = statements["CapeEnclaveReadsKey"]
    assert reads["Principal"] == {"AWS": ENCLAVE}
    assert set(reads["Action"]) == {
        "kms:CreateAlias",
        "kms:DescribeKey",
        "kms:GetKeyPolicy",
        "kms:GetPublicKey",
    }
    release = statements["CapeEnclaveReleasesOnlyToAttestedCode"]
    assert release["Effect"] == "Allow"
    assert release["Principal"] == {"AWS": ENCLAVE}
    assert release["Action"] == ["kms:Decrypt", "kms:GenerateDataKey*"]
    assert release["Condition"] == {
        "StringEqualsIgnoreCase": {
            "kms:RecipientAttestation:PCR0": ["ab" * 48],
            "kms:RecipientAttestation:PCR2": sorted(["cd" * 48, "01" * 48]),
        }
    }
    json.dumps(document)  # JSON-ready


def test_policy_pcr_values_are_lower_case_hex() -> None:
    text = json.dumps(key_policy_document(ACCOUNT, ADMIN, ENCLAVE, POLICY))
    assert "CD" * 48 not in text
    assert "cd" * 48 in text


def _grants(statement: dict[str, Any], action: str) -> bool:
    actions = statement["Action"]
    actions = [actions] if isinstance(actions, str) else actions
    return any(
        a == action or a == "kms:*" or (a.endswith("*") and action.startswith(a[:-1]))
        for a in actions
    )


def test_no_statement_allows_decrypt_without_attestation_conditions() -> None:
    """nitro-attestation.md §3.6 pitfall: any unconditional kms:Decrypt bypasses attestation."""
    document = key_policy_document(ACCOUNT, ADMIN, ENCLAVE, POLICY)
    for statement in document["Statement"]:
        if statement["Effect"] != "Allow":
            continue
        for action in ("kms:Decrypt", "kms:GenerateDataKey", "kms:ReEncryptFrom"):
            if _grants(statement, action):
                conditions = statement["Condition"]["StringEqualsIgnoreCase"]
                assert set(conditions) == {
                    "kms:RecipientAttestation:PCR0",
                    "kms:RecipientAttestation:PCR2",
                }
        assert not _grants(statement, "kms:PutKeyPolicy")  # the policy is immutable
        assert not _grants(statement, "kms:UpdateAlias")  # the alias cannot be moved
        assert not _grants(statement, "kms:DeleteAlias")
    admin = next(s for s in document["Statement"] if s["Principal"] == {"AWS": ADMIN})
    assert not _grants(admin, "kms:Decrypt")


def test_every_pinned_pcr_has_a_deny_for_everyone_else() -> None:
    document = key_policy_document(ACCOUNT, ADMIN, ENCLAVE, POLICY)
    denies = [s for s in document["Statement"] if s["Effect"] == "Deny"]
    assert len(denies) == 2
    for deny, index in zip(denies, (0, 2), strict=True):
        assert deny["Principal"] == {"AWS": "*"}
        assert set(deny["Action"]) == {"kms:Decrypt", "kms:GenerateDataKey*", "kms:ReEncrypt*"}
        key = f"kms:RecipientAttestation:PCR{index}"
        values = POLICY.pcrs[index]
        assert deny["Condition"] == {
            "StringNotEqualsIgnoreCase": {key: sorted(v.hex() for v in values)}
        }


@pytest.mark.parametrize(
    ("account", "admin", "enclave"),
    [
        ("12345678901", ADMIN, ENCLAVE),
        (ACCOUNT, "cape-admin", ENCLAVE),
        (ACCOUNT, ADMIN, "arn:aws:iam::999999999999:role/cape-enclave"),
        (ACCOUNT, ADMIN, f"arn:aws:iam::{ACCOUNT}:user/cape-enclave"),
        (ACCOUNT, ADMIN, ADMIN),
    ],
)
def test_policy_document_validates_its_principals(account: str, admin: str, enclave: str) -> None:
    with pytest.raises(ValueError):
        key_policy_document(account, admin, enclave, POLICY)


def test_policy_document_refuses_zero_pcr0_without_allow_debug() -> None:
    policy = KeyPolicy(pcrs={0: frozenset({bytes(48)}), 2: frozenset({PCR2})})
    with pytest.raises(ValueError, match="debug"):
        key_policy_document(ACCOUNT, ADMIN, ENCLAVE, policy)
    debug = KeyPolicy(pcrs={0: frozenset({bytes(48)})}, allow_debug=True)
    assert key_policy_document(ACCOUNT, ADMIN, ENCLAVE, debug)


def test_policy_round_trips_through_its_document() -> None:
    parsed = key_policy_from_document(
        policy_text(), account_id=ACCOUNT, admin_role_arn=ADMIN, enclave_role_arn=ENCLAVE
    )
    assert parsed == POLICY


def test_policy_parse_tolerates_formatting_and_single_values() -> None:
    document = key_policy_document(ACCOUNT, ADMIN, ENCLAVE, POLICY)
    for statement in document["Statement"]:
        for values in statement.get("Condition", {}).get("StringNotEqualsIgnoreCase", {}).values():
            values.reverse()
    document["Statement"].reverse()
    release = document["Statement"][-3]
    release["Condition"]["StringEqualsIgnoreCase"]["kms:RecipientAttestation:PCR0"] = "ab" * 48
    text = json.dumps(document, indent=4)
    assert (
        key_policy_from_document(
            text, account_id=ACCOUNT, admin_role_arn=ADMIN, enclave_role_arn=ENCLAVE
        )
        == POLICY
    )


def _unconditional_decrypt(document: dict[str, Any]) -> None:
    document["Statement"].append(
        {
            "Sid": "Convenience",
            "Effect": "Allow",
            "Principal": {"AWS": ENCLAVE},
            "Action": "kms:Decrypt",
            "Resource": "*",
        }
    )


def _drop_deny(document: dict[str, Any]) -> None:
    document["Statement"] = [s for s in document["Statement"] if s["Effect"] != "Deny"]


def _other_principal(document: dict[str, Any]) -> None:
    document["Statement"][2]["Principal"] = {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}


def _put_policy(document: dict[str, Any]) -> None:
    document["Statement"][0]["Action"].append("kms:PutKeyPolicy")


def _no_release(document: dict[str, Any]) -> None:
    del document["Statement"][2]


@pytest.mark.parametrize(
    "change", [_unconditional_decrypt, _drop_deny, _other_principal, _put_policy, _no_release]
)
def test_changed_policies_are_refused(change: Any) -> None:
    document = key_policy_document(ACCOUNT, ADMIN, ENCLAVE, POLICY)
    change(document)
    with pytest.raises(FormatError, match="not a Cape key policy"):
        key_policy_from_document(
            json.dumps(document), account_id=ACCOUNT, admin_role_arn=ADMIN, enclave_role_arn=ENCLAVE
        )


@pytest.mark.parametrize("text", ["", "{", "[]", '{"Statement": 5}'])
def test_unparseable_policies_are_refused(text: str) -> None:
    with pytest.raises(FormatError):
        key_policy_from_document(
            text, account_id=ACCOUNT, admin_role_arn=ADMIN, enclave_role_arn=ENCLAVE
        )


# -- keys -----------------------------------------------------------------------------------


def test_first_request_creates_the_key_and_its_alias(
    service: AwsKeyService, stubber: Stubber
) -> None:
    stubber.add_client_error(
        "describe_key",
        "NotFoundException",
        "Alias not found",
        400,
        expected_params={"KeyId": ALIAS},
    )
    stubber.add_response(
        "create_key",
        {"KeyMetadata": key_metadata()},
        {
            "Policy": policy_text(),
            "Description": "Cape key of alice",
            "KeyUsage": "ENCRYPT_DECRYPT",
            "KeySpec": "RSA_4096",
            "BypassPolicyLockoutSafetyCheck": True,
            "Tags": [{"TagKey": "cape:owner", "TagValue": "alice"}],
        },
    )
    stubber.add_response("create_alias", {}, {"AliasName": ALIAS, "TargetKeyId": KEY_ID})
    expect_existing_key(stubber)
    metadata = service.get_or_create_key("alice")
    assert metadata.owner == "alice"
    assert metadata.key_id == KEY_ID
    assert metadata.created_at == CREATED
    assert metadata.policy == POLICY


def test_existing_key_is_verified_and_cached(service: AwsKeyService, stubber: Stubber) -> None:
    expect_existing_key(stubber)
    first = service.get_or_create_key("alice")
    assert service.get_or_create_key("alice") == first  # no second round of calls


def test_losing_a_creation_race_uses_the_winner_and_retires_the_orphan(
    service: AwsKeyService, stubber: Stubber
) -> None:
    orphan = "ffffffff-12ab-34cd-56ef-1234567890ab"
    stubber.add_client_error("describe_key", "NotFoundException", expected_params={"KeyId": ALIAS})
    create = ("Policy", "Description", "KeyUsage", "KeySpec", "BypassPolicyLockoutSafetyCheck")
    stubber.add_response(
        "create_key",
        {"KeyMetadata": key_metadata(KeyId=orphan)},
        dict.fromkeys((*create, "Tags"), ANY),
    )
    stubber.add_client_error(
        "create_alias",
        "AlreadyExistsException",
        expected_params={"AliasName": ALIAS, "TargetKeyId": orphan},
    )
    stubber.add_response(
        "schedule_key_deletion",
        {"KeyId": orphan, "PendingWindowInDays": 7},
        {"KeyId": orphan, "PendingWindowInDays": 7},
    )
    expect_existing_key(stubber)
    assert service.get_or_create_key("alice").key_id == KEY_ID


@pytest.mark.parametrize(
    "changes",
    [
        {"Origin": "EXTERNAL"},  # imported key material: someone knows the private key
        {"KeySpec": "RSA_2048"},
        {"KeyUsage": "SIGN_VERIFY"},
        {"KeyManager": "AWS"},
    ],
)
def test_alias_to_an_unsuitable_key_is_refused(
    service: AwsKeyService, stubber: Stubber, changes: dict[str, str]
) -> None:
    stubber.add_response("describe_key", {"KeyMetadata": key_metadata(**changes)}, {"KeyId": ALIAS})
    with pytest.raises(FormatError, match="does not name"):
        service.get_or_create_key("alice")


@pytest.mark.parametrize("state", ["PendingDeletion", "Disabled", "PendingImport"])
def test_key_that_is_not_enabled_is_refused_and_not_cached(
    service: AwsKeyService, stubber: Stubber, state: str
) -> None:
    for _ in range(2):
        stubber.add_response(
            "describe_key", {"KeyMetadata": key_metadata(KeyState=state)}, {"KeyId": ALIAS}
        )
        with pytest.raises(AwsKMSError, match=state):
            service.get_public_key("alice")


def test_alias_to_a_key_with_a_foreign_policy_is_refused(
    service: AwsKeyService, stubber: Stubber
) -> None:
    """The host shares the enclave's role and could pre-create alias/cape/<owner>."""
    document = key_policy_document(ACCOUNT, ADMIN, ENCLAVE, POLICY)
    _unconditional_decrypt(document)
    expect_existing_key(stubber, policy=json.dumps(document))
    with pytest.raises(FormatError, match="not a Cape key policy"):
        service.get_public_key("alice")


def test_get_public_key(
    service: AwsKeyService, stubber: Stubber, cape_key_pool: tuple[RSAPrivateKey, ...]
) -> None:
    expect_existing_key(stubber)
    expect_public_key(stubber, cape_key_pool[0])
    assert service.get_public_key("alice") == public_key_der(cape_key_pool[0])


def test_get_public_key_refuses_a_small_key(
    service: AwsKeyService, stubber: Stubber, enclave_key: RSAPrivateKey
) -> None:
    expect_existing_key(stubber)
    expect_public_key(stubber, enclave_key)  # an RSA-2048 key claiming to be RSA_4096
    with pytest.raises(FormatError, match="2048-bit"):
        service.get_public_key("alice")


def test_missing_key_is_key_not_found(service: AwsKeyService, stubber: Stubber) -> None:
    stubber.add_client_error("describe_key", "NotFoundException", expected_params={"KeyId": ALIAS})
    with pytest.raises(KeyNotFoundError, match="alice"):
        service.get_public_key("alice")


def test_invalid_owner_never_reaches_aws(service: AwsKeyService) -> None:
    with pytest.raises(FormatError):
        service.get_or_create_key("../alice")


# -- release --------------------------------------------------------------------------------


def test_decrypt_sends_the_recipient_and_returns_the_cms(
    service: AwsKeyService, stubber: Stubber, enclave_key: RSAPrivateKey
) -> None:
    dek = bytes(range(32))
    blob = b"\x11" * 512
    cms = seal_for_recipient(dek, public_key_der(enclave_key))
    expect_existing_key(stubber)
    stubber.add_response(
        "decrypt",
        {
            "KeyId": KEY_ARN,
            "EncryptionAlgorithm": "RSAES_OAEP_SHA_256",
            "CiphertextForRecipient": cms,
        },
        decrypt_request(blob),
    )
    sealed = service.decrypt("alice", blob, recipient=Recipient(DOCUMENT))
    assert sealed == cms
    assert open_for_recipient(sealed, enclave_key) == dek


def test_decrypt_refuses_a_response_with_plaintext(
    service: AwsKeyService, stubber: Stubber, enclave_key: RSAPrivateKey
) -> None:
    expect_existing_key(stubber)
    stubber.add_response(
        "decrypt",
        {
            "KeyId": KEY_ARN,
            "Plaintext": b"\x22" * 32,
            "CiphertextForRecipient": seal_for_recipient(b"\x22" * 32, public_key_der(enclave_key)),
        },
        decrypt_request(),
    )
    with pytest.raises(FormatError, match="Plaintext") as exc:
        service.decrypt("alice", b"\x11" * 512, recipient=Recipient(DOCUMENT))
    assert "22" * 8 not in str(exc.value)


def test_decrypt_refuses_a_response_without_cms(service: AwsKeyService, stubber: Stubber) -> None:
    expect_existing_key(stubber)
    stubber.add_response("decrypt", {"KeyId": KEY_ARN}, decrypt_request())
    with pytest.raises(FormatError, match="CiphertextForRecipient"):
        service.decrypt("alice", b"\x11" * 512, recipient=Recipient(DOCUMENT))


def test_access_denied_is_a_key_release_denial(service: AwsKeyService, stubber: Stubber) -> None:
    expect_existing_key(stubber)
    stubber.add_client_error(
        "decrypt",
        "AccessDeniedException",
        "User is not authorized to perform: kms:Decrypt",
        400,
        expected_params=decrypt_request(),
    )
    with pytest.raises(KeyReleaseDeniedError, match="attestation") as exc:
        service.decrypt("alice", b"\x11" * 512, recipient=Recipient(DOCUMENT))
    assert exc.value.__cause__ is not None  # the AWS error stays available for logs


@pytest.mark.parametrize("code", ["InvalidCiphertextException", "IncorrectKeyException"])
def test_bad_ciphertext_is_a_generic_decryption_error(
    service: AwsKeyService, stubber: Stubber, code: str
) -> None:
    expect_existing_key(stubber)
    stubber.add_client_error("decrypt", code, expected_params=decrypt_request())
    with pytest.raises(DecryptionError) as exc:
        service.decrypt("alice", b"\x11" * 512, recipient=Recipient(DOCUMENT))
    assert str(exc.value) == envelope.DECRYPTION_FAILED


@pytest.mark.parametrize(
    "code", ["KMSInvalidStateException", "DisabledException", "ThrottlingException"]
)
def test_other_aws_errors_carry_their_code(
    service: AwsKeyService, stubber: Stubber, code: str
) -> None:
    expect_existing_key(stubber)
    stubber.add_client_error("decrypt", code, expected_params=decrypt_request())
    with pytest.raises(AwsKMSError) as exc:
        service.decrypt("alice", b"\x11" * 512, recipient=Recipient(DOCUMENT))
    assert exc.value.code == code
    assert code in str(exc.value)


def test_access_denied_elsewhere_is_not_a_release_denial(
    service: AwsKeyService, stubber: Stubber
) -> None:
    stubber.add_client_error(
        "describe_key", "AccessDeniedException", expected_params={"KeyId": ALIAS}
    )
    with pytest.raises(AwsKMSError, match="AccessDeniedException"):
        service.get_public_key("alice")


def test_wrong_algorithm_is_refused_before_calling_aws(service: AwsKeyService) -> None:
    recipient = Recipient(DOCUMENT, key_encryption_algorithm="RSAES_OAEP_SHA_1")
    with pytest.raises(KeyReleaseDeniedError, match="RSAES_OAEP_SHA_1"):
        service.decrypt("alice", b"\x11" * 512, recipient=recipient)
    with pytest.raises(KeyReleaseDeniedError):
        service.generate_data_key("alice", recipient=recipient)


def test_generate_data_key_wraps_locally_and_releases_through_kms(
    service: AwsKeyService,
    stubber: Stubber,
    cape_key_pool: tuple[RSAPrivateKey, ...],
    enclave_key: RSAPrivateKey,
) -> None:
    user_key = cape_key_pool[0]
    cms = seal_for_recipient(b"\x33" * 32, public_key_der(enclave_key))
    expect_existing_key(stubber)
    expect_public_key(stubber, user_key)
    stubber.add_response(
        "decrypt", {"KeyId": KEY_ARN, "CiphertextForRecipient": cms}, decrypt_request()
    )
    data_key = service.generate_data_key("alice", recipient=Recipient(DOCUMENT))
    assert data_key.ciphertext_for_recipient == cms
    # The blob is an RSA-OAEP-SHA-256 wrap under the owner's KMS key: what KMS decrypts.
    assert len(data_key.ciphertext_blob) == 512
    assert len(envelope.unwrap_key(data_key.ciphertext_blob, user_key)) == 32


def test_generate_data_key_denied_by_kms(
    service: AwsKeyService, stubber: Stubber, cape_key_pool: tuple[RSAPrivateKey, ...]
) -> None:
    expect_existing_key(stubber)
    expect_public_key(stubber, cape_key_pool[0])
    stubber.add_client_error("decrypt", "AccessDeniedException", expected_params=decrypt_request())
    with pytest.raises(KeyReleaseDeniedError):
        service.generate_data_key("alice", recipient=Recipient(DOCUMENT))


# -- packaging ------------------------------------------------------------------------------


def test_missing_aws_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "botocore.exceptions", None)
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(CapeError, match=r"cape\[aws\]"):
        AwsKeyService(
            account_id=ACCOUNT,
            admin_role_arn=ADMIN,
            enclave_role_arn=ENCLAVE,
            default_policy=POLICY,
        )


def test_constructor_makes_its_own_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    service = AwsKeyService(
        account_id=ACCOUNT,
        admin_role_arn=ADMIN,
        enclave_role_arn=ENCLAVE,
        default_policy=POLICY,
        region_name="eu-west-1",
    )
    assert service._client.meta.region_name == "eu-west-1"


def test_cape_kms_imports_without_boto3() -> None:
    """Without the aws extra, the package (and this module) still import."""
    code = (
        "import sys\n"
        "for name in ('boto3', 'botocore', 'botocore.exceptions'): sys.modules[name] = None\n"
        "import cape.kms, cape.kms.aws, cape.kms.local\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
