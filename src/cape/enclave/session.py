"""One client session inside the enclave: key, deploy, run or test (protocol.md "Sessions").

Each session gets a fresh X25519 key pair and an attestation document binding the client's
nonce, that key and ``user_data``. Plaintext (bundles, inputs, outputs, data keys) exists only
in this process and in the session's sandbox; what goes back to the host is the document,
ciphertext, checksums and error text.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import logging
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cape.crypto import envelope, hpke, results, stream
from cape.crypto.keys import load_rsa_public_key
from cape.crypto.results import SEALED_ERROR_TEXT
from cape.crypto.session_keys import CHACHA20_POLY1305, SEALINGS, Sealing, SessionKeys
from cape.enclave.keyclient import KMS_TIMEOUT_S, EnclaveKeyClient
from cape.enclave.lanes import Lanes
from cape.enclave.sandbox import FunctionSandbox, SandboxLimits, Services
from cape.enclave.secure_module.base import SecureModule
from cape.enclave.unpack import check_bundle, unpack_bundle
from cape.enclave.warm import Lease, WarmPool
from cape.errors import (
    BusyError,
    CapeError,
    DecryptionError,
    FormatError,
    FunctionError,
    KeyReleaseDeniedError,
    LimitExceededError,
)
from cape.formats.bundle import BundleLimits

__all__ = ["Inbox", "SessionConfig", "run_session"]

log = logging.getLogger("cape.enclave")
Send = Callable[[dict[str, Any]], Awaitable[None]]
KINDS = frozenset({"key", "deploy", "run", "test"})
MAX_NONCE_BYTES = 1024
MAX_PARTY_CHARS = 256
INPUT_FRAMES = frozenset({"hpke", "sealed"})
"""How a run or test session's inputs arrive (``input_frames``, ours): HPKE, or sealed under
the session's input key (crypto/session_keys.py), which the attested ``user_data`` confirms."""
SEALING_VALUES = " or ".join(f'"{name}"' for name in SEALINGS)


class Inbox(asyncio.Queue[dict[str, Any]]):
    """A session's frames from the host. Its ``close`` also ends a call in progress (or
    waiting for a thread): the sandbox is killed, so nothing of a session the client left
    keeps running or holds a place in the enclave's lanes."""

    def __init__(self) -> None:
        super().__init__()
        self.on_close: Callable[[], object] | None = None

    def close(self) -> None:
        self.put_nowait({"t": "close"})
        callback, self.on_close = self.on_close, None
        if callback is not None:
            callback()


@dataclass(frozen=True)
class SessionConfig:
    """Limits and places shared by every session of one runtime."""

    workdir: Path
    sandbox_limits: SandboxLimits = field(default_factory=SandboxLimits)
    bundle_limits: BundleLimits = field(default_factory=BundleLimits)
    max_input_bytes: int = 64 << 20
    warm_pool: bool = True
    lanes: Lanes = field(default_factory=Lanes)  # bounded, fairly shared threads


@dataclass
class _Context:
    sid: int
    kind: str
    owner: str
    party: str  # whom fair queueing counts this session against: the caller, else the owner
    nonce: bytes
    response_key: bytes | None
    sealed_inputs: bool
    sealing: Sealing  # the suite of the session's sealed channels (results, inputs)
    module: SecureModule
    keys: EnclaveKeyClient
    config: SessionConfig
    send: Send
    inbox: Inbox
    pool: WarmPool | None

    async def reply(self, message: dict[str, Any]) -> None:
        await self.send({**message, "sid": self.sid})

    async def error(self, text: str, *, fatal: bool) -> None:
        await self.reply({"t": "error", "message": text, "fatal": fatal})

    async def next_frame(self, expected: str) -> dict[str, Any] | None:
        message = await self.inbox.get()
        if message["t"] == "close":
            return None
        if message["t"] != expected:
            raise FormatError(f"expected a {expected!r} frame, got {message['t']!r}")
        return message


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _check_sealing(message: dict[str, Any], response_key: bytes | None) -> Sealing:
    """The open frame's ``sealing`` (ours): absent (v1, ChaCha20-Poly1305) or a suite the
    client asked for, which needs its response key (crypto/session_keys.py)."""
    if "sealing" not in message:
        return CHACHA20_POLY1305
    sealing = SEALINGS.get(message["sealing"]) if isinstance(message["sealing"], str) else None
    if sealing is None:
        raise FormatError(f"'sealing' must be {SEALING_VALUES}")
    if response_key is None:
        raise FormatError("'sealing' needs a response key")
    return sealing


