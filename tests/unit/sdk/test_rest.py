"""REST refusals become one-line RequestRefusedErrors, whatever the error body holds."""

from __future__ import annotations

import httpx
import pytest

from cape.errors import RequestRefusedError
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
