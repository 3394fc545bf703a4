"""The key service's HTTPS API (``cape.kms.server``), in process: authentication, bounds and
bad bodies. The real process over real TLS is ``tests/e2e/test_kms_serve.py``."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest
from starlette.testclient import TestClient

from cape.crypto.keyanswers import AnswerSigner
from cape.enclave.secure_module.simulated import SimulatedAuthority
from cape.kms.base import KeyPolicy
from cape.kms.local import LocalKeyService
from cape.kms.server import MAX_BODY_BYTES, KeyServiceApp, create_key_service_app

TOKEN = secrets.token_hex(32).encode()


@pytest.fixture
def client(tmp_path: Path, authority: SimulatedAuthority) -> Iterator[TestClient]:
    service = LocalKeyService(
        tmp_path / "kms.sqlite3",
        master_key=secrets.token_bytes(32),
        trusted_root=authority.root_certificate,
        default_policy=KeyPolicy.signer(b"\x01" * 48),
    )
    signer = AnswerSigner.generate()
    app = create_key_service_app(
        KeyServiceApp(
            service=service,
            signer=signer,
            node_token=TOKEN,
            root_pem=authority.root_pem,
            issue_intermediate=lambda body: b"",
            sign_runtime=lambda pcr0: b"",
            ready=service.ping,
        )
    )
    with TestClient(app) as test_client:
        yield test_client
    service.close()


def _auth(token: bytes = TOKEN) -> dict[str, str]:
    return {"Authorization": "Bearer " + token.decode()}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/node"),
        ("POST", "/v1/kms"),
        ("POST", "/v1/attestation/intermediate"),
        ("POST", "/v1/runtime/signature"),
    ],
)
@pytest.mark.parametrize("headers", [{}, _auth(secrets.token_hex(32).encode()), _auth(TOKEN[:-1])])
def test_every_route_but_health_needs_the_node_token(
    client: TestClient, method: str, path: str, headers: dict[str, str]
) -> None:
    reply = client.request(method, path, headers=headers, content=b"{}")
    assert reply.status_code == 401
    assert reply.headers["WWW-Authenticate"] == "Bearer"
    assert "node token" in reply.json()["error"]


def test_health_and_readiness_need_no_token(client: TestClient) -> None:
    assert client.get("/healthz").text == "ok\n"
    assert client.get("/readyz").json() == {"ready": True, "checks": {"database": "ok"}}


def test_a_node_learns_the_identity_and_root(client: TestClient) -> None:
    body = client.get("/v1/node", headers=_auth()).json()
    assert len(bytes.fromhex(body["identity"])) == 32
    assert body["root_pem"].startswith("-----BEGIN CERTIFICATE-----")


def test_a_kms_frame_is_answered_signed(client: TestClient) -> None:
    request = {"t": "kms", "rid": 1, "op": "get_public_key", "owner": "alice", "create": True,
               "challenge": secrets.token_bytes(16)}  # fmt: skip
    reply = cbor2.loads(
        client.post("/v1/kms", headers=_auth(), content=cbor2.dumps(request)).content
    )
    assert reply["t"] == "kms_result" and isinstance(reply["result"], bytes)
    assert len(reply["sig"]) == 64


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"not cbor", "channel frame"),
        (cbor2.dumps({"t": "open", "sid": 1}), "one enclave 'kms' frame"),
        (cbor2.dumps([1, 2]), "CBOR map"),
    ],
)
def test_bad_kms_bodies_are_400(client: TestClient, body: bytes, needle: str) -> None:
    reply = client.post("/v1/kms", headers=_auth(), content=body)
    assert reply.status_code == 400 and needle in reply.json()["error"]


def test_bodies_over_the_limit_are_refused(client: TestClient) -> None:
    reply = client.post("/v1/kms", headers=_auth(), content=b"x" * (MAX_BODY_BYTES + 1))
    assert reply.status_code == 413


@pytest.mark.parametrize("body", [b"", b"{}", json.dumps({"pcr0": "zz"}).encode(),
                                  json.dumps({"pcr0": "ab"}).encode()])  # fmt: skip
def test_a_bad_runtime_signature_request_is_400(client: TestClient, body: bytes) -> None:
    assert client.post("/v1/runtime/signature", headers=_auth(), content=body).status_code == 400
