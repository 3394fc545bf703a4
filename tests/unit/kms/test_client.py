"""The node's key-service client: settings it accepts, and bounded waits (never a hang)."""

from __future__ import annotations

import hashlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cape.errors import FormatError, KeyServiceUnavailableError, VerificationError
from cape.kms import client as client_module
from cape.kms.client import KeyServiceClient, check_key_service_url, parse_pin, read_node_token
from cape.platform.tls import ensure_pinned_certificate


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sha256:" + "AB" * 32, "ab" * 32),
        ("  sha256:" + ":".join(["0f"] * 32) + " ", "0f" * 32),
    ],
)
def test_pins_in_printed_forms(text: str, expected: str) -> None:
    assert parse_pin(text) == expected


@pytest.mark.parametrize("text", ["", "ab" * 32, "sha1:" + "ab" * 20, "sha256:" + "ab" * 31])
def test_bad_pins(text: str) -> None:
    with pytest.raises(FormatError, match="sha256: and 64 hex digits"):
        parse_pin(text)


@pytest.mark.parametrize(
    "url",
    ["http://kms:7443", "https://kms:7443/v1", "https://user:pw@kms", "https://:7443", "kms:7443",
     "https://kms:notaport", "https://kms?x=1"],
)  # fmt: skip
def test_bad_urls(url: str) -> None:
    with pytest.raises(FormatError, match=r"https://HOST\[:PORT\]"):
        check_key_service_url(url)


def test_good_urls() -> None:
    assert check_key_service_url("https://kms.internal:7443/") == "https://kms.internal:7443"
    assert check_key_service_url("https://[::1]:7443") == "https://[::1]:7443"


def test_token_files(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_text("  0123456789abcdef0123\n")
    assert read_node_token(path) == b"0123456789abcdef0123"
    for bad in ("short", "0123456789 abcdef0123", "ünïcødé-ünïcødé-ünïcødé"):
        path.write_text(bad)
        with pytest.raises(FormatError, match="at least 16 printable ASCII"):
            read_node_token(path)


@pytest.fixture
def silent_server(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    """A TLS server with a pinned certificate that completes handshakes, then never answers."""
    cert, key = ensure_pinned_certificate(tmp_path, "127.0.0.1")
    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    stop = threading.Event()
    held: list[ssl.SSLSocket] = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                held.append(context.wrap_socket(connection, server_side=True))
            except (OSError, ssl.SSLError):
                connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], der
    stop.set()
    thread.join(5)
    for connection in held:
        connection.close()
    listener.close()


def test_a_service_that_stops_answering_is_unavailable_within_the_bound(
    silent_server: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, der = silent_server
    monkeypatch.setattr(client_module, "READ_TIMEOUT_S", 1.0)
    client = KeyServiceClient(f"https://127.0.0.1:{port}", der, b"0123456789abcdef0123")
    try:
        started = time.monotonic()
        reply = client.relay({"t": "kms", "rid": 1, "op": "get_public_key", "owner": "alice"})
        assert reply == {"error": client_module.UNAVAILABLE_TEXT, "kind": "unavailable"}
        assert time.monotonic() - started < 10
        with pytest.raises(KeyServiceUnavailableError, match="did not answer within 1s"):
            client.node_info()
    finally:
        client.close()


def test_connect_checks_the_pin_before_anything_else(silent_server: tuple[int, bytes]) -> None:
    port, der = silent_server
    presented = hashlib.sha256(der).hexdigest()
    with pytest.raises(VerificationError) as raised:
        KeyServiceClient.connect(f"https://127.0.0.1:{port}", "ab" * 32, b"0123456789abcdef0123")
    assert f"sha256:{presented}" in str(raised.value) and "sha256:" + "ab" * 32 in str(raised.value)
