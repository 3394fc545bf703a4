"""A node's side of the network key service (``cape kms serve``, :mod:`cape.kms.server`).

The channel is TLS with the key service's certificate **pinned** by SHA-256
(``key_service_pin = "sha256:HEX"``): :meth:`KeyServiceClient.connect` first fetches the
certificate the service presents, before sending anything, and refuses one with another
fingerprint (naming both); from then on the HTTPS client trusts exactly that certificate, so a
certificate change mid-run fails the handshake instead of reaching an impostor. Every request
carries the shared node token (``key_service_token_file``).

What the node learns over this channel (the key service's answer identity and the cluster's
attestation root) is trust-on-configuration: it is as good as the pin and the token the
operator configured. Key answers are signed by that identity and checked inside the enclave,
so the node relaying them cannot forge one.

Every call is bounded (:data:`CONNECT_TIMEOUT_S`, :data:`READ_TIMEOUT_S`). At start a failure
is one clear error; while serving, :meth:`KeyServiceClient.relay` turns an unreachable or
failing service into a ``kind = "unavailable"`` answer, which the enclave raises as
:class:`~cape.errors.KeyServiceUnavailableError` (the client sees "try again later").
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import ssl
import urllib.parse
from pathlib import Path
from typing import Any, Final

import cbor2
import httpx

from cape.errors import (
    CapeError,
    FormatError,
    KeyServiceUnavailableError,
    RequestRefusedError,
    VerificationError,
)
from cape.formats.frames import parse_frame_body

__all__ = [
    "CONNECT_TIMEOUT_S",
    "READ_TIMEOUT_S",
    "KeyServiceClient",
    "check_key_service_url",
    "parse_pin",
    "read_node_token",
]

CONNECT_TIMEOUT_S: Final = 5.0
READ_TIMEOUT_S: Final = 20.0
"""Longest wait for one answer; under the enclave's own 30 s, so the enclave hears the
typed error rather than a timeout of its own."""
MIN_TOKEN_BYTES: Final = 16
_PIN = re.compile(r"sha256:([0-9a-f]{64})")
UNAVAILABLE_TEXT: Final = "the key service is unavailable; try again later"
"""What the enclave (and so the client) hears; the node's log names the URL and the cause."""
_RELAYED: Final = ("result", "sig", "error", "kind")

log = logging.getLogger("cape.kms.client")


def parse_pin(text: str) -> str:
    """``sha256:HEX`` (64 hex digits, any case, colons between bytes allowed) → lower hex.

    Raises:
        FormatError: anything else.
    """
    value = text.strip().lower()
    if value.startswith("sha256:"):
        value = "sha256:" + value.removeprefix("sha256:").replace(":", "")
    match = _PIN.fullmatch(value)
    if match is None:
        raise FormatError(
            "a certificate pin is sha256: and 64 hex digits (cape kms serve prints it)"
        )
    return match.group(1)


def check_key_service_url(text: str) -> str:
    """``https://HOST[:PORT]`` with no path, query or credentials; returned without a
    trailing slash.

    Raises:
        FormatError: anything else.
    """
    parsed = urllib.parse.urlsplit(text.strip())
    try:
        port = parsed.port
    except ValueError:
        port = -1
    if (
        parsed.scheme != "https"
        or not parsed.hostname
        or port == -1
        or parsed.username is not None
        or parsed.path not in ("", "/")
        or parsed.query
        or parsed.fragment
    ):
        raise FormatError("the key service URL must be https://HOST[:PORT] (no path)")
    return text.strip().rstrip("/")


def read_node_token(path: Path) -> bytes:
    """The shared node token in ``path`` (surrounding whitespace ignored).

    Raises:
        FormatError: unreadable, shorter than 16 characters, or not printable ASCII.
    """
    try:
        token = Path(path).read_bytes().strip()
    except OSError as exc:
        raise FormatError(f"cannot read the node token file {path}: {exc.strerror}") from None
    if len(token) < MIN_TOKEN_BYTES or not all(0x21 <= byte < 0x7F for byte in token):
        raise FormatError(
            f"the node token in {path} must be at least {MIN_TOKEN_BYTES} printable ASCII "
            "characters without spaces (e.g. `openssl rand -hex 32`)"
        )
    return token


