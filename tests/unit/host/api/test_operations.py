"""/healthz, /readyz and /metrics, and the metrics middleware, over Starlette's test client
(the e2e twin on real nodes behind HAProxy is tests/e2e/test_cluster.py)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from cape.host.api.operations import Metrics, Readiness, create_operation_routes


def ok() -> None:
    return None


def failing(text: str) -> Callable[[], None]:
    def probe() -> None:
        raise OSError(text)

    return probe


def node(readiness: Readiness | None = None, live: int = 1) -> tuple[TestClient, Metrics]:
    metrics = Metrics("node-a", live_enclaves=lambda: live, restarts=lambda: 3, active=lambda: 2)
    readiness = readiness or Readiness(ok, ok, lambda: live, lambda: False)

    async def function(request: object) -> PlainTextResponse:
        return PlainTextResponse("fn")

    async def run(websocket: WebSocket) -> None:
        await websocket.accept()
        message = await websocket.receive_text()
        if message == "fail":
            await websocket.close(1011)
            return
        await websocket.send_text("done")
        try:
            await websocket.receive_text()
        except WebSocketDisconnect:
            return

    async def deploy(websocket: WebSocket) -> None:
        await websocket.close(1008)  # refused before the upgrade

    app = Starlette(
        routes=[
            Route("/v1/functions/{id}", function),
            WebSocketRoute("/v1/run/{id}", run),
            WebSocketRoute("/v1/deploy", deploy),
            *create_operation_routes(readiness, metrics),
        ]
    )
    return TestClient(metrics.wrap(app)), metrics


def test_healthz_and_a_ready_node() -> None:
    client, _ = node()
    assert client.get("/healthz").text == "ok\n"
    reply = client.get("/readyz")
    assert reply.status_code == 200
    assert reply.json() == {
        "ready": True,
        "live_enclaves": 1,
        "checks": {"database": "ok", "blob_store": "ok", "enclaves": "ok", "serving": "ok"},
    }


@pytest.mark.parametrize(
    ("readiness", "live", "check", "state"),
    [
        (Readiness(failing("connection refused"), ok, lambda: 1, lambda: False), 1,
         "database", "connection refused"),
        (Readiness(ok, failing("object store: bucket: AccessDenied"), lambda: 1, lambda: False),
         1, "blob_store", "object store: bucket: AccessDenied"),
        (Readiness(ok, ok, lambda: 0, lambda: False), 0, "enclaves", "no live enclave"),
        (Readiness(ok, ok, lambda: 1, lambda: True), 1, "serving", "draining"),
        (Readiness(lambda: time.sleep(2), ok, lambda: 1, lambda: False, timeout_s=0.2), 1,
         "database", "no answer within 0.2s"),
    ],
)  # fmt: skip
def test_a_node_that_cannot_serve_is_not_ready(
    readiness: Readiness, live: int, check: str, state: str
) -> None:
    client, _ = node(readiness, live)
    reply = client.get("/readyz")
    assert reply.status_code == 503
    assert reply.json()["ready"] is False
    assert reply.json()["checks"][check] == state
    assert client.get("/healthz").status_code == 200  # alive all the same


def test_metrics_count_sessions_and_requests_without_user_data() -> None:
    client, _ = node()
    secret_id = "SECRETFUNCTIONID000001"
    assert client.get(f"/v1/functions/{secret_id}").text == "fn"
    with client.websocket_connect(f"/v1/run/{secret_id}") as ws:
        ws.send_text("hello")
        assert ws.receive_text() == "done"
        ws.close(1000)
    with client.websocket_connect(f"/v1/run/{secret_id}") as ws:
        ws.send_text("fail")
        with pytest.raises(WebSocketDisconnect):
            ws.receive_text()
    with pytest.raises(WebSocketDisconnect), client.websocket_connect("/v1/deploy"):
        pass
    text = client.get("/metrics").text
    assert 'cape_sessions_total{kind="run",outcome="ok"} 1.0' in text
    assert 'cape_sessions_total{kind="run",outcome="internal"} 1.0' in text
    assert 'cape_sessions_total{kind="deploy",outcome="refused"} 1.0' in text
    assert 'cape_session_seconds_count{kind="run"} 2.0' in text
    assert 'cape_http_requests_total{route="/v1/functions",status="200"} 1.0' in text
    assert 'cape_node_info{node="node-a"} 1.0' in text
    assert "cape_enclaves_alive 1.0" in text and "cape_enclave_restarts_total 3.0" in text
    assert "cape_sessions_active 2.0" in text
    assert secret_id not in text and "/readyz" not in text and "/metrics" not in text
    assert client.get("/metrics").headers["content-type"].startswith("text/plain; version=0.0.4")


def test_each_node_has_its_own_registry() -> None:
    first, _ = node()
    second, _ = node()
    first.get("/v1/functions/x")
    assert 'route="/v1/functions"' not in second.get("/metrics").text
