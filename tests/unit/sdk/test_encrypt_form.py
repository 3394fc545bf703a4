"""``cape encrypt`` picks its form by the size of what it writes (issue 12, item 1)."""

from __future__ import annotations

import io

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from cape.crypto import envelope
from cape.sdk import encrypt


@pytest.fixture(scope="module")
def key() -> rsa.RSAPublicKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()


@pytest.mark.parametrize("size", [0, 1, 2, 3, 100, 1000, 4097])
def test_text_form_size_is_exact(key: rsa.RSAPublicKey, size: int) -> None:
    written = len(envelope.encrypt_text(b"x" * size, key)) + 1  # and the newline
    assert encrypt.text_form_size(size, key) == written


@pytest.mark.parametrize("limit", [1000, 1001, 1002, 1003, 5000, 1 << 20])
def test_the_largest_text_input_is_the_largest_that_fits(key: rsa.RSAPublicKey, limit: int) -> None:
    largest = encrypt.largest_text_input(limit, key)
    assert encrypt.text_form_size(largest, key) <= limit
    assert encrypt.text_form_size(largest + 1, key) > limit


def test_a_text_form_over_the_limit_is_written_streaming(key: rsa.RSAPublicKey) -> None:
    limit = 10_000
    fits = encrypt.largest_text_input(limit, key)
    for size, streaming in ((fits, False), (fits + 1, True)):
        out = io.BytesIO()
        result = encrypt.encrypt_stream_to(io.BytesIO(b"y" * size), out, key, text_limit=limit)
        assert result.streaming is streaming
        assert out.getvalue().startswith(b"cape-stream-v1:" if streaming else b"cape:")
        if not streaming:
            assert len(out.getvalue()) <= limit
    # Unknown size (stdin): decided after reading, the same way.
    out = io.BytesIO()
    result = encrypt.encrypt_stream_to(
        io.BufferedReader(io.BytesIO(b"y" * (fits + 1))), out, key, text_limit=limit
    )
    assert result.streaming


def test_a_limit_below_any_text_form_always_streams(key: rsa.RSAPublicKey) -> None:
    out = io.BytesIO()
    assert encrypt.encrypt_stream_to(io.BytesIO(b""), out, key, text_limit=10).streaming
