"""The real Nitro Secure Module, reached through the ``/dev/nsm`` driver.

The driver takes one ``ioctl`` per request (``shared/spec/nitro-attestation.md`` §3.5,
``aws-nitro-enclaves-nsm-api`` ``src/driver/mod.rs``)::

    struct nsm_message { struct iovec request; struct iovec response; };   /* 32 bytes */
    ioctl(fd, _IOWR(0x0A, 0, sizeof(struct nsm_message)), &msg)            /* 0xC0200A00 */

``request`` points at the CBOR request (at most 4096 bytes, else ``EMSGSIZE``), ``response``
at a 12288-byte buffer; on return the kernel has written the CBOR response there and set
``response.iov_len`` to its length.

This only works inside a Nitro Enclave. The ``ioctl`` callable and the device path are
constructor parameters so the message handling is unit-tested here with a fake device.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import threading
from pathlib import Path
from typing import ClassVar, Protocol

from cape.enclave.secure_module.base import SecureModule
from cape.errors import NSMError, SecureModuleError
from cape.formats.nsm import MAX_REQUEST_BYTES, RESPONSE_BUFFER_BYTES

__all__ = [
    "NSM_DEVICE",
    "NSM_IOCTL_REQUEST",
    "IoVec",
    "IoctlFunction",
    "NSMMessage",
    "NitroSecureModule",
]

NSM_DEVICE = Path("/dev/nsm")
NSM_IOCTL_MAGIC = 0x0A


class IoVec(ctypes.Structure):
    """``struct iovec``: a pointer and a length."""

    _fields_: ClassVar = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class NSMMessage(ctypes.Structure):
    """``struct nsm_message``: the request and response buffers of one ``ioctl``."""

    _fields_: ClassVar = [("request", IoVec), ("response", IoVec)]


def _iowr(magic: int, number: int, size: int) -> int:
    """Linux ``_IOWR(magic, number, size)``: direction read|write (3) in the top two bits."""
    return (3 << 30) | (size << 16) | (magic << 8) | number


#: ``_IOWR(0x0A, 0, sizeof(struct nsm_message))``: 0xC0200A00 on 64-bit Linux.
NSM_IOCTL_REQUEST = _iowr(NSM_IOCTL_MAGIC, 0, ctypes.sizeof(NSMMessage))


class IoctlFunction(Protocol):
    """The shape of :func:`fcntl.ioctl` as this module calls it."""

    def __call__(self, fd: int, request: int, arg: NSMMessage, /) -> object: ...


class NitroSecureModule(SecureModule):
    """The Nitro Secure Module of the enclave this process runs in.

    The device is opened on first use and kept open until :meth:`close`. Requests over
    4096 bytes are refused before the ``ioctl`` with ``NSMError("InputTooLarge")``, as
    ``nsm-api`` does; an ``EMSGSIZE`` from the driver is reported the same way, and any other
    ``ioctl`` failure raises :class:`~cape.errors.SecureModuleError`.
    """

    def __init__(
        self,
        device: str | os.PathLike[str] = NSM_DEVICE,
        *,
        ioctl: IoctlFunction = fcntl.ioctl,
    ) -> None:
        self._device = Path(device)
        self._ioctl = ioctl
        self._fd: int | None = None
        self._lock = threading.Lock()

    def _open(self) -> int:
        with self._lock:
            if self._fd is None:
                try:
                    self._fd = os.open(self._device, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise SecureModuleError(
                        f"no Nitro Secure Module at {self._device} "
                        "(not running inside a Nitro Enclave?)"
                    ) from None
                except OSError as exc:
                    raise SecureModuleError(
                        f"cannot open the Nitro Secure Module at {self._device}: "
                        f"{exc.strerror or exc}"
                    ) from None
            return self._fd

    def close(self) -> None:
        """Close the device if it is open; a later request opens it again."""
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def process(self, request: bytes) -> bytes:
        """Send one CBOR request to the device and return its CBOR response."""
        if len(request) > MAX_REQUEST_BYTES:
            raise NSMError("InputTooLarge")
        fd = self._open()
        request_buffer = ctypes.create_string_buffer(request, max(len(request), 1))
        response_buffer = ctypes.create_string_buffer(RESPONSE_BUFFER_BYTES)
        message = NSMMessage(
            IoVec(ctypes.cast(request_buffer, ctypes.c_void_p), len(request)),
            IoVec(ctypes.cast(response_buffer, ctypes.c_void_p), RESPONSE_BUFFER_BYTES),
        )
        try:
            self._ioctl(fd, NSM_IOCTL_REQUEST, message)
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                raise NSMError("InputTooLarge") from None
            raise SecureModuleError(
                f"the Nitro Secure Module ioctl failed: {exc.strerror or exc}"
            ) from None
        length = int(message.response.iov_len)
        if length > RESPONSE_BUFFER_BYTES:
            raise SecureModuleError(
                f"the Nitro Secure Module reported a {length}-byte response; "
                f"the buffer holds {RESPONSE_BUFFER_BYTES}"
            )
        if length == 0:
            raise SecureModuleError("the Nitro Secure Module returned an empty response")
        return ctypes.string_at(response_buffer, length)
