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
from typing import Any, Final, cast

__all__ = ["TICKETS", "TICKETS_PER_SERVER", "TicketStore"]

TICKETS_PER_SERVER: Final = 32
"""Saved sessions per server and context; the oldest go first (a burst of concurrent
sessions each brings a fresh ticket back, which the next burst uses)."""


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


class TicketStore:
    """Saved TLS 1.3 sessions per ``SSLContext`` and server (see the module docstring)."""

    def __init__(self, per_server: int = TICKETS_PER_SERVER) -> None:
        self._per_server = per_server
        self._lock = threading.Lock()
        self._saved: weakref.WeakKeyDictionary[
            ssl.SSLContext, dict[tuple[str, int], deque[ssl.SSLSession]]
        ] = weakref.WeakKeyDictionary()

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
        if not isinstance(ssl_object, ssl.SSLObject) or ssl_object.version() != "TLSv1.3":
            return
        session = ssl_object.session
        if session is None or not session.has_ticket or not _fresh(session):
            return
        if offered is not None and session == offered:  # no fresh ticket came: not reused
            return
        with self._lock:
            servers = self._saved.setdefault(context, {})
            saved = servers.setdefault((host, port), deque(maxlen=self._per_server))
            if session not in saved:
                saved.append(session)

    def clear(self) -> None:
        """Forget every saved session."""
        with self._lock:
            self._saved.clear()

    def saved(self, context: ssl.SSLContext, host: str, port: int) -> int:
        """How many sessions are saved for this context and server (for tests and figures)."""
        with self._lock:
            return len(self._saved.get(context, {}).get((host, port), ()))

    def _take(self, context: ssl.SSLContext, host: str, port: int) -> ssl.SSLSession | None:
        with self._lock:
            saved = self._saved.get(context, {}).get((host, port))
            while saved:
                session = saved.pop()  # the newest
                if _fresh(session):
                    return session
            return None


def _fresh(session: ssl.SSLSession) -> bool:
    """Still inside the lifetime the server gave its ticket (``time`` + ``timeout``)."""
    return time.time() < session.time + session.timeout


TICKETS: Final = TicketStore()
"""The SDK's sessions' saved TLS sessions (this process)."""
