"""The enclave runtime: the process that would run inside a Nitro Enclave.

It talks to the host only through one framed channel (``cape.formats.frames``), given as an
inherited socket file descriptor here and vsock on Nitro. It holds its keys only in memory:
the simulated secure module's instance key arrives in the ``provision`` frame, each session's
HPKE key and every data key live in this process, and user code runs in per-session sandboxes.

Start-up: ``python -m cape.enclave.runtime --fd N --workdir DIR [--private-tmpfs]``. In
simulated mode the launcher starts it in its own network namespace (no interfaces) and mount
namespace; with ``--private-tmpfs`` the runtime mounts a tmpfs over its work directory, so
unpacked bundles live in memory no other process on the host can see.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import socket
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path
from typing import Any

from cape._internal.heap import steady_heap
from cape.crypto.keyanswers import IDENTITY_PCR
from cape.enclave import cgroups
from cape.enclave.awskeys import AwsEnclaveKeyClient, key_client
from cape.enclave.awskms import AwsCredentials
from cape.enclave.keyclient import EnclaveKeyClient
from cape.enclave.lanes import CALLS, LaneLimits, Lanes
from cape.enclave.measure import measure_runtime, simulated_pcrs
from cape.enclave.provision import decode_credentials, image_signature
from cape.enclave.sandbox import UIDS, SandboxLimits
from cape.enclave.secure_module.base import SecureModule
from cape.enclave.secure_module.nitro import NitroSecureModule
from cape.enclave.secure_module.simulated import SimulatedSecureModule
from cape.enclave.session import Inbox, SessionConfig, run_session
from cape.enclave.uids import DEFAULT_RANGE, UidRange, parse_range
from cape.enclave.warm import WarmPool
from cape.enclave.zygote import START_PATHS, set_start_path
from cape.errors import CapeError, FormatError
from cape.formats.frames import FrameProtocol, encode_frame_parts, roomy_send_buffer

__all__ = ["Runtime", "main"]

log = logging.getLogger("cape.enclave")
#: Default cap of the enclave's private tmpfs (unpacked functions and per-session copies).
STORAGE_BYTES = 8 << 30
_PR_SET_DUMPABLE = 4


class Runtime:
    """Dispatches channel frames to sessions and key-service answers to waiting calls."""

    def __init__(
        self,
        config: SessionConfig,
        *,
        kms_identity: bytes | None,
        nitro: bool = False,
        kms_options: dict[str, Any] | None = None,
    ) -> None:
        self._nitro = nitro
        self._kms_identity = kms_identity
        self._kms_options = kms_options or {}
        self._config = config
        self._write_lock = asyncio.Lock()
        self._sessions: dict[int, Inbox] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._module: SecureModule | None = None
        self._keys: EnclaveKeyClient | None = None
        self._pool = (
            WarmPool(
                config.workdir,
                sandbox_limits=config.sandbox_limits,
                bundle_limits=config.bundle_limits,
                lanes=config.lanes,
            )
            if config.warm_pool
            else None
        )
        # The channel (issue 16): a FrameProtocol hands each frame to _on_frame as it is
        # parsed; until the runtime is provisioned, frames wait in _early for _provision.
        self._protocol = FrameProtocol(self._on_frame, self._on_end)
        self._transport: asyncio.Transport | None = None
        self._early: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._serving = False
        self._ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ended.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def send(self, message: dict[str, Any]) -> None:
        # A large result is written by reference after its frame head, not copied into one
        # frame first (issue 16: two copies of a 1 MiB result, ≈0.1 ms, per call).
        parts = encode_frame_parts(message)
        async with self._write_lock:
            await self._protocol.write(parts)
        if message["t"] in ("close", "error") and (message["t"] == "close" or message.get("fatal")):
            self._sessions.pop(message.get("sid", 0), None)

    def _on_frame(self, message: dict[str, Any], frame: memoryview) -> None:
        """One frame from the host, as the protocol parsed it (on the loop, in order)."""
        del frame
        if not self._serving:
            self._early.put_nowait(message)
            return
        try:
            self._dispatch(message)
        except CapeError as exc:
            error = {"t": "error", "sid": message["sid"], "message": exc.diagnostics()}
            task = asyncio.create_task(self.send({**error, "fatal": True}))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _on_end(self, exc: Exception | None) -> None:
        """The host closed the channel (``exc`` None) or it broke or carried a bad frame."""
        self._early.put_nowait(None)
        if not self._ended.done():
            if exc is None:
                self._ended.set_result(None)
            else:
                self._ended.set_exception(exc)

    async def _next_early(self) -> dict[str, Any] | None:
        """The next frame before the runtime serves; None once the channel has ended."""
        message = await self._early.get()
        if message is None:
            self._early.put_nowait(None)
            if self._ended.done() and not self._ended.cancelled():
                error = self._ended.exception()
                if error is not None:
                    raise error
        return message

    async def _configure(self) -> dict[str, Any]:
        """The host's ``configure`` frame, for images with a fixed command line: the key
        service's identity or the AWS KMS configuration, measured into PCR16 either way."""
        message = await self._next_early()
        if message is None or message["t"] != "configure":
            raise FormatError("the first channel frame must be 'configure'")
        return message

    async def _provision(self) -> None:
        configure = await self._configure() if self._kms_identity is None else None
        if self._nitro:
            # Inside a real Nitro Enclave the hardware measured us and holds the signing key:
            # there is nothing to provision, and the PCRs are read back from the NSM.
            # (Not exercisable on this machine: no /dev/nsm.)
            module: SecureModule = NitroSecureModule()
            pcrs = {i: module.describe_pcr(i).data for i in range(16)}
        else:
            module, pcrs = await self._provision_simulated()
        self._module = module
        self._keys = await asyncio.to_thread(
            partial(
                key_client,
                module,
                self.send,
                identity=self._kms_identity,
                configure=configure,
                lanes=self._config.lanes,
                **self._kms_options,
            )
        )
        pcrs[IDENTITY_PCR] = module.describe_pcr(IDENTITY_PCR).data  # measured just now
        await self.send({"t": "ready", "pcrs": pcrs})

    async def _provision_simulated(self) -> tuple[SecureModule, dict[int, bytes]]:
        message = await self._next_early()
        if message is None or message["t"] != "provision":
            raise FormatError("the first channel frame must be 'provision'")
        credentials = decode_credentials(message.get("credentials"))
        measurement = await asyncio.to_thread(measure_runtime)
        pcrs = simulated_pcrs(
            measurement,
            instance_id=credentials.instance_id,
            image_signature=image_signature(message.get("credentials")),
        )
        return SimulatedSecureModule(credentials, pcrs=pcrs), pcrs

    def _dispatch(self, message: dict[str, Any]) -> None:
        if self._module is None or self._keys is None:
            raise RuntimeError("the runtime was not provisioned")
        kind, sid = message["t"], message["sid"]
        if kind == "kms_result":
            self._keys.resolve(message)
        elif kind == "credentials" and isinstance(self._keys, AwsEnclaveKeyClient):
            self._keys.update_credentials(AwsCredentials.from_json(message.get("credentials")))
        elif kind == "open":
            if sid in self._sessions or sid == 0:
                raise FormatError(f"session {sid} is already open or invalid")
            inbox = Inbox()
            self._sessions[sid] = inbox
            task = asyncio.create_task(
                run_session(
                    message,
                    module=self._module,
                    keys=self._keys,
                    config=self._config,
                    send=self.send,
                    inbox=inbox,
                    pool=self._pool,
                )
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif kind in ("input", "bundle", "chunk"):
            queue = self._sessions.get(sid)
            if queue is not None:
                queue.put_nowait(message)
        elif kind == "close":
            queue = self._sessions.get(sid)
            if queue is not None:
                queue.close()
        else:
            raise FormatError(f"unexpected {kind!r} frame from the host")

    async def serve(self, sock: socket.socket) -> None:
        """Serve the host's channel ``sock`` until the host closes it; a broken channel or a
        malformed frame raises (the runtime then exits)."""
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.connect_accepted_socket(lambda: self._protocol, sock)
        try:
            await self._provision()
            self._serving = True
            while not self._early.empty():  # what came with the last early frame, in order
                if (message := self._early.get_nowait()) is not None:
                    self._on_frame(message, memoryview(b""))
            await self._ended
        finally:
            if self._keys is not None:
                self._keys.fail_all("the host closed the channel")
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._pool is not None:
                await self._pool.close()
            self._transport.close()


def _mount_private_tmpfs(workdir: Path, size_bytes: int) -> None:
    """Mount a size-capped tmpfs over the work directory, in this process's mount namespace."""
    options = f"mode=0711,nosuid,nodev,size={size_bytes}"
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "cape-enclave", str(workdir)],
        check=True,
        capture_output=True,
    )


