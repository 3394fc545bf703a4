"""Answer the enclave's key-service frames with a :class:`KeyService` (the vsock-proxy role).

The host relays ``kms`` frames here unchanged; what comes back is public (a public key) or
encrypted to the enclave (CMS ``CiphertextForRecipient``), and signed with the key service's
identity (:mod:`cape.crypto.keyanswers`) so the host relaying it can neither substitute nor
replay it. Errors become a ``kind`` the enclave maps back to the same exception type, with
text that never holds key material.
"""

from __future__ import annotations

import logging
from typing import Any

from cape.crypto.keyanswers import AnswerSigner
from cape.errors import (
    CapeError,
    DecryptionError,
    KeyNotFoundError,
    KeyReleaseDeniedError,
)
from cape.kms.base import KeyService, Recipient

__all__ = ["serve_kms_request"]

log = logging.getLogger("cape.kms")


def _bytes(message: dict[str, Any], name: str) -> bytes:
    value = message.get(name)
    if not isinstance(value, bytes):
        raise CapeError(f"key-service request lacks bytes {name!r}")
    return value


def _owner(message: dict[str, Any]) -> str:
    owner = message.get("owner")
    if not isinstance(owner, str):
        raise CapeError("key-service request lacks 'owner'")
    return owner


def serve_kms_request(
    service: KeyService, message: dict[str, Any], *, signer: AnswerSigner
) -> dict[str, Any]:
    """One ``kms`` frame in, ``{"result": …, "sig": …}`` or ``{"error": text, "kind": …}`` out."""
    reply = _answer(service, message)
    if "result" in reply:
        try:
            reply["sig"] = signer.sign(message, reply["result"])
        except CapeError as exc:
            return {"error": exc.diagnostics(), "kind": "error"}
    return reply


def _answer(service: KeyService, message: dict[str, Any]) -> dict[str, Any]:
    op = message.get("op")
    try:
        if op == "get_public_key":
            owner = _owner(message)
            if message.get("create"):
                service.get_or_create_key(owner)
            return {"result": service.get_public_key(owner)}
        if op == "decrypt":
            recipient = Recipient(attestation_document=_bytes(message, "document"))
            blob = _bytes(message, "blob")
            return {"result": service.decrypt(_owner(message), blob, recipient=recipient)}
        if op == "generate_data_key":
            recipient = Recipient(attestation_document=_bytes(message, "document"))
            key = service.generate_data_key(_owner(message), recipient=recipient)
            return {"result": {"blob": key.ciphertext_blob, "cms": key.ciphertext_for_recipient}}
        return {"error": f"unknown key-service operation {op!r}", "kind": "error"}
    except KeyReleaseDeniedError as exc:
        log.warning("key release denied: %s", exc.diagnostics())
        return {"error": exc.diagnostics(), "kind": "denied"}
    except KeyNotFoundError as exc:
        return {"error": exc.diagnostics(), "kind": "not_found"}
    except DecryptionError as exc:
        return {"error": exc.diagnostics(), "kind": "decryption"}
    except (CapeError, ValueError) as exc:
        text = exc.diagnostics() if isinstance(exc, CapeError) else str(exc)
        return {"error": text, "kind": "error"}
