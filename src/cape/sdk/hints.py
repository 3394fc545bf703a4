"""What to do next, for error messages that otherwise leave a user stuck.

:func:`hint` maps an error's text to one short suggestion (or ``None``); :func:`add_hint`
appends it to a :class:`~cape.errors.CapeError` in place, keeping its type. The SDK applies it
to what a session or a request raises, and the CLI to every error line it prints.
"""

from __future__ import annotations

import re
from typing import Final, TypeVar

__all__ = ["add_hint", "hint"]

E = TypeVar("E", bound=BaseException)

_MISSING_MODULE: Final = re.compile(r"No module named '([A-Za-z0-9_]+)")
_TLS: Final = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed")
_INPUT_LIMIT: Final = re.compile(r"\binput\b[^;]*exceeds the limit of", re.IGNORECASE)
_BUNDLE_LIMIT: Final = re.compile(r"\bbundle\b[^;]*exceeds the limit of", re.IGNORECASE)


def hint(message: str) -> str | None:
    """A suggestion for ``message``, or ``None`` when there is nothing useful to add."""
    if any(marker in message for marker in _TLS):
        return (
            "if the server uses its own CA, trust it with --ca-file FILE or "
            "`cape config ca_file FILE` (SDK: Cape(ca_file=...))"
        )
    if match := _MISSING_MODULE.search(message):
        return (
            f"add {match.group(1)} (pinned, name==version) to the function's requirements.txt: "
            "`cape deploy` and `cape test` vendor it into the bundle"
        )
    if _INPUT_LIMIT.search(message):
        return (
            "encrypt large inputs with `cape encrypt` (it picks the smaller streaming form, or "
            "force it with --stream), or ask the operator to raise the limit "
            "(`cape serve --max-input-mib N`)"
        )
    if _BUNDLE_LIMIT.search(message):
        return "leave data files and unused dependencies out of the function folder"
    return None


def add_hint(exc: E) -> E:
    """Append :func:`hint`'s suggestion to ``exc``'s message (once), keeping its type."""
    if len(exc.args) != 1 or not isinstance(exc.args[0], str):
        return exc
    text = exc.args[0]
    suggestion = hint(text)
    if suggestion is not None and suggestion not in text:
        exc.args = (f"{text}; {suggestion}",)
    return exc
