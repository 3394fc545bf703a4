"""The Nitro Secure Module (NSM) request and response messages: models, encoder, parser.

Pure bytes <-> model: no device, no keys, no clock. The wire format is what AWS's
``aws-nitro-enclaves-nsm-api`` (``src/api/mod.rs``) produces with serde and CBOR
(``shared/spec/nitro-attestation.md`` §3.5):

- enums are externally tagged: a unit variant is a bare text string (``"DescribeNSM"``), a
  struct variant is a one-entry map from the variant name to a map of its fields
  (``{"DescribePCR": {"index": 3}}``), and the ``Error`` newtype variant wraps a unit enum
  (``{"Error": "InvalidIndex"}``);
- struct fields are text keys in declaration order; ``u16`` fields are CBOR unsigned
  integers, ``serde_bytes`` fields are byte strings, ``Option<ByteBuf>`` ``None`` is ``null``;
- ``locked_pcrs`` (a ``BTreeSet<u16>``) is an ascending array, ``digest`` a bare text string.

The encoder emits exactly those bytes, so the simulated module and the ``/dev/nsm`` device
exchange the same messages. The parser is strict (a parsed message is always well formed):
wrong shapes, wrong types, unknown variants or fields, missing fields and ``u16`` values out of
range raise :class:`~cape.errors.FormatError`. Size *policy* (``InputTooLarge``, PCR index
ranges) belongs to the module that serves the request, not to this codec; the parser only
refuses messages larger than the device's buffers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias

import cbor2

from cape.errors import FormatError
from cape.formats.cose import loads_cbor

__all__ = [
    "DIGESTS",
    "ERROR_CODES",
    "MAX_ATTESTATION_FIELD_BYTES",
    "MAX_REQUEST_BYTES",
    "RESPONSE_BUFFER_BYTES",
    "U16_MAX",
    "AttestationRequest",
    "AttestationResponse",
    "DescribeNSMRequest",
    "DescribeNSMResponse",
    "DescribePCRRequest",
    "DescribePCRResponse",
    "ErrorResponse",
    "ExtendPCRRequest",
    "ExtendPCRResponse",
    "GetRandomRequest",
    "GetRandomResponse",
    "LockPCRRequest",
    "LockPCRResponse",
    "LockPCRsRequest",
    "LockPCRsResponse",
    "Request",
    "Response",
    "encode_request",
    "encode_response",
    "parse_request",
    "parse_response",
]

#: The driver refuses larger requests with ``EMSGSIZE`` (``NSM_REQUEST_MAX_SIZE``, 0x1000).
MAX_REQUEST_BYTES = 4096
#: The response buffer every NSM client hands the driver (``NSM_RESPONSE_MAX_SIZE``, 0x3000).
RESPONSE_BUFFER_BYTES = 12288
#: The largest ``user_data``, ``nonce`` or ``public_key`` a real NSM accepts (see the samples).
MAX_ATTESTATION_FIELD_BYTES = 1024
U16_MAX = 0xFFFF

#: ``nsm_io::Digest`` variants.
DIGESTS = ("SHA256", "SHA384", "SHA512")
#: ``nsm_io::ErrorCode`` variants, in declaration order.
ERROR_CODES = (
    "Success",
    "InvalidArgument",
    "InvalidIndex",
    "InvalidResponse",
    "ReadOnlyIndex",
    "InvalidOperation",
    "BufferTooSmall",
    "InputTooLarge",
    "InternalError",
)


def _require_u16(value: int, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int")
    if not 0 <= value <= U16_MAX:
        raise ValueError(f"{name} must be in 0..{U16_MAX}, got {value}")


def _require_bytes(value: object, name: str, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes{' or None' if optional else ''}")


# --- requests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DescribePCRRequest:
    """Read the PCR at ``index`` (``Request::DescribePCR``)."""

    index: int

    def __post_init__(self) -> None:
        _require_u16(self.index, "index")


@dataclass(frozen=True)
class ExtendPCRRequest:
    """Extend the PCR at ``index`` with ``data`` (``Request::ExtendPCR``)."""

    index: int
    data: bytes

    def __post_init__(self) -> None:
        _require_u16(self.index, "index")
        _require_bytes(self.data, "data")


@dataclass(frozen=True)
class LockPCRRequest:
    """Make the PCR at ``index`` read-only (``Request::LockPCR``)."""

    index: int

    def __post_init__(self) -> None:
        _require_u16(self.index, "index")


@dataclass(frozen=True)
class LockPCRsRequest:
    """Make PCRs ``[0, range)`` read-only (``Request::LockPCRs``)."""

    range: int

    def __post_init__(self) -> None:
        _require_u16(self.range, "range")


@dataclass(frozen=True)
class DescribeNSMRequest:
    """Ask for the module's version and capabilities (``Request::DescribeNSM``)."""


