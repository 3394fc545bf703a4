"""Writes a frame header announcing 1 GiB straight onto the worker's channel."""

import os
import socket
import stat
import struct
import time


def cape_handler(data: bytes) -> bytes:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                socket.socket(fileno=os.dup(fd)).sendall(
                    struct.pack(">I", 1 << 30) + b"\x00" * 4096
                )
        except OSError:
            pass
    time.sleep(30)
    return b"unreachable"
