"""COSE_Sign1 (RFC 8152 §4.2) as AWS Nitro attestation documents use it.

Pure bytes <-> model: no keys, no clock, no I/O. Signing and verifying happen in the secure
module and the verifier; this module only builds and splits the structure and produces the
``Sig_structure`` that both sign over.

Nitro documents are untagged ``[protected, unprotected, payload, signature]`` arrays; RFC 8152
also allows CBOR tag 18, which :func:`parse_cose_sign1` accepts.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any, cast

import cbor2

from cape.errors import FormatError

__all__ = [
    "ALG_ES384",
    "COSE_SIGN1_TAG",
    "ES384_SIGNATURE_BYTES",
    "CoseSign1",
    "encode_cose_sign1",
    "es384_protected_header",
    "loads_cbor",
    "parse_cose_sign1",
    "sig_structure",
]

COSE_SIGN1_TAG = 18
ALG_ES384 = -35
HEADER_ALG = 1
ES384_SIGNATURE_BYTES = 96  # raw r || s, 48 bytes each


MAX_CBOR_DEPTH = 16


class _ViewReader(io.BufferedIOBase):
    """``read`` and ``tell`` over a buffer, each read a copy of only its piece (``io.BytesIO``
    of a ``memoryview`` copies it whole first: a large channel frame, issue 16)."""

    def __init__(self, data: memoryview) -> None:
        super().__init__()
        self._view = data
        self._at = 0

    def read(self, size: int | None = -1) -> bytes:
        size = -1 if size is None else size
        end = len(self._view) if size < 0 else min(len(self._view), self._at + size)
        piece = self._view[self._at : end].tobytes()
        self._at = end
        return piece

    def tell(self) -> int:
        return self._at

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


def loads_cbor(data: bytes | memoryview, what: str) -> Any:
    """Decode exactly one CBOR item, strictly.

    Duplicate map keys, indefinite lengths, nesting deeper than :data:`MAX_CBOR_DEPTH` and
    trailing bytes are refused: each would let two parsers read one document differently.
    Every decoder failure becomes :class:`FormatError`. A ``memoryview`` is read in place.
    """
    fp = cast(IO[bytes], _ViewReader(data) if isinstance(data, memoryview) else io.BytesIO(data))
    decoder = cbor2.CBORDecoder(
        fp, allow_duplicate_keys=False, allow_indefinite=False, max_depth=MAX_CBOR_DEPTH
    )
    try:
        item = decoder.decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise FormatError(f"{what} is not valid CBOR: {exc}") from None
    if fp.tell() != len(data):
        raise FormatError(f"{what} has {len(data) - fp.tell()} trailing bytes after the CBOR item")
    return item


@dataclass(frozen=True)
class CoseSign1:
    """A decoded COSE_Sign1 structure.

    ``protected`` is kept as the exact serialized bytes, because the signature covers them.
    """

    protected: bytes
    unprotected: dict[Any, Any]
    payload: bytes
    signature: bytes

    @property
    def algorithm(self) -> int | None:
        """The ``alg`` (label 1) from the protected header, if present."""
        header = loads_cbor(self.protected, "COSE protected header") if self.protected else {}
        if not isinstance(header, dict):
            raise FormatError("COSE protected header is not a map")
        alg = header.get(HEADER_ALG)
        return alg if isinstance(alg, int) and not isinstance(alg, bool) else None

    def to_be_signed(self) -> bytes:
        """The ``Sig_structure`` bytes this structure's signature covers."""
        return sig_structure(self.protected, self.payload)


def sig_structure(protected: bytes, payload: bytes, external_aad: bytes = b"") -> bytes:
    """``["Signature1", protected, external_aad, payload]`` encoded as CBOR (RFC 8152 §4.4)."""
    return bytes(cbor2.dumps(["Signature1", protected, external_aad, payload]))


def parse_cose_sign1(data: bytes) -> CoseSign1:
    """Split a COSE_Sign1 message, tagged (18) or untagged, into its four parts.

    Raises :class:`FormatError` when the bytes are not exactly one well-formed COSE_Sign1.
    """
    item = loads_cbor(data, "COSE_Sign1 document")
    if isinstance(item, cbor2.CBORTag):
        if item.tag != COSE_SIGN1_TAG:
            raise FormatError(f"unexpected CBOR tag {item.tag} (COSE_Sign1 is tag 18)")
        item = item.value
    # cbor2 hands tagged contents back immutable (tuple, frozendict); accept both shapes.
    if not isinstance(item, list | tuple) or len(item) != 4:
        raise FormatError("COSE_Sign1 must be an array of 4 items")
    protected, unprotected, payload, signature = item
    if not isinstance(protected, bytes):
        raise FormatError("COSE_Sign1 protected header must be a byte string")
    if not isinstance(unprotected, Mapping):
        raise FormatError("COSE_Sign1 unprotected header must be a map")
    if not isinstance(payload, bytes):
        raise FormatError(
            "COSE_Sign1 payload must be a byte string (detached payloads are refused)"
        )
    if not isinstance(signature, bytes):
        raise FormatError("COSE_Sign1 signature must be a byte string")
    return CoseSign1(protected, dict(unprotected), payload, signature)


def encode_cose_sign1(message: CoseSign1, *, tagged: bool = False) -> bytes:
    """Serialize a COSE_Sign1; untagged by default, as the Nitro Secure Module emits it."""
    body = [message.protected, message.unprotected, message.payload, message.signature]
    if tagged:
        return bytes(cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, body)))
    return bytes(cbor2.dumps(body))


def es384_protected_header() -> bytes:
    """The protected header Nitro documents carry: ``{1: -35}`` (``a1 01 38 22``)."""
    return bytes(cbor2.dumps({HEADER_ALG: ALG_ES384}))
