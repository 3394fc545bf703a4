"""Raises ValueError("boom") on b"boom", echoes otherwise."""


def cape_handler(data: bytes) -> bytes:
    if data == b"boom":
        raise ValueError("boom")
    if data == b"exit":
        raise SystemExit(7)
    return data
