"""Burns CPU forever."""


def cape_handler(data: bytes) -> bytes:
    n = 0
    while True:
        n += 1
