"""Tries to create a file at each path it is given; reports the outcome per path (JSON)."""

import json


def _try(path: str) -> str:
    try:
        with open(path, "w") as handle:
            handle.write("x")
    except OSError as exc:
        return f"error {exc.errno}"
    return "written"


def cape_handler(data: bytes) -> bytes:
    return json.dumps({path: _try(path) for path in json.loads(data)}).encode()
