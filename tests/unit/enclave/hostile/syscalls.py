"""Calls syscalls the seccomp filter denies; reports errno names (JSON)."""

import ctypes
import errno
import json
import socket

libc = ctypes.CDLL(None, use_errno=True)
PTRACE_TRACEME = 0
ADDR_NO_RANDOMIZE = 0x0040000
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
SYS_IO_URING_SETUP = 425  # x86_64 and aarch64 alike


def _errno(result: int) -> str:
    return "ok" if result != -1 else errno.errorcode.get(ctypes.get_errno(), "?")


def cape_handler(data: bytes) -> bytes:
    result = {
        "ptrace": _errno(libc.ptrace(PTRACE_TRACEME, 0, None, None)),
        "personality": _errno(libc.personality(ctypes.c_ulong(ADDR_NO_RANDOMIZE))),
        "unshare_user": _errno(libc.unshare(CLONE_NEWUSER)),
        "unshare_mount": _errno(libc.unshare(CLONE_NEWNS)),
        "mount": _errno(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
        "io_uring_setup": _errno(libc.syscall(SYS_IO_URING_SETUP, 1, ctypes.c_void_p(0))),
    }
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        result["socket_inet"] = "ok"
    except OSError as exc:
        result["socket_inet"] = errno.errorcode.get(exc.errno or 0, "?")
    with open("/proc/self/status") as status:
        result["seccomp_mode"] = next(
            line.split()[1] for line in status if line.startswith("Seccomp:")
        )
    return json.dumps(result).encode()
