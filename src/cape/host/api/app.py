"""The API application: the REST and websocket routes on one Starlette app."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.routing import BaseRoute

from cape.host.api.errors import EXCEPTION_HANDLERS
from cape.host.api.rest import ApiDeps, create_rest_routes
from cape.host.api.sessions import SessionDeps, create_session_routes
from cape.host.console import console_routes

__all__ = ["create_app"]


def create_app(
    rest: ApiDeps, sessions: SessionDeps, operations: Sequence[BaseRoute] = ()
) -> Starlette:
    """Every route of protocol.md over the given dependencies (no lifespan: the caller owns
    the enclave pool and the stores), and the node's ``operations`` routes
    (:mod:`cape.host.api.operations`)."""
    return Starlette(
        routes=[
            *create_rest_routes(rest),
            *create_session_routes(sessions),
            *console_routes(),
            *operations,
        ],
        exception_handlers=dict(EXCEPTION_HANDLERS),
    )
