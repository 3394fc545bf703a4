"""The key service as a network service: the HTTPS API of ``cape kms serve``.

Nodes of a cluster (``cape serve`` with ``key_service_url``) reach one key service over TLS,
pinning its certificate by SHA-256, and authenticate with the cluster's shared node token
(``Authorization: Bearer TOKEN``, compared in constant time; anything else is 401). The
routes (``docs/cluster.md``):

- ``GET /healthz``: 200 while the process serves (no authentication).
- ``GET /readyz``: 200 when the key database answers, else 503 (no authentication).
- ``GET /v1/node``: what a node needs to start: the key service's answer identity (raw
  Ed25519 public key, hex; the runtime measures it into PCR16) and the cluster's attestation
  root (PEM).
- ``POST /v1/kms``: one enclave ``kms`` frame body (CBOR), relayed unchanged by the node;
  the answer is a ``kms_result`` frame body: ``result`` and ``sig`` (the identity's
  signature over request and result, :mod:`cape.crypto.keyanswers`) or ``error`` and
  ``kind``. The node relays it unchanged to the enclave, which checks the signature: a node
  can drop or delay answers but cannot forge one.
- ``POST /v1/attestation/intermediate``: a node's certificate request (PEM) in, its
  intermediate CA certificate under the cluster root (PEM) out
  (:mod:`cape.enclave.secure_module.cluster`).
- ``POST /v1/runtime/signature``: ``{"pcr0": HEX}`` in, the simulated runtime's signature
  section (the release signer's signature of that PCR0, PCR8) out.

Every body is bounded (:data:`MAX_BODY_BYTES`); no route logs a body, a token or key
material. The composition (database, master key, authority, uvicorn) is
:mod:`cape.platform.kms_serve`.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import cbor2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from cape.crypto.keyanswers import AnswerSigner
from cape.errors import CapeError, FormatError
from cape.formats.frames import parse_frame_body
from cape.kms.base import KeyService
from cape.kms.proxy import serve_kms_request

__all__ = ["MAX_BODY_BYTES", "KeyServiceApp", "create_key_service_app"]

MAX_BODY_BYTES: Final = 1 << 20
"""The largest request body (a ``kms`` frame holds a document and a wrapped key: a few KiB)."""
FRAME_TYPE: Final = "application/cbor"

log = logging.getLogger("cape.kms.server")


@dataclass(frozen=True)
class KeyServiceApp:
    """What the API serves with."""

    service: KeyService
    signer: AnswerSigner
    node_token: bytes
    root_pem: bytes
    issue_intermediate: Callable[[bytes], bytes]
    """A node's certificate request (PEM) → its intermediate CA certificate (PEM); raises
    ``ValueError`` for a bad request."""
    sign_runtime: Callable[[bytes], bytes]
    """A runtime's PCR0 → the signature section naming the release signer (PCR8)."""
    ready: Callable[[], None]
    """Raises when the key database does not answer."""


class _Refused(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


def _error(status: int, text: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": text}, status_code=status, headers=headers)


async def _body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise _Refused(413, f"request body over {MAX_BODY_BYTES} bytes")
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _Refused(413, f"request body over {MAX_BODY_BYTES} bytes")
        parts.append(chunk)
    return b"".join(parts)


def create_key_service_app(app: KeyServiceApp) -> Starlette:
    """The ASGI application of ``cape kms serve`` (see the module docstring)."""
    if len(app.node_token) < 16:
        raise ValueError("the node token must be at least 16 bytes")
    expected = b"Bearer " + app.node_token

    def authenticate(request: Request) -> None:
        given = request.headers.get("authorization", "").encode("latin-1", "replace")
        if not hmac.compare_digest(given, expected):
            peer = request.client.host if request.client else "unknown"
            log.warning("refused a request to %s from %s: wrong node token", request.url.path, peer)
            raise _Refused(401, "a valid node token is required (key_service_token_file)")

    def guarded(
        handler: Callable[[Request], Any],
    ) -> Callable[[Request], Any]:
        async def route(request: Request) -> Response:
            try:
                authenticate(request)
                response: Response = await handler(request)
            except _Refused as exc:
                return _error(exc.status, str(exc))
            return response

        return route

    async def healthz(_request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(_request: Request) -> Response:
        try:
            await run_in_threadpool(app.ready)
        except Exception as exc:  # the reason, shortened; never a traceback
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            return JSONResponse({"ready": False, "checks": {"database": reason}}, 503)
        return JSONResponse({"ready": True, "checks": {"database": "ok"}})

    async def node(_request: Request) -> Response:
        return JSONResponse(
            {"identity": app.signer.public_bytes.hex(), "root_pem": app.root_pem.decode()}
        )

    async def kms(request: Request) -> Response:
        body = await _body(request)
        try:
            message = parse_frame_body(body)
        except FormatError as exc:
            raise _Refused(400, exc.diagnostics()) from None
        if message.get("t") != "kms":
            raise _Refused(400, "the body must be one enclave 'kms' frame")
        reply = await run_in_threadpool(serve_kms_request, app.service, message, signer=app.signer)
        return Response(cbor2.dumps({"t": "kms_result", **reply}), media_type=FRAME_TYPE)

    async def intermediate(request: Request) -> Response:
        body = await _body(request)
        try:
            certificate = await run_in_threadpool(app.issue_intermediate, body)
        except ValueError as exc:
            raise _Refused(400, f"bad certificate request: {exc}") from None
        peer = request.client.host if request.client else "unknown"
        log.info("issued a node attestation intermediate to %s", peer)
        return Response(certificate, media_type="application/x-pem-file")

    async def runtime_signature(request: Request) -> Response:
        body = await _body(request)
        try:
            document = json.loads(body)
            pcr0 = bytes.fromhex(document["pcr0"])
        except (ValueError, TypeError, KeyError):
            raise _Refused(400, 'the body must be {"pcr0": HEX}') from None
        if len(pcr0) != 48:
            raise _Refused(400, "pcr0 must be 48 bytes")
        try:
            section = await run_in_threadpool(app.sign_runtime, pcr0)
        except CapeError as exc:
            raise _Refused(400, exc.diagnostics()) from None
        log.info("signed the simulated runtime with PCR0 %s", pcr0.hex()[:16])
        return Response(section, media_type="application/octet-stream")

    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/v1/node", guarded(node), methods=["GET"]),
            Route("/v1/kms", guarded(kms), methods=["POST"]),
            Route("/v1/attestation/intermediate", guarded(intermediate), methods=["POST"]),
            Route("/v1/runtime/signature", guarded(runtime_signature), methods=["POST"]),
        ]
    )
