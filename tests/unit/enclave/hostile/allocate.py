"""Tries to allocate 10 GB."""


def cape_handler(data: bytes) -> bytes:
    if data == b"small":
        return bytes(len(bytearray(1 << 20)))[:2]
    block = bytearray(10 << 30)
    return bytes(len(block))