def _quiet_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's handler for errors nobody awaited, with a fixed, data-free line: the default
    prints the exception and its traceback, which may quote user code or its messages, and the
    enclave's log goes to the host (issue 18, finding 8)."""
    exc = context.get("exception")
    log.error("an unhandled error in a background task (%s)", type(exc).__name__)


def _quiet_thread_errors(args: threading.ExceptHookArgs) -> None:
    log.error("an unhandled error in a thread (%s)", args.exc_type.__name__)


def _not_dumpable() -> None:
    """No core dumps of, and no ptrace or /proc/<pid>/mem access to, this process by
    unprivileged users (the keys it holds live in its memory). Linux only; cheap."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def _uid_range(text: str) -> UidRange:
    try:
        return parse_range(text)
    except CapeError as exc:
        raise argparse.ArgumentTypeError(exc.diagnostics()) from None


def _lane_limits(args: argparse.Namespace) -> LaneLimits:
    return LaneLimits(
        threads=args.call_threads,
        per_party=min(args.calls_per_user, args.call_threads),
        queue_per_party=args.call_queue,
        queue=max(args.call_queue, 4 * args.call_threads),
    )


def _channel_socket(fd: int | None, vsock: str | None) -> socket.socket:
    """The channel: an inherited Unix socket (simulated) or a vsock connection (Nitro).

    Without either, ``$CAPE_CHANNEL`` names it, as an enclave image's ``env`` does:
    ``vsock:CID:PORT``, or ``unix:PATH`` where a test runs the image's userland.
    """
    if fd is not None:
        return socket.socket(fileno=fd)
    if vsock is None:
        kind, _, address = os.environ.get("CAPE_CHANNEL", "").partition(":")
        if kind == "unix" and address:
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            unix.connect(address)
            return unix
        if kind != "vsock" or not address:
            raise ValueError("give --fd, --vsock or CAPE_CHANNEL=vsock:CID:PORT|unix:PATH")
        vsock = address
    cid_text, _, port_text = vsock.partition(":")
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.connect((int(cid_text), int(port_text)))
    return sock


async def _amain(
    sock: socket.socket,
    config: SessionConfig,
    *,
    nitro: bool,
    kms_identity: bytes | None,
    kms_options: dict[str, Any],
) -> None:
    asyncio.get_running_loop().set_exception_handler(_quiet_errors)
    roomy_send_buffer(sock)  # a large result leaves in one send (issue 16)
    runtime = Runtime(config, nitro=nitro, kms_identity=kms_identity, kms_options=kms_options)
    await runtime.serve(sock)


def _identity_argument(value: str) -> bytes | None:
    return None if value == "channel" else bytes.fromhex(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cape-enclave-runtime")
    channel = parser.add_mutually_exclusive_group()
    channel.add_argument("--fd", type=int, help="inherited channel socket (simulated mode)")
    channel.add_argument("--vsock", metavar="CID:PORT", help="host vsock address (Nitro)")
    parser.add_argument(
        "--nitro", action="store_true", help="use /dev/nsm instead of the simulated module"
    )
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument(
        "--kms-identity",
        type=_identity_argument,
        default=None,
        metavar="HEX|channel",
        help="the key service's Ed25519 public key, or 'channel' (the default, what images "
        "use): from the host's first frame; either way measured into PCR16",
    )
    parser.add_argument("--kms-connect", metavar="tcp:HOST:PORT|unix:PATH", help=argparse.SUPPRESS)
    parser.add_argument("--kms-insecure-http", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--private-tmpfs", action="store_true")
    parser.add_argument(
        "--no-warm-pool", action="store_true", help="decrypt, unpack and start per session"
    )
    parser.add_argument("--call-timeout", type=float, default=SandboxLimits().call_timeout_s)
    parser.add_argument(
        "--sandbox-uids",
        type=_uid_range,
        default=DEFAULT_RANGE,
        metavar="START-END",
        help="host uids for sandboxes (cape serve checks them against the system's ranges)",
    )
    parser.add_argument(
        "--sandbox-start",
        choices=START_PATHS,
        default="auto",
        help="auto: a sandbox zygote forks each session's sandbox where this runs as root; "
        "bubblewrap: always start sandboxes with bubblewrap",
    )
    parser.add_argument(
        "--storage-bytes",
        type=int,
        default=STORAGE_BYTES,
        help="size cap of the private tmpfs holding unpacked functions",
    )
    parser.add_argument("--call-threads", type=int, default=CALLS.threads)
    parser.add_argument("--calls-per-user", type=int, default=CALLS.per_party)
    parser.add_argument("--call-queue", type=int, default=CALLS.queue_per_party)
    args = parser.parse_args(argv)
    args.nitro = args.nitro or os.environ.get("CAPE_SECURE_MODULE") == "nitro"
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="enclave: %(message)s")
    threading.excepthook = _quiet_thread_errors
    _not_dumpable()
    steady_heap()  # no page faults per large call (issue 16)
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(args.workdir, 0o711)  # noqa: S103 - traverse-only, for the sandbox's uid
    if args.private_tmpfs:
        _mount_private_tmpfs(args.workdir, args.storage_bytes)
    UIDS.configure(args.sandbox_uids)
    set_start_path(args.sandbox_start)
    groups, why = cgroups.shared()
    if groups is None:
        log.warning("cgroups unavailable (%s): sandboxes have per-process rlimits only", why)
    try:
        config = SessionConfig(
            workdir=args.workdir,
            sandbox_limits=SandboxLimits(call_timeout_s=args.call_timeout),
            warm_pool=not args.no_warm_pool,
            lanes=Lanes(calls=_lane_limits(args)),
        )
        sock = _channel_socket(args.fd, args.vsock)
        kms_options = {
            "kms_connect": args.kms_connect,  # tests: moto instead of vsock-proxy
            "kms_insecure_http": args.kms_insecure_http,
        }
        asyncio.run(
            _amain(
                sock,
                config,
                nitro=args.nitro,
                kms_identity=args.kms_identity,
                kms_options=kms_options,
            )
        )
    except CapeError as exc:
        log.error("the runtime stopped: %s", type(exc).__name__)
        return 1
    except (OSError, ValueError) as exc:
        log.error("the runtime could not start: %s", type(exc).__name__)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