def _check_open(message: dict[str, Any]) -> tuple[str, str, str, bytes, bytes | None, bool]:
    kind, owner, nonce = message.get("kind"), message.get("owner"), message.get("nonce", b"")
    response_key, caller = message.get("response_key"), message.get("caller", owner)
    inputs = message.get("input_frames", "hpke")
    if kind not in KINDS:
        raise FormatError(f"unknown session kind {kind!r}")
    if not isinstance(owner, str) or not owner:
        raise FormatError("session owner must be a non-empty string")
    if not isinstance(caller, str) or not caller or len(caller) > MAX_PARTY_CHARS:
        raise FormatError("session caller must be a short non-empty string")
    if not isinstance(nonce, bytes) or len(nonce) > MAX_NONCE_BYTES:
        raise FormatError(f"nonce must be at most {MAX_NONCE_BYTES} bytes")
    if response_key is not None:
        hpke.load_public_key(response_key)  # KeyFormatError for anything but an X25519 key
    if inputs not in INPUT_FRAMES:
        raise FormatError('\'input_frames\' must be "hpke" or "sealed"')
    if inputs == "sealed" and (response_key is None or kind not in ("run", "test")):
        raise FormatError("sealed inputs need a response key and a run or test session")
    return kind, owner, caller, nonce, response_key, inputs == "sealed"


def _attest(ctx: _Context, session_key: hpke.KeyPair, user_data: dict[str, str]) -> bytes:
    if ctx.response_key is not None:
        user_data = {
            **user_data,
            "response_key_sha256": _b64(hashlib.sha256(ctx.response_key).digest()),
        }
    if ctx.sealed_inputs:  # confirmed inside the document, so a host cannot fake it
        user_data = {**user_data, "input_frames": "sealed"}
    if ctx.sealing is not CHACHA20_POLY1305:  # likewise: the client takes its suite from here
        user_data = {**user_data, "sealing": ctx.sealing.name}
    encoded = json.dumps(user_data, separators=(",", ":")).encode() if user_data else None
    return ctx.module.attestation(
        nonce=ctx.nonce, public_key=session_key.public_bytes, user_data=encoded
    )


async def _decrypt_input(ctx: _Context, data: bytes) -> bytes:
    """Whole ``cape:``/``cape-stream-v1:`` inputs are opened with the function owner's key."""
    if not stream.is_ciphertext(data):
        return data
    unwrapper = ctx.keys.unwrapper_for(ctx.owner, asyncio.get_running_loop())
    return await ctx.config.lanes.keys.run(ctx.party, stream.decrypt_any, data, unwrapper)


def _services(ctx: _Context, loop: asyncio.AbstractEventLoop) -> Services:
    """``cape_encrypt`` inside the function: encrypt for, and decrypt with, the owner's key."""
    unwrap = ctx.keys.unwrapper_for(ctx.owner, loop)

    def serve(op: str, data: bytes) -> bytes:
        if op == "encrypt":
            der = asyncio.run_coroutine_threadsafe(ctx.keys.public_key(ctx.owner), loop).result(
                timeout=KMS_TIMEOUT_S
            )
            return envelope.encrypt_text(data, load_rsa_public_key(der)).encode("ascii")
        if op == "decrypt":
            return stream.decrypt_any(data, unwrap)
        raise FormatError(f"unknown encryption service {op!r}")

    return serve


async def _key_session(ctx: _Context) -> None:
    public_der = await ctx.keys.public_key(ctx.owner)
    # "owner" (our extension) binds the key to its account, so a host cannot answer a
    # request for one user's key with another user's document.
    user_data = {"key": _b64(public_der), "owner": ctx.owner}
    await _attestation(ctx, hpke.generate_keypair(), user_data)