def _presented_certificate(host: str, port: int, url: str) -> bytes:
    """The DER certificate the service presents (nothing is sent but the TLS handshake)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the pin is checked right after, before any request
    try:
        with (
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            certificate = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise KeyServiceUnavailableError(
            f"cannot reach the key service at {url}: {reason}"
        ) from None
    if not certificate:
        raise VerificationError(f"the key service at {url} presented no certificate")
    return certificate


class KeyServiceClient:
    """HTTPS to one key service, its certificate pinned; thread-safe (one connection pool)."""

    def __init__(self, url: str, certificate_der: bytes, token: bytes) -> None:
        self.url = url
        pem = ssl.DER_cert_to_PEM_cert(certificate_der)
        context = ssl.create_default_context(cadata=pem)
        context.check_hostname = False  # the pinned certificate is the identity, not a name
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # trust exactly that one
        self._client = httpx.Client(
            base_url=url,
            verify=context,
            timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            headers={"Authorization": "Bearer " + token.decode("ascii")},
            trust_env=False,
        )

    @classmethod
    def connect(cls, url: str, pin: str, token: bytes) -> KeyServiceClient:
        """Check the service's certificate against ``pin`` (hex SHA-256), then check the
        token with one authenticated request.

        Raises:
            KeyServiceUnavailableError: the service cannot be reached.
            VerificationError: it presents a certificate with another fingerprint.
            RequestRefusedError: it refuses the node token (401).
        """
        url = check_key_service_url(url)
        parsed = urllib.parse.urlsplit(url)
        host, port = parsed.hostname or "", parsed.port or 443
        der = _presented_certificate(host, port, url)
        presented = hashlib.sha256(der).hexdigest()
        if presented != pin:
            raise VerificationError(
                f"the key service at {url} presented certificate sha256:{presented}, but "
                f"key_service_pin expects sha256:{pin}: check the pin (cape kms serve prints "
                "it) or the URL"
            )
        client = cls(url, der, token)
        try:
            client.node_info()
        except BaseException:
            client.close()
            raise
        return client

    # --- calls ------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise KeyServiceUnavailableError(
                f"the key service at {self.url} did not answer within {READ_TIMEOUT_S:g}s"
            ) from None
        except httpx.HTTPError as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise KeyServiceUnavailableError(
                f"cannot reach the key service at {self.url}: {reason}"
            ) from None
        if response.status_code == 401:
            raise RequestRefusedError(
                f"the key service at {self.url} refused this node's token (HTTP 401): check "
                "key_service_token_file against the service's node_token_file",
                status=401,
            )
        if response.status_code >= 500:
            raise KeyServiceUnavailableError(
                f"the key service at {self.url} answered HTTP {response.status_code}"
            )
        if response.status_code != 200:
            raise CapeError(
                f"the key service at {self.url} refused {path} (HTTP {response.status_code}): "
                f"{_error_text(response)}"
            )
        return response

    def node_info(self) -> tuple[bytes, bytes]:
        """The service's answer identity (raw Ed25519 public key) and the cluster root (PEM)."""
        response = self._request("GET", "/v1/node")
        try:
            document = response.json()
            identity = bytes.fromhex(document["identity"])
            root_pem = str(document["root_pem"]).encode()
        except (ValueError, TypeError, KeyError):
            raise FormatError(f"the key service at {self.url} sent a malformed /v1/node") from None
        return identity, root_pem

    def intermediate(self, request_pem: bytes) -> bytes:
        """This node's intermediate CA certificate (PEM) for its certificate request."""
        return self._request("POST", "/v1/attestation/intermediate", content=request_pem).content

    def runtime_signature(self, pcr0: bytes) -> bytes:
        """The release signer's signature section for a runtime measuring ``pcr0``."""
        body = json.dumps({"pcr0": pcr0.hex()}).encode()
        return self._request("POST", "/v1/runtime/signature", content=body).content

    def relay(self, message: dict[str, Any]) -> dict[str, Any]:
        """Forward one enclave ``kms`` frame; the answer as the enclave expects it. Never
        raises: a failure is an unsigned ``{"error": …, "kind": …}`` answer."""
        try:
            response = self._request(
                "POST",
                "/v1/kms",
                content=cbor2.dumps(message),
                headers={"Content-Type": "application/cbor"},
            )
            reply = parse_frame_body(response.content)
            if reply.get("t") != "kms_result":
                raise FormatError("the key service answered with another frame type")
        except KeyServiceUnavailableError as exc:
            log.warning("%s", exc.diagnostics())
            return {"error": UNAVAILABLE_TEXT, "kind": "unavailable"}
        except CapeError as exc:
            log.warning("key service call failed: %s", exc.diagnostics())
            return {"error": "the key service call failed", "kind": "error"}
        return {name: reply[name] for name in _RELAYED if name in reply}

    def check_ready(self) -> None:
        """Raise when the key service is not ready (``/readyz``), for the node's ``/readyz``."""
        try:
            response = self._client.get("/readyz", timeout=CONNECT_TIMEOUT_S)
        except httpx.HTTPError as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise KeyServiceUnavailableError(f"{self.url} unreachable: {reason}") from None
        if response.status_code != 200:
            raise KeyServiceUnavailableError(f"{self.url} not ready (HTTP {response.status_code})")

    def close(self) -> None:
        self._client.close()


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error"))[:200]
    except (ValueError, AttributeError):
        return response.text[:200]
