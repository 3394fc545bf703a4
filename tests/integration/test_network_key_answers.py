"""Key answers relayed from a network key service: a hostile node cannot forge them.

The same attacks as ``test_key_answers.py`` (substitute, strip, replay), on the network path:
a real ``cape kms serve`` over pinned TLS, a node platform connected to it as ``cape serve``
connects (:class:`~cape.platform.kms_node.NodePlatform`), and a real enclave process whose
``kms`` frames that node relays. The node rewrites answers between the key service and the
enclave; the enclave, measuring the service's identity into PCR16, must refuse every rewrite.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import ssl
import threading
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509

from cape.crypto.keyanswers import IDENTITY_PCR, identity_pcr
from cape.crypto.keys import generate_cape_key, public_key_der
from cape.errors import VerificationError
from cape.formats.attestation import AttestationDocument
from cape.host.launcher import EnclaveConnection
from cape.kms.client import KeyServiceClient, parse_pin, read_node_token
from cape.platform.kms_node import NodePlatform
from cape.platform.tls import ensure_pinned_certificate
from cape.verify.policy import AttestationPolicy
from cape.verify.verifier import verify_attestation
from tests.integration.harness import (
    OWNER,
    AnswerTap,
    attested,
    key_session_error,
    requires_enclaves,
    substitute_public_key,
)
from tests.kms_service import KeyServiceProcess

pytestmark = requires_enclaves

T = TypeVar("T")


class HostileNode(NodePlatform):
    """A node that may rewrite the key service's answers on their way to the enclave."""

    def __init__(
        self, client: KeyServiceClient, node: str, identity: bytes, root: x509.Certificate
    ) -> None:
        super().__init__(client, node, identity, root)
        self.tap = AnswerTap()
        self.loop = asyncio.new_event_loop()

    def _kms(self, message: dict[str, Any]) -> dict[str, Any]:
        return self.tap(message, super()._kms(message))

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def verify(self, document: bytes, nonce: bytes) -> AttestationDocument:
        return verify_attestation(
            document,
            root=self.root,
            now=dt.datetime.now(dt.UTC),
            policy=AttestationPolicy(nonce=nonce),
        )

    def close(self) -> None:
        super().close()
        self.loop.close()


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyServiceProcess]:
    process = KeyServiceProcess.create(tmp_path_factory.mktemp("kms")).start()
    yield process
    process.kill()


@pytest.fixture(scope="module")
def node(kms: KeyServiceProcess) -> Iterator[HostileNode]:
    token = read_node_token(kms.token_file)
    client = KeyServiceClient.connect(kms.url, parse_pin(kms.pin), token)
    identity, root_pem = client.node_info()
    platform = HostileNode(client, "hostile", identity, x509.load_pem_x509_certificate(root_pem))
    yield platform
    platform.close()


@pytest.fixture(scope="module")
def enclave(node: HostileNode) -> Iterator[EnclaveConnection]:
    connection = node.run(node.launcher().start())
    yield connection
    node.run(connection.close())


@pytest.fixture(autouse=True)
def _honest_again(node: HostileNode) -> Iterator[None]:
    yield
    node.tap.honest()


def _key_session_error(node: HostileNode, enclave: EnclaveConnection, owner: str) -> str:
    return node.run(key_session_error(enclave, owner))


def test_an_honest_relay_verifies_and_chains_to_the_cluster_root(
    node: HostileNode, enclave: EnclaveConnection
) -> None:
    session, document = node.run(attested(enclave, node, "key"))  # type: ignore[arg-type]
    node.run(session.close())
    request, reply = node.tap.seen[-1]
    assert isinstance(request["challenge"], bytes) and isinstance(reply["sig"], bytes)
    assert len(document.cabundle) == 3  # cluster root → this node's intermediate → instance
    assert document.pcrs[IDENTITY_PCR] == identity_pcr(node.identity_public)


def test_a_node_substituting_its_own_public_key_fails_the_session(
    node: HostileNode, enclave: EnclaveConnection
) -> None:
    rogue = public_key_der(generate_cape_key().public_key())

    node.tap.rewrite = substitute_public_key(rogue)
    error = _key_session_error(node, enclave, OWNER)
    assert "does not verify against the measured key service identity" in error


def test_a_node_stripping_the_signature_fails_the_session(
    node: HostileNode, enclave: EnclaveConnection
) -> None:
    rogue = public_key_der(generate_cape_key().public_key())
    node.tap.rewrite = lambda message, reply: {"result": rogue}
    assert "is not signed" in _key_session_error(node, enclave, OWNER)


def test_a_node_replaying_another_users_answer_fails_the_session(
    node: HostileNode, enclave: EnclaveConnection
) -> None:
    node.run(attested(enclave, node, "key", owner="mallory"))  # type: ignore[arg-type]
    recorded = node.tap.answer_for("mallory")
    node.tap.rewrite = lambda message, reply: recorded
    error = _key_session_error(node, enclave, OWNER)
    assert "does not verify" in error and "'alice'" in error


def test_the_token_never_reaches_a_server_with_another_certificate(
    tmp_path: Path, kms: KeyServiceProcess
) -> None:
    """An impostor at the key service's address (another certificate) sees a TLS handshake
    and nothing else: the pin is checked before any request, so the token is never sent."""
    cert, key = ensure_pinned_certificate(tmp_path, "127.0.0.1")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    received: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def impostor() -> None:
            connection, _ = listener.accept()
            with context.wrap_socket(connection, server_side=True) as tls:
                tls.settimeout(5)
                with contextlib.suppress(OSError):
                    while chunk := tls.recv(65536):
                        received.append(chunk)

        thread = threading.Thread(target=impostor)
        thread.start()
        with pytest.raises(VerificationError, match="presented certificate sha256:"):
            KeyServiceClient.connect(
                f"https://127.0.0.1:{port}", parse_pin(kms.pin), read_node_token(kms.token_file)
            )
        thread.join(10)
    assert received == []