@dataclass(frozen=True)
class AttestationRequest:
    """Ask for a signed attestation document (``Request::Attestation``).

    The codec carries fields of any length; the module refuses ones longer than
    :data:`MAX_ATTESTATION_FIELD_BYTES` with ``InputTooLarge``.
    """

    user_data: bytes | None = None
    nonce: bytes | None = None
    public_key: bytes | None = None

    def __post_init__(self) -> None:
        _require_bytes(self.user_data, "user_data", optional=True)
        _require_bytes(self.nonce, "nonce", optional=True)
        _require_bytes(self.public_key, "public_key", optional=True)


@dataclass(frozen=True)
class GetRandomRequest:
    """Ask for entropy (``Request::GetRandom``)."""


Request: TypeAlias = (
    DescribePCRRequest
    | ExtendPCRRequest
    | LockPCRRequest
    | LockPCRsRequest
    | DescribeNSMRequest
    | AttestationRequest
    | GetRandomRequest
)


# --- responses ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DescribePCRResponse:
    """A PCR's value and whether it is read-only (``Response::DescribePCR``)."""

    lock: bool
    data: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.lock, bool):
            raise TypeError("lock must be a bool")
        _require_bytes(self.data, "data")


@dataclass(frozen=True)
class ExtendPCRResponse:
    """The PCR's value after the extension (``Response::ExtendPCR``)."""

    data: bytes

    def __post_init__(self) -> None:
        _require_bytes(self.data, "data")


@dataclass(frozen=True)
class LockPCRResponse:
    """The PCR is now read-only (``Response::LockPCR``)."""


@dataclass(frozen=True)
class LockPCRsResponse:
    """The PCRs are now read-only (``Response::LockPCRs``)."""


@dataclass(frozen=True)
class DescribeNSMResponse:
    """The module's version and capabilities (``Response::DescribeNSM``).

    ``locked_pcrs`` is kept sorted and without duplicates, as the ``BTreeSet`` on the wire is.
    """

    version_major: int
    version_minor: int
    version_patch: int
    module_id: str
    max_pcrs: int
    locked_pcrs: tuple[int, ...]
    digest: str

    def __post_init__(self) -> None:
        for name in ("version_major", "version_minor", "version_patch", "max_pcrs"):
            _require_u16(getattr(self, name), name)
        if not isinstance(self.module_id, str):
            raise TypeError("module_id must be a str")
        locked = tuple(sorted(set(self.locked_pcrs)))
        for index in locked:
            _require_u16(index, "locked_pcrs entry")
        object.__setattr__(self, "locked_pcrs", locked)
        if self.digest not in DIGESTS:
            raise ValueError(f"digest must be one of {', '.join(DIGESTS)}")


@dataclass(frozen=True)
class AttestationResponse:
    """A COSE_Sign1 attestation document (``Response::Attestation``)."""

    document: bytes

    def __post_init__(self) -> None:
        _require_bytes(self.document, "document")


@dataclass(frozen=True)
class GetRandomResponse:
    """Bytes of entropy (``Response::GetRandom``)."""

    random: bytes

    def __post_init__(self) -> None:
        _require_bytes(self.random, "random")


@dataclass(frozen=True)
class ErrorResponse:
    """The module could not serve the request (``Response::Error(ErrorCode)``)."""

    code: str

    def __post_init__(self) -> None:
        if self.code not in ERROR_CODES:
            raise ValueError(f"unknown NSM error code {self.code!r}")


Response: TypeAlias = (
    DescribePCRResponse
    | ExtendPCRResponse
    | LockPCRResponse
    | LockPCRsResponse
    | DescribeNSMResponse
    | AttestationResponse
    | GetRandomResponse
    | ErrorResponse
)


# --- encoding -------------------------------------------------------------------------------


def _dumps(item: object) -> bytes:
    return bytes(cbor2.dumps(item))


