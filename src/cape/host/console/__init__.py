"""The web console's routes: the built page, script and style (``static/``, made from ``js/``
by ``npm run build``) served at ``/console/`` with strict security headers.

Only the three shipped files are served, never a path from the request. The page loads no
inline script or style, talks only to its own origin, and cannot be framed.
"""

from __future__ import annotations

from importlib import resources
from typing import Final

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

__all__ = ["SECURITY_HEADERS", "console_routes"]

#: Every console response carries these.
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_FILES: Final = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}


def _asset(name: str) -> bytes | None:
    try:
        return resources.files(__package__).joinpath("static", name).read_bytes()
    except (FileNotFoundError, OSError):
        return None


async def _serve(request: Request) -> Response:
    name = request.path_params.get("name") or "index.html"
    if name not in _FILES:
        return Response("not found\n", status_code=404, headers=SECURITY_HEADERS)
    body = _asset(name)
    if body is None:
        return Response(
            "the console is not built (cd js && npm ci && npm run build)\n",
            status_code=404,
            headers=SECURITY_HEADERS,
        )
    return Response(body, media_type=_FILES[name], headers=SECURITY_HEADERS)


async def _redirect(request: Request) -> Response:
    return RedirectResponse("/console/", status_code=308, headers=SECURITY_HEADERS)


def console_routes() -> list[BaseRoute]:
    """``/console`` (redirect), ``/console/`` and its three assets."""
    return [
        Route("/console", _redirect, methods=["GET", "HEAD"]),
        Route("/console/", _serve, methods=["GET", "HEAD"]),
        Route("/console/{name}", _serve, methods=["GET", "HEAD"]),
    ]
