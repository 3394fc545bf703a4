"""Signing an enclave image with an AWS KMS key (``cape enclave build --sign-kms-key ARN``).

The release key never leaves KMS: the image's PCR0 signature is made by KMS ``Sign``
(``MessageType=DIGEST``, ``ECDSA_SHA_384`` for a P-384 key), and the certificate given with
``--sign-cert`` (which the operator made for that key) goes into the image and names the
signer (PCR8). A signature that does not verify with the certificate is refused, so a key
and a certificate that do not belong together never produce an image.

KMS signatures are randomized ECDSA: a rebuild has the same PCRs, but its signature section,
and so its SHA-256, differ. Reproducers compare PCR0-2 (or rebuild unsigned).

boto3 and botocore come with the ``aws`` extra; the tests drive this module through
``botocore.stub.Stubber`` (there is no AWS account here, see docs/mocks.md).
"""

from __future__ import annotations

from typing import Any

from cryptography import x509

from cape.crypto.eif_signature import ImageSigner
from cape.errors import CapeError, FormatError

__all__ = ["KMS_ALGORITHMS", "kms_image_signer"]

#: KMS signing algorithm by the certificate key's curve (COSE ES256/ES384/ES512).
KMS_ALGORITHMS = {
    "secp256r1": "ECDSA_SHA_256",
    "secp384r1": "ECDSA_SHA_384",
    "secp521r1": "ECDSA_SHA_512",
}


def _region(key_id: str) -> str | None:
    """The region of a key ARN (``arn:aws:kms:REGION:ACCOUNT:key/ID``), else ``None``."""
    parts = key_id.split(":")
    if len(parts) >= 6 and parts[0] == "arn" and parts[3]:
        return parts[3]
    return None


def kms_image_signer(
    key_id: str, certificate_pem: bytes, *, client: Any | None = None
) -> ImageSigner:
    """An :class:`ImageSigner` whose signatures come from the KMS key ``key_id``.

    ``client`` is a boto3 KMS client; without one it is made for the ARN's region (or the
    default one for a key id or alias).

    Raises:
        FormatError: the certificate is not PEM X.509 on a supported EC curve, or the key id
            is empty.
        CapeError: boto3 is missing, or KMS refuses (the error code is named) when signing.
    """
    if not key_id.strip():
        raise FormatError("--sign-kms-key needs a KMS key ARN, id or alias")
    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem)
    except ValueError:
        raise FormatError("the signing certificate is not a PEM X.509 certificate") from None
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise CapeError(
            "signing with AWS KMS needs boto3 and botocore: pip install 'cape[aws]'"
        ) from None
    if client is None:
        try:
            import boto3
        except ImportError:
            raise CapeError(
                "signing with AWS KMS needs boto3 and botocore: pip install 'cape[aws]'"
            ) from None
        client = boto3.client("kms", region_name=_region(key_id))
    curve = getattr(certificate.public_key(), "curve", None)
    algorithm = KMS_ALGORITHMS.get(getattr(curve, "name", ""))

    def sign_digest(digest: bytes) -> bytes:
        try:
            response = client.sign(
                KeyId=key_id,
                Message=digest,
                MessageType="DIGEST",
                SigningAlgorithm=algorithm,
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "unknown error")
            raise CapeError(f"AWS KMS Sign with {key_id} failed: {code}") from None
        except BotoCoreError as exc:
            raise CapeError(f"AWS KMS Sign with {key_id} failed: {exc}") from None
        signature = response.get("Signature")
        if not isinstance(signature, bytes):
            raise CapeError("AWS KMS Sign returned no signature")
        return signature

    return ImageSigner.external(certificate, sign_digest)
