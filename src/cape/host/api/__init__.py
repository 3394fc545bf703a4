"""The host's HTTP API on Starlette.

- :mod:`~cape.host.api.errors`: the one table from exceptions to HTTP statuses and
  websocket close codes, with ``{"error": ...}`` bodies;
- :mod:`~cape.host.api.rest`: the REST routes (:func:`create_rest_routes` over
  :class:`ApiDeps`).
"""

from __future__ import annotations

from cape.host.api.errors import EXCEPTION_HANDLERS, close_code_for, error_response
from cape.host.api.rest import ApiDeps, create_rest_routes

__all__ = [
    "EXCEPTION_HANDLERS",
    "ApiDeps",
    "close_code_for",
    "create_rest_routes",
    "error_response",
]
