"""Signed key-service answers: every request field and the result are bound."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest

from cape.crypto.keyanswers import (
    AnswerSigner,
    identity_measurement,
    identity_pcr,
    load_identity_public_key,
    verify_answer,
)
from cape.errors import KeyAnswerError, KeyFormatError


def _request(**changes: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "op": "decrypt",
        "owner": "alice",
        "blob": b"wrapped",
        "document": b"doc",
        "challenge": os.urandom(16),
    }
    request.update(changes)
    return request


def test_an_answer_verifies_for_its_own_request_only() -> None:
    signer = AnswerSigner.generate()
    public = load_identity_public_key(signer.public_bytes)
    request = _request()
    signature = signer.sign(request, b"cms")
    verify_answer(public, request, b"cms", signature)
    # The host-visible routing id is not part of the statement.
    verify_answer(public, {**request, "rid": 7}, b"cms", signature)
    for name, value in [
        ("op", "generate_data_key"),
        ("owner", "bob"),
        ("blob", b"other"),
        ("document", b"other"),
        ("challenge", os.urandom(16)),
        ("create", True),
    ]:
        with pytest.raises(KeyAnswerError, match="does not verify"):
            verify_answer(public, {**request, name: value}, b"cms", signature)
    with pytest.raises(KeyAnswerError, match="does not verify"):
        verify_answer(public, request, b"other cms", signature)
    other = load_identity_public_key(AnswerSigner.generate().public_bytes)
    with pytest.raises(KeyAnswerError, match="does not verify"):
        verify_answer(other, request, b"cms", signature)


@pytest.mark.parametrize("signature", [None, b"", b"x" * 63, "sig"])
def test_a_missing_or_malformed_signature_is_refused(signature: object) -> None:
    public = load_identity_public_key(AnswerSigner.generate().public_bytes)
    with pytest.raises(KeyAnswerError, match="is not signed"):
        verify_answer(public, _request(), b"cms", signature)


def test_a_request_without_challenge_cannot_be_verified() -> None:
    signer = AnswerSigner.generate()
    request = _request()
    del request["challenge"]
    with pytest.raises(KeyAnswerError, match="without a challenge"):
        verify_answer(
            load_identity_public_key(signer.public_bytes),
            request,
            b"x",
            signer.sign(request, b"x"),
        )


@pytest.mark.parametrize("raw", [b"", b"\x00" * 31, b"\x00" * 33])
def test_identity_must_be_a_raw_ed25519_key(raw: bytes) -> None:
    with pytest.raises(KeyFormatError):
        load_identity_public_key(raw)


def test_identity_pcr_is_one_nsm_extension() -> None:
    public = AnswerSigner.generate().public_bytes
    measured = identity_measurement(public)
    assert identity_pcr(public) == hashlib.sha384(bytes(48) + measured).digest()
    assert identity_pcr(public) != identity_pcr(AnswerSigner.generate().public_bytes)
