"""Forks children that each allocate (and touch) part of the memory limit, then linger.

Input: JSON ``{"children": N, "mib": M}``. Each child writes one byte to a pipe once its M MiB
are resident and sleeps; the handler waits until every child has reported or died, then returns
how many are still alive holding their memory. Per-process limits (RLIMIT_AS) let every child
live; a limit on the whole function does not.
"""

import json
import os
import select
import time


def cape_handler(data: bytes) -> bytes:
    request = json.loads(data)
    read_end, write_end = os.pipe()
    children = []
    for _ in range(request["children"]):
        pid = os.fork()
        if pid:
            children.append(pid)
            continue
        os.close(read_end)
        held = bytearray(request["mib"] << 20)  # zero-filled: every page is touched
        os.write(write_end, b"1")
        time.sleep(600)
        del held
        os._exit(0)
    os.close(write_end)
    reported, dead = 0, set[int]()
    deadline = time.monotonic() + 20
    while reported + len(dead) < len(children) and time.monotonic() < deadline:
        ready, _, _ = select.select([read_end], [], [], 0.1)
        if ready:
            reported += len(os.read(read_end, 64))
        dead.update(pid for pid in children if pid not in dead and os.waitpid(pid, os.WNOHANG)[0])
    time.sleep(0.5)  # a kill for the last allocation lands now
    alive = [pid for pid in children if pid not in dead and os.waitpid(pid, os.WNOHANG) == (0, 0)]
    return str(len(alive)).encode()
