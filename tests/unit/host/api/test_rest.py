"""The REST routes against a real SQLite store, real accounts and tokens (cheap argon2)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.applications import Starlette
from starlette.testclient import TestClient

from cape.formats.runtime import RuntimeTarget
from cape.host.api.errors import EXCEPTION_HANDLERS
from cape.host.api.rest import ApiDeps, create_rest_routes
from cape.host.auth import Accounts, LoginRateLimiter, TokenIssuer
from cape.host.ids import is_id
from cape.host.store.blobs import DirectoryBlobStore
from cape.host.store.deploys import commit_deploy
from cape.host.store.metadata import Function, SqlMetadataStore

PASSWORD = "correct horse battery staple"
ROOT_PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY_DOC = b"\x84\x44cose document bytes"
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


class Monotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlMetadataStore]:
    with SqlMetadataStore(f"sqlite:///{tmp_path / 'meta.db'}") as metadata:
        yield metadata


@pytest.fixture
def blobs(tmp_path: Path) -> DirectoryBlobStore:
    return DirectoryBlobStore(tmp_path / "blobs")


@pytest.fixture
def monotonic() -> Monotonic:
    return Monotonic()


async def _key_documents(username: str) -> bytes | None:
    return KEY_DOC if username == "alice" else None


@pytest.fixture
def client(
    store: SqlMetadataStore, blobs: DirectoryBlobStore, monotonic: Monotonic
) -> Iterator[TestClient]:
    accounts = Accounts(
        store,
        TokenIssuer(Ed25519PrivateKey.generate()),
        hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1),
        limiter=LoginRateLimiter(max_failures_per_pair=3, clock=monotonic),
    )
    deps = ApiDeps(
        store=store,
        blobs=blobs,
        accounts=accounts,
        attestation_root_pem=ROOT_PEM,
        key_documents=_key_documents,
        max_body_bytes=1024,
    )
    app = Starlette(routes=create_rest_routes(deps), exception_handlers=dict(EXCEPTION_HANDLERS))
    with TestClient(app) as test_client:
        yield test_client


def signup(client: TestClient, username: str) -> dict[str, Any]:
    response = client.post("/v1/signup", json={"username": username, "password": PASSWORD})
    assert response.status_code == 201, response.text
    data = response.json()
    assert isinstance(data, dict)
    return data


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def deploy(
    store: SqlMetadataStore, blobs: DirectoryBlobStore, username: str, *, public: bool = False
) -> Function:
    owner = store.get_user_by_name(username)
    assert owner is not None
    return commit_deploy(
        store,
        blobs,
        owner=owner,
        name="echo",
        checksum=hashlib.sha256(b"bundle").hexdigest(),
        public=public,
        ciphertext_chunks=[b"ciphertext"],
    )


# --------------------------------------------------------------------------- accounts


def test_signup_and_login_shapes(client: TestClient) -> None:
    created = signup(client, "alice")
    assert set(created) == {"access_token", "token_type", "expires_at", "user_id", "username"}
    assert created["token_type"] == "Bearer"
    assert created["username"] == "alice"
    assert is_id(created["user_id"])
    assert RFC3339.fullmatch(created["expires_at"])

    response = client.post("/v1/login", json={"username": "alice", "password": PASSWORD})
    assert response.status_code == 200
    logged_in = response.json()
    assert set(logged_in) == set(created)
    assert logged_in["user_id"] == created["user_id"]
    assert client.get("/v1/tokens", headers=bearer(logged_in["access_token"])).status_code == 200


def test_duplicate_username_is_409(client: TestClient) -> None:
    signup(client, "alice")
    response = client.post("/v1/signup", json={"username": "ALICE", "password": PASSWORD})
    assert response.status_code == 409
    assert set(response.json()) == {"error"}


def test_bad_signup_fields_are_400(client: TestClient) -> None:
    response = client.post("/v1/signup", json={"username": "alice", "password": "short"})
    assert response.status_code == 400
    response = client.post("/v1/signup", json={"username": "alice", "password": 12345678})
    assert response.status_code == 400
    assert response.json() == {"error": "the field 'password' must be a string"}
    response = client.post("/v1/signup", json={"username": "alice"})
    assert response.json() == {"error": "the field 'password' is required"}


def test_wrong_password_is_401_and_never_echoed(client: TestClient) -> None:
    signup(client, "alice")
    response = client.post("/v1/login", json={"username": "alice", "password": "wrong-password"})
    assert response.status_code == 401
    assert response.json() == {"error": "invalid username or password"}
    assert "wrong-password" not in response.text
    response = client.post("/v1/login", json={"username": "nobody", "password": PASSWORD})
    assert response.status_code == 401


def test_repeated_failures_are_rate_limited_with_retry_after(
    client: TestClient, monotonic: Monotonic
) -> None:
    signup(client, "alice")
    wrong = {"username": "alice", "password": "wrong-password"}
    statuses = [client.post("/v1/login", json=wrong).status_code for _ in range(3)]
    assert statuses == [401, 401, 401]
    response = client.post("/v1/login", json={"username": "alice", "password": PASSWORD})
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1
    assert "try again" in response.json()["error"]
    monotonic.now += 10
    response = client.post("/v1/login", json={"username": "alice", "password": PASSWORD})
    assert response.status_code == 200


# --------------------------------------------------------------------------- auth and bodies


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer"}, bearer("not.a.jwt")],
)
def test_missing_or_invalid_bearer_is_401(client: TestClient, headers: dict[str, str]) -> None:
    for path in ("/v1/functions", "/v1/tokens"):
        response = client.get(path, headers=headers)
        assert response.status_code == 401
        assert set(response.json()) == {"error"}
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "the request body is not valid JSON"),
        (b"\xff\xfe", "the request body is not valid JSON"),
        (b"[1, 2]", "the request body must be a JSON object"),
        (b"", "the request body is not valid JSON"),
    ],
)
def test_malformed_json_is_400(client: TestClient, content: bytes, message: str) -> None:
    response = client.post("/v1/login", content=content)
    assert response.status_code == 400
    assert response.json() == {"error": message}


def test_oversized_body_is_413(client: TestClient) -> None:
    response = client.post("/v1/login", json={"username": "a" * 2000, "password": PASSWORD})
    assert response.status_code == 413
    assert "exceeds the limit of 1024" in response.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
        yield b'{"username": "'
        yield b"a" * 2000
        yield b'"}'

    response = client.post("/v1/login", content=chunks())
    assert response.status_code == 413


def test_unknown_route_and_method_use_the_error_shape(client: TestClient) -> None:
    assert client.get("/v1/nowhere").json() == {"error": "Not Found"}
    response = client.put("/v1/tokens")
    assert response.status_code == 405
    assert set(response.json()) == {"error"}


# --------------------------------------------------------------------------- tokens


def test_token_create_list_delete_revokes_at_once(client: TestClient) -> None:
    session = bearer(signup(client, "alice")["access_token"])
    response = client.post(
        "/v1/token", headers=session, json={"name": "ci", "description": "for CI"}
    )
    assert response.status_code == 201
    created = response.json()
    assert set(created) == {"token", "id"}
    pat = bearer(created["token"])
    assert client.get("/v1/functions", headers=pat).status_code == 200

    listed = client.get("/v1/tokens", headers=session).json()
    assert [t["id"] for t in listed] == [created["id"]]
    assert set(listed[0]) == {"id", "name", "description", "created_at", "last_used"}
    assert listed[0]["name"] == "ci"
    assert listed[0]["description"] == "for CI"
    assert RFC3339.fullmatch(listed[0]["created_at"])
    assert created["token"] not in client.get("/v1/tokens", headers=session).text

    response = client.delete(f"/v1/token/{created['id']}", headers=session)
    assert (response.status_code, response.json()) == (200, {"id": created["id"]})
    response = client.get("/v1/functions", headers=pat)
    assert response.status_code == 401
    assert response.json() == {"error": "token has been revoked"}
    assert client.delete(f"/v1/token/{created['id']}", headers=session).status_code == 404


@pytest.mark.parametrize("form", ["seconds", "rfc3339"])
def test_token_expiry_as_seconds_or_rfc3339(client: TestClient, form: str) -> None:
    # Computed when the test runs, not at collection (a long suite would age it).
    in_an_hour = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    expiry: int | str = 3600 if form == "seconds" else in_an_hour.strftime("%Y-%m-%dT%H:%M:%SZ")
    session = bearer(signup(client, "alice")["access_token"])
    response = client.post("/v1/token", headers=session, json={"name": "t", "expiry": expiry})
    assert response.status_code == 201
    (listed,) = client.get("/v1/tokens", headers=session).json()
    left = dt.datetime.fromisoformat(listed["expiry"]) - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=58) < left <= dt.timedelta(hours=1)


@pytest.mark.parametrize(
    "expiry",
    [
        "2000-01-01T00:00:00Z",
        "2030-01-01T00:00:00",
        "9999-01-01T00:00:00Z",
        "tomorrow",
        -5,
        0,
        10**30,
        True,
        1.5,
    ],
)
def test_bad_token_expiry_is_400(client: TestClient, expiry: object) -> None:
    session = bearer(signup(client, "alice")["access_token"])
    response = client.post("/v1/token", headers=session, json={"name": "t", "expiry": expiry})
    assert response.status_code == 400
    assert set(response.json()) == {"error"}


def test_function_scoped_token_only_reads_its_function(
    client: TestClient, store: SqlMetadataStore, blobs: DirectoryBlobStore
) -> None:
    session = bearer(signup(client, "alice")["access_token"])
    function = deploy(store, blobs, "alice")
    response = client.post(
        "/v1/token", headers=session, json={"name": "run", "function_id": function.id}
    )
    assert response.status_code == 201
    scoped = bearer(response.json()["token"])
    assert client.get(f"/v1/functions/{function.id}", headers=scoped).status_code == 200
    for method, path in [
        ("GET", "/v1/functions"),
        ("GET", "/v1/tokens"),
        ("DELETE", f"/v1/functions/{function.id}"),
        ("DELETE", f"/v1/token/{response.json()['id']}"),
    ]:
        refused = client.request(method, path, headers=scoped)
        assert refused.status_code == 403, (method, path)
    refused = client.post("/v1/token", headers=scoped, json={"name": "more"})
    assert refused.status_code == 403
    (listed,) = client.get("/v1/tokens", headers=session).json()
    assert listed["function_id"] == function.id


def test_token_for_someone_elses_function_is_403_or_404_if_private(
    client: TestClient, store: SqlMetadataStore, blobs: DirectoryBlobStore
) -> None:
    signup(client, "alice")
    bob = bearer(signup(client, "bob")["access_token"])
    public = deploy(store, blobs, "alice", public=True)
    private = deploy(store, blobs, "alice")
    response = client.post("/v1/token", headers=bob, json={"name": "x", "function_id": public.id})
    assert response.status_code == 403
    missing = client.post("/v1/token", headers=bob, json={"name": "x", "function_id": "a" * 22})
    hidden = client.post("/v1/token", headers=bob, json={"name": "x", "function_id": private.id})
    assert (hidden.status_code, hidden.json()) == (missing.status_code, missing.json())
    assert missing.status_code == 404


# --------------------------------------------------------------------------- functions


def test_functions_list_get_delete(
    client: TestClient, store: SqlMetadataStore, blobs: DirectoryBlobStore
) -> None:
    alice = bearer(signup(client, "alice")["access_token"])
    bob = bearer(signup(client, "bob")["access_token"])
    private = deploy(store, blobs, "alice")
    public = deploy(store, blobs, "alice", public=True)

    listed = client.get("/v1/functions", headers=alice).json()
    assert [f["id"] for f in listed] == [public.id, private.id]  # newest first
    assert listed[1] == {
        "id": private.id,
        "name": "echo",
        "created_at": private.created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "checksum": private.checksum,
        "public": False,
    }
    assert client.get("/v1/functions?limit=1&offset=1", headers=alice).json() == [listed[1]]
    assert client.get("/v1/functions?limit=x", headers=alice).status_code == 400
    assert client.get("/v1/functions?limit=0", headers=alice).status_code == 400
    assert client.get(f"/v1/functions?offset={10**30}", headers=alice).status_code == 400
    assert client.get("/v1/functions", headers=bob).json() == []

    assert client.get(f"/v1/functions/{private.id}", headers=alice).json() == listed[1]
    assert client.get(f"/v1/functions/{private.id}", headers=bob).status_code == 404
    assert client.get(f"/v1/functions/{public.id}", headers=bob).status_code == 200
    assert client.get(f"/v1/functions/{'z' * 22}", headers=alice).status_code == 404
    assert client.get("/v1/functions/not-an-id", headers=alice).status_code == 404

    assert client.delete(f"/v1/functions/{private.id}", headers=bob).status_code == 404
    assert client.delete(f"/v1/functions/{public.id}", headers=bob).status_code == 403
    response = client.delete(f"/v1/functions/{private.id}", headers=alice)
    assert (response.status_code, response.json()) == (200, {"id": private.id})
    assert not blobs.exists(private.blob_key)
    assert client.get(f"/v1/functions/{private.id}", headers=alice).status_code == 404
    assert client.delete(f"/v1/functions/{private.id}", headers=alice).status_code == 404


# --------------------------------------------------------------------------- unauthenticated


def test_user_key_route(client: TestClient) -> None:
    response = client.get("/v1/user/alice/key")
    assert response.status_code == 200
    assert base64.b64decode(response.json()["attestation_document"]) == KEY_DOC
    response = client.get("/v1/user/bob/key")
    assert response.status_code == 404
    assert set(response.json()) == {"error"}


def test_attestation_root_route(client: TestClient) -> None:
    response = client.get("/v1/attestation/root")
    assert response.status_code == 200
    assert response.content == ROOT_PEM
    assert response.headers["content-type"].startswith("application/x-pem-file")


def test_runtime_route_describes_the_enclave_python_without_auth(client: TestClient) -> None:
    response = client.get("/v1/runtime")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"python_version", "implementation", "abi", "platforms", "max_input_bytes"}
    assert body["max_input_bytes"] == 64 << 20  # what `cape encrypt` sizes its output for
    # The default is this host's interpreter: simulated enclaves run it.
    assert RuntimeTarget.from_json(body) == RuntimeTarget.local()


def test_runtime_route_reports_the_configured_target(
    store: SqlMetadataStore, blobs: DirectoryBlobStore
) -> None:
    target = RuntimeTarget("3.12", "cp", "cp312", ("manylinux_2_28_aarch64", "linux_aarch64"))
    accounts = Accounts(store, TokenIssuer(Ed25519PrivateKey.generate()))
    deps = ApiDeps(
        store=store,
        blobs=blobs,
        accounts=accounts,
        attestation_root_pem=ROOT_PEM,
        key_documents=_key_documents,
        runtime=target,
    )
    with TestClient(Starlette(routes=create_rest_routes(deps))) as test_client:
        response = test_client.get("/v1/runtime")
    assert response.status_code == 200
    assert RuntimeTarget.from_json(response.json()) == target
