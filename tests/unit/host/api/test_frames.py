"""Strict JSON in session frames: size, depth, duplicate keys and constants are refused as
FormatError (close 1008), never as an internal error."""

from __future__ import annotations

import pytest

from cape.errors import FormatError
from cape.host.api.errors import BodyTooLargeError, close_code_for
from cape.host.api.frames import MAX_JSON_DEPTH, MAX_TEXT_FRAME_BYTES, json_message, strict_json


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[" * 30_000 + "]" * 30_000, "nests"),
        ("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "nests more than"),
        ('{"a": 1, "a": 2}', "duplicate key"),
        ('{"a": NaN}', "NaN is not allowed"),
        ('{"a": -Infinity}', "-Infinity is not allowed"),
        ("{", "not JSON"),
    ],
)
def test_loose_or_deep_json_is_a_format_error(text: str, expected: str) -> None:
    with pytest.raises(FormatError, match=expected) as refused:
        strict_json(text, "nonce")
    assert close_code_for(refused.value)[0] == 1008


def test_depth_up_to_the_limit_and_sizes_up_to_64_kib_pass() -> None:
    deepest = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert strict_json(deepest, "nonce") is not None
    padded = '{"message": {"pad": "' + "x" * (MAX_TEXT_FRAME_BYTES - 40) + '"}}'
    assert json_message(padded, "nonce")["pad"]
    with pytest.raises(BodyTooLargeError) as refused:
        strict_json(" " * (MAX_TEXT_FRAME_BYTES + 1), "nonce")
    assert close_code_for(refused.value)[0] == 1009


def test_the_frame_must_be_a_message_object() -> None:
    with pytest.raises(FormatError, match="binary frame"):
        json_message(b"{}", "nonce")
    with pytest.raises(FormatError, match='"message"'):
        json_message('{"message": []}', "nonce")
