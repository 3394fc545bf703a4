"""Signing an image with an AWS KMS key, against botocore's Stubber.

There is no AWS account here (docs/mocks.md): the Stubber checks each ``Sign`` request against
the KMS API model and the exact parameters, and answers with a signature made by a local key
standing in for the KMS key. The expected digest is computed here from the spec (RFC 8152
Sig_structure over serde_cbor of ``{"register_index": 0, "register_value": PCR0}``), not with
the writer's helpers, and the image is then checked by ``describe`` and the spec reader.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import cbor2
import pytest
from botocore.stub import Stubber
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from cape.crypto.eif_signature import ImageSigner
from cape.errors import CapeError, SignatureError
from cape.image.build import build_image
from cape.image.kms import kms_image_signer
from cape.verify.eif import describe_eif
from tests.unit.image import spec_reader

ARN = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"


@pytest.fixture
def client() -> Any:
    return boto3.client(
        "kms", region_name="eu-west-1", aws_access_key_id="x", aws_secret_access_key="x"
    )


@pytest.fixture
def stubber(client: Any) -> Iterator[Stubber]:
    with Stubber(client) as stub:
        yield stub
        stub.assert_no_pending_responses()


def expected_digest(pcr0: bytes) -> bytes:
    protected = cbor2.dumps({1: -35})  # alg: ES384
    payload = cbor2.dumps({"register_index": 0, "register_value": list(pcr0)})
    return hashlib.sha384(cbor2.dumps(["Signature1", protected, b"", payload])).digest()


def stand_in_signature(key: ImageSigner, digest: bytes) -> bytes:
    """What KMS would return: a (randomized) DER ECDSA signature over the digest."""
    private = serialization.load_pem_private_key(key.private_key_pem(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    return private.sign(digest, ec.ECDSA(Prehashed(hashes.SHA384())))


def unsigned_pcr0(blobs: Path, rootfs: Path, tmp_path: Path) -> bytes:
    return build_image(blobs=blobs, rootfs=rootfs, output=tmp_path / "unsigned.eif").pcrs[0]


def expect_sign(stubber: Stubber, digest: bytes, signature: bytes) -> None:
    stubber.add_response(
        "sign",
        {"KeyId": ARN, "Signature": signature, "SigningAlgorithm": "ECDSA_SHA_384"},
        {
            "KeyId": ARN,
            "Message": digest,
            "MessageType": "DIGEST",
            "SigningAlgorithm": "ECDSA_SHA_384",
        },
    )


def test_kms_signed_image_has_the_certificates_pcr8(
    blobs: Path, rootfs: Path, tmp_path: Path, signer: ImageSigner, client: Any, stubber: Stubber
) -> None:
    pcr0 = unsigned_pcr0(blobs, rootfs, tmp_path)
    digest = expected_digest(pcr0)
    expect_sign(stubber, digest, stand_in_signature(signer, digest))
    kms = kms_image_signer(ARN, signer.certificate_pem, client=client)
    result = build_image(blobs=blobs, rootfs=rootfs, output=tmp_path / "kms.eif", signer=kms)
    description = describe_eif(tmp_path / "kms.eif")
    assert description.pcrs[0] == pcr0 == result.pcrs[0]
    assert description.pcrs[8] == signer.identity.pcr8 == result.pcrs[8]
    image = spec_reader.read((tmp_path / "kms.eif").read_bytes())
    (entry,) = spec_reader.signature_entries(image.sections[-1].data)
    assert bytes(entry["signing_certificate"]) == signer.certificate_pem


def test_kms_key_that_does_not_match_the_certificate_is_refused(
    blobs: Path,
    rootfs: Path,
    tmp_path: Path,
    signer: ImageSigner,
    other_signer: ImageSigner,
    client: Any,
    stubber: Stubber,
) -> None:
    digest = expected_digest(unsigned_pcr0(blobs, rootfs, tmp_path))
    expect_sign(stubber, digest, stand_in_signature(other_signer, digest))
    kms = kms_image_signer(ARN, signer.certificate_pem, client=client)
    with pytest.raises(SignatureError, match="do not belong together"):
        build_image(blobs=blobs, rootfs=rootfs, output=tmp_path / "kms.eif", signer=kms)
    assert not (tmp_path / "kms.eif").exists()


def test_kms_refusal_is_one_clear_error(
    blobs: Path, rootfs: Path, tmp_path: Path, signer: ImageSigner, client: Any, stubber: Stubber
) -> None:
    stubber.add_client_error("sign", "AccessDeniedException", "not allowed")
    kms = kms_image_signer(ARN, signer.certificate_pem, client=client)
    with pytest.raises(CapeError, match=r"AWS KMS Sign with .* failed: AccessDeniedException"):
        build_image(blobs=blobs, rootfs=rootfs, output=tmp_path / "kms.eif", signer=kms)
    assert not (tmp_path / "kms.eif").exists()
