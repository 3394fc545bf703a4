"""Returns a value of the type the input names, to exercise the handler contract."""

from typing import Any


def cape_handler(data: bytes) -> Any:
    values: dict[bytes, Any] = {
        b"bytes": b"\x00\xffraw",
        b"str": "h\u00e9llo",
        b"none": None,
        b"int": 42,
        b"tuple": (1, "a"),
        b"dict": {"k": 1.5},
        b"bytearray": bytearray(b"ba"),
    }
    return values[data]
