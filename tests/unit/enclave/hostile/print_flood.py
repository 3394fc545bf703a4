"""Prints as many MiB as asked to stdout and stderr (half each), then returns."""

import os
import sys


def cape_handler(data: bytes) -> bytes:
    mib = int(data)
    chunk = "x" * (1 << 20)
    for _ in range(mib // 2):
        print(chunk)
        os.write(2, chunk.encode())
    print("done", file=sys.stderr)
    return b"done"
