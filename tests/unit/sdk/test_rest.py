"""REST refusals become one-line RequestRefusedErrors, whatever the error body holds."""

from __future__ import annotations

import httpx
import pytest

from cape.errors import FormatError, RequestRefusedError
from cape.sdk.client import key_document_user_data
from tests.unit.sdk.test_bundle import rest_client


@pytest.mark.parametrize(
    ("status", "body", "words"),
    [
        (401, b'{"error": "token is expired"}', "token is expired (HTTP 401); log in again"),
        (404, b'{"message": "no such function"}', "no such function (HTTP 404)"),
        (500, b"plain text failure", "plain text failure (HTTP 500)"),
        (403, b"[" * 100_000, "(HTTP 403)"),  # deep JSON: no RecursionError
        (400, b'["not", "an", "object"]', '["not", "an", "object"] (HTTP 400)'),
        (502, b"", "request failed (HTTP 502)"),
    ],
)
def test_refusals_are_typed_and_one_line(status: int, body: bytes, words: str) -> None:
    client = rest_client(lambda _request: httpx.Response(status, content=body))
    with client, pytest.raises(RequestRefusedError) as refused:
        client.request("GET", "/v1/functions")
    assert refused.value.status == status
    assert words in str(refused.value) and "\n" not in str(refused.value)
    assert len(str(refused.value)) < 400


def test_long_error_texts_are_capped() -> None:
    body = b'{"error": "' + b"x" * 5000 + b'"}'
    client = rest_client(lambda _request: httpx.Response(400, content=body))
    with client, pytest.raises(RequestRefusedError) as refused:
        client.request("GET", "/v1/functions")
    assert len(str(refused.value)) < 400


@pytest.mark.parametrize(
    "body", [b"not json", b"[" * 100_000, b'{"truncated": ', b"\xff\xfe"], ids=repr
)
def test_success_labelled_json_that_is_not_is_a_format_error(body: bytes) -> None:
    """A 200 whose body claims JSON but is not (or is nested past the parser) is one FormatError
    naming the call, not a ValueError or RecursionError."""
    client = rest_client(
        lambda _request: httpx.Response(
            200, content=body, headers={"content-type": "application/json"}
        )
    )
    with client, pytest.raises(FormatError, match=r"^the server's answer to GET /v1/functions"):
        client.request("GET", "/v1/functions")


@pytest.mark.parametrize(
    ("user_data", "match"),
    [
        (b"[" * 100_000, "is not JSON$"),
        (b"\xff\xfe", "is not JSON$"),
        (b"func_checksum=abc", "is not JSON$"),
        (b'["key"]', "not a JSON object$"),
        (b"null", "not a JSON object$"),
    ],
    ids=["deep", "not-utf8", "not-json", "array", "null"],
)
def test_key_document_user_data_that_is_not_an_object_is_a_format_error(
    user_data: bytes, match: str
) -> None:
    with pytest.raises(FormatError, match=match):
        key_document_user_data(user_data)


def test_key_document_user_data_object_and_empty() -> None:
    assert key_document_user_data(b'{"key": "k"}') == {"key": "k"}
    assert key_document_user_data(b"") == {} and key_document_user_data(None) == {}
