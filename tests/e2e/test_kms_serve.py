"""Two ``cape serve`` nodes, separate data directories, one ``cape kms serve`` (issue 14).

Real processes and real TLS on loopback: one key service for the module (its pin printed at
start, a node token in a file) and two nodes configured only by ``CAPE_*`` settings: the key
service's URL, pin and token file, and the shared database, blob store and token-signing key
(here a SQLite file and directories standing for PostgreSQL and S3, which
``tests/e2e/test_cluster.py`` uses). The tests show:

- a ``cape:`` ciphertext made with the key fetched through node A decrypts in a run through
  node B (one key service behind both);
- a client pinning the one cluster root verifies documents from both nodes, each chained
  root → that node's intermediate → instance CA;
- the root key, the master key and the runtime signer's key exist only in the key service's
  data directory;
- wrong pin, wrong token and an unreachable key service are each one ``Error:`` line at node
  start; a key service killed while the node runs fails calls that need a key with the typed
  "key service unavailable" (close 1013) at once, ``/readyz`` names it, and the node recovers
  when the key service is back;
- the canary plaintext is in neither the key service's files nor its logs.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest
import websockets
from cryptography import x509

from cape.crypto import envelope
from cape.errors import BusyError
from cape.sdk.flows import fetch_key, run_path
from cape.sdk.session import SUBPROTOCOL, ws_url
from cape.verify.roots import fingerprint
from tests.e2e.conftest import requires_enclaves
from tests.e2e.server import ServeProcess, User, run
from tests.kms_service import KeyServiceProcess
from tests.services import free_port

pytestmark = requires_enclaves

CANARY: Final = "kms-canary-" + secrets.token_hex(8)
ECHO: Final = "def cape_handler(data):\n    return b'echo:' + data\n"


@dataclass
class Cluster:
    kms: KeyServiceProcess
    shared: Path
    a: ServeProcess
    b: ServeProcess

    def client(self, node: ServeProcess) -> ServeProcess:
        """A client's view of ``node``: its URL and CA, the key service's cluster root."""
        view = ServeProcess(node.data_dir, node.config_dir, node.log_dir)
        view.url = node.url
        return view


def _shared_env(shared: Path) -> dict[str, str]:
    return {
        "CAPE_DATABASE_URL": f"sqlite:///{shared / 'metadata.sqlite3'}",
        "CAPE_BLOB_STORE": str(shared / "blobs"),
        "CAPE_AUTH_DIR": str(shared / "auth"),
    }


def _node(base: Path, name: str, env: dict[str, str]) -> ServeProcess:
    return ServeProcess(
        base / name / "data",
        base / name / "config",
        base / name / "logs",
        enclaves=1,
        extra_args=["--signup-rate", "0"],
        env={**env, "CAPE_NODE_NAME": name},
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("kms-cluster")
    kms = KeyServiceProcess.create(base / "kms").start()
    shared = base / "shared"
    env = {**_shared_env(shared), **kms.node_env()}
    nodes: list[ServeProcess] = []
    try:
        nodes.append(_node(base, "node-a", env).start())
        nodes.append(_node(base, "node-b", env).start())
        yield Cluster(kms, shared, nodes[0], nodes[1])
    finally:
        for node in nodes:
            node.kill()
        kms.kill()


def _cape_input(user: User, via: ServeProcess, plaintext: bytes) -> str:
    key = run(fetch_key(via.url, user.token, via.options()))
    return envelope.encrypt_text(plaintext, key)


def test_a_ciphertext_made_through_node_a_runs_through_node_b(cluster: Cluster) -> None:
    user = User.signup(cluster.a)
    echo = run(user.deploy(ECHO, name="echo")).id
    ciphertext = _cape_input(user, cluster.a, b"from node a " + CANARY.encode())
    on_b = User(cluster.b, user.username, user.token)
    assert run(on_b.run(echo, ciphertext.encode())) == b"echo:from node a " + CANARY.encode()
    # The key behind both nodes is one key: fetched through B, it is the same public key.
    key_b = run(fetch_key(cluster.b.url, user.token, cluster.b.options()))
    key_a = run(fetch_key(cluster.a.url, user.token, cluster.a.options()))
    assert key_a.public_numbers() == key_b.public_numbers()


def test_one_cluster_root_verifies_documents_from_both_nodes(cluster: Cluster) -> None:
    root_file = cluster.kms.data_dir / "attestation" / "root.pem"
    root = x509.load_pem_x509_certificate(root_file.read_bytes())
    for node in (cluster.a, cluster.b):  # each node serves the cluster root, not its own
        assert node.root == root
        assert f"sha256:{fingerprint(root)}" in node.stdout()
    user = User.signup(cluster.a)
    echo = run(user.deploy(ECHO, name="echo")).id
    intermediates = []
    for node in (cluster.a, cluster.b):
        client = User(node, user.username, user.token)

        async def open_and_run(client: User = client) -> tuple[bytes, tuple[bytes, ...]]:
            session = await client.session(echo)
            try:  # the session verified its document against the pinned cluster root
                return await session.invoke(b"hi"), session.document.cabundle
            finally:
                await session.close()

        output, cabundle = run(open_and_run())
        assert output == b"echo:hi"
        chain = [x509.load_der_x509_certificate(der) for der in cabundle]
        assert len(chain) == 3 and chain[0] == root  # root → node intermediate → instance
        node_name = "node-a" if node is cluster.a else "node-b"
        assert f"{node_name}.node." in chain[1].subject.rfc4514_string()
        intermediates.append(chain[1])
    assert intermediates[0] != intermediates[1]


def _files(directory: Path) -> Iterator[Path]:
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            yield path


def test_key_service_secrets_exist_only_in_its_data_directory(cluster: Cluster) -> None:
    secrets_ = {
        "root key": (cluster.kms.data_dir / "attestation" / "root.key").read_bytes(),
        "master key": (cluster.kms.data_dir / "kms" / "master.key").read_bytes(),
        "signer key": (cluster.kms.data_dir / "image-signing" / "key.pem").read_bytes(),
    }
    assert all(len(value) >= 32 for value in secrets_.values())
    outside = [cluster.shared, cluster.a.data_dir.parent, cluster.b.data_dir.parent]
    for directory in outside:
        for path in _files(directory):
            data = path.read_bytes()
            for what, value in secrets_.items():
                assert value.strip() not in data, f"the {what} is in {path}"
            assert path.name not in {"root.key", "master.key", "kms.sqlite3"}, path


def _start_fails(tmp: Path, env: dict[str, str]) -> list[str]:
    """``cape serve`` with these settings: its stderr lines (it must exit non-zero)."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from cape.cli.app import main; main()",
            "serve",
            "--data-dir",
            str(tmp / "data"),
            "--port",
            "0",
            "--enclaves",
            "1",
        ],
        env={**os.environ, "CAPE_CONFIG_DIR": str(tmp / "config"), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0, result.stdout
    assert "Ready:" not in result.stdout
    assert "Traceback" not in result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


def test_a_wrong_pin_is_one_error_naming_both_fingerprints(
    cluster: Cluster, tmp_path: Path
) -> None:
    wrong = "sha256:" + "ab" * 32
    errors = _start_fails(tmp_path, cluster.kms.node_env(CAPE_KEY_SERVICE_PIN=wrong))
    assert len(errors) == 1
    assert cluster.kms.pin in errors[0] and wrong in errors[0] and cluster.kms.url in errors[0]


def test_a_wrong_token_is_one_error(cluster: Cluster, tmp_path: Path) -> None:
    token = tmp_path / "wrong.token"
    token.write_text(secrets.token_hex(32))
    errors = _start_fails(tmp_path, cluster.kms.node_env(CAPE_KEY_SERVICE_TOKEN_FILE=str(token)))
    assert len(errors) == 1 and "refused this node's token (HTTP 401)" in errors[0]
    assert token.read_text() not in errors[0]


def test_an_unreachable_key_service_is_one_error_naming_its_url(
    cluster: Cluster, tmp_path: Path
) -> None:
    url = f"https://127.0.0.1:{free_port()}"  # nothing listens there
    errors = _start_fails(tmp_path, cluster.kms.node_env(CAPE_KEY_SERVICE_URL=url))
    assert errors == [f"Error: cannot reach the key service at {url}: Connection refused"]


def _readyz(node: ServeProcess) -> tuple[int, dict[str, object]]:
    context = ssl.create_default_context(cafile=str(node.ca_file))
    try:
        with urllib.request.urlopen(node.url + "/readyz", context=context, timeout=30) as reply:
            return int(reply.status), json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


async def _raw_run(node: ServeProcess, function: str, token: str) -> tuple[list[str], int]:
    """Open a run session by hand: the frames the server sends, and its close code."""
    frames: list[str] = []
    async with websockets.connect(
        ws_url(node.url, run_path(function)),
        subprotocols=[SUBPROTOCOL, token],  # type: ignore[list-item]
        ssl=node.ssl_context(),
    ) as websocket:
        nonce = base64.b64encode(secrets.token_bytes(16)).decode()
        await websocket.send(json.dumps({"message": {"nonce": nonce}}))
        try:
            while True:
                frames.append(str(await websocket.recv()))
        except websockets.ConnectionClosed as exc:
            return frames, exc.rcvd.code if exc.rcvd is not None else 1006


def test_a_key_service_killed_mid_run_fails_key_calls_clearly_until_it_is_back(
    cluster: Cluster,
) -> None:
    user = User.signup(cluster.a)
    echo = run(user.deploy(ECHO, name="echo")).id
    ciphertext = _cape_input(user, cluster.a, b"needs a key").encode()
    assert _readyz(cluster.a)[0] == 200
    cluster.kms.kill()
    try:
        started = time.monotonic()
        # The run needs the owner's key (for its bundle and its cape: input): the enclave's
        # typed KeyServiceUnavailableError reaches the client as the server's error frame
        # before the close (1013, try again later), marked "busy": our SDK's BusyError.
        with pytest.raises(BusyError) as raised:
            run(user.run(echo, ciphertext))
        assert str(raised.value) == "the key service is unavailable; try again later"
        frames, code = run(_raw_run(cluster.a, echo, user.token))
        assert code == 1013  # try again later: the enclave's typed KeyServiceUnavailableError
        assert frames == ['{"error":"the key service is unavailable; try again later","busy":true}']
        # Connection refused: an answer at once, not after the relay's read timeout.
        assert time.monotonic() - started < 20
        status, body = _readyz(cluster.a)
        checks = body["checks"]
        assert status == 503 and isinstance(checks, dict)
        assert checks["key_service"] != "ok" and cluster.kms.url in str(checks["key_service"])
        # What needs no key still works.
        assert any(f["id"] == echo for f in user.api("GET", "/v1/functions"))
        assert "cannot reach the key service at" in cluster.a.stderr()
    finally:
        cluster.kms.start()  # same port, data directory and certificate: the same pin
    assert _readyz(cluster.a)[0] == 200
    assert run(user.run(echo, ciphertext)) == b"echo:needs a key"


def test_the_canary_is_absent_from_the_key_service_files_and_logs(cluster: Cluster) -> None:
    user = User.signup(cluster.b)
    function = run(user.deploy(ECHO + f"# {CANARY}\n", name="canary")).id
    ciphertext = _cape_input(user, cluster.b, CANARY.encode())
    assert run(user.run(function, ciphertext.encode())) == b"echo:" + CANARY.encode()
    needle = CANARY.encode()
    for path in [*_files(cluster.kms.data_dir), *_files(cluster.kms.log_dir)]:
        assert needle not in path.read_bytes(), path
