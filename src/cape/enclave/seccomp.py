"""The seccomp filter around user code, built with libseccomp and handed to bubblewrap as BPF.

Policy: **default allow, explicit deny list** (Cape's capejail used the opposite: default kill
and an allow-list of about 250 syscalls). A deny list suits us because:

- CPython plus the native wheels functions ship (numpy, onnxruntime, ...) use a broad and
  shifting set of syscalls (``sched_setaffinity`` had to be added to capejail for numpy); an
  allow-list that misses one kills a legitimate function in the middle of a call.
- The containment does not rest on seccomp. The sandbox has its own user, mount, pid, net,
  ipc, uts and cgroup namespaces, runs as an unprivileged host uid with no capabilities,
  sees only read-only system files plus its own directory, and has resource limits. seccomp
  is defence in depth: it takes away the kernel interfaces that matter most for escaping or
  for attacking the kernel (namespaces, mounts, tracing, BPF, keyrings, io_uring, modules,
  clocks) and all networking except Unix sockets.

Denied calls fail with ``EPERM`` (``EACCES`` for sockets; ``ENOSYS`` for ``clone3``, so glibc
falls back to ``clone`` whose flags we can inspect) instead of killing the process, so Python
raises a clear ``PermissionError`` inside the function. System calls of a foreign ABI
(32-bit ``int 0x80``, x32) kill the process: nothing legitimate uses them here and they
would bypass the filter's syscall numbers.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import tempfile

import pyseccomp  # type: ignore[import-untyped]

__all__ = [
    "CLONE_NAMESPACE_FLAGS",
    "DENIED_SYSCALLS",
    "bpf_program",
    "build_filter",
    "program_fd",
]

#: Denied with EPERM whatever their arguments.
DENIED_SYSCALLS: tuple[str, ...] = (
    # tracing and reading other processes
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "kcmp",
    # namespaces and mounts (classic and new mount API)
    "unshare",
    "setns",
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "chroot",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    # kernel attack surface
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "keyctl",
    "add_key",
    "request_key",
    "open_by_handle_at",
    "name_to_handle_at",
    "lookup_dcookie",
    "fanotify_init",
    # no further seccomp filters once ours is installed
    "seccomp",
    # machine administration
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    "syslog",
    "vhangup",
    "sethostname",
    "setdomainname",
    "iopl",
    "ioperm",
    "uselib",
    "nfsservctl",
    # clocks
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
)

#: ``clone`` with any of these flags (a new namespace) is denied.
CLONE_NAMESPACE_FLAGS: dict[str, int] = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}

PR_SET_SECCOMP = 22
_NR_SCMP_ERROR = -1
PERSONALITY_QUERY = 0xFFFFFFFF


def _exists(name: str) -> bool:
    # libseccomp resolves names it does not know on this architecture to a negative number.
    return int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)) != _NR_SCMP_ERROR


def _clone_flags_arg() -> int:
    # clone(flags, ...) everywhere but s390, where the first two arguments are swapped.
    return 1 if pyseccomp.system_arch() in (pyseccomp.Arch.S390, pyseccomp.Arch.S390X) else 0


def build_filter() -> pyseccomp.SyscallFilter:
    """The sandbox's filter: allow by default, deny the calls listed in this module."""
    deny = pyseccomp.ERRNO(errno.EPERM)
    flt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    flt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    for name in DENIED_SYSCALLS:
        if _exists(name):
            flt.add_rule(deny, name)

    # Sockets: Unix domain only (there is no network interface anyway; this is depth).
    flt.add_rule(
        pyseccomp.ERRNO(errno.EACCES), "socket", pyseccomp.Arg(0, pyseccomp.NE, socket.AF_UNIX)
    )
    flt.add_rule(
        pyseccomp.ERRNO(errno.EACCES), "socketpair", pyseccomp.Arg(0, pyseccomp.NE, socket.AF_UNIX)
    )

    # New namespaces through clone; clone3 passes its flags in memory seccomp cannot read.
    flags_arg = _clone_flags_arg()
    for flag in CLONE_NAMESPACE_FLAGS.values():
        flt.add_rule(deny, "clone", pyseccomp.Arg(flags_arg, pyseccomp.MASKED_EQ, flag, flag))
    if _exists("clone3"):
        flt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")

    # prctl(PR_SET_SECCOMP, ...): the older way to stack another filter.
    flt.add_rule(deny, "prctl", pyseccomp.Arg(0, pyseccomp.EQ, PR_SET_SECCOMP))

    # personality: only PER_LINUX (0) and the query (0xffffffff). The kernel reads the argument
    # as 32 bits, so deny anything above them, and every 32-bit value other than all-zeros and
    # all-ones: such a value has some bit i set whose cyclic neighbour i+1 is clear, which one
    # single-comparison rule per bit catches.
    flt.add_rule(deny, "personality", pyseccomp.Arg(0, pyseccomp.GT, PERSONALITY_QUERY))
    for bit in range(32):
        mask = (1 << bit) | (1 << ((bit + 1) % 32))
        flt.add_rule(deny, "personality", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, mask, 1 << bit))
    return flt


@functools.cache
def bpf_program() -> bytes:
    """The filter compiled to a classic BPF program (``struct sock_filter`` array)."""
    flt = build_filter()
    with tempfile.TemporaryFile() as out:
        flt.export_bpf(out)
        out.seek(0)
        program = out.read()
    if not program or len(program) % 8:
        raise RuntimeError("libseccomp exported an empty or malformed BPF program")
    return program


def program_fd() -> int:
    """A fresh read-only descriptor holding :func:`bpf_program`, for ``bwrap --seccomp FD``.

    bubblewrap reads it to the end and closes its copy; the caller closes this one once the
    sandbox has started.
    """
    fd = os.memfd_create("cape-seccomp", os.MFD_CLOEXEC)
    try:
        os.write(fd, bpf_program())
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
