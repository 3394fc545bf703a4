"""The SDK's websocket proxy choice (``cape.sdk.session.proxy_for``): websockets' own rule,
remembered per server and proxy settings, so a changed proxy variable counts at the next
session, and sessions really go through the proxy it names."""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest
from websockets.proxy import get_proxy
from websockets.uri import parse_uri

from cape.errors import TransportError
from cape.sdk.session import PROXY_VARIABLES, Session, SessionOptions, proxy_for
from tests.integration.hostile import Pki

URLS = ("wss://cape.example:8443/v1/run/a", "wss://10.0.0.7/v1/key", "wss://[::1]:9/v1/test")
SETTINGS: tuple[dict[str, str], ...] = (
    {},
    {"HTTPS_PROXY": "http://proxy.example:3128"},
    {"https_proxy": "http://lower.example:3128", "HTTPS_PROXY": "http://upper.example:1"},
    {"HTTPS_PROXY": "http://proxy.example:3128", "NO_PROXY": "cape.example,10.0.0.7"},
    {"wss_proxy": "http://ws.example:8080", "https_proxy": "http://proxy.example:3128"},
    {"SOCKS_PROXY": "socks5h://socks.example:1080"},
)


@pytest.fixture(autouse=True)
def clean_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_the_choice_is_websockets_own_and_follows_every_change_of_the_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The same URLs are asked again after each change: a choice remembered beyond its
    # settings would answer with the previous proxy (or none).
    for settings in (*SETTINGS, *reversed(SETTINGS)):
        for name in PROXY_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        for url in URLS:
            assert proxy_for(url) == get_proxy(parse_uri(url)), (settings, url)


def test_a_session_goes_through_the_proxy_the_environment_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as probe:  # a port nothing listens on: a direct connect is refused
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    server_url = f"https://127.0.0.1:{closed}"

    async def scenario() -> list[bytes]:
        heads: list[bytes] = []

        async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            heads.append(await reader.readline())
            writer.close()  # refuse the tunnel: the session must then fail with a clear error

        server = await asyncio.start_server(proxy, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        options = SessionOptions(root=Pki.generate().root, ssl_context=ssl.create_default_context())
        async with server:
            assert proxy_for(f"wss://127.0.0.1:{closed}/v1/key") is None  # remembered: none
            monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
            with pytest.raises(TransportError, match="cannot reach"):
                await Session.open(server_url, "/v1/key", "token", options)
            monkeypatch.setenv("NO_PROXY", "127.0.0.1")
            with pytest.raises(TransportError, match="cannot reach"):  # direct: refused
                await Session.open(server_url, "/v1/key", "token", options)
        return heads

    heads = asyncio.run(scenario())
    assert heads == [f"CONNECT 127.0.0.1:{closed} HTTP/1.1\r\n".encode()]
