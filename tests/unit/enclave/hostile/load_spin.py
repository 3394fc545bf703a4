"""Never finishes importing."""

while True:
    pass


def cape_handler(data: bytes) -> bytes:
    return data
