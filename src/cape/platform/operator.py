"""Operator actions on keys: ``cape kms rebind`` and ``cape kms policy``.

**Rebind.** Keys created before signer policies existed (or pinned to one build on purpose)
have a ``measurement`` policy: PCR0-2 of one runtime. An upgrade changes those PCRs and locks
their owners out. :func:`rebind_keys` moves such keys to a ``signer`` policy (PCR8, optionally
PCR3) or to the measurement of a new runtime, but only after the operator proves that the new
runtime is signed by the expected certificate:

- with an image (``eif``): it must describe cleanly (:func:`cape.verify.eif.describe_eif`:
  structure, CRC, a signature that signs its PCR0), and its signing certificate must be the
  expected one (the ``expected_cert`` file, else the data directory's image-signing
  certificate);
- without one (simulated mode): the runtime installed here is measured and signed with the
  data directory's image-signing key, and that key's certificate must be the expected one.

Each key moved is logged in the key service's ``key_log`` table (who, when, why, old and new
policy). The old runtime loses access at once: the service re-reads rows another process
changed.

**AWS policy.** :func:`aws_signer_policy` prints the AWS KMS key policy that enforces a
signer policy: Decrypt/GenerateDataKey only with ``kms:RecipientAttestation:PCR8`` (and
``…:PCR3`` for a role) matching, and explicit Denies for every principal when the condition
key is absent (no ``Recipient``) or different.
"""

from __future__ import annotations

import getpass
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cape.crypto.eif_signature import SignerIdentity, verify_signature_section
from cape.enclave.measure import measure_runtime
from cape.errors import CapeError, FormatError
from cape.kms.aws import key_policy_document
from cape.kms.base import KeyMetadata, KeyPolicy
from cape.kms.local import KeyLogEntry, LocalKeyService, load_master_key
from cape.platform.local import IMAGE_SIGNING_DIR, load_image_signer
from cape.verify.eif import describe_eif

__all__ = [
    "RebindError",
    "RebindReport",
    "aws_signer_policy",
    "key_log",
    "rebind_keys",
    "role_pcr3",
]

KINDS = ("signer", "measurement")


class RebindError(CapeError):
    """A rebind the operator cannot prove safe: nothing was changed."""


@dataclass(frozen=True)
class RebindReport:
    policy: KeyPolicy
    signer: SignerIdentity
    moved: list[KeyMetadata]


def role_pcr3(role_arn: str) -> bytes:
    """PCR3 of enclaves whose parent holds ``role_arn``: ``SHA384(0^48 ‖ ARN)`` (AWS's formula)."""
    return hashlib.sha384(bytes(48) + role_arn.encode()).digest()


def _expected(data_dir: Path, expected_cert: Path | None) -> x509.Certificate:
    if expected_cert is not None:
        try:
            return x509.load_pem_x509_certificate(expected_cert.read_bytes())
        except OSError as exc:
            raise FormatError(f"cannot read {expected_cert}: {exc.strerror or exc}") from None
        except ValueError:
            raise FormatError(f"{expected_cert} is not a PEM certificate") from None
    signer = load_image_signer(data_dir / IMAGE_SIGNING_DIR, create=False)
    if signer is None:
        raise RebindError(
            f"{data_dir} has no image-signing certificate; name the expected one with --cert"
        )
    return signer.certificate


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def _proof(
    data_dir: Path, eif: Path | None, expected: x509.Certificate
) -> tuple[SignerIdentity, dict[int, bytes]]:
    """The new runtime's signer and PCRs, once its signature by ``expected`` is proven."""
    if eif is not None:
        description = describe_eif(eif)
        if description.signer is None:
            raise RebindError(
                f"{eif} is not signed: cannot prove the new runtime comes from the expected signer"
            )
        identity, pcrs = description.signer, description.pcrs
    else:
        signer = load_image_signer(data_dir / IMAGE_SIGNING_DIR, create=False)
        if signer is None:
            raise RebindError(f"{data_dir} has no image-signing key to sign the installed runtime")
        measurement = measure_runtime()
        identity = verify_signature_section(signer.sign_pcr0(measurement.pcr0), measurement.pcr0)
        pcrs = {0: measurement.pcr0, 1: measurement.pcr1, 2: measurement.pcr2, 8: identity.pcr8}
    if identity.der != _der(expected):
        raise RebindError(
            f"the new runtime is signed by {identity.subject!r}, not by the expected certificate "
            f"{expected.subject.rfc4514_string()!r}"
        )
    return identity, pcrs


