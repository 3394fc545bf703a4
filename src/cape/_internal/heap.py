"""glibc's heap settings for processes that pass large buffers on every call (issue 16).

By default glibc serves blocks over its (moving) mmap threshold with fresh mappings and trims
the heap's free top, so each 1 MiB input, plaintext and result of a warm call comes back as
zero-filled pages: measured through ``cape serve`` at 1 MiB, 200-1,000 minor page faults and
0.5-2 ms of system time per call in the server and in the enclave runtime, in runs that
otherwise differ only by chance (the heap's layout), against none with fixed thresholds.
"""

from __future__ import annotations

import contextlib
import ctypes

__all__ = ["HEAP_MMAP_THRESHOLD", "HEAP_TRIM_THRESHOLD", "steady_heap"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
#: Blocks this large and over (a large bundle) still get a mapping of their own, returned
#: when freed.
HEAP_MMAP_THRESHOLD = 4 << 20
#: Free memory at the heap's top kept for the next call, at most. 64 MiB (with a 32 MiB mmap
#: threshold) kept the enclave's peak at 1.44x of a 100 MiB chunked deploy (goal <= 1.2x, met
#: at 1.00x before); 4 and 8 MiB keep it at 0.99x and the 1 MiB call fault-free (lead's check,
#: `server_bench.py --only deploy --only invoke`, 22:41 UTC).
HEAP_TRIM_THRESHOLD = 8 << 20


def steady_heap() -> None:
    """Keep freed large buffers in the heap for the next call instead of giving them back to
    the kernel (see the module docstring). glibc only (Linux); elsewhere nothing changes."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD)
