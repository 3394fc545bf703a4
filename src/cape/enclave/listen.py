"""The runtime's listening channel, for images whose command line is fixed (Nitro EIFs).

Inside a Nitro Enclave the parent connects to the enclave: the runtime listens on a vsock
port (``--listen vsock:5005``) and accepts exactly one connection, the host's channel. The
same code listens on a Unix socket (``--listen unix:/path``), which is how the Nitro launcher
is tested on machines without vsock: only the socket family differs, the framing is the same.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from cape.errors import FormatError

__all__ = ["accept_channel", "parse_listen"]

_MAX_PORT = 0xFFFFFFFF


def parse_listen(spec: str) -> tuple[int, tuple[int, int] | str]:
    """``vsock:PORT`` or ``unix:PATH`` as ``(family, address)`` for :func:`socket.socket`."""
    kind, _, rest = spec.partition(":")
    if kind == "vsock" and rest.isdigit() and 0 < int(rest) <= _MAX_PORT:
        return socket.AF_VSOCK, (socket.VMADDR_CID_ANY, int(rest))
    if kind == "unix" and rest:
        return socket.AF_UNIX, rest
    raise FormatError(f"--listen {spec!r}: use vsock:PORT or unix:PATH")


def accept_channel(spec: str) -> socket.socket:
    """Listen on ``spec``, accept one connection (the host's), stop listening, return it."""
    family, address = parse_listen(spec)
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        if family == socket.AF_UNIX:
            path = Path(str(address))
            if path.is_socket():
                os.unlink(path)
        listener.bind(address)
        listener.listen(1)
        connection, _ = listener.accept()
    return connection