def _open_service(
    data_dir: Path, policy: KeyPolicy, database_url: str | None = None
) -> LocalKeyService:
    root_path = data_dir / "attestation" / "root.pem"
    kms_dir = data_dir / "kms"
    has_database = database_url is not None or (kms_dir / "kms.sqlite3").is_file()
    if not root_path.is_file() or not has_database:
        raise RebindError(
            f"{data_dir} holds no key service: give the data directory of cape serve, or of "
            "cape kms serve on the key-service machine (a cluster node's holds no keys)"
        )
    root = x509.load_pem_x509_certificate(root_path.read_bytes())
    return LocalKeyService(
        database_url or kms_dir / "kms.sqlite3",
        master_key=load_master_key(kms_dir),
        trusted_root=root,
        default_policy=policy,
    )


def key_log(data_dir: Path, *, database_url: str | None = None) -> list[KeyLogEntry]:
    """The key service's audit log in ``data_dir`` (its keys in ``database_url`` if given)."""
    service = _open_service(Path(data_dir), KeyPolicy.signer(b"\x01" * 48), database_url)
    try:
        return service.key_log()
    finally:
        service.close()


def rebind_keys(
    data_dir: Path,
    *,
    to: str,
    eif: Path | None = None,
    expected_cert: Path | None = None,
    role_arn: str | None = None,
    owners: Sequence[str] | None = None,
    include_signer_keys: bool = False,
    reason: str = "cape kms rebind",
    actor: str | None = None,
    database_url: str | None = None,
) -> RebindReport:
    """Move keys to a ``signer`` policy or to the new runtime's ``measurement`` (module doc).

    By default only keys with a measurement policy move; ``include_signer_keys`` moves keys
    bound to a signer too. ``role_arn`` adds PCR3 to a signer policy. ``database_url``: the
    key database of a ``cape kms serve`` that keeps it elsewhere than ``data_dir`` (PostgreSQL).

    Raises:
        RebindError: the new runtime is unsigned or signed by another certificate, or the
            directory is not a ``cape serve`` data directory. Nothing changes.
        FormatError: the image or certificate does not parse.
    """
    if to not in KINDS:
        raise ValueError(f"to must be one of {KINDS}")
    data_dir = Path(data_dir)
    expected = _expected(data_dir, expected_cert)
    identity, pcrs = _proof(data_dir, eif, expected)
    if to == "signer":
        pcr3 = role_pcr3(role_arn) if role_arn else None
        policy = KeyPolicy.signer(identity.pcr8, pcr3=pcr3)
    else:
        policy = KeyPolicy.measurement(pcrs[0], pcrs[1], pcrs[2])
    service = _open_service(data_dir, policy, database_url)
    try:
        moved = service.rebind(
            policy,
            actor=actor or getpass.getuser(),
            reason=reason,
            owners=list(owners) if owners else None,
            only_kind=None if include_signer_keys else "measurement",
        )
    finally:
        service.close()
    return RebindReport(policy=policy, signer=identity, moved=moved)


def aws_signer_policy(
    pcr8: bytes,
    *,
    account_id: str | None = None,
    role_arn: str | None = None,
    admin_role_arn: str | None = None,
) -> dict[str, Any]:
    """The AWS KMS key policy releasing keys only to images signed with PCR8 ``pcr8``.

    ``role_arn`` is the parent instances' (enclave) role: it becomes the releasing principal
    and PCR3 is pinned to it. Without it the principal is ``role/cape-enclave`` in
    ``account_id``. The admin role (default ``role/cape-admin``) manages the key without
    decrypting. The per-PCR ``Deny`` statements use ``StringNotEqualsIgnoreCase``, which is
    true when the condition key is absent, i.e. for any decrypt without a ``Recipient``.

    Raises:
        FormatError: neither an account nor a role, or malformed ARNs or account id.
    """
    if account_id is None and role_arn is not None:
        parts = role_arn.split(":")
        account_id = parts[4] if len(parts) > 5 else None
    if account_id is None:
        raise FormatError("give --account (or --role, whose account is used)")
    enclave_role = role_arn or f"arn:aws:iam::{account_id}:role/cape-enclave"
    admin_role = admin_role_arn or f"arn:aws:iam::{account_id}:role/cape-admin"
    try:
        policy = KeyPolicy.signer(pcr8, pcr3=role_pcr3(role_arn) if role_arn else None)
        return key_policy_document(account_id, admin_role, enclave_role, policy)
    except ValueError as exc:
        raise FormatError(str(exc)) from None