async def _assemble(ctx: _Context, size: object) -> bytearray | None:
    """Collect a bundle sent as ``chunk`` frames into one buffer of the announced size.

    The buffer grows as the bytes arrive: nothing is allocated for what a client only
    announced (issue 18, finding 4), and the announcement is bounded by the maximum bundle
    size. It is returned as is (no ``bytes`` copy): a ``cape:`` bundle is decrypted in it.
    """
    limit = ctx.config.bundle_limits.max_bundle_bytes
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise FormatError("bundle 'size' must be a positive integer")
    if size > limit:
        raise LimitExceededError("bundle size in bytes", limit, size)
    buffer = bytearray()
    while len(buffer) < size:
        message = await ctx.next_frame("chunk")
        if message is None:
            return None
        piece = message.get("data")
        if not isinstance(piece, bytes) or not piece or len(buffer) + len(piece) > size:
            raise FormatError("bundle chunks must be non-empty and add up to the announced size")
        buffer += piece
        del message, piece
    return buffer


async def _deploy_session(ctx: _Context) -> None:
    session_key = hpke.generate_keypair()
    await _attestation(ctx, session_key, {})
    message = await ctx.next_frame("bundle")
    if message is None:
        return
    name, public = message.get("name"), message.get("public", False)
    data = message.get("data")
    if "size" in message and data is None:
        data = await _assemble(ctx, message["size"])
        if data is None:
            return
    if (
        not isinstance(data, bytes | bytearray)
        or not isinstance(name, str)
        or not isinstance(public, bool)
    ):
        raise FormatError("bundle frame needs bytes 'data', str 'name' and bool 'public'")
    if not data.startswith(envelope.PREFIX) and not data.startswith(stream.STREAM_PREFIX):
        raise FormatError("deploy bundle must be 'cape:' + envelope ciphertext")
    if isinstance(data, bytearray) and not data.startswith(stream.STREAM_PREFIX):
        checksum = await _open_chunked_bundle(ctx, data)
    else:
        zip_bytes = await _decrypt_input(ctx, bytes(data))
        await ctx.config.lanes.keys.run(
            ctx.party, check_bundle, zip_bytes, ctx.config.bundle_limits
        )
        checksum = hashlib.sha256(zip_bytes).hexdigest()
    await ctx.reply({"t": "deployed", "checksum": checksum, "name": name, "owner": ctx.owner})


async def _open_chunked_bundle(ctx: _Context, buffer: bytearray) -> str:
    """Decrypt a chunked ``cape:`` bundle in its own buffer, validate it; return its checksum.

    Only one copy of the bundle exists at any time: the plaintext overwrites the ciphertext,
    and the checksum and the zip checks read it through a view.
    """
    unwrapper = ctx.keys.unwrapper_for(ctx.owner, asyncio.get_running_loop())

    def open_and_check() -> str:
        plaintext = envelope.decrypt_in_place(buffer, unwrapper)
        try:
            check_bundle(plaintext, ctx.config.bundle_limits)
            return hashlib.sha256(plaintext).hexdigest()
        finally:
            plaintext.release()

    return await ctx.config.lanes.keys.run(ctx.party, open_and_check)


class _Inputs:
    """Opens a run or test session's input frames in order (a test session's bundle first):
    HPKE-sealed to the session key, or, when the session confirmed sealed inputs, input *n*
    under the session's input key, so that nothing the host made up, replayed, reordered or
    dropped opens (crypto/session_keys.py). Either failure is the same DecryptionError."""

    def __init__(self, ctx: _Context, session_key: hpke.KeyPair) -> None:
        self.session_key = session_key
        self.keys = (
            None
            if ctx.response_key is None
            else SessionKeys.for_enclave(session_key, ctx.response_key, ctx.sealing)
        )
        self.sealed = ctx.sealed_inputs
        self.count = 0

    def open(self, data: bytes) -> bytes:
        sequence, self.count = self.count, self.count + 1
        if self.sealed and self.keys is not None:
            return self.keys.inputs.open(sequence, data)
        return hpke.open(self.session_key, data)