def encode_request(request: Request) -> bytes:
    """Encode a request exactly as ``nsm-api`` does; no size limit is applied here."""
    match request:
        case DescribePCRRequest(index=index):
            return _dumps({"DescribePCR": {"index": index}})
        case ExtendPCRRequest(index=index, data=data):
            return _dumps({"ExtendPCR": {"index": index, "data": data}})
        case LockPCRRequest(index=index):
            return _dumps({"LockPCR": {"index": index}})
        case LockPCRsRequest(range=count):
            return _dumps({"LockPCRs": {"range": count}})
        case DescribeNSMRequest():
            return _dumps("DescribeNSM")
        case AttestationRequest(user_data=user_data, nonce=nonce, public_key=public_key):
            body = {"user_data": user_data, "nonce": nonce, "public_key": public_key}
            return _dumps({"Attestation": body})
        case GetRandomRequest():
            return _dumps("GetRandom")
    raise TypeError(f"not an NSM request: {type(request).__name__}")


def encode_response(response: Response) -> bytes:
    """Encode a response exactly as the NSM does."""
    match response:
        case DescribePCRResponse(lock=lock, data=data):
            return _dumps({"DescribePCR": {"lock": lock, "data": data}})
        case ExtendPCRResponse(data=data):
            return _dumps({"ExtendPCR": {"data": data}})
        case LockPCRResponse():
            return _dumps("LockPCR")
        case LockPCRsResponse():
            return _dumps("LockPCRs")
        case DescribeNSMResponse():
            body = {
                "version_major": response.version_major,
                "version_minor": response.version_minor,
                "version_patch": response.version_patch,
                "module_id": response.module_id,
                "max_pcrs": response.max_pcrs,
                "locked_pcrs": list(response.locked_pcrs),
                "digest": response.digest,
            }
            return _dumps({"DescribeNSM": body})
        case AttestationResponse(document=document):
            return _dumps({"Attestation": {"document": document}})
        case GetRandomResponse(random=random):
            return _dumps({"GetRandom": {"random": random}})
        case ErrorResponse(code=code):
            return _dumps({"Error": code})
    raise TypeError(f"not an NSM response: {type(response).__name__}")


# --- parsing --------------------------------------------------------------------------------


class _Fields:
    """Typed access to a struct variant's field map; every failure is a FormatError."""

    def __init__(self, what: str, body: Any, names: Iterable[str]) -> None:
        self.what = what
        expected = tuple(names)
        if not isinstance(body, dict):
            raise FormatError(f"{what} must be a map of its fields")
        missing = [name for name in expected if name not in body]
        if missing:
            raise FormatError(f"{what} lacks field(s): {', '.join(missing)}")
        unknown = [repr(key) for key in body if key not in expected]
        if unknown:
            raise FormatError(f"{what} has unknown field(s): {', '.join(unknown)}")
        self.body: dict[str, Any] = body

    def u16(self, name: str) -> int:
        return _parse_u16(self.body[name], f"{self.what} field {name!r}")

    def bstr(self, name: str) -> bytes:
        value = self.body[name]
        if not isinstance(value, bytes):
            raise FormatError(f"{self.what} field {name!r} must be a byte string")
        return value

    def optional_bstr(self, name: str) -> bytes | None:
        return None if self.body[name] is None else self.bstr(name)

    def boolean(self, name: str) -> bool:
        value = self.body[name]
        if not isinstance(value, bool):
            raise FormatError(f"{self.what} field {name!r} must be a boolean")
        return value

    def text(self, name: str) -> str:
        value = self.body[name]
        if not isinstance(value, str):
            raise FormatError(f"{self.what} field {name!r} must be a text string")
        return value


