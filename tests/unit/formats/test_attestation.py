"""The Nitro document format: real samples parse and re-encode byte for byte; each row of
nitro-attestation.md §3.2 has a vector that breaks exactly that row."""

from __future__ import annotations

import base64
import contextlib
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cape.errors import CapeError, FormatError
from cape.formats.attestation import (
    MAX_DOCUMENT_BYTES,
    AttestationDocument,
    decode_document_bytes,
    encode_attestation_payload,
    parse_attestation,
    parse_attestation_payload,
)
from cape.formats.cose import CoseSign1, encode_cose_sign1, es384_protected_header
from tests.samples import SAMPLE_IDS, SAMPLES, Sample, read_sample, requires_samples


def valid_fields() -> dict[str, Any]:
    return {
        "module_id": "i-0123456789abcdef0-enc0123456789abcdef",
        "digest": "SHA384",
        "timestamp": 1_700_000_000_000,
        "pcrs": {i: bytes([i]) * 48 for i in range(16)},
        "certificate": b"\x30" * 600,
        "cabundle": [b"\x30" * 500, b"\x30" * 700],
        "public_key": b"\x01" * 32,
        "user_data": b'{"func_checksum": "x"}',
        "nonce": b"0123456789abcdef",
    }


def encode(fields: dict[str, Any]) -> bytes:
    return bytes(cbor2.dumps(fields))


def test_valid_synthetic_payload_parses_and_round_trips() -> None:
    payload = encode(valid_fields())
    doc = parse_attestation_payload(payload)
    assert doc.module_id.startswith("i-")
    assert doc.pcrs[3] == b"\x03" * 48
    assert encode_attestation_payload(doc) == payload


def test_optional_fields_may_be_null() -> None:
    fields = valid_fields() | {"public_key": None, "user_data": None, "nonce": None}
    doc = parse_attestation_payload(encode(fields))
    assert (doc.public_key, doc.user_data, doc.nonce) == (None, None, None)
    assert encode_attestation_payload(doc) == encode(fields)


# One row of the spec table per case: (field, bad value, words expected in the message).
INVALID_ROWS: list[tuple[str, Any, str]] = [
    ("module_id", "", "module_id"),
    ("module_id", b"i-abc", "module_id"),
    ("digest", "SHA256", "digest"),
    ("digest", None, "digest"),
    ("timestamp", 0, "timestamp"),
    ("timestamp", -5, "timestamp"),
    ("timestamp", 1.5, "timestamp"),
    ("timestamp", True, "timestamp"),
    ("pcrs", {}, "pcrs"),
    ("pcrs", {i: b"\x00" * 48 for i in range(33)}, "pcrs"),
    ("pcrs", {32: b"\x00" * 48}, "outside"),
    ("pcrs", {-1: b"\x00" * 48}, "outside"),
    ("pcrs", {"0": b"\x00" * 48}, "outside"),
    ("pcrs", {0: b"\x00" * 47}, "PCR0"),
    ("pcrs", {0: "00" * 48}, "PCR0"),
    ("pcrs", [b"\x00" * 48], "pcrs"),
    ("certificate", b"", "certificate"),
    ("certificate", b"\x30" * 1025, "certificate"),
    ("certificate", None, "certificate"),
    ("cabundle", [], "cabundle"),
    ("cabundle", b"\x30" * 10, "cabundle"),
    ("cabundle", [b"\x30" * 10, b""], r"cabundle\[1\]"),
    ("cabundle", [b"\x30" * 1025], r"cabundle\[0\]"),
    ("public_key", b"", "public_key"),
    ("public_key", b"\x01" * 1025, "public_key"),
    ("user_data", b"\x01" * 1025, "user_data"),
    ("user_data", "text", "user_data"),
    ("nonce", b"\x01" * 1025, "nonce"),
    ("nonce", 7, "nonce"),
]


@pytest.mark.parametrize(("field", "value", "words"), INVALID_ROWS)
def test_each_spec_row_is_enforced(field: str, value: Any, words: str) -> None:
    fields = valid_fields() | {field: value}
    with pytest.raises(FormatError, match=words):
        parse_attestation_payload(encode(fields))


def test_limits_accept_their_maximum() -> None:
    fields = valid_fields() | {
        "certificate": b"\x30" * 1024,
        "public_key": b"\x01" * 1024,
        "user_data": b"\x01" * 1024,
        "nonce": b"\x01" * 1024,
        "pcrs": {i: b"\x00" * (32, 48, 64)[i % 3] for i in range(32)},
    }
    doc = parse_attestation_payload(encode(fields))
    assert len(doc.pcrs) == 32
    assert doc.user_data is not None and len(doc.user_data) == 1024


