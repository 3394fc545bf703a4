"""The NSM request/response codec against hand-derived CBOR (serde rules of nsm-api).

Each hex vector below was written out by hand from the rules in spec/nitro-attestation.md §3.5
(externally tagged enums, unit variants as bare text, struct fields in declaration order,
``None`` as ``f6``, ``serde_bytes`` as byte strings), not produced by the encoder under test.
"""

from __future__ import annotations

import contextlib
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cape.errors import FormatError
from cape.formats.nsm import (
    DIGESTS,
    ERROR_CODES,
    MAX_REQUEST_BYTES,
    RESPONSE_BUFFER_BYTES,
    AttestationRequest,
    AttestationResponse,
    DescribeNSMRequest,
    DescribeNSMResponse,
    DescribePCRRequest,
    DescribePCRResponse,
    ErrorResponse,
    ExtendPCRRequest,
    ExtendPCRResponse,
    GetRandomRequest,
    GetRandomResponse,
    LockPCRRequest,
    LockPCRResponse,
    LockPCRsRequest,
    LockPCRsResponse,
    Request,
    Response,
    encode_request,
    encode_response,
    parse_request,
    parse_response,
)

# Text strings, as CBOR: major type 3 header byte + UTF-8.
DESCRIBE_PCR = "6b" + "4465736372696265504352"  # "DescribePCR" (11)
EXTEND_PCR = "69" + "457874656e64504352"  # "ExtendPCR" (9)
LOCK_PCR = "67" + "4c6f636b504352"  # "LockPCR" (7)
LOCK_PCRS = "68" + "4c6f636b50435273"  # "LockPCRs" (8)
DESCRIBE_NSM = "6b" + "44657363726962654e534d"  # "DescribeNSM" (11)
ATTESTATION = "6b" + "4174746573746174696f6e"  # "Attestation" (11)
GET_RANDOM = "69" + "47657452616e646f6d"  # "GetRandom" (9)
ERROR = "65" + "4572726f72"  # "Error" (5)
INDEX = "65" + "696e646578"  # "index"
RANGE = "65" + "72616e6765"  # "range"
DATA = "64" + "64617461"  # "data"
USER_DATA = "69" + "757365725f64617461"  # "user_data"
NONCE = "65" + "6e6f6e6365"  # "nonce"
PUBLIC_KEY = "6a" + "7075626c69635f6b6579"  # "public_key"
LOCK = "64" + "6c6f636b"  # "lock"
DOCUMENT = "68" + "646f63756d656e74"  # "document"
RANDOM = "66" + "72616e646f6d"  # "random"
LONG_80 = "80" * 1024

REQUEST_VECTORS: list[tuple[Request, str]] = [
    (DescribeNSMRequest(), DESCRIBE_NSM),
    (GetRandomRequest(), GET_RANDOM),
    (DescribePCRRequest(3), "a1" + DESCRIBE_PCR + "a1" + INDEX + "03"),
    (DescribePCRRequest(24), "a1" + DESCRIBE_PCR + "a1" + INDEX + "1818"),
    (DescribePCRRequest(300), "a1" + DESCRIBE_PCR + "a1" + INDEX + "19012c"),
    (DescribePCRRequest(65535), "a1" + DESCRIBE_PCR + "a1" + INDEX + "19ffff"),
    (
        ExtendPCRRequest(16, b"\xab\xcd"),
        "a1" + EXTEND_PCR + "a2" + INDEX + "10" + DATA + "42abcd",
    ),
    (ExtendPCRRequest(31, b""), "a1" + EXTEND_PCR + "a2" + INDEX + "181f" + DATA + "40"),
    (LockPCRRequest(16), "a1" + LOCK_PCR + "a1" + INDEX + "10"),
    (LockPCRsRequest(32), "a1" + LOCK_PCRS + "a1" + RANGE + "1820"),
    (
        # {"Attestation": {"user_data": null, "nonce": h'01', "public_key": null}}
        AttestationRequest(nonce=b"\x01"),
        "a1 6b 4174746573746174696f6e a3 69 757365725f64617461 f6 65 6e6f6e6365 41 01"
        " 6a 7075626c69635f6b6579 f6",
    ),
    (
        AttestationRequest(),
        "a1" + ATTESTATION + "a3" + USER_DATA + "f6" + NONCE + "f6" + PUBLIC_KEY + "f6",
    ),
    (
        AttestationRequest(user_data=b"", nonce=None, public_key=b"\x30\x59"),
        "a1" + ATTESTATION + "a3" + USER_DATA + "40" + NONCE + "f6" + PUBLIC_KEY + "423059",
    ),
    (
        AttestationRequest(user_data=b"\x80" * 1024),
        "".join(
            ("a1", ATTESTATION, "a3", USER_DATA, "590400", LONG_80, NONCE, "f6", PUBLIC_KEY, "f6")
        ),
    ),
]

