"""Start enclave processes and carry their traffic (untrusted host side).

The host never sees plaintext: it relays opaque channel frames, answers the enclave's
key-service calls through an injected proxy (the vsock-proxy role on Nitro), and hands the
enclave its simulated-mode credentials from an injected provider. It imports only
``cape.formats``.

:class:`SimulatedLauncher` starts ``python -m cape.enclave.runtime`` with a socketpair as the
channel, in new network and mount namespaces (``unshare --net --mount``): the enclave process
has no network interfaces and a private tmpfs for unpacked functions. Without the privileges
for that it refuses to start (fail closed) rather than run an enclave on the host's network.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import itertools
import os
import shutil
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from cape._internal.tempdirs import private_tempdir
from cape.errors import CapeError, FormatError, TransportError
from cape.formats.frames import FrameProtocol, encode_frame_parts, roomy_send_buffer
from cape.host.errors import UnavailableError

__all__ = ["EnclaveConnection", "EnclaveLauncher", "HostSession", "SimulatedLauncher"]

KmsProxy = Callable[[dict[str, Any]], dict[str, Any]]
"""Answers one ``kms`` frame: returns ``{"result": …}`` or ``{"error": text, "kind": …}``."""

Tap = Callable[[str, bytes], None]
"""Observes every channel frame ("to-enclave" or "from-enclave", encoded bytes): for audits
and for tests that prove no plaintext crosses the channel."""

Provider = Callable[[], Mapping[str, Any]]
"""Returns the ``credentials`` for a new simulated enclave (the simulated AWS's role)."""

READY_TIMEOUT_S = 60.0


class HostSession:
    """One session as the host relays it: frames in, frames out, never decrypted here.

    The channel's protocol hands each frame for this session straight to :meth:`_deliver`
    (issue 16: no reader task or queue between them); :meth:`receive` waits on a plain future.
    """

    def __init__(self, connection: EnclaveConnection, sid: int) -> None:
        self._connection = connection
        self.sid = sid
        self._frames: collections.deque[dict[str, Any] | None] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False

    def _deliver(self, message: dict[str, Any] | None) -> None:
        """A frame for this session, or ``None``: the channel ended."""
        self._frames.append(message)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def send(self, message: dict[str, Any]) -> None:
        if self.closed:
            raise TransportError("the session is closed")
        await self._connection.send({**message, "sid": self.sid})

    async def receive(self) -> dict[str, Any]:
        """The next frame from the enclave for this session; ``close``/fatal errors end it.

        A fatal error marked ``busy`` (a full queue in the enclave) raises
        :class:`~cape.host.errors.UnavailableError`: "try again later", close 1013.
        """
        while not self._frames:  # a frame stays queued if this wait is cancelled
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        message = self._frames[0]
        if message is None:  # the end stays for every later receive
            self.closed = True
            raise TransportError("the enclave is gone")
        self._frames.popleft()
        if message["t"] == "close" or (message["t"] == "error" and message.get("fatal")):
            self.closed = True
            if message["t"] == "error" and message.get("busy") is True:
                raise UnavailableError(str(message.get("message", "the enclave is busy")))
        return message

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(CapeError, OSError):
                await self._connection.send({"t": "close", "sid": self.sid})
        self._connection.forget(self.sid)


class EnclaveConnection:
    """The host's end of one enclave's channel, read by a :class:`FrameProtocol`.

    Build one with :meth:`over` (it attaches the channel's socket to the running loop).
    """

    def __init__(
        self,
        kms: KmsProxy,
        process: asyncio.subprocess.Process | None = None,
        tap: Tap | None = None,
    ) -> None:
        self._tap = tap
        self._kms = kms
        self.process = process
        self.pcrs: dict[int, bytes] = {}
        self._ids = itertools.count(1)
        self._sessions: dict[int, HostSession] = {}
        self._write_lock = asyncio.Lock()
        self._kms_tasks: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._protocol = FrameProtocol(self._on_frame, self._on_end)
        self._ended: asyncio.Future[None] = loop.create_future()
        self._ready: asyncio.Future[None] = loop.create_future()
        # An enclave that dies while nobody waits for it (a start cut short by shutdown) must
        # not log "Future exception was never retrieved".
        self._ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._cleanup: list[Callable[[], None]] = []

    @classmethod
    async def over(
        cls,
        sock: socket.socket,
        kms: KmsProxy,
        process: asyncio.subprocess.Process | None = None,
        tap: Tap | None = None,
        **kwargs: Any,
    ) -> Self:
        """A connection reading and writing ``sock`` (the channel's connected host end)."""
        connection = cls(kms, process, tap, **kwargs)
        roomy_send_buffer(sock)  # a large input or bundle slice leaves in one send (issue 16)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(lambda: connection._protocol, sock)
        connection._transport = transport
        return connection

    @property
    def alive(self) -> bool:
        return self._transport is not None and not self._ended.done()

    async def send(self, message: dict[str, Any]) -> None:
        parts = encode_frame_parts(message)
        if self._tap is not None:
            self._tap("to-enclave", b"".join(parts))
        if self._transport is None:
            raise TransportError("the enclave channel is not open")
        async with self._write_lock:
            try:
                await self._protocol.write(parts)  # a bundle in slices, never a second copy
            except (ConnectionError, OSError) as exc:
                raise TransportError(f"the enclave channel is broken: {exc}") from None

    async def wait_closed(self) -> None:
        """Return once the channel has ended (the enclave exited or was closed)."""
        if self._transport is not None:
            await asyncio.wait({self._ended})

    def forget(self, sid: int) -> None:
        self._sessions.pop(sid, None)

    async def _answer_kms(self, message: dict[str, Any]) -> None:
        reply = await asyncio.to_thread(self._kms, message)
        await self.send({"t": "kms_result", "rid": message.get("rid"), **reply})

    def _on_frame(self, message: dict[str, Any], frame: memoryview) -> None:
        """One frame from the enclave, as the protocol parsed it (on the loop, in order)."""
        if self._tap is not None:
            self._tap("from-enclave", bytes(frame))
        kind = message["t"]
        if kind == "ready":
            pcrs = message.get("pcrs")
            if isinstance(pcrs, dict):
                self.pcrs = dict(pcrs)
            if not self._ready.done():
                self._ready.set_result(None)
        elif kind == "kms":
            task = asyncio.create_task(self._answer_kms(message))
            self._kms_tasks.add(task)
            task.add_done_callback(self._kms_tasks.discard)
        elif (session := self._sessions.get(message["sid"])) is not None:
            session._deliver(message)

    def _on_end(self, exc: Exception | None) -> None:
        """The channel ended (the enclave exited, the channel broke or sent a bad frame):
        every session gets end-of-stream."""
        del exc  # whatever the cause, the sessions see "the enclave is gone"
        if not self._ready.done():
            self._ready.set_exception(TransportError("the enclave exited before it was ready"))
        for session in self._sessions.values():
            session._deliver(None)
        for task in self._kms_tasks:
            task.cancel()
        if not self._ended.done():
            self._ended.set_result(None)

    async def start(self, provision: Mapping[str, Any] | None) -> None:
        if provision is not None:
            await self.send({"t": "provision", "credentials": dict(provision)})
        await asyncio.wait_for(asyncio.shield(self._ready), READY_TIMEOUT_S)

    async def open_session(
        self,
        kind: str,
        *,
        owner: str,
        nonce: bytes,
        response_key: bytes | None = None,
        bundle: bytes | None = None,
        bundle_sha256: bytes | None = None,
        caller: str | None = None,
        sealed_inputs: bool = False,
        sealing: str | None = None,
    ) -> HostSession:
        """Open a session; the caller then reads the ``attestation`` frame from it (for a run
        opened with ``bundle_sha256`` alone, possibly a ``need_bundle`` frame first).

        ``caller`` (the user running someone else's function) is whom the enclave's fair
        queueing counts the session against; it defaults to ``owner``."""
        if not self.alive:
            raise TransportError("the enclave is not running")
        sid = next(self._ids)
        session = HostSession(self, sid)
        self._sessions[sid] = session
        message: dict[str, Any] = {
            "t": "open",
            "sid": sid,
            "kind": kind,
            "owner": owner,
            "nonce": nonce,
        }
        if response_key is not None:
            message["response_key"] = response_key
        if sealed_inputs:  # the client asked; the enclave confirms it in the document
            message["input_frames"] = "sealed"
        if sealing is not None:  # the sealed channels' suite: likewise confirmed
            message["sealing"] = sealing
        if bundle is not None:
            message["bundle"] = bundle
        if bundle_sha256 is not None:
            message["bundle_sha256"] = bundle_sha256
        if caller is not None:  # whom the enclave's fair queues count the session against
            message["caller"] = caller
        await self.send(message)
        return session

    def close_channel(self) -> None:
        """Close the channel (writes still buffered are flushed first); the sessions then get
        end-of-stream."""
        if self._transport is not None:
            self._transport.close()

    def on_close(self, callback: Callable[[], None]) -> None:
        self._cleanup.append(callback)

    async def close(self) -> None:
        """Stop the enclave: close the channel, then terminate the process if it lingers."""
        self.close_channel()
        if self.process is not None and self.process.returncode is None:
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._transport is not None:
            # The channel ends with the process; one that lingers (its peer holds the other
            # end, or a write stays unflushed) is cut after a grace period.
            await asyncio.wait({self._ended}, timeout=5)
            self._transport.abort()
            await asyncio.wait({self._ended})
        for callback in self._cleanup:
            callback()


class EnclaveLauncher(abc.ABC):
    """Starts enclaves: simulated processes here, Nitro Enclaves (nitro-cli + vsock) later."""

    @abc.abstractmethod
    async def start(self) -> EnclaveConnection: ...


class SimulatedLauncher(EnclaveLauncher):
    """Starts the enclave runtime as a local process in its own network and mount namespaces."""

    def __init__(
        self,
        *,
        kms: KmsProxy,
        provision: Provider,
        python: str = sys.executable,
        extra_env: Mapping[str, str] | None = None,
        isolate: bool = True,
        tap: Tap | None = None,
        runtime_args: Sequence[str] = (),
    ) -> None:
        self._tap = tap
        self._runtime_args = list(runtime_args)
        self._kms = kms
        self._provision = provision
        self._python = python
        self._extra_env = dict(extra_env or {})
        self._isolate = isolate

    def _command(self, fd: int, workdir: Path) -> list[str]:
        runtime = [
            self._python,
            "-m",
            "cape.enclave.runtime",
            "--fd",
            str(fd),
            "--workdir",
            str(workdir),
            *self._runtime_args,
        ]
        if not self._isolate:
            return runtime
        unshare = shutil.which("unshare")
        if unshare is None or os.geteuid() != 0:
            raise CapeError(
                "simulated enclaves need root and util-linux 'unshare' for their own network "
                "and mount namespaces; refusing to start an enclave on the host's network"
            )
        return [
            unshare,
            "--net",
            "--mount",
            "--propagation",
            "private",
            "--",
            *runtime,
            "--private-tmpfs",
        ]

    async def start(self) -> EnclaveConnection:
        host_end, enclave_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        workdir = private_tempdir("cape-enclave-")  # a killed server's are swept here
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAPE_")}
        env.update(self._extra_env)
        try:
            process = await asyncio.create_subprocess_exec(
                *self._command(enclave_end.fileno(), workdir),
                pass_fds=(enclave_end.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                env=env,
            )
        except OSError as exc:
            host_end.close()
            raise CapeError(f"cannot start the enclave runtime: {exc}") from None
        finally:
            enclave_end.close()
        connection = await EnclaveConnection.over(host_end, self._kms, process, self._tap)
        connection.on_close(lambda: shutil.rmtree(workdir, ignore_errors=True))
        try:
            await connection.start(self._provision())
        except (CapeError, TimeoutError) as exc:
            await connection.close()
            if isinstance(exc, TimeoutError):
                raise TransportError("the enclave did not become ready in time") from None
            raise
        except asyncio.CancelledError:  # shutdown: stop it and remove its directory
            await asyncio.shield(connection.close())
            raise
        return connection


def expect(message: dict[str, Any], kind: str) -> dict[str, Any]:
    """Check a relayed frame's type; a fatal ``error`` frame becomes a CapeError."""
    if message["t"] == "error":
        text = str(message.get("message", "enclave error"))
        if message.get("busy"):  # a bounded queue of the enclave is full: try again later
            raise UnavailableError(text)
        raise CapeError(text)
    if message["t"] != kind:
        raise FormatError(f"expected {kind!r} from the enclave, got {message['t']!r}")
    return message
