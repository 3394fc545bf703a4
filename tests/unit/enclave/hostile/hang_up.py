"""Closes the worker's channel, then keeps the process alive."""

import os
import stat
import time


def cape_handler(data: bytes) -> bytes:
    for name in os.listdir("/proc/self/fd"):
        try:
            if stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                os.close(int(name))
        except OSError:
            pass
    time.sleep(60)
    return b"unreachable"