async def _serve_inputs(ctx: _Context, sandbox: FunctionSandbox, inputs: _Inputs) -> None:
    # Replies are sealed under a key only this enclave and the client can derive (see
    # crypto/results.py): the host can neither read nor forge them, nor drop or reorder one.
    channel = None if inputs.keys is None else inputs.keys.results
    sequence = 0

    async def fail_call(text: str) -> None:
        nonlocal sequence
        if channel is None:
            await ctx.error(text, fatal=False)
        else:
            sealed = channel.seal(sequence, text.encode("utf-8"), kind=results.ERROR)
            await ctx.reply(
                {"t": "error", "message": SEALED_ERROR_TEXT, "fatal": False, "sealed": sealed}
            )
        sequence += 1

    while (message := await ctx.next_frame("input")) is not None:
        data = message.get("data")
        if not isinstance(data, bytes):
            raise FormatError("input frame needs bytes 'data'")
        if len(data) > ctx.config.max_input_bytes:
            inputs.count += 1  # a sealed input's number is spent whether or not it opens
            limit = ctx.config.max_input_bytes
            await fail_call(LimitExceededError("input size in bytes", limit).diagnostics())
            continue
        # A frame that does not open under the session key is a protocol error: fatal.
        plaintext = inputs.open(data)
        try:
            plaintext = await _decrypt_input(ctx, plaintext)
            ctx.inbox.on_close = functools.partial(
                asyncio.get_running_loop().run_in_executor, None, sandbox.close
            )
            try:
                # On the event loop, holding a calls-lane slot (no thread hop per call).
                calls = ctx.config.lanes.calls
                output = await calls.run_async(ctx.party, sandbox.call_async, plaintext)
            finally:
                ctx.inbox.on_close = None
        except (FunctionError, LimitExceededError, DecryptionError, KeyReleaseDeniedError) as exc:
            # One bad input (the function raised, an oversized output, a cape: input that
            # does not open or whose key is refused) ends that call, not the session. A dead
            # sandbox (SandboxError) ends the session.
            await fail_call(exc.diagnostics())
            continue
        if channel is not None:
            sealed = channel.seal(sequence, output)
            await ctx.reply({"t": "result", "data": sealed, "encrypted": True})
        else:
            await ctx.reply({"t": "result", "data": output, "encrypted": False})
        sequence += 1


async def _attestation(ctx: _Context, session_key: hpke.KeyPair, user_data: dict[str, str]) -> None:
    """Send the session's document, made holding a slot of the attestation lane (its
    admission, fairness and busy errors): on the lane's thread when the module waits on a
    device, on the event loop when it only computes in this process (the simulated one), which
    saves a thread hand-off per session (issue 16)."""
    lane = ctx.config.lanes.attestation
    if ctx.module.waits:
        document = await lane.run(ctx.party, _attest, ctx, session_key, user_data)
    else:
        async with lane.slot(ctx.party):
            document = _attest(ctx, session_key, user_data)
    await ctx.reply({"t": "attestation", "document": document})


async def _cold_lease(ctx: _Context, zip_bytes: bytes) -> Lease:
    """Unpack into a private directory and start a sandbox: the path with no warm pool."""
    holder = Path(tempfile.mkdtemp(prefix=f"s{ctx.sid}-", dir=ctx.config.workdir))
    try:
        holder.chmod(0o711)  # the sandbox's unprivileged uid must traverse to its function dir
        limits = ctx.config.bundle_limits
        lanes = ctx.config.lanes
        root = await lanes.keys.run(ctx.party, unpack_bundle, zip_bytes, holder, limits)
        sandbox = await lanes.calls.run(
            ctx.party,
            functools.partial(
                FunctionSandbox.start,
                root,
                limits=ctx.config.sandbox_limits,
                services=_services(ctx, asyncio.get_running_loop()),
            ),
        )
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, holder, True)
        raise
    return Lease(sandbox, holder)


async def _stored_bundle(ctx: _Context, bundle: object, digest: object) -> bytes:
    """The run's stored ciphertext: sent with ``open``, or asked for now (``need_bundle``).

    A host that names the ciphertext by its SHA-256 sends the bytes only when this enclave
    does not hold the function warm; whatever arrives must match the name.
    """
    if bundle is None:
        await ctx.reply({"t": "need_bundle"})
        message = await ctx.next_frame("bundle")
        bundle = None if message is None else message.get("data")
    if not isinstance(bundle, bytes):
        raise FormatError("run session needs the stored bundle")
    if isinstance(digest, bytes) and not hmac.compare_digest(
        hashlib.sha256(bundle).digest(), digest
    ):
        raise FormatError("the stored bundle does not match its announced SHA-256")
    return bundle


