"""TLS 1.3 session resumption for the SDK's websocket sessions.

Every Cape session is a new TLS connection, most often to the server of the one before. A
full handshake verifies the server's certificate chain and its signature over the handshake;
a resumed TLS 1.3 handshake (RFC 8446 §2.2) instead proves that the server holds the
resumption secret of an earlier full handshake that *this* :class:`ssl.SSLContext` verified
for the same host and port, and still agrees a fresh (EC)DHE key (OpenSSL's clients offer only
``psk_dhe_ke``), so each connection keeps forward secrecy. That saves ≈ 0.2 ms of the
client's CPU per session net of CPython's copies of the session (benchmarks/README.md, "The
Python SDK's CPU per session"), and spares the server its handshake signature.

The rules, each of which :mod:`tests.unit.sdk.test_tls_resumption` checks:

- tickets live in this process's memory only, per ``SSLContext`` object and per
  ``(host, port)``, at most :data:`TICKETS_PER_SERVER` each, newest first;
- each ticket is offered once (taken out of the store), only to the host and port it came
  from, and only in the first handshake of the connection it was taken for (a redirect to
  another server gets a full handshake);
- only TLS 1.3 sessions are kept (TLS 1.2 resumption repeats the old master secret), and only
  tickets still inside their lifetime are offered;
- a server that did not resume an offered ticket, or gave none, a few connections in a row
  (a balancer across nodes, restarts, no tickets) is left alone for a while: reading and
  offering sessions cost CPython a copy each, which would otherwise make it dearer to reach;
- a connection through an HTTP proxy, or on an event loop that is not asyncio's own (which
  may not call :meth:`ssl.SSLContext.wrap_bio`), uses the caller's context unchanged: a full
  handshake, as before.

A server that does not know a ticket (restarted, another node, rotated ticket keys) answers
with a full handshake, which verifies its certificate as usual. The attestation document is
verified in every session regardless: TLS protects the token; the enclave's identity comes
from the document.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Final, cast

__all__ = ["MISSES_BEFORE_REST", "REST_CONNECTIONS", "TICKETS", "TICKETS_PER_SERVER", "TicketStore"]

TICKETS_PER_SERVER: Final = 32
"""Saved sessions per server and context; the oldest go first (a burst of concurrent
sessions each brings a fresh ticket back, which the next burst uses)."""
MISSES_BEFORE_REST: Final = 3
REST_CONNECTIONS: Final = 64
"""A server that did not resume or give a ticket :data:`MISSES_BEFORE_REST` times in a row
is neither offered nor asked for sessions for its next :data:`REST_CONNECTIONS` connections."""


class _Offering:
    """What asyncio's SSL transport sees as the connection's context: the caller's own, whose
    :meth:`wrap_bio` also offers one saved session, once, to the server it was saved for.
    asyncio (3.11 to 3.13) uses nothing of the context but :meth:`wrap_bio`; anything else is
    the caller's context's own attribute."""

    def __init__(self, context: ssl.SSLContext, host: str, session: ssl.SSLSession) -> None:
        self._context = context
        self._host = host
        self._session: ssl.SSLSession | None = session

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        offered, self._session = self._session, None
        if session is None and not server_side and server_hostname == self._host:
            session = offered
        return self._context.wrap_bio(
            incoming,
            outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


@dataclass
class _Server:
    """What the store knows of one server (per context): its saved sessions, and whether it
    has lately failed to resume or to give tickets."""

    saved: deque[ssl.SSLSession]
    misses: int = 0
    """Connections in a row that were offered a ticket and did not resume, or brought none."""
    resting: int = 0
    """Connections still to make without offering or reading a session (a back-off)."""


class TicketStore:
    """Saved TLS 1.3 sessions per ``SSLContext`` and server (see the module docstring).

    Reading a connection's session and offering one each cost CPython a copy of the session
    (≈ 0.2 ms each, the server's certificate included), so a server that does not resume
    (behind a balancer across nodes, restarted, without tickets or TLS 1.3) would make every
    connection dearer: after :data:`MISSES_BEFORE_REST` such connections in a row, the next
    :data:`REST_CONNECTIONS` to it neither offer nor read a session, then it is tried again."""

    def __init__(self, per_server: int = TICKETS_PER_SERVER) -> None:
        self._per_server = per_server
        self._lock = threading.Lock()
        self._servers: weakref.WeakKeyDictionary[ssl.SSLContext, dict[tuple[str, int], _Server]] = (
            weakref.WeakKeyDictionary()
        )

    def offer(
        self, context: ssl.SSLContext, host: str, port: int, *, direct: bool
    ) -> tuple[ssl.SSLContext, ssl.SSLSession | None]:
        """The ``ssl`` argument for a connection to ``host:port``, and the saved session it
        offers: the caller's context, made to offer one when it is at hand and the connection
        is ``direct`` (no HTTP proxy) on asyncio's own event loop; else the context as is."""
        if not direct or not isinstance(asyncio.get_running_loop(), asyncio.BaseEventLoop):
            return context, None
        session = self._take(context, host, port)
        if session is None:
            return context, None
        return cast(ssl.SSLContext, _Offering(context, host, session)), session

    def keep(
        self,
        context: ssl.SSLContext,
        host: str,
        port: int,
        transport: Any,
        offered: ssl.SSLSession | None = None,
    ) -> None:
        """Save the session of an open connection (its ``transport``) for a later one, if it
        is a TLS 1.3 session with a ticket other than the ``offered`` one (spent)."""
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if not isinstance(ssl_object, ssl.SSLObject):
            return
        with self._lock:
            server = self._server(context, host, port)
            if server.resting > 0:
                return
        session = ssl_object.session if ssl_object.version() == "TLSv1.3" else None
        usable = session is not None and session.has_ticket and _fresh(session)
        resumed = offered is not None and ssl_object.session_reused
        with self._lock:
            if (offered is not None and not resumed) or not usable:
                server.misses += 1
            else:
                server.misses = 0
            if server.misses >= MISSES_BEFORE_REST:
                server.misses, server.resting = 0, REST_CONNECTIONS
                server.saved.clear()
                return
            if not usable or session is None or session == offered:  # no fresh ticket came
                return
            if session not in server.saved:
                server.saved.append(session)

    def clear(self) -> None:
        """Forget every saved session and back-off."""
        with self._lock:
            self._servers.clear()

    def saved(self, context: ssl.SSLContext, host: str, port: int) -> int:
        """How many sessions are saved for this context and server (for tests and figures)."""
        with self._lock:
            return len(self._server(context, host, port).saved)

    def resting(self, context: ssl.SSLContext, host: str, port: int) -> bool:
        """Whether connections to this server currently neither offer nor read sessions."""
        with self._lock:
            return self._server(context, host, port).resting > 0

    def _server(self, context: ssl.SSLContext, host: str, port: int) -> _Server:
        servers = self._servers.setdefault(context, {})
        server = servers.get((host, port))
        if server is None:
            server = servers[(host, port)] = _Server(deque(maxlen=self._per_server))
        return server

    def _take(self, context: ssl.SSLContext, host: str, port: int) -> ssl.SSLSession | None:
        with self._lock:
            server = self._server(context, host, port)
            if server.resting > 0:  # the connection that ends the rest reads its session
                server.resting -= 1
                return None
            while server.saved:
                session = server.saved.pop()  # the newest
                if _fresh(session):
                    return session
            return None


def _fresh(session: ssl.SSLSession) -> bool:
    """Still inside the lifetime the server gave its ticket (``time`` + ``timeout``)."""
    return time.time() < session.time + session.timeout


TICKETS: Final = TicketStore()
"""The SDK's sessions' saved TLS sessions (this process)."""
