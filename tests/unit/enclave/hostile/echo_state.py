"""Echo, plus a per-session counter; module-level code records each import in the cwd."""

from pathlib import Path

calls = 0
with Path("imports.log").open("a") as log:
    log.write("imported\n")


def cape_handler(data: bytes) -> bytes:
    global calls
    calls += 1
    if data == b"count":
        imports = Path("imports.log").read_text().count("imported")
        return f"{calls} {imports}".encode()
    return data
