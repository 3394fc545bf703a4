"""Key-service answers the host cannot forge: Ed25519-signed, bound to the request.

The enclave reaches the built-in key service only through the host, which relays ``kms``
frames. Without authentication a hostile host could answer "the public key of alice" with a
key of its own (and the enclave would attest to it as alice's Cape key), hand the enclave a
data key of its choosing (CMS addressed to the enclave's public recipient key is something
anyone can build), or replay one user's answer into another user's session.

So the key service holds an **identity key** (Ed25519) and signs every successful answer.
What it signs is a canonical CBOR statement: this module's domain label, the request's
fields exactly as the enclave sent them (operation, owner, ``create``, ``blob``, the
attestation ``document``, and a fresh random ``challenge`` the enclave puts in every
request) and the ``result``. A substituted result, another request's answer or an old answer
all fail verification.

The identity's public half is part of the runtime's measured configuration: at start-up the
runtime extends PCR :data:`IDENTITY_PCR` (the first user PCR of the NSM) with
:func:`identity_measurement` and locks it, so every attestation document from it names the
key service it trusts, and a key policy pinning that PCR releases keys only to enclaves that
trust this key service (:func:`identity_pcr` is the expected value). An enclave started with
another identity reports another PCR16.

Error answers are not signed: a host that fakes a refusal only denies service, which it can
do anyway by dropping frames.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Final

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cape.errors import KeyAnswerError, KeyFormatError

__all__ = [
    "CHALLENGE_BYTES",
    "IDENTITY_PCR",
    "SIGNED_REQUEST_FIELDS",
    "AnswerSigner",
    "aws_kms_measurement",
    "identity_measurement",
    "identity_pcr",
    "load_identity_public_key",
    "measured_pcr",
    "verify_answer",
]

IDENTITY_PCR: Final = 16
"""The NSM PCR the runtime extends with the key service's identity (then locks)."""

CHALLENGE_BYTES: Final = 16
"""Length of the random challenge in every request."""

SIGNED_REQUEST_FIELDS: Final = ("op", "owner", "create", "blob", "document", "challenge")
"""The request fields a signature covers (``rid`` is the host-visible routing id: not signed,
the challenge does its job)."""

_DOMAIN: Final = "cape-kms-answer-v1"
_IDENTITY_LABEL: Final = b"cape-kms-identity-v1\x00"
_AWS_LABEL: Final = b"cape-kms-aws-v1\x00"
_PCR_BYTES: Final = 48
_SIGNATURE_BYTES: Final = 64


def load_identity_public_key(raw: bytes) -> Ed25519PublicKey:
    """A raw 32-byte Ed25519 public key; :class:`KeyFormatError` for anything else."""
    if not isinstance(raw, bytes) or len(raw) != 32:
        raise KeyFormatError("the key service identity must be a 32-byte Ed25519 public key")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise KeyFormatError("the key service identity is not an Ed25519 public key") from None


def identity_measurement(public_key: bytes) -> bytes:
    """What the runtime extends :data:`IDENTITY_PCR` with: SHA-384 of a label and the key."""
    load_identity_public_key(public_key)
    return hashlib.sha384(_IDENTITY_LABEL + public_key).digest()


def aws_kms_measurement(configuration: bytes) -> bytes:
    """What an enclave using AWS KMS itself extends :data:`IDENTITY_PCR` with: SHA-384 of a
    label and its canonical KMS configuration (region, account, roles, key policy), so a host
    cannot point it at another account's keys unnoticed."""
    return hashlib.sha384(_AWS_LABEL + configuration).digest()


def identity_pcr(public_key: bytes) -> bytes:
    """The value of :data:`IDENTITY_PCR` in an enclave trusting ``public_key``: one NSM
    extension of a zero PCR, ``SHA384(0^48 || identity_measurement(public_key))``."""
    return measured_pcr(identity_measurement(public_key))


def measured_pcr(measurement: bytes) -> bytes:
    """A zero PCR extended once with ``measurement`` (the NSM's ``SHA384(pcr || data)``)."""
    return hashlib.sha384(bytes(_PCR_BYTES) + measurement).digest()


def _statement(request: Mapping[str, Any], result: object) -> bytes:
    fields = {name: request[name] for name in SIGNED_REQUEST_FIELDS if name in request}
    try:
        return cbor2.dumps([_DOMAIN, fields, result], canonical=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise KeyAnswerError(f"the key-service answer cannot be encoded: {exc}") from None


class AnswerSigner:
    """The key service's side: signs ``(request, result)`` with its identity key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError("the key service identity must be an Ed25519 private key")
        self._key = private_key

    @classmethod
    def generate(cls) -> AnswerSigner:
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_bytes(self) -> bytes:
        """The raw 32-byte public key (what the runtime is started with)."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign(self, request: Mapping[str, Any], result: object) -> bytes:
        return self._key.sign(_statement(request, result))


def verify_answer(
    public_key: Ed25519PublicKey,
    request: Mapping[str, Any],
    result: object,
    signature: object,
) -> None:
    """Check that ``result`` is the key service's answer to exactly ``request``.

    Raises:
        KeyAnswerError: no signature, or one that does not verify (a substituted result, an
            answer to another request, or a key service other than the measured one).
    """
    if "challenge" not in request:
        raise KeyAnswerError("a key-service request without a challenge cannot be verified")
    if not isinstance(signature, bytes) or len(signature) != _SIGNATURE_BYTES:
        raise KeyAnswerError(
            f"the key service's answer to {request.get('op')!r} is not signed; "
            "the host may have substituted it"
        )
    try:
        public_key.verify(signature, _statement(request, result))
    except InvalidSignature:
        raise KeyAnswerError(
            f"the key service's answer to {request.get('op')!r} for "
            f"{str(request.get('owner'))[:64]!r} does not verify against the measured key "
            "service identity: the host substituted or replayed it"
        ) from None
