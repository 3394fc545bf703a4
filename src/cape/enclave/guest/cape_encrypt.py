"""Cape Encrypt from inside a function: ``encrypt`` / ``decrypt`` with the owner's Cape key.

The stand-in for Cape's in-function ``cape_encrypt`` package (reference §8.3)::

    import cape_encrypt

    token = cape_encrypt.encrypt(b"secret")  # "cape:" + base64, for the function's owner
    plain = cape_encrypt.decrypt(token)  # b"secret"

    try:
        cape_encrypt.decrypt(b"cape:garbage")
    except cape_encrypt.CapeEncryptError as exc:
        ...  # str(exc) is the runtime's one-line reason

This file runs inside the sandbox and imports only the standard library. The sandbox worker
(:mod:`cape.enclave.worker`) loads it from ``/cape-worker/guest/cape_encrypt.py`` and registers
it as ``sys.modules["cape_encrypt"]`` *before* it imports ``app.py``, so ``import cape_encrypt``
always gets this helper, even when a bundle ships its own ``cape_encrypt.py`` (a vendored copy of
Cape's old RPC client, which spoke to a socket that does not exist here). The helper's folder is
also appended to the *end* of ``sys.path``, after the function's folder and the standard library,
where it can shadow nothing. A function can still replace the module in ``sys.modules``; that
only affects the function itself, which is the helper's only user.

Transport: a stream socket of its own (not the worker's call channel), inherited by the worker
and handed to :func:`_attach`. One synchronous request at a time (a lock serialises threads);
every frame is ``u32be length || payload``:

- request: ``op byte || data`` with op ``1`` (encrypt: the plaintext) or ``2`` (decrypt: the
  ciphertext exactly as given, text or binary, ``cape:`` or ``cape-stream-v1:``);
- response: ``status byte || body`` with status ``0`` (the result) or ``1`` (a UTF-8, one-line
  reason, raised here as :class:`CapeEncryptError`).

Data over the session's limit is refused here, before anything is sent. A session started
without encryption services has no such socket: every call then raises
``CapeEncryptError("encryption services are not available in this session")``. Neither has a
process forked by the function (the socket is closed in the child, so that two processes can
never interleave their frames), nor a program it executes.
"""

from __future__ import annotations

import _thread
import os
import struct

# Loaded into every session before app.py: only modules that are cheap to import (no socket,
# threading or contextlib, which pull in enum, collections and functools). The socket is used
# as a plain descriptor; ``_thread.allocate_lock`` is what ``threading.Lock`` is.

__all__ = ["CapeEncryptError", "decrypt", "encrypt"]

ENCRYPT = 1
DECRYPT = 2
OK = 0
ERROR = 1
HEADER = struct.Struct(">I")
NOT_AVAILABLE = "encryption services are not available in this session"
NOT_IN_CHILD = (
    "encryption services are not available in a process forked by the function "
    "(only in the function's own process)"
)
CONNECTION_LOST = "the connection to the runtime's encryption services was lost"


class CapeEncryptError(Exception):
    """Encryption or decryption failed; the message is the runtime's one-line reason."""


_lock = _thread.allocate_lock()
_fd: int | None = None
_unavailable = NOT_AVAILABLE  # why there is no socket, while there is none
_max_request = 0
_max_response = 0


def encrypt(data: bytes) -> str:
    """Encrypt ``data`` to the function owner's Cape key; returns ``"cape:" + base64``."""
    result = _request(ENCRYPT, _as_bytes(data, "encrypt"), "encrypt")
    try:
        return result.decode("ascii")
    except UnicodeDecodeError:
        raise CapeEncryptError("the runtime returned a malformed ciphertext") from None


def decrypt(data: bytes | str) -> bytes:
    """Decrypt a ``cape:`` or ``cape-stream-v1:`` ciphertext (text or binary form)."""
    if isinstance(data, str):
        return _request(DECRYPT, data.encode("utf-8"), "decrypt")
    return _request(DECRYPT, _as_bytes(data, "decrypt"), "decrypt")


def _as_bytes(data: object, name: str) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    accepted = "bytes or str" if name == "decrypt" else "bytes"
    raise TypeError(f"{name}() takes {accepted}, not {type(data).__name__}")


def _request(op: int, data: bytes, name: str) -> bytes:
    global _fd, _unavailable
    with _lock:
        fd = _fd
        if fd is None:
            raise CapeEncryptError(_unavailable)
        if len(data) > _max_request:
            raise CapeEncryptError(
                f"{name}: the data is {len(data)} bytes, over the limit of {_max_request} bytes"
            )
        try:
            _write_all(fd, HEADER.pack(len(data) + 1) + bytes((op,)))
            if data:
                _write_all(fd, data)
            (length,) = HEADER.unpack(_recv_exact(fd, HEADER.size))
            if not 1 <= length <= _max_response + 1:
                raise _Malformed
            status = _recv_exact(fd, 1)[0]
            body = _recv_exact(fd, length - 1)
            if status not in (OK, ERROR):
                raise _Malformed
        except BaseException as exc:
            # Cut short (the runtime went away, a signal handler raised, ...): the frames are
            # out of step now, so this process gives the connection up for good.
            _fd, _unavailable = None, CONNECTION_LOST
            _close_quietly(fd)
            if isinstance(exc, OSError | EOFError | _Malformed):
                raise CapeEncryptError(CONNECTION_LOST) from None
            raise
    if status == ERROR:
        raise CapeEncryptError(body.decode("utf-8", "replace") or f"{name} failed")
    return body


class _Malformed(Exception):
    pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _recv_exact(fd: int, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            raise EOFError
        got += k
    return bytes(buf)


def _close_quietly(fd: int) -> None:
    try:  # noqa: SIM105 - contextlib costs an import per session start
        os.close(fd)
    except OSError:
        pass


def _attach(fd: int, max_request_bytes: int, max_response_bytes: int) -> None:
    """Called once by the sandbox worker, before app.py is imported."""
    global _fd, _max_request, _max_response
    os.set_blocking(fd, True)
    os.set_inheritable(fd, False)  # programs the function executes do not get it
    _fd, _max_request, _max_response = fd, max_request_bytes, max_response_bytes
    os.register_at_fork(after_in_child=_forget_in_child)


def _forget_in_child() -> None:
    global _lock, _fd, _unavailable
    _lock = _thread.allocate_lock()  # another thread may have held it at the fork
    fd, _fd, _unavailable = _fd, None, NOT_IN_CHILD
    if fd is not None:
        _close_quietly(fd)