RESPONSE_VECTORS: list[tuple[Response, str]] = [
    (
        DescribePCRResponse(lock=True, data=bytes(48)),
        "a1" + DESCRIBE_PCR + "a2" + LOCK + "f5" + DATA + "5830" + "00" * 48,
    ),
    (
        DescribePCRResponse(lock=False, data=b"\x07" * 48),
        "a1" + DESCRIBE_PCR + "a2" + LOCK + "f4" + DATA + "5830" + "07" * 48,
    ),
    (ExtendPCRResponse(b"\x01" * 48), "a1" + EXTEND_PCR + "a1" + DATA + "5830" + "01" * 48),
    (LockPCRResponse(), LOCK_PCR),
    (LockPCRsResponse(), LOCK_PCRS),
    (
        DescribeNSMResponse(
            version_major=1,
            version_minor=0,
            version_patch=0,
            module_id="i-1",
            max_pcrs=32,
            locked_pcrs=(0, 1, 16),
            digest="SHA384",
        ),
        # Spaces are only for reading; bytes.fromhex ignores them.
        "a1" + DESCRIBE_NSM + " a7"
        " 6d 76657273696f6e5f6d616a6f72 01"  # "version_major": 1
        " 6d 76657273696f6e5f6d696e6f72 00"  # "version_minor": 0
        " 6d 76657273696f6e5f7061746368 00"  # "version_patch": 0
        " 69 6d6f64756c655f6964 63 692d31"  # "module_id": "i-1"
        " 68 6d61785f70637273 1820"  # "max_pcrs": 32
        " 6b 6c6f636b65645f70637273 83 00 01 10"  # "locked_pcrs": [0, 1, 16]
        " 66 646967657374 66 534841333834",  # "digest": "SHA384"
    ),
    (
        AttestationResponse(bytes.fromhex("8444a1013822")),
        "a1" + ATTESTATION + "a1" + DOCUMENT + "46" + "8444a1013822",
    ),
    (GetRandomResponse(b"\x01\x02"), "a1" + GET_RANDOM + "a1" + RANDOM + "420102"),
    (ErrorResponse("InvalidArgument"), "a1" + ERROR + "6f" + "496e76616c6964417267756d656e74"),
    (ErrorResponse("InputTooLarge"), "a1" + ERROR + "6d" + "496e707574546f6f4c61726765"),
    (ErrorResponse("Success"), "a1" + ERROR + "67" + "53756363657373"),
]


def _id(vector: tuple[Any, str]) -> str:
    return type(vector[0]).__name__


@pytest.mark.parametrize("vector", REQUEST_VECTORS, ids=_id)
def test_request_encodes_to_the_hand_derived_bytes(vector: tuple[Request, str]) -> None:
    request, hex_bytes = vector
    assert encode_request(request) == bytes.fromhex(hex_bytes)


@pytest.mark.parametrize("vector", REQUEST_VECTORS, ids=_id)
def test_request_parses_from_the_hand_derived_bytes(vector: tuple[Request, str]) -> None:
    request, hex_bytes = vector
    assert parse_request(bytes.fromhex(hex_bytes)) == request


@pytest.mark.parametrize("vector", RESPONSE_VECTORS, ids=_id)
def test_response_encodes_to_the_hand_derived_bytes(vector: tuple[Response, str]) -> None:
    response, hex_bytes = vector
    assert encode_response(response) == bytes.fromhex(hex_bytes)


@pytest.mark.parametrize("vector", RESPONSE_VECTORS, ids=_id)
def test_response_parses_from_the_hand_derived_bytes(vector: tuple[Response, str]) -> None:
    response, hex_bytes = vector
    assert parse_response(bytes.fromhex(hex_bytes)) == response


def test_describe_nsm_response_keeps_locked_pcrs_as_a_sorted_set() -> None:
    response = DescribeNSMResponse(1, 0, 0, "m", 32, (16, 0, 16, 1), "SHA384")
    assert response.locked_pcrs == (0, 1, 16)


# --- round trips ----------------------------------------------------------------------------

u16 = st.integers(min_value=0, max_value=0xFFFF)
small_bytes = st.binary(max_size=1024)
optional_bytes = st.none() | small_bytes

