"""Cape: confidential computing for Python functions.

``from cape import Cape`` gives the client SDK (:mod:`cape.sdk.client`). It is imported on
first use only, so enclave code importing ``cape.enclave`` never loads client code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["AsyncCape", "Cape", "FunctionRef", "__version__"]

if TYPE_CHECKING:
    from cape.sdk.client import AsyncCape, Cape, FunctionRef


def __getattr__(name: str) -> Any:
    if name in ("AsyncCape", "Cape", "FunctionRef"):
        from cape.sdk import client

        return getattr(client, name)
    raise AttributeError(f"module 'cape' has no attribute {name!r}")
