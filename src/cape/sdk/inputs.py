"""What callers hand the SDK, checked and normalized: PCR pins, fingerprints, token strings or
files, function ids, a key document's user_data (re-exported by :mod:`cape.sdk.client`)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

from cape.errors import FormatError
from cape.sdk.function_ref import FunctionRef
from cape.verify.policy import pcr_allow_list

#: PCR pins as pycape takes them (``{"0": ["hex", …]}``) or as ``{0: [bytes, …]}``.
PcrPins = Mapping[int | str, Iterable[str | bytes]]
TOKEN_FILE_MAX: Final = 4096


def _pcr_pins(pcrs: PcrPins | None) -> dict[int, frozenset[bytes]]:
    if not pcrs:
        return {}
    pins: list[tuple[int, bytes]] = []
    for index, values in pcrs.items():
        try:
            number = int(index)
        except ValueError:
            raise FormatError(f"PCR index {index!r} is not a number") from None
        if isinstance(values, str | bytes):
            values = [values]
        for value in values:
            try:
                raw = bytes.fromhex(value) if isinstance(value, str) else bytes(value)
            except ValueError:
                raise FormatError(f"PCR{number} value {value!r} is not hex") from None
            pins.append((number, raw))
    try:
        return pcr_allow_list(pins)
    except ValueError as exc:
        raise FormatError(str(exc)) from None


def key_document_user_data(user_data: bytes | None) -> dict[str, Any]:
    """A stored key document's user_data as a JSON object (FormatError otherwise, however deep
    or malformed)."""
    try:
        parsed = json.loads(user_data or b"{}")
    except (ValueError, RecursionError):
        raise FormatError("the key document's user_data is not JSON") from None
    if not isinstance(parsed, dict):
        raise FormatError("the key document's user_data is not a JSON object")
    return parsed


def _function_id(text: str) -> str:
    ref = FunctionRef.parse(text)
    if ref.id is None:
        raise FormatError(f"{text!r} is a name; this needs the function's id (see `cape list`)")
    return ref.id


_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def normalize_fingerprint(text: str) -> str:
    """A SHA-256 fingerprint in any printed form: with or without ``sha256:``, colons or
    spaces, any case (``cape serve`` prints ``sha256:6b25…``) → 64 lower-case hex digits."""
    cleaned = re.sub(r"[\s:]", "", text.lower()).removeprefix("sha256")
    if not _FINGERPRINT.fullmatch(cleaned):
        raise FormatError(
            f"{text!r} is not a SHA-256 fingerprint (64 hex digits, as `cape serve` prints it: "
            "sha256:6b25…)"
        )
    return cleaned


def _load_token(token: str | os.PathLike[str]) -> str:
    """A token string, or the contents of a token file (pycape accepts both)."""
    if isinstance(token, os.PathLike) or (
        len(token) < TOKEN_FILE_MAX and "." not in token.strip("./") and Path(token).is_file()
    ):
        try:
            return Path(token).read_text().strip()
        except OSError as exc:
            raise FormatError(f"cannot read the token file {token}: {exc.strerror}") from None
    if not token.strip():
        raise FormatError("the token is empty")
    return token.strip()
