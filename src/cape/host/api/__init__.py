"""The host's HTTP API on Starlette.

- :mod:`~cape.host.api.errors`: the one table from exceptions to HTTP statuses and
  websocket close codes, with ``{"error": ...}`` bodies;
- :mod:`~cape.host.api.rest`: the REST routes (:func:`create_rest_routes` over
  :class:`ApiDeps`);
- :mod:`~cape.host.api.sessions`: the websocket routes relaying sessions to enclaves;
- :mod:`~cape.host.api.app`: :func:`create_app`, both on one Starlette application.
"""

from __future__ import annotations

from cape.host.api.app import create_app
from cape.host.api.errors import EXCEPTION_HANDLERS, close_code_for, error_response
from cape.host.api.rest import ApiDeps, create_rest_routes
from cape.host.api.sessions import Lifecycle, SessionDeps, create_session_routes

__all__ = [
    "EXCEPTION_HANDLERS",
    "ApiDeps",
    "Lifecycle",
    "SessionDeps",
    "close_code_for",
    "create_app",
    "create_rest_routes",
    "create_session_routes",
    "error_response",
]
