"""``cape serve --enclave nitro``: the parent instance's side of Cape on AWS Nitro Enclaves.

Wires :class:`~cape.host.nitro.NitroLauncher` to AWS KMS *called from inside the enclave*
(:mod:`cape.enclave.awskeys`): the parent never holds a Cape key or a key-service secret. On
start it

1. runs the :func:`~cape.host.nitro.preflight` checks (nitro-cli, allocator, ``/dev/vsock``,
   the image) and reads the image's measurements with ``nitro-cli describe-eif``;
2. derives the key policy new Cape keys get (:func:`image_key_policy`): PCR8 (the image's
   signing certificate) when the image is signed, so keys survive upgrades signed by the same
   key, plus PCR3 (the parent's IAM role) when asked; PCR0-2 of this image otherwise;
3. fetches temporary credentials of the instance role from the instance metadata service
   (IMDSv2, botocore's fetcher) for each enclave's ``configure`` frame, and renews them;
4. loads the AWS Nitro Enclaves root certificate the operator downloaded (checked against its
   published fingerprint): clients verify documents against it, and the server serves it.

**Needs a real parent instance and AWS account (not exercised on the development machine):**
IMDS, nitro-cli, vsock and KMS. The pieces are tested separately (fake nitro-cli, moto, fake
sysfs); ``cape doctor`` checks them together on a real parent (docs/deploy-aws.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cape.enclave.awskeys import AwsKmsConfig
from cape.errors import CapeError
from cape.host.launcher import KmsProxy, Tap
from cape.host.nitro import (
    NitroCli,
    NitroError,
    NitroLauncher,
    NitroSettings,
    VsockFamily,
    preflight,
)
from cape.kms.base import KeyPolicy
from cape.platform.operator import role_pcr3
from cape.verify.roots import AWS_NITRO_ROOT_G1_SHA256, fingerprint, load_root_certificate_file

__all__ = [
    "NitroOptions",
    "image_key_policy",
    "instance_role_credentials",
    "load_aws_root",
    "nitro_launcher",
]

_NO_HOST_KMS = {
    "error": "in Nitro mode the enclave calls AWS KMS itself; the host answers no key calls",
    "kind": "error",
}


@dataclass(frozen=True)
class NitroOptions:
    """What ``cape serve --enclave nitro`` takes besides the common options."""

    eif: Path
    aws_root: Path
    region: str
    account_id: str
    admin_role_arn: str
    enclave_role_arn: str
    cpu_count: int = 2
    memory_mib: int = 2048
    pin_role: bool = True
    """Pin PCR3 (the parent's IAM role) in new keys' policies, beside PCR8."""
    proxy_port: int = 8000


def image_key_policy(pcrs: Mapping[int, bytes], *, role_arn: str | None = None) -> KeyPolicy:
    """The policy for new Cape keys: PCR8 of a signed image (+ PCR3 of ``role_arn``), or
    PCR0-2 of an unsigned one (then every new image needs new keys)."""
    pcr3 = role_pcr3(role_arn) if role_arn is not None else None
    if any(pcrs.get(8, b"")):
        return KeyPolicy.signer(pcrs[8], pcr3=pcr3)
    pins = dict(KeyPolicy.measurement(pcrs[0], pcrs[1], pcrs[2]).pcrs)
    if pcr3 is not None:
        pins[3] = frozenset({pcr3})
    return KeyPolicy(pcrs=pins)


def load_aws_root(path: Path) -> x509.Certificate:
    """The AWS Nitro Enclaves Root-G1 certificate from ``path``, checked by fingerprint."""
    root = load_root_certificate_file(path)
    if fingerprint(root) != AWS_NITRO_ROOT_G1_SHA256:
        raise CapeError(
            f"{path} is not the AWS Nitro Enclaves Root-G1 certificate "
            f"(sha256:{fingerprint(root)[:16]}…)"
        )
    return root


def instance_role_credentials() -> dict[str, Any]:
    """The instance role's temporary credentials from IMDSv2, as a ``credentials`` field.

    *Needs a real EC2 instance* (IMDS at 169.254.169.254)."""
    try:
        from botocore.utils import InstanceMetadataFetcher
    except ImportError:
        raise CapeError("Nitro mode needs botocore: install cape with the 'aws' extra") from None
    fetched = InstanceMetadataFetcher(timeout=2, num_attempts=3).retrieve_iam_role_credentials()
    if not fetched:
        raise CapeError(
            "no instance-role credentials from the instance metadata service: is this an EC2 "
            "instance with an instance profile (and IMDSv2 reachable)?"
        )
    return {
        "AccessKeyId": fetched["access_key"],
        "SecretAccessKey": fetched["secret_key"],
        "Token": fetched["token"],
    }


async def nitro_launcher(
    options: NitroOptions,
    enclaves: int,
    *,
    tap: Tap | None = None,
    cli: NitroCli | None = None,
) -> tuple[NitroLauncher, x509.Certificate]:
    """Check the parent, read the image, and return the launcher and the attestation root."""
    settings = NitroSettings(
        eif=options.eif, cpu_count=options.cpu_count, memory_mib=options.memory_mib
    )
    family = VsockFamily()
    preflight(settings, enclaves, family)
    root = load_aws_root(options.aws_root)
    cli = cli or NitroCli()
    pcrs = await cli.describe_eif(options.eif)
    try:
        config = AwsKmsConfig(
            region=options.region,
            account_id=options.account_id,
            admin_role_arn=options.admin_role_arn,
            enclave_role_arn=options.enclave_role_arn,
            policy=image_key_policy(
                pcrs, role_arn=options.enclave_role_arn if options.pin_role else None
            ),
            proxy_port=options.proxy_port,
        )
    except ValueError as exc:
        raise NitroError(f"cannot derive a key policy from {options.eif}: {exc}") from None

    def configure() -> dict[str, Any]:
        return {"aws_kms": config.to_frame(), "credentials": instance_role_credentials()}

    def renew() -> dict[str, Any]:
        return {"credentials": instance_role_credentials()}

    def no_host_kms(message: dict[str, Any]) -> dict[str, Any]:
        del message
        return dict(_NO_HOST_KMS)

    kms: KmsProxy = no_host_kms
    launcher = NitroLauncher(
        settings, kms=kms, configure=configure, renew=renew, family=family, cli=cli, tap=tap
    )
    return launcher, root


def root_pem(root: x509.Certificate) -> bytes:
    return root.public_bytes(serialization.Encoding.PEM)
