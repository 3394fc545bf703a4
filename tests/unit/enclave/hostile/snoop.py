"""Tries to list or read each path it is given; reports the outcome per path (JSON)."""

import json
import os


def _try(path: str) -> str:
    try:
        if os.path.isdir(path):
            return f"listed {len(os.listdir(path))} entries"
        with open(path, "rb") as handle:
            return f"read {len(handle.read(64))} bytes"
    except OSError as exc:
        return f"error {exc.errno}"


def cape_handler(data: bytes) -> bytes:
    return json.dumps({path: _try(path) for path in json.loads(data)}).encode()
