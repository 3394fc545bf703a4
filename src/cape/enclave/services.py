"""The function's encryption services: Cape's in-function ``cape_encrypt`` (reference §8.3).

Every sandbox holds the stdlib-only helper ``cape/enclave/guest/cape_encrypt.py`` read-only
at ``/cape-worker/guest/cape_encrypt.py``; the worker registers it as ``cape_encrypt`` before
app.py is imported (its docstring has the API and the frames). When ``start`` is given a
``services`` callback, the sandbox also inherits a second socketpair dedicated to it, so that a
handler's request, made in the middle of a call, never interleaves with the call frames. The
runtime serves it in the thread that waits for the worker: while loading app.py (module-level
code may encrypt) and during each call, one request at a time, under the same wall clock. A
request made between calls (by a thread the function left running) waits for the next call.
``services(op, data)`` gets ``"encrypt"`` or ``"decrypt"`` and the data, at most
``max_input_bytes``, and returns the result, at most :func:`services_response_limit` bytes; a
:class:`cape.errors.CapeError` it raises goes back as that one-line ``diagnostics()``, anything
else as ``"internal error"`` (logged as the exception's type only, never with data), and a
``BaseException`` kills the sandbox and propagates. A frame announcing an empty or oversized
request is a protocol violation (``crashed``; nothing beyond the limit is ever read); a
well-framed request with an unknown operation gets an error response. A guest that closes its
end simply stops being served. Without a callback there is no such socket at all (least
privilege): ``cape_encrypt`` then raises "encryption services are not available in this
session" without asking anyone.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import time
from collections.abc import Callable

from cape.enclave.spawn import ProtocolViolation, Timeout, WorkerGone, recv_exact, send_all
from cape.errors import CapeError

__all__ = ["Services", "ServicesServer", "services_response_limit"]

log = logging.getLogger("cape.enclave")

#: ``services(op, data) -> result``: op is ``"encrypt"`` or ``"decrypt"`` (see the docstring).
Services = Callable[[str, bytes], bytes]

# The frames (mirrors cape.enclave.guest.cape_encrypt).
_HEADER = struct.Struct(">I")
_OPS = {1: "encrypt", 2: "decrypt"}
_SERVICE_OK = 0
_SERVICE_ERROR = 1
_MAX_REASON_BYTES = 1 << 10


def services_response_limit(max_request_bytes: int) -> int:
    """The largest services result: room for ``cape:`` + base64 of a maximal plaintext."""
    return max_request_bytes + max_request_bytes // 3 + (64 << 10)


class ServicesServer:
    """Serves one sandbox's requests on its services socket (see the module docstring)."""

    def __init__(
        self,
        sock: socket.socket,
        services: Services,
        max_request_bytes: int,
        kill: Callable[[str], None],
    ) -> None:
        self._sock = sock
        self._services = services
        self._max_request_bytes = max_request_bytes
        self._kill = kill
        # Served until the guest closes its end (only while a call or the load is under way).
        self._open = True

    @property
    def sock(self) -> socket.socket:
        """The runtime's end of the services socket."""
        return self._sock

    @property
    def open(self) -> bool:
        """False once the guest closed its end: nothing more to serve."""
        return self._open

    def serve_until_readable(self, channel: socket.socket, deadline: float) -> None:
        """Serve requests until ``channel`` has something to read (or the deadline)."""
        services = self._sock
        while self._open:
            poller = select.poll()
            poller.register(channel.fileno(), select.POLLIN)
            poller.register(services.fileno(), select.POLLIN)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout
            ready = dict(poller.poll(remaining * 1000))
            if channel.fileno() in ready:
                return
            if services.fileno() in ready:
                self._serve_one(services, deadline)

    def _serve_one(self, sock: socket.socket, deadline: float) -> None:
        """Read one request (nothing beyond the limit), answer it; a closed end stops serving."""
        limit = self._max_request_bytes
        try:
            try:
                if not sock.recv(1, socket.MSG_PEEK):
                    raise WorkerGone
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                raise WorkerGone from exc
            (length,) = _HEADER.unpack(recv_exact(sock, _HEADER.size, deadline))
            if length == 0:
                raise ProtocolViolation("an empty encryption-services request")
            if length - 1 > limit:
                raise ProtocolViolation(
                    f"an encryption-services request of {length - 1} bytes, "
                    f"over the limit of {limit} bytes"
                )
            op = recv_exact(sock, 1, deadline)[0]
            data = recv_exact(sock, length - 1, deadline)
            status, body = self._run_service(op, data)
            del data
            send_all(sock, (_HEADER.pack(len(body) + 1) + bytes((status,)), body), deadline)
        except WorkerGone:
            self._open = False  # the function closed its end (or died: the channel says)

    def _run_service(self, op: int, data: bytes) -> tuple[int, bytes]:
        name = _OPS.get(op)
        if name is None:
            return _SERVICE_ERROR, f"unknown encryption-services operation {op}".encode()
        try:
            result = self._services(name, data)
            if not isinstance(result, bytes | bytearray | memoryview):
                raise TypeError(f"services returned {type(result).__name__}, not bytes")
        except CapeError as exc:
            reason = exc.diagnostics().encode("utf-8", "replace")[:_MAX_REASON_BYTES]
            return _SERVICE_ERROR, reason.decode("utf-8", "ignore").encode()
        except Exception as exc:
            log.error("sandbox: the %s service failed with %s", name, type(exc).__name__)
            return _SERVICE_ERROR, b"internal error"
        except BaseException:
            self._kill("the runtime stopped while serving the function's encryption request")
            raise
        limit = services_response_limit(self._max_request_bytes)
        if len(result) > limit:
            return (
                _SERVICE_ERROR,
                f"the result of {name} is {len(result)} bytes, over the limit of {limit} "
                "bytes".encode(),
            )
        return _SERVICE_OK, bytes(result)
