"""Writes a marker file at import; its path is in marker_path.txt next to this file."""

from pathlib import Path

Path(Path(__file__).with_name("marker_path.txt").read_text()).write_text("ran")


def cape_handler(data: bytes) -> bytes:
    return b"ran"
