"""Spins in several processes for a while; reports the CPU time they got and the wall time.

Input (JSON): ``{"children": N, "seconds": S}``. Each child spins until the wall deadline and
reports its own CPU time (the kernel's accounting, ``time.process_time``) through a pipe.
"""

import json
import os
import time


def cape_handler(data: bytes) -> bytes:
    request = json.loads(data)
    started = time.monotonic()
    deadline = started + request["seconds"]
    read_end, write_end = os.pipe()
    children = []
    for _ in range(request["children"]):
        pid = os.fork()
        if pid:
            children.append(pid)
            continue
        os.close(read_end)
        n = 0
        while time.monotonic() < deadline:
            n += 1
        os.write(write_end, f"{time.process_time():.6f}\n".encode())
        os._exit(0)
    os.close(write_end)
    for pid in children:
        os.waitpid(pid, 0)
    wall = time.monotonic() - started
    with os.fdopen(read_end) as reports:
        cpu = sum(float(line) for line in reports.read().split())
    return json.dumps({"cpu": cpu, "wall": wall, "children": len(children)}).encode()
