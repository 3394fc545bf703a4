"""The REST half of the protocol (protocol.md "REST"): accounts, functions, tokens, keys."""

from __future__ import annotations

import json
import ssl
from typing import Any, Final, Self

import httpx

from cape.errors import FormatError, RequestRefusedError, TransportError
from cape.formats.runtime import RuntimeTarget

__all__ = ["RestClient"]

TIMEOUT_S: Final = 30.0


def refusal_text(body: bytes | bytearray) -> str | None:
    """The ``error`` (or ``message``) of a JSON refusal body, at most 300 characters; ``None``
    when the body is not a JSON object (however deep or malformed)."""
    try:
        parsed = json.loads(body or b"{}")
    except (ValueError, RecursionError):
        return None
    if not isinstance(parsed, dict):
        return None
    return str(parsed.get("error") or parsed.get("message") or "")[:300]


def retry_after_seconds(value: object) -> int | None:
    """A ``Retry-After`` of whole seconds (the only form Cape sends: a header's text, or a
    number in a busy error frame), else ``None``."""
    if isinstance(value, str) and value.strip().isdigit() and len(value) < 8:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**7:
        return value
    return None


def retry_hint(seconds: int | None) -> str:
    """What a refusal's one line adds when the server says when to try again."""
    return "" if seconds is None else f"; try again in {seconds} s"


def refused(
    message: str, text: str, status: int, retry_after: str | None = None
) -> RequestRefusedError:
    """A refusal, with the re-login hint when the server says the token expired and the
    server's ``Retry-After`` (whole seconds) when it says when to try again."""
    if "token is expired" in text:
        message += "; log in again"
    message += retry_hint(retry_after_seconds(retry_after))
    return RequestRefusedError(message, status=status)


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
                try:
                    return json.loads(response.content)
                except (ValueError, RecursionError):
                    raise FormatError(
                        f"the server's answer to {method} {path} is not JSON"
                    ) from None
            return response.content
        text = refusal_text(response.content)
        if text is None:
            text = response.text[:200]
        status = response.status_code
        raise refused(
            f"{text or 'request failed'} (HTTP {status})",
            text,
            status,
            response.headers.get("retry-after"),
        )

    def signup(self, username: str, password: str, invite: str | None = None) -> dict[str, Any]:
        """Create an account; ``invite`` is the code an invite-only server needs."""
        body = {"username": username, "password": password}
        if invite is not None:
            body["invite"] = invite
        result: dict[str, Any] = self.request("POST", "/v1/signup", body)
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