@pytest.mark.parametrize("field", list(valid_fields()))
def test_missing_field_is_refused(field: str) -> None:
    fields = valid_fields()
    del fields[field]
    with pytest.raises(FormatError, match=f"lacks field.*{field}"):
        parse_attestation_payload(encode(fields))


def test_unknown_field_is_refused() -> None:
    with pytest.raises(FormatError, match="unknown field"):
        parse_attestation_payload(encode(valid_fields() | {"extra": 1}))


def test_payload_size_limit() -> None:
    with pytest.raises(FormatError, match="payload"):
        parse_attestation_payload(b"")
    with pytest.raises(FormatError, match="payload"):
        parse_attestation_payload(b"\xa0" + b"\x00" * 16384)


def test_duplicate_keys_are_refused() -> None:
    # {"digest": "SHA384", "digest": "SHA384", ...}: two parsers could disagree on which wins.
    payload = encode(valid_fields())
    duplicated = b"\xaa" + payload[1:] + cbor2.dumps("nonce") + cbor2.dumps(b"other")
    with pytest.raises(FormatError, match="Duplicate"):
        parse_attestation_payload(duplicated)


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(FormatError, match="trailing"):
        parse_attestation_payload(encode(valid_fields()) + b"\x00")


def test_indefinite_length_is_refused() -> None:
    payload = encode(valid_fields())
    indefinite = b"\xbf" + payload[1:] + b"\xff"
    with pytest.raises(FormatError, match="indefinite"):
        parse_attestation_payload(indefinite)


def signed(
    payload: bytes, *, protected: bytes | None = None, signature: bytes = b"\x00" * 96
) -> bytes:
    header = es384_protected_header() if protected is None else protected
    return encode_cose_sign1(CoseSign1(header, {}, payload, signature))


def test_envelope_requires_es384_and_raw_signature() -> None:
    payload = encode(valid_fields())
    assert parse_attestation(signed(payload)).document.module_id
    with pytest.raises(FormatError, match="ES384"):
        parse_attestation(signed(payload, protected=cbor2.dumps({1: -7})))
    with pytest.raises(FormatError, match="ES384"):
        parse_attestation(signed(payload, protected=b""))
    with pytest.raises(FormatError, match="96 bytes"):
        parse_attestation(signed(payload, signature=b"\x00" * 104))


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (cbor2.dumps([b"", {}, b""]), "array of 4"),
        (cbor2.dumps({"a": 1}), "array of 4"),
        (cbor2.dumps([{1: -35}, {}, b"x", b"s"]), "protected"),
        (cbor2.dumps([b"\xa0", None, b"x", b"s"]), "unprotected"),
        (cbor2.dumps([b"\xa0", {}, None, b"s"]), "detached"),
        (cbor2.dumps([b"\xa0", {}, b"x", "s"]), "signature"),
        (cbor2.dumps(cbor2.CBORTag(98, [b"\xa0", {}, b"x", b"s"])), "tag 98"),
        (b"\x84\x44", "not valid CBOR"),
        (b"", "not valid CBOR"),
    ],
)
def test_envelope_shape_errors(body: bytes, words: str) -> None:
    with pytest.raises(FormatError, match=words):
        parse_attestation(body)


def test_oversized_document_is_refused_before_decoding() -> None:
    with pytest.raises(FormatError, match="at most"):
        parse_attestation(b"\x84" + b"\x00" * MAX_DOCUMENT_BYTES)


