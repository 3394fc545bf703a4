"""The REST half of the protocol (protocol.md "REST"): accounts, functions, tokens, keys."""

from __future__ import annotations

import ssl
from typing import Any, Final, Self

import httpx

from cape.errors import FormatError, RequestRefusedError, TransportError
from cape.formats.runtime import RuntimeTarget

__all__ = ["RestClient"]

TIMEOUT_S: Final = 30.0


class RestClient:
    """Synchronous JSON calls to one server; errors become one-line CapeErrors."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext, token: str | None = None) -> None:
        if not url.startswith("https://"):
            raise FormatError(f"the server URL must use https://, not {url.split(':', 1)[0]}://")
        self.url = url.rstrip("/")
        self.token = token
        self._client = httpx.Client(verify=ssl_context, timeout=TIMEOUT_S)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            response = self._client.request(method, self.url + path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise TransportError(f"cannot reach the Cape server at {self.url}: {exc}") from None
        if response.is_success:
            if response.headers.get("content-type", "").startswith("application/json"):
                return response.json()
            return response.content
        try:
            text = str(response.json().get("error") or response.json().get("message") or "")
        except (ValueError, AttributeError):
            text = response.text[:200]
        message = f"{text or 'request failed'} (HTTP {response.status_code})"
        if "token is expired" in text:
            message += "; log in again"
        raise RequestRefusedError(message, status=response.status_code)

    def signup(self, username: str, password: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "POST", "/v1/signup", {"username": username, "password": password}
        )
        return result

    def login(self, username: str, password: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "POST", "/v1/login", {"username": username, "password": password}
        )
        return result

    def attestation_root(self) -> bytes:
        data: bytes = self.request("GET", "/v1/attestation/root")
        return data

    def runtime(self) -> RuntimeTarget:
        """The enclave's Python, for vendoring requirements (FormatError if malformed)."""
        return RuntimeTarget.from_json(self.request("GET", "/v1/runtime"))