requests: st.SearchStrategy[Request] = st.one_of(
    st.builds(DescribePCRRequest, u16),
    st.builds(ExtendPCRRequest, u16, small_bytes),
    st.builds(LockPCRRequest, u16),
    st.builds(LockPCRsRequest, u16),
    st.just(DescribeNSMRequest()),
    st.builds(AttestationRequest, optional_bytes, optional_bytes, optional_bytes),
    st.just(GetRandomRequest()),
)

responses: st.SearchStrategy[Response] = st.one_of(
    st.builds(DescribePCRResponse, st.booleans(), small_bytes),
    st.builds(ExtendPCRResponse, small_bytes),
    st.just(LockPCRResponse()),
    st.just(LockPCRsResponse()),
    st.builds(
        DescribeNSMResponse,
        u16,
        u16,
        u16,
        st.text(max_size=64),
        u16,
        st.lists(u16, max_size=40).map(tuple),
        st.sampled_from(DIGESTS),
    ),
    st.builds(AttestationResponse, st.binary(max_size=8192)),
    st.builds(GetRandomResponse, small_bytes),
    st.builds(ErrorResponse, st.sampled_from(ERROR_CODES)),
)


@given(requests)
def test_requests_round_trip(request: Request) -> None:
    data = encode_request(request)
    assert parse_request(data) == request
    assert encode_request(parse_request(data)) == data


@given(responses)
def test_responses_round_trip(response: Response) -> None:
    data = encode_response(response)
    assert parse_response(data) == response
    assert encode_response(parse_response(data)) == data


# --- malformed input ------------------------------------------------------------------------


def _cbor(item: Any) -> bytes:
    return bytes(cbor2.dumps(item))


MALFORMED_REQUESTS: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("not CBOR", b"\xff"),
    ("truncated", bytes.fromhex("a1" + LOCK_PCR + "a1" + INDEX)),
    ("trailing bytes", bytes.fromhex(GET_RANDOM + "00")),
    ("unknown unit variant", _cbor("Reboot")),
    ("unknown struct variant", _cbor({"Reboot": {}})),
    ("response variant as request", _cbor({"Attestation": {"document": b"x"}})),
    ("integer", _cbor(7)),
    ("array", _cbor(["DescribePCR", {"index": 1}])),
    ("two variants", _cbor({"LockPCR": {"index": 16}, "GetRandom": None})),
    ("non-text variant key", _cbor({1: {"index": 16}})),
    ("unit variant as a map", _cbor({"DescribeNSM": None})),
    ("unit variant with empty fields", _cbor({"GetRandom": {}})),
    ("struct variant as a bare string", _cbor("DescribePCR")),
    ("fields as an array", _cbor({"DescribePCR": [3]})),
    ("missing field", _cbor({"ExtendPCR": {"index": 16}})),
    ("unknown field", _cbor({"DescribePCR": {"index": 3, "bank": 0}})),
    ("negative index", _cbor({"DescribePCR": {"index": -1}})),
    ("index above u16", _cbor({"DescribePCR": {"index": 65536}})),
    ("huge index", _cbor({"LockPCR": {"index": 2**64}})),
    ("boolean index", _cbor({"LockPCR": {"index": True}})),
    ("text index", _cbor({"LockPCR": {"index": "3"}})),
    ("float index", _cbor({"LockPCR": {"index": 3.0}})),
    ("null range", _cbor({"LockPCRs": {"range": None}})),
    ("text data", _cbor({"ExtendPCR": {"index": 16, "data": "abc"}})),
    ("array data", _cbor({"ExtendPCR": {"index": 16, "data": [1, 2]}})),
    (
        "text nonce",
        _cbor({"Attestation": {"user_data": None, "nonce": "n", "public_key": None}}),
    ),
    ("attestation missing fields", _cbor({"Attestation": {"nonce": None}})),
    (
        "duplicate field",
        bytes.fromhex("a1" + LOCK_PCR + "a2" + INDEX + "01" + INDEX + "02"),
    ),
    ("indefinite-length map", bytes.fromhex("bf" + GET_RANDOM + "f6ff")),
    ("too large for the device", _cbor({"ExtendPCR": {"index": 16, "data": bytes(4100)}})),
]

