"""Simulated-mode provisioning: instance credentials as channel-safe values.

In simulated mode the operator's machine plays AWS: it certifies an instance CA for each
enclave process and sends it over the channel once, before any session (on Nitro the
hardware holds these and this message is never sent). The simulated root's private key is
never part of it.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cape.enclave.secure_module.simulated import InstanceCredentials
from cape.errors import FormatError

__all__ = ["IMAGE_SIGNATURE", "decode_credentials", "encode_credentials", "image_signature"]

#: Key of the simulated image's signature section in the ``provision`` credentials: what an
#: EIF carries in its signature section, here for the runtime's measured PCR0.
IMAGE_SIGNATURE = "image_signature"
MAX_IMAGE_SIGNATURE_BYTES = 32768


def encode_credentials(
    credentials: InstanceCredentials, *, image_signature: bytes | None = None
) -> dict[str, Any]:
    """The ``credentials`` value of a ``provision`` frame (with the image's signature section
    when the host signed the runtime)."""
    extra = {} if image_signature is None else {IMAGE_SIGNATURE: image_signature}
    return extra | {
        "instance_id": credentials.instance_id,
        "region": credentials.region,
        "instance_key": credentials.instance_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        "cabundle": list(credentials.cabundle),
    }


def decode_credentials(value: Any) -> InstanceCredentials:
    """Rebuild :class:`InstanceCredentials`; :class:`FormatError` for anything malformed."""
    if not isinstance(value, dict):
        raise FormatError("provision credentials must be a map")
    try:
        key = serialization.load_der_private_key(value["instance_key"], password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise FormatError("provisioned instance key is not an EC key")
        return InstanceCredentials(
            instance_id=value["instance_id"],
            region=value["region"],
            instance_key=key,
            cabundle=tuple(value["cabundle"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"provision credentials are malformed: {exc}") from None


def image_signature(value: Any) -> bytes | None:
    """The signature section in a ``provision`` frame's credentials, if any."""
    if not isinstance(value, dict) or value.get(IMAGE_SIGNATURE) is None:
        return None
    section = value[IMAGE_SIGNATURE]
    if not isinstance(section, bytes) or len(section) > MAX_IMAGE_SIGNATURE_BYTES:
        raise FormatError("the provisioned image signature must be at most 32 KiB of bytes")
    return section
