"""A reference to a deployed function: an id, a ``user/name``, and optionally its checksum.

The JSON shape is pycape's (``function_id``, ``function_name``, ``function_checksum``), so
``function.json`` files written for pycape load as they are.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cape.errors import FormatError
from cape.formats.names import CHECKSUM_PATTERN, is_id

__all__ = ["FunctionRef"]


@dataclass(frozen=True)
class FunctionRef:
    """A deployed function, by ``id`` or by ``name`` (``"user/function"``), or both.

    When ``checksum`` (SHA-256 hex of the function's bundle) is set, sessions refuse an
    enclave that does not attest exactly that code.
    """

    id: str | None = None
    name: str | None = None
    checksum: str | None = None

    def __post_init__(self) -> None:
        if self.id is None and self.name is None:
            raise FormatError("a function reference needs an id or a 'user/name'")
        if self.id is not None and not is_id(self.id):
            raise FormatError(f"{self.id!r} is not a function id (22 letters and digits)")
        if self.name is not None:
            user, sep, function = self.name.partition("/")
            if not sep or not user or not function or "/" in function:
                raise FormatError(f"a function name looks like 'user/name', not {self.name!r}")
        if self.checksum is not None:
            if not CHECKSUM_PATTERN.fullmatch(self.checksum.lower()):
                raise FormatError("a function checksum is 64 hex digits (SHA-256)")
            object.__setattr__(self, "checksum", self.checksum.lower())

    @property
    def user(self) -> str | None:
        return None if self.name is None else self.name.split("/", 1)[0]

    @property
    def full_name(self) -> str | None:
        return self.name

    @property
    def path(self) -> str:
        """The run route: by id when known, else by name."""
        return f"/v1/run/{self.id}" if self.id is not None else f"/v1/run/{self.name}"

    def __str__(self) -> str:
        return self.id or self.name or ""

    @classmethod
    def parse(cls, text: str, *, checksum: str | None = None) -> FunctionRef:
        """``"user/name"`` or a 22-character id."""
        if "/" in text:
            return cls(name=text, checksum=checksum)
        if is_id(text):
            return cls(id=text, checksum=checksum)
        raise FormatError(f"{text!r} is neither a function id (22 characters) nor 'user/name'")

    @classmethod
    def from_json(cls, source: str | os.PathLike[str]) -> FunctionRef:
        """Load pycape's JSON shape from a file path or a JSON string."""
        text: str
        path = Path(source)
        if isinstance(source, os.PathLike) or (len(str(source)) < 4096 and path.is_file()):
            try:
                text = path.read_text()
            except OSError as exc:
                raise FormatError(f"cannot read {path}: {exc.strerror}") from None
        else:
            text = str(source)
        try:
            data: Any = json.loads(text)
        except ValueError:
            raise FormatError("the function reference is not valid JSON") from None
        if not isinstance(data, dict):
            raise FormatError("the function reference JSON must be an object")
        fields = {k: data.get(f"function_{k}") for k in ("id", "name", "checksum")}
        for key, value in fields.items():
            if value is not None and not isinstance(value, str):
                raise FormatError(f"function_{key} must be a string")
        return cls(id=fields["id"], name=fields["name"], checksum=fields["checksum"])

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """pycape's JSON shape; also written to ``path`` when given."""
        data = {
            f"function_{k}": v
            for k, v in (("id", self.id), ("name", self.name), ("checksum", self.checksum))
            if v is not None
        }
        text = json.dumps(data)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text
