"""A sandbox's call path: one input frame to the worker, one reply frame back.

:class:`SandboxCalls` is the half of :class:`cape.enclave.sandbox.FunctionSandbox` that runs
calls, blocking (:meth:`~SandboxCalls.call`, in a thread of the calls lane) or on the event loop
(:meth:`~SandboxCalls.call_async`, issue 16); both share the input check, the deadline, why the
frames failed and the output's status. Starting, closing and reaping a sandbox, and why it
ended, are :mod:`cape.enclave.sandbox`'s (split from it along that seam, with no change of
behaviour). The frames are :mod:`cape.enclave.worker`'s; every length that comes back is
checked before a byte of the body is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, NoReturn

from cape.enclave.lanes import Offload
from cape.enclave.services import ServicesServer
from cape.enclave.spawn import (
    COALESCE_BYTES,
    OutputTooLarge,
    ProtocolViolation,
    Spawn,
    Timeout,
    WorkerGone,
    readable_first,
    recv_exact,
    recv_some,
    send_all,
)
from cape.enclave.zygote import ZygoteSpawn
from cape.errors import FunctionError, LimitExceededError, SandboxError

if TYPE_CHECKING:
    from cape.enclave.sandbox import SandboxLimits

__all__ = ["SandboxCalls"]

# Worker protocol (mirrors cape.enclave.worker, which cannot import cape).
_HEADER = struct.Struct(">I")
_READY = _OK = 0
_RAISED = 1
_LOAD_ERROR = 2
_TOO_LARGE = 3
_MAX_TEXT_BYTES = 8 << 10


class SandboxCalls:
    """Calls into a started sandbox (see the module docstring); the sandbox's state is set by
    :class:`cape.enclave.sandbox.FunctionSandbox`, which also says how it ends."""

    _spawn: Spawn | ZygoteSpawn
    _limits: SandboxLimits
    _services: ServicesServer | None
    _call_lock: threading.Lock
    _pid1_fd: int | None
    _dead: str | None  # why the sandbox is no longer usable
    _killed: str | None  # why we killed it, when we did

    def _terminate(self, why: str | None) -> None:
        """Kill the sandbox and reap it (FunctionSandbox's)."""
        raise NotImplementedError

    def _fail_after_exit(self, *, during_load: bool) -> NoReturn:
        """The worker hung up: raise why the sandbox ended (FunctionSandbox's)."""
        raise NotImplementedError

    # -- calls

    def call(self, data: bytes) -> bytes:
        """Run ``cape_handler(data)`` and return its output bytes.

        Raises FunctionError when the handler raised (the session stays usable),
        LimitExceededError for an input or output over its limit (likewise), and
        SandboxError when the sandbox died, timed out or broke a limit; it is dead after that.
        """
        self._check_input(data)
        with self._call_lock:
            deadline = self._deadline()
            try:
                self._send(data, deadline)
                status, body = self._receive(deadline)
            except _FRAME_ERRORS as exc:
                self._call_failed(exc)
        output = self._output(status, body)
        if output is None:
            with self._call_lock:
                self._fail("crashed", f"the sandbox worker sent an unknown status {status}")
        return output

    async def call_async(self, offload: Offload, data: bytes) -> bytes:
        """:meth:`call` from the event loop, without a thread per call (issue 16).

        The input is written and the reply read on the event loop (``loop.sock_*`` and a
        reader on the channel), under the same wall clock, output limit and errors as
        :meth:`call`. What would block goes to ``offload`` (a thread of the calls lane, within
        the slot the caller holds, see :meth:`cape.enclave.lanes.Lane.run_async`): serving an
        encryption-services request (the same :class:`ServicesServer` loop as :meth:`call`,
        until the reply is readable) and reaping a sandbox that died, timed out or broke a
        limit. While another thread holds the sandbox (``close``, a blocking ``call``) the
        whole call goes to ``offload``. A cancelled call kills the sandbox: its channel may be
        left in the middle of a frame.
        """
        self._check_input(data)
        if not self._call_lock.acquire(blocking=False):
            return await offload(self.call, data)
        try:
            deadline = self._deadline()
            try:
                status, body = await self._exchange(data, deadline, offload)
            except asyncio.CancelledError:
                self._dead = self._killed = "a call was cancelled"
                if self._pid1_fd is not None:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(self._pid1_fd, signal.SIGKILL)
                raise
            except _FRAME_ERRORS as exc:
                await offload(self._call_failed, exc)  # raises the SandboxError
                raise AssertionError("unreachable") from None
            output = self._output(status, body)
            if output is None:
                message = f"the sandbox worker sent an unknown status {status}"
                await offload(self._fail, "crashed", message)
                raise AssertionError("unreachable")
            return output
        finally:
            self._call_lock.release()

    # -- a call's parts, shared by call and call_async

    def _check_input(self, data: bytes) -> None:
        limit = self._limits.max_input_bytes
        if len(data) > limit:
            raise LimitExceededError("function input in bytes", limit, len(data))

    def _deadline(self) -> float:
        """The call's deadline; the sandbox must be alive (call with ``_call_lock`` held)."""
        if self._dead is not None:
            raise SandboxError("crashed", f"the sandbox is no longer running ({self._dead})")
        return time.monotonic() + self._limits.call_timeout_s

    def _call_failed(self, exc: Exception) -> NoReturn:
        """Why a call's frames failed (one of ``_FRAME_ERRORS``); the sandbox is dead after."""
        limits = self._limits
        if isinstance(exc, Timeout):
            self._fail(
                "timeout", f"the call exceeded the time limit of {limits.call_timeout_s:g} s"
            )
        if isinstance(exc, OutputTooLarge):
            self._fail(
                "output",
                f"function output exceeds the limit of {limits.max_output_bytes} bytes{exc}",
            )
        if isinstance(exc, ProtocolViolation):
            self._fail("crashed", f"the sandbox worker broke the protocol ({exc})")
        self._fail_after_exit(during_load=False)

    def _output(self, status: int, body: bytes) -> bytes | None:
        """The handler's output, or its error raised; None for an unknown status (fatal)."""
        if status == _OK:
            return body
        if status == _RAISED:
            raise FunctionError(f"function raised {_one_line(body)}")
        if status == _TOO_LARGE and body.isdigit() and len(body) < 20:
            raise LimitExceededError(
                "function output in bytes", self._limits.max_output_bytes, int(body)
            )
        return None

    async def _exchange(self, data: bytes, deadline: float, offload: Offload) -> tuple[int, bytes]:
        """Send one input frame and read the reply frame, on the event loop (see
        :meth:`call_async`); raises the frame helpers' exceptions as :meth:`_send` and
        :meth:`_receive` do."""
        loop = asyncio.get_running_loop()
        sock = self._spawn.channel
        try:
            async with asyncio.timeout_at(loop.time() + deadline - time.monotonic()):
                try:
                    if len(data) <= COALESCE_BYTES:
                        await loop.sock_sendall(sock, _HEADER.pack(len(data)) + data)
                    else:
                        await loop.sock_sendall(sock, _HEADER.pack(len(data)))
                        await loop.sock_sendall(sock, data)
                except OSError as exc:
                    raise WorkerGone from exc
                while self._services is not None and self._services.open:
                    if await readable_first(loop, sock, self._services.sock):
                        break
                    # A request of the function: served in a thread, as by call().
                    await offload(self._services.serve_until_readable, sock, deadline)
                return await self._read_reply(loop, sock)
        except TimeoutError:
            raise Timeout from None

    async def _read_reply(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket
    ) -> tuple[int, bytes]:
        """The reply frame, read with as few ``recv`` calls as it arrives in (issue 16): one
        into a small buffer for the head, status and a small body together; a larger body
        then straight into a buffer of its announced length (checked against the output limit
        first). Bytes after the frame, which the worker never sends unasked, break the
        protocol."""
        head = bytearray(_REPLY_READ_BYTES)
        view = memoryview(head)
        got = 0
        while got < _HEADER.size + 1:
            got += await recv_some(loop, sock, view[got:])
        (length,) = _HEADER.unpack_from(head)
        if length == 0:
            raise ProtocolViolation("empty frame")
        if length - 1 > self._limits.max_output_bytes:
            raise OutputTooLarge(f" ({length - 1} bytes announced)")
        status, end = head[_HEADER.size], _HEADER.size + length
        if got > end:
            raise ProtocolViolation("bytes after the reply frame")
        if got == end:
            return status, bytes(view[_HEADER.size + 1 : end])
        body = bytearray(length - 1)
        filled = got - _HEADER.size - 1
        body[:filled] = view[_HEADER.size + 1 : got]
        view.release()
        del head
        rest = memoryview(body)
        while filled < len(body):
            filled += await recv_some(loop, sock, rest[filled:])
        rest.release()
        return status, bytes(body)

    def _send(self, data: bytes, deadline: float) -> None:
        send_all(self._spawn.channel, (_HEADER.pack(len(data)), data), deadline)

    def _receive(self, deadline: float) -> tuple[int, bytes]:
        sock = self._spawn.channel
        if self._services is not None:
            self._services.serve_until_readable(sock, deadline)
        (length,) = _HEADER.unpack(recv_exact(sock, _HEADER.size, deadline))
        if length == 0:
            raise ProtocolViolation("empty frame")
        if length - 1 > self._limits.max_output_bytes:
            raise OutputTooLarge(f" ({length - 1} bytes announced)")
        status = recv_exact(sock, 1, deadline)[0]
        return status, recv_exact(sock, length - 1, deadline)

    def _fail(self, reason: str, message: str) -> NoReturn:
        self._terminate(message)
        raise SandboxError(reason, message)


# What the frame helpers raise when a call cannot complete (see SandboxCalls._call_failed).
_FRAME_ERRORS = (Timeout, OutputTooLarge, ProtocolViolation, WorkerGone)


#: The first read of a reply: its head, status and a body up to this size in one ``recv``.
_REPLY_READ_BYTES = 64 << 10


def _one_line(body: bytes) -> str:
    text = body[:_MAX_TEXT_BYTES].decode("utf-8", "replace")
    return " ".join(text.split()) or "(no message)"