async def _run_session(ctx: _Context, bundle: object, digest: object = None) -> None:
    """run: the host brings the stored ciphertext, or first only its SHA-256 (``bundle_sha256``)
    so that a function this enclave holds warm costs no transfer; the document carries the
    function's checksum."""
    if digest is not None and (not isinstance(digest, bytes) or len(digest) != 32):
        raise FormatError("bundle_sha256 must be 32 bytes")
    if bundle is None and digest is None:
        raise FormatError("run session needs the stored bundle or its SHA-256")
    session_key = hpke.generate_keypair()
    # The warm pool starts the spare that replaces this session's once its attestation
    # document is sent: the start would otherwise compete with it for the CPU (issue 16).
    document_sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    try:
        if ctx.pool is not None:
            fetched: list[bytes] = []

            async def decrypt() -> bytes:  # only when the function is not warm
                fetched.append(await _stored_bundle(ctx, bundle, digest))
                return await _decrypt_input(ctx, fetched[0])

            if isinstance(digest, bytes):
                name = digest
            elif isinstance(bundle, bytes):
                name = hashlib.sha256(bundle).digest()
            else:
                raise FormatError("run session needs the stored bundle")
            checksum, lease = await ctx.pool.acquire(
                ctx.owner,
                name,
                decrypt,
                _services(ctx, asyncio.get_running_loop()),
                party=ctx.party,
                document_sent=document_sent,
            )
            fetched.clear()
        else:
            stored = await _stored_bundle(ctx, bundle, digest)
            zip_bytes = await _decrypt_input(ctx, stored)
            del stored
            checksum = hashlib.sha256(zip_bytes).digest()
            lease = await _cold_lease(ctx, zip_bytes)
            del zip_bytes
        try:
            await _attestation(ctx, session_key, {"func_checksum": _b64(checksum)})
            document_sent.set_result(None)
            await _serve_inputs(ctx, lease.sandbox, _Inputs(ctx, session_key))
        finally:
            await asyncio.to_thread(lease.release)
    finally:
        if not document_sent.done():
            document_sent.set_result(None)


async def _test_session(ctx: _Context) -> None:
    """test: the bundle arrives HPKE-sealed in the session and is never stored."""
    session_key = hpke.generate_keypair()
    await _attestation(ctx, session_key, {})
    message = await ctx.next_frame("bundle")
    if message is None:
        return
    sealed = message.get("data")
    if not isinstance(sealed, bytes):
        raise FormatError("bundle frame needs bytes 'data'")
    inputs = _Inputs(ctx, session_key)
    lease = await _cold_lease(ctx, inputs.open(sealed))
    try:
        await _serve_inputs(ctx, lease.sandbox, inputs)
    finally:
        await asyncio.to_thread(lease.release)


async def run_session(
    message: dict[str, Any],
    *,
    module: SecureModule,
    keys: EnclaveKeyClient,
    config: SessionConfig,
    send: Send,
    inbox: Inbox,
    pool: WarmPool | None = None,
) -> None:
    """Serve one session from its ``open`` frame to the end; never raises."""
    sid = message["sid"]
    try:
        kind, owner, caller, nonce, response_key, sealed_inputs = _check_open(message)
        ctx = _Context(
            sid,
            kind,
            owner,
            caller,
            nonce,
            response_key,
            sealed_inputs,
            _check_sealing(message, response_key),
            module,
            keys,
            config,
            send,
            inbox,
            pool,
        )
        if kind == "key":
            await _key_session(ctx)
        elif kind == "deploy":
            await _deploy_session(ctx)
        elif kind == "run":
            await _run_session(ctx, message.get("bundle"), message.get("bundle_sha256"))
        else:
            await _test_session(ctx)
        await send({"t": "close", "sid": sid})
    except CapeError as exc:
        reply = {"t": "error", "sid": sid, "message": exc.diagnostics(), "fatal": True}
        if isinstance(exc, BusyError):
            reply["busy"] = True  # the host answers "try again later" (close 1013)
        await send(reply)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a bug: report generically, keep serving other sessions
        # Only the exception's type: its message or traceback could carry a file name, an
        # input or a message of user code, and the enclave's log goes to the host.
        log.error("session %d failed: internal error (%s)", sid, type(exc).__name__)
        await send({"t": "error", "sid": sid, "message": "internal enclave error", "fatal": True})
