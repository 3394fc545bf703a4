"""Fills every writable place it is given with 1 MiB blocks, up to a cap per place.

Input (JSON): ``{"paths": [...], "cap_mib": N}``. Reports, per path, the bytes written and
the errno that stopped it (0: the cap, not the file system).
"""

import json
import os


def _fill(path: str, cap: int) -> list[int]:
    block, written = b"\xa5" * (1 << 20), 0
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        return [0, exc.errno or -1]
    try:
        while written < cap:
            written += os.write(fd, block)
    except OSError as exc:
        return [written, exc.errno or -1]
    finally:
        os.close(fd)
    return [written, 0]


def cape_handler(data: bytes) -> bytes:
    request = json.loads(data)
    cap = request["cap_mib"] << 20
    return json.dumps({path: _fill(path, cap) for path in request["paths"]}).encode()