MALFORMED_RESPONSES: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("not CBOR", b"\x1c"),
    ("unknown variant", _cbor({"Sealed": {"data": b""}})),
    ("request variant as response", _cbor("GetRandom")),
    ("unit LockPCR as a map", _cbor({"LockPCR": None})),
    ("error without a code", _cbor("Error")),
    ("unknown error code", _cbor({"Error": "Busy"})),
    ("error code as a number", _cbor({"Error": 1})),
    ("error code as a map", _cbor({"Error": {"code": "InvalidIndex"}})),
    ("lock as an integer", _cbor({"DescribePCR": {"lock": 1, "data": b""}})),
    ("document as text", _cbor({"Attestation": {"document": "8444"}})),
    ("document missing", _cbor({"Attestation": {}})),
    ("random as null", _cbor({"GetRandom": {"random": None}})),
    (
        "locked_pcrs not ascending",
        _cbor(
            {
                "DescribeNSM": {
                    "version_major": 1,
                    "version_minor": 0,
                    "version_patch": 0,
                    "module_id": "m",
                    "max_pcrs": 32,
                    "locked_pcrs": [1, 0],
                    "digest": "SHA384",
                }
            }
        ),
    ),
    (
        "locked_pcrs duplicate",
        _cbor(
            {
                "DescribeNSM": {
                    "version_major": 1,
                    "version_minor": 0,
                    "version_patch": 0,
                    "module_id": "m",
                    "max_pcrs": 32,
                    "locked_pcrs": [1, 1],
                    "digest": "SHA384",
                }
            }
        ),
    ),
    (
        "unknown digest",
        _cbor(
            {
                "DescribeNSM": {
                    "version_major": 1,
                    "version_minor": 0,
                    "version_patch": 0,
                    "module_id": "m",
                    "max_pcrs": 32,
                    "locked_pcrs": [],
                    "digest": "MD5",
                }
            }
        ),
    ),
    (
        "version above u16",
        _cbor(
            {
                "DescribeNSM": {
                    "version_major": 70000,
                    "version_minor": 0,
                    "version_patch": 0,
                    "module_id": "m",
                    "max_pcrs": 32,
                    "locked_pcrs": [],
                    "digest": "SHA384",
                }
            }
        ),
    ),
    (
        "module_id as bytes",
        _cbor(
            {
                "DescribeNSM": {
                    "version_major": 1,
                    "version_minor": 0,
                    "version_patch": 0,
                    "module_id": b"m",
                    "max_pcrs": 32,
                    "locked_pcrs": [],
                    "digest": "SHA384",
                }
            }
        ),
    ),
    (
        "larger than the response buffer",
        _cbor({"Attestation": {"document": bytes(RESPONSE_BUFFER_BYTES)}}),
    ),
]


@pytest.mark.parametrize(
    "data", [d for _, d in MALFORMED_REQUESTS], ids=[n for n, _ in MALFORMED_REQUESTS]
)
def test_rejects_malformed_request(data: bytes) -> None:
    with pytest.raises(FormatError):
        parse_request(data)


@pytest.mark.parametrize(
    "data", [d for _, d in MALFORMED_RESPONSES], ids=[n for n, _ in MALFORMED_RESPONSES]
)
def test_rejects_malformed_response(data: bytes) -> None:
    with pytest.raises(FormatError):
        parse_response(data)


def test_error_messages_name_the_problem() -> None:
    with pytest.raises(FormatError, match="unknown NSM request 'Reboot'"):
        parse_request(_cbor("Reboot"))
    with pytest.raises(FormatError, match=r"'index' is 65536; a u16 is 0\.\.65535"):
        parse_request(_cbor({"DescribePCR": {"index": 65536}}))
    with pytest.raises(FormatError, match="lacks field"):
        parse_request(_cbor({"ExtendPCR": {"index": 16}}))
    with pytest.raises(FormatError, match=f"at most {MAX_REQUEST_BYTES}"):
        parse_request(bytes(MAX_REQUEST_BYTES + 1))


@given(st.binary(max_size=256))
def test_arbitrary_bytes_raise_only_format_error(data: bytes) -> None:
    for parse in (parse_request, parse_response):
        with contextlib.suppress(FormatError):
            parse(data)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text() | st.binary(),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
        ),
        max_leaves=12,
    )
)
def test_arbitrary_cbor_items_raise_only_format_error(item: Any) -> None:
    data = _cbor(item)
    for parse in (parse_request, parse_response):
        with contextlib.suppress(FormatError):
            parse(data)


# --- constructor misuse is a bug, not a FormatError ------------------------------------------


def test_constructors_refuse_out_of_range_values() -> None:
    with pytest.raises(ValueError, match=r"0\.\.65535"):
        DescribePCRRequest(65536)
    with pytest.raises(TypeError):
        LockPCRRequest(True)
    with pytest.raises(TypeError):
        AttestationRequest(nonce="text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown NSM error code"):
        ErrorResponse("Busy")
    with pytest.raises(ValueError, match="digest"):
        DescribeNSMResponse(1, 0, 0, "m", 32, (), "MD5")
