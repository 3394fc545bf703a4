"""Allocates 10 GB at import."""

block = bytearray(10 << 30)


def cape_handler(data: bytes) -> bytes:
    return data
