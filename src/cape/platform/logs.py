"""Structured logs: ``log_format = "json"`` writes one JSON object per line to stderr.

Each line has ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``node`` (the node's name, so a
cluster's logs can be merged) and ``message``, plus ``error`` with the exception's type and
text when there is one (no traceback frames: their locals are never printed either way). The
messages are the same as the text format's: the host logs only metadata, never user data.
"""

from __future__ import annotations

import datetime as dt
import json
import logging

__all__ = ["JsonFormatter"]


class JsonFormatter(logging.Formatter):
    """A log record as one JSON line."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "node": self.node,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            line["error"] = f"{type(error).__name__}: {error}"
        return json.dumps(line, ensure_ascii=False)
