"""Operations endpoints of a node: ``/healthz``, ``/readyz`` and Prometheus ``/metrics``.

- ``GET /healthz``: 200 while the process serves requests (a liveness probe: restart on
  failure). Nothing else is checked, so a slow database never gets a node restarted.
- ``GET /readyz``: 200 when the node can take sessions: the metadata database answers, the
  blob store is reachable, a network key service (if any) is ready, at least one enclave is
  alive and the node is not draining; else 503.
  The body names each check and its state (``ok`` or a short reason, never a password or
  user data). A load balancer sends new sessions only to ready nodes.
- ``GET /metrics``: Prometheus text format from this node's own registry: sessions by kind
  (``key``, ``deploy``, ``test``, ``run``) and outcome, their durations, REST requests by
  route prefix and status, sessions in progress, live enclaves and enclave restarts. Labels
  are fixed words and numbers: never a username, function id or name, token or payload (REST
  routes are labelled by their first two path segments, ``/v1/functions``, never the id).

:class:`Metrics` is an ASGI middleware that watches only the ASGI message *types*, statuses
and close codes going out, never their bodies; it wraps the API application in
:mod:`cape.platform.serve`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Metrics", "Readiness", "create_operation_routes"]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
SESSION_KINDS: Final = frozenset({"key", "deploy", "test", "run"})
CLOSE_OUTCOMES: Final = {
    1000: "ok",
    1001: "going_away",
    1008: "policy",
    1009: "too_big",
    1011: "internal",
}
LATENCY_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


@dataclass(frozen=True)
class Readiness:
    """What ``/readyz`` checks, as callables that raise (any exception) when not ready."""

    database: Callable[[], None]
    blob_store: Callable[[], None]
    live_enclaves: Callable[[], int]
    draining: Callable[[], bool]
    key_service: Callable[[], None] | None = None
    """A network key service's readiness (``None``: the built-in one, in this process)."""
    timeout_s: float = 5.0


class _NodeCollector(Collector):
    """Gauges read at scrape time from the running node."""

    def __init__(
        self,
        node: str,
        live_enclaves: Callable[[], int],
        restarts: Callable[[], int],
        active: Callable[[], int],
    ) -> None:
        self._node = node
        self._live = live_enclaves
        self._restarts = restarts
        self._active = active

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("cape_node_info", "This node's name", labels=["node"])
        info.add_metric([self._node], 1)
        yield info
        yield GaugeMetricFamily("cape_enclaves_alive", "Live enclave processes", self._live())
        yield CounterMetricFamily(
            "cape_enclave_restarts", "Enclaves restarted after they exited", self._restarts()
        )
        yield GaugeMetricFamily("cape_sessions_active", "Sessions in progress", self._active())


class Metrics:
    """This node's metrics (one registry per node) and the middleware that counts them."""

    def __init__(
        self,
        node: str,
        *,
        live_enclaves: Callable[[], int],
        restarts: Callable[[], int],
        active: Callable[[], int],
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_NodeCollector(node, live_enclaves, restarts, active))
        self.sessions = Counter(
            "cape_sessions",
            "Websocket sessions by kind and outcome (refused_<status> before the upgrade, "
            "else how they closed)",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.session_seconds = Histogram(
            "cape_session_seconds",
            "Session durations by kind (accepted sessions)",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "cape_http_requests",
            "REST requests by route prefix and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "cape_http_request_seconds",
            "REST request durations by route prefix",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """``app`` with every websocket session and REST request counted."""

        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "websocket":
                await self._websocket(app, scope, receive, send)
            elif scope["type"] == "http":
                await self._http(app, scope, receive, send)
            else:
                await app(scope, receive, send)

        return counted

    async def _websocket(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        parts = str(scope.get("path", "")).split("/")
        kind = parts[2] if len(parts) > 2 and parts[2] in SESSION_KINDS else "other"
        outcome = "client_gone"  # neither side closed: the connection was lost
        accepted_at: float | None = None
        closed = False

        async def watched_receive() -> Message:
            nonlocal outcome
            message = await receive()
            if message["type"] == "websocket.disconnect" and not closed:
                code = int(message.get("code", 1005))  # the client closed first
                normal = code in (1000, 1001) and accepted_at is not None
                outcome = "ok" if normal else "client_gone"
            return message

        async def watched_send(message: Message) -> None:
            nonlocal outcome, accepted_at, closed
            kind_of = message["type"]
            if kind_of == "websocket.accept":
                accepted_at = time.monotonic()
            elif kind_of == "websocket.http.response.start":
                outcome, closed = f"refused_{int(message.get('status', 0))}", True
            elif kind_of == "websocket.close" and not closed:
                code = int(message.get("code", 1000))
                outcome = "refused" if accepted_at is None else CLOSE_OUTCOMES.get(code, "other")
                closed = True
            await send(message)

        try:
            await app(scope, watched_receive, watched_send)
        finally:
            self.sessions.labels(kind, outcome).inc()
            if accepted_at is not None:
                self.session_seconds.labels(kind).observe(time.monotonic() - accepted_at)

    async def _http(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        route = "/".join(str(scope.get("path", "")).split("/")[:3]) or "/"
        status = 500
        started = time.monotonic()

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await app(scope, receive, watched)
        finally:
            if route.startswith("/v1/"):  # not the operations endpoints nor stray paths
                self.requests.labels(route, str(status)).inc()
                self.request_seconds.labels(route).observe(time.monotonic() - started)


def create_operation_routes(readiness: Readiness, metrics: Metrics) -> list[Route]:
    """``/healthz``, ``/readyz`` and ``/metrics`` (see the module docstring)."""

    async def healthz(_request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(_request: Request) -> Response:
        checks: dict[str, str] = {}

        async def check(name: str, probe: Callable[[], None]) -> None:
            try:
                await asyncio.wait_for(asyncio.to_thread(probe), readiness.timeout_s)
            except TimeoutError:
                checks[name] = f"no answer within {readiness.timeout_s:g}s"
            except Exception as exc:  # the reason, shortened; never a traceback
                checks[name] = " ".join(str(exc).split())[:200] or type(exc).__name__
            else:
                checks[name] = "ok"

        probes = [
            check("database", readiness.database),
            check("blob_store", readiness.blob_store),
        ]
        if readiness.key_service is not None:
            probes.append(check("key_service", readiness.key_service))
        await asyncio.gather(*probes)
        live = readiness.live_enclaves()
        checks["enclaves"] = "ok" if live > 0 else "no live enclave"
        checks["serving"] = "draining" if readiness.draining() else "ok"
        ready = all(state == "ok" for state in checks.values())
        return JSONResponse(
            {"ready": ready, "live_enclaves": live, "checks": checks},
            status_code=200 if ready else 503,
        )

    async def metrics_page(_request: Request) -> Response:
        body = await asyncio.to_thread(metrics.render)
        return Response(body, media_type=CONTENT_TYPE)

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_page, methods=["GET"]),
    ]
