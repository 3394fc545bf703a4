"""A mixin for objects that own resources: ``with obj:`` calls ``obj.close()``."""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["Closeable"]


class Closeable:
    """Adds the context-manager protocol on top of a ``close()`` method."""

    def close(self) -> None:
        """Release resources; subclasses override (the default holds none)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
