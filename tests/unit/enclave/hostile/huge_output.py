"""Returns as many bytes as the input asks for."""


def cape_handler(data: bytes) -> bytes:
    return b"x" * int(data)
