"""TLS 1.3 session resumption between the SDK's sessions (``cape.sdk.tls``): a later session
to the same server resumes, every session still verifies its own attestation document, and a
ticket is offered once, only to the server and context it came from, only while fresh, and
never lets a server skip the certificate check that a full handshake makes."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cape.errors import TransportError
from cape.platform.tls import TlsFiles, ensure_tls
from cape.sdk import tls as sdk_tls
from cape.sdk.session import Session, SessionOptions
from tests.integration.hostile import (
    HostileServer,
    Pki,
    client_ssl_context,
    server_ssl_context,
)

RUN_PATH = "/v1/run/fn"
TOKEN = "token"
T = TypeVar("T")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return ensure_tls(tmp_path_factory.mktemp("tls"), "127.0.0.1")


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.generate()


def _options(tls: TlsFiles, pki: Pki) -> SessionOptions:
    return SessionOptions(root=pki.root, ssl_context=client_ssl_context(tls))


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def _session(url: str, options: SessionOptions) -> bool:
    """One run session with one invoke; whether its TLS connection resumed."""
    async with await Session.open(url, RUN_PATH, TOKEN, options) as session:
        ssl_object = session._ws.transport.get_extra_info("ssl_object")
        assert await session.invoke(b"hi") == b"echo:hi"
        return bool(ssl_object.session_reused)


def _run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(scenario())


def test_a_later_session_resumes_and_still_verifies_its_own_document(
    tls: TlsFiles, pki: Pki
) -> None:
    options = _options(tls, pki)

    async def scenario() -> tuple[list[bool], list[int], int]:
        async with HostileServer(tls, pki) as server:
            resumed = [await _session(server.url, options) for _ in range(4)]
            saved = sdk_tls.TICKETS.saved(options.ssl_context, "127.0.0.1", _port(server.url))
            records = await server.finished(4)
        # every session was sent its own document and sent its input only after it
        return resumed, [len(record.after_document) for record in records], saved

    resumed, inputs, saved = _run(scenario)
    assert resumed == [False, True, True, True]
    assert inputs == [1, 1, 1, 1]
    assert saved == 1  # each ticket offered once; the resumed session's fresh one kept


def test_a_ticket_goes_only_to_its_own_server_and_context(tls: TlsFiles, pki: Pki) -> None:
    options = _options(tls, pki)
    other_context = _options(tls, pki)  # the same trust, another SSLContext object

    async def scenario() -> list[bool]:
        async with HostileServer(tls, pki) as first, HostileServer(tls, pki) as second:
            return [
                await _session(first.url, options),  # full: nothing saved yet
                await _session(second.url, options),  # full: another port
                await _session(first.url, other_context),  # full: another context
                await _session(first.url, options),  # resumed: its own ticket
                await _session(second.url, options),  # resumed: its own ticket
            ]

    assert _run(scenario) == [False, False, False, True, True]


def test_a_server_that_does_not_know_the_ticket_must_pass_the_certificate_check(
    tls: TlsFiles, pki: Pki, tmp_path: Path
) -> None:
    # An impostor on the same host and port with a certificate the client does not trust:
    # the saved ticket means nothing to it, so the handshake is a full one and fails.
    options = _options(tls, pki)
    impostor = ensure_tls(tmp_path / "impostor", "127.0.0.1")  # another CA

    async def scenario() -> tuple[bool, int]:
        async with HostileServer(tls, pki) as server:
            port = _port(server.url)
            await _session(server.url, options)
            resumed = await _session(server.url, options)
        assert sdk_tls.TICKETS.saved(options.ssl_context, "127.0.0.1", port) == 1
        async with HostileServer(
            impostor, pki, ssl_context=server_ssl_context(impostor), port=port
        ) as fake:
            with pytest.raises(TransportError, match="cannot reach"):
                await Session.open(fake.url, RUN_PATH, TOKEN, options)
            assert fake.sessions == []
        return resumed, sdk_tls.TICKETS.saved(options.ssl_context, "127.0.0.1", port)

    resumed, saved = _run(scenario)
    assert resumed  # the real server resumed: the ticket was there to offer
    assert saved == 0  # and it was spent on the impostor, who could not use it


def test_a_server_that_sends_no_fresh_ticket_is_not_offered_the_old_one_again(
    tls: TlsFiles, pki: Pki
) -> None:
    options = _options(tls, pki)
    server_context = server_ssl_context(tls)

    async def scenario() -> list[bool]:
        async with HostileServer(tls, pki, ssl_context=server_context) as server:
            first = await _session(server.url, options)
            server_context.num_tickets = 0  # from now on: resumes, but issues no ticket
            second = await _session(server.url, options)
            third = await _session(server.url, options)
        return [first, second, third]

    assert _run(scenario) == [False, True, False]


def test_tls_1_2_sessions_and_expired_tickets_are_not_offered(
    tls: TlsFiles, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = _options(tls, pki)
    old_server = server_ssl_context(tls)
    old_server.maximum_version = ssl.TLSVersion.TLSv1_2

    async def scenario() -> list[bool]:
        async with HostileServer(tls, pki, ssl_context=old_server) as server:
            tls12 = [await _session(server.url, options) for _ in range(2)]
        async with HostileServer(tls, pki) as server:
            fresh = [await _session(server.url, options) for _ in range(2)]
            later = time.time() + 3 * 24 * 3600  # past any ticket's lifetime
            with monkeypatch.context() as patch:
                patch.setattr(time, "time", lambda: later)
                expired = await _session(server.url, options)
        return [*tls12, *fresh, expired]

    assert _run(scenario) == [False, False, False, True, False]


def test_a_connection_through_a_proxy_gets_the_callers_context_unchanged(
    tls: TlsFiles, pki: Pki
) -> None:
    options = _options(tls, pki)

    async def scenario() -> tuple[bool, bool]:
        async with HostileServer(tls, pki) as server:
            port = _port(server.url)
            await _session(server.url, options)
            context, offered = sdk_tls.TICKETS.offer(
                options.ssl_context, "127.0.0.1", port, direct=False
            )
            kept = sdk_tls.TICKETS.saved(options.ssl_context, "127.0.0.1", port) == 1
        return context is options.ssl_context and offered is None, kept

    assert _run(scenario) == (True, True)
