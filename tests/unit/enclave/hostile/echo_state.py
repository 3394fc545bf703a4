"""Echo, plus a per-session counter; module-level code records each import in scratch (/tmp)."""

import os
from pathlib import Path

calls = 0
with Path("/tmp/imports.log").open("a") as log:
    log.write("imported\n")


def cape_handler(data: bytes) -> bytes:
    global calls
    calls += 1
    if data == b"count":
        imports = Path("/tmp/imports.log").read_text().count("imported")
        return f"{calls} {imports}".encode()
    if data == b"cwd":
        return os.getcwd().encode()
    return data