def _parse_u16(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise FormatError(f"{what} must be an unsigned integer")
    if not 0 <= value <= U16_MAX:
        raise FormatError(f"{what} is {value}; a u16 is 0..{U16_MAX}")
    return value


def _split_variant(item: Any, what: str) -> tuple[str, Any]:
    """``"Name"`` -> (Name, _UNIT); ``{"Name": body}`` -> (Name, body)."""
    if isinstance(item, str):
        return item, _UNIT
    if isinstance(item, dict) and len(item) == 1:
        ((name, body),) = item.items()
        if isinstance(name, str):
            return name, body
    raise FormatError(f"{what} must be a variant name or a one-entry map from a variant name")


_UNIT = object()


def _unit(name: str, body: Any, kind: str) -> None:
    if body is not _UNIT:
        raise FormatError(f"NSM {kind} {name!r} takes no fields; it is encoded as a bare string")


def _struct(name: str, body: Any, kind: str, names: tuple[str, ...]) -> _Fields:
    if body is _UNIT:
        raise FormatError(f"NSM {kind} {name!r} must be a map of its fields, not a bare string")
    return _Fields(f"NSM {kind} {name!r}", body, names)


def _parse_describe_nsm(body: Any) -> DescribeNSMResponse:
    fields = _struct(
        "DescribeNSM",
        body,
        "response",
        (
            "version_major",
            "version_minor",
            "version_patch",
            "module_id",
            "max_pcrs",
            "locked_pcrs",
            "digest",
        ),
    )
    raw_locked = fields.body["locked_pcrs"]
    if not isinstance(raw_locked, list):
        raise FormatError("NSM response 'DescribeNSM' field 'locked_pcrs' must be an array")
    locked = [_parse_u16(index, "a 'locked_pcrs' entry") for index in raw_locked]
    if any(a >= b for a, b in itertools.pairwise(locked)):
        raise FormatError("NSM response 'DescribeNSM' field 'locked_pcrs' must be ascending")
    digest = fields.text("digest")
    if digest not in DIGESTS:
        raise FormatError(f"NSM digest {digest!r} is not one of {', '.join(DIGESTS)}")
    return DescribeNSMResponse(
        version_major=fields.u16("version_major"),
        version_minor=fields.u16("version_minor"),
        version_patch=fields.u16("version_patch"),
        module_id=fields.text("module_id"),
        max_pcrs=fields.u16("max_pcrs"),
        locked_pcrs=tuple(locked),
        digest=digest,
    )


def _parse_error(body: Any) -> ErrorResponse:
    if not isinstance(body, str):
        raise FormatError("NSM response 'Error' must carry an error code string")
    if body not in ERROR_CODES:
        raise FormatError(f"unknown NSM error code {body!r}")
    return ErrorResponse(body)


def parse_request(data: bytes) -> Request:
    """Decode one NSM request; :class:`FormatError` for anything ``nsm-api`` would not emit."""
    if len(data) > MAX_REQUEST_BYTES:
        raise FormatError(
            f"NSM request is {len(data)} bytes; the device carries at most {MAX_REQUEST_BYTES}"
        )
    name, body = _split_variant(loads_cbor(data, "NSM request"), "NSM request")
    kind = "request"
    match name:
        case "DescribePCR":
            return DescribePCRRequest(_struct(name, body, kind, ("index",)).u16("index"))
        case "ExtendPCR":
            fields = _struct(name, body, kind, ("index", "data"))
            return ExtendPCRRequest(fields.u16("index"), fields.bstr("data"))
        case "LockPCR":
            return LockPCRRequest(_struct(name, body, kind, ("index",)).u16("index"))
        case "LockPCRs":
            return LockPCRsRequest(_struct(name, body, kind, ("range",)).u16("range"))
        case "DescribeNSM":
            _unit(name, body, kind)
            return DescribeNSMRequest()
        case "Attestation":
            fields = _struct(name, body, kind, ("user_data", "nonce", "public_key"))
            return AttestationRequest(
                user_data=fields.optional_bstr("user_data"),
                nonce=fields.optional_bstr("nonce"),
                public_key=fields.optional_bstr("public_key"),
            )
        case "GetRandom":
            _unit(name, body, kind)
            return GetRandomRequest()
    raise FormatError(f"unknown NSM request {name!r}")


def parse_response(data: bytes) -> Response:
    """Decode one NSM response; :class:`FormatError` for anything the NSM would not emit."""
    if len(data) > RESPONSE_BUFFER_BYTES:
        raise FormatError(
            f"NSM response is {len(data)} bytes; the buffer holds {RESPONSE_BUFFER_BYTES}"
        )
    name, body = _split_variant(loads_cbor(data, "NSM response"), "NSM response")
    kind = "response"
    match name:
        case "DescribePCR":
            fields = _struct(name, body, kind, ("lock", "data"))
            return DescribePCRResponse(fields.boolean("lock"), fields.bstr("data"))
        case "ExtendPCR":
            return ExtendPCRResponse(_struct(name, body, kind, ("data",)).bstr("data"))
        case "LockPCR":
            _unit(name, body, kind)
            return LockPCRResponse()
        case "LockPCRs":
            _unit(name, body, kind)
            return LockPCRsResponse()
        case "DescribeNSM":
            return _parse_describe_nsm(body)
        case "Attestation":
            return AttestationResponse(_struct(name, body, kind, ("document",)).bstr("document"))
        case "GetRandom":
            return GetRandomResponse(_struct(name, body, kind, ("random",)).bstr("random"))
        case "Error":
            if body is _UNIT:
                raise FormatError("NSM response 'Error' must carry an error code")
            return _parse_error(body)
    raise FormatError(f"unknown NSM response {name!r}")