@settings(max_examples=300)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_only_raise_format_error(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        parse_attestation(data)


@settings(max_examples=200)
@given(
    st.builds(
        AttestationDocument,
        module_id=st.text(min_size=1, max_size=64),
        timestamp=st.integers(min_value=1, max_value=2**64 - 1),
        pcrs=st.dictionaries(
            st.integers(0, 31),
            st.sampled_from([32, 48, 64]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
            min_size=1,
            max_size=32,
        ),
        certificate=st.binary(min_size=1, max_size=1024),
        cabundle=st.lists(st.binary(min_size=1, max_size=1024), min_size=1, max_size=4),
        public_key=st.none() | st.binary(min_size=1, max_size=1024),
        user_data=st.none() | st.binary(max_size=1024),
        nonce=st.none() | st.binary(max_size=1024),
    )
)
def test_encode_parse_round_trip(doc: AttestationDocument) -> None:
    assert parse_attestation_payload(encode_attestation_payload(doc)) == doc


def test_decode_document_bytes_accepts_raw_and_base64() -> None:
    raw = signed(encode(valid_fields()))
    assert decode_document_bytes(raw) == raw
    text = base64.b64encode(raw)
    assert decode_document_bytes(b"  " + text[:40] + b"\n" + text[40:] + b"\n") == raw
    tagged = encode_cose_sign1(parse_attestation(raw).cose, tagged=True)
    assert decode_document_bytes(tagged) == tagged
    assert parse_attestation(tagged).document == parse_attestation(raw).document
    with pytest.raises(FormatError, match="base64"):
        decode_document_bytes(b"not base64 at all!")
    with pytest.raises(FormatError, match="empty"):
        decode_document_bytes(b" \n")


def test_debug_detection_uses_pcr0_only() -> None:
    pcrs = {i: b"\x07" * 48 for i in range(16)}
    base = valid_fields()
    production = parse_attestation_payload(encode(base | {"pcrs": pcrs}))
    assert not production.is_debug
    debug_pcrs = pcrs | {0: b"\x00" * 48, 1: b"\x00" * 48, 2: b"\x00" * 48}
    assert parse_attestation_payload(encode(base | {"pcrs": debug_pcrs})).is_debug
    no_pcr0 = {i: v for i, v in pcrs.items() if i != 0}
    assert parse_attestation_payload(encode(base | {"pcrs": no_pcr0})).is_debug


# --- the real AWS documents -------------------------------------------------------------


@requires_samples
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_real_documents_parse_with_documented_facts(sample: Sample) -> None:
    raw = read_sample(sample)
    assert raw[:8] == bytes.fromhex("8444a10138 22a059".replace(" ", ""))  # untagged, ES384
    parsed = parse_attestation(raw)
    doc = parsed.document
    assert doc.module_id == sample.module_id
    assert doc.timestamp == sample.timestamp_ms
    assert sorted(doc.pcrs) == list(range(16))
    assert all(len(v) == 48 for v in doc.pcrs.values())
    assert len(doc.cabundle) == 4
    assert doc.is_debug == sample.debug
    if sample.debug:
        assert not any(doc.pcrs[0] + doc.pcrs[1] + doc.pcrs[2])
        assert any(doc.pcrs[4])  # debug mode keeps PCR4
    # Payload keys on the wire are in NSM order.
    assert list(cbor2.loads(parsed.cose.payload)) == [
        "module_id",
        "digest",
        "timestamp",
        "pcrs",
        "certificate",
        "cabundle",
        "public_key",
        "user_data",
        "nonce",
    ]


@requires_samples
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_real_documents_re_encode_byte_for_byte(sample: Sample) -> None:
    raw = read_sample(sample)
    parsed = parse_attestation(raw)
    assert encode_attestation_payload(parsed.document) == parsed.cose.payload
    assert encode_cose_sign1(parsed.cose) == raw


@requires_samples
def test_real_document_optional_field_shapes() -> None:
    blocky, _, anjuna = (parse_attestation(read_sample(s)).document for s in SAMPLES)
    assert blocky.public_key == blocky.user_data == blocky.nonce == b"\x01" * 1024
    assert anjuna.public_key is not None and len(anjuna.public_key) == 294
    assert anjuna.user_data is None and anjuna.nonce is None


def test_errors_are_cape_errors() -> None:
    assert issubclass(FormatError, CapeError)


@pytest.mark.parametrize(
    "variant",
    [
        "bignum-timestamp",
        "non-minimal-pcr-index",
        "key-order",
        "pcr-order",
    ],
)
def test_only_the_canonical_nsm_encoding_parses(variant: str) -> None:
    """Two encodings of one document would let two parsers disagree; only NSM's is accepted."""
    fields = valid_fields()
    if variant == "bignum-timestamp":
        fields["timestamp"] = cbor2.CBORTag(2, fields["timestamp"].to_bytes(8, "big"))
        payload = encode(fields)
    elif variant == "non-minimal-pcr-index":
        payload = encode(fields)
        needle = b"\x00\x58\x30"  # PCR0: key 0, then bstr(48)
        assert payload.count(needle) >= 1
        payload = payload.replace(needle, b"\x18\x00\x58\x30", 1)
    elif variant == "key-order":
        payload = encode(dict(reversed(list(fields.items()))))
    else:
        fields["pcrs"] = dict(reversed(list(fields["pcrs"].items())))
        payload = encode(fields)
    with pytest.raises(FormatError, match="canonical"):
        parse_attestation_payload(payload)
