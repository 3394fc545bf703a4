"""The program that runs inside the sandbox: loads ``app.py`` once, then serves calls.

This file runs under the sandbox's own interpreter with ``-I -S``: it sees only the standard
library and the function's files, never cape, cryptography or any site-packages. It must
therefore import nothing but the standard library. :mod:`cape.enclave.sandbox` copies this
file into the sandbox read-only at ``/cape-worker/worker.py`` and starts it as::

    python -I -S -B /cape-worker/worker.py <channel fd> <name=value> ...

The settings (:data:`SETTINGS`) are one ``name=value`` argument each, integers in decimal.

Channel (a stream socket inherited from the runtime), every frame ``u32be length || payload``:

- worker → runtime, once, after loading: a *response* with status ``READY`` (empty payload)
  or ``LOAD_ERROR``.
- runtime → worker: a request, the payload is the input bytes.
- worker → runtime: a response, ``status byte || body``: ``OK`` (the output bytes),
  ``RAISED`` (UTF-8 ``"<ExceptionType>: <message>"``, at most a few KiB), ``TOO_LARGE``
  (the output's length in decimal; the output itself is dropped).

Before any of the function's code runs, the worker lowers its resource limits (they are
inherited by every process the function starts and cannot be raised again: the sandbox holds
no capabilities), closes every inherited descriptor but the channel and the services socket,
and points fds 0-2 and ``sys.stdin/stdout/stderr`` at ``/dev/null`` so that printing cannot
block or fill memory.

Encryption services: the helper module ``cape_encrypt`` (``cape/enclave/guest/cape_encrypt.py``,
bound read-only at ``<guest_dir>/cape_encrypt.py``) is loaded and registered in ``sys.modules``
before app.py, its folder appended to ``sys.path``, and, when the config names a ``services``
socket (a second inherited stream socket, separate from the channel so that a handler's request
never interleaves with the call frames), attached to it. The module documents that protocol.

The runtime does not trust anything this process sends: the function runs in this same
process and could write to the channel itself. The checks here only keep honest functions
(and their forked children) from confusing the protocol by accident.
"""

from __future__ import annotations

import errno
import os
import resource
import struct
import sys
from importlib.machinery import ModuleSpec, SourceFileLoader
from types import CodeType, ModuleType

# Start-up cost is paid once per session (issue 16): this file imports only what the
# interpreter has loaded already or what is cheap (no json, socket, typing, importlib.util or
# threading, which cost 4-9 ms of CPU each, mostly through re and enum). ``TYPE_CHECKING`` is
# a local name that type checkers treat as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

READY = OK = 0
RAISED = 1
LOAD_ERROR = 2
TOO_LARGE = 3

#: Exit statuses the runtime maps to a reason (see cape.enclave.sandbox).
EXIT_MEMORY = 101
EXIT_PROTOCOL = 102
EXIT_SETUP = 103

MAX_ERROR_CHARS = 4000
HEADER = struct.Struct(">I")
READ_BYTES = 64 << 10  # the first read of an input: its head and a body up to this size
APP_FILE = "app.py"
HANDLER = "cape_handler"
GUEST_MODULE = "cape_encrypt"


#: The worker's settings: ``name=value`` arguments; the texts are paths, the rest integers.
LIMIT_SETTINGS = ("memory_bytes", "cpu_seconds", "processes", "open_files", "file_size_bytes")
SERVICES_SETTINGS = ("fd", "max_request_bytes", "max_response_bytes")
TEXT_SETTINGS = ("root", "guest_dir")
SETTINGS = (*TEXT_SETTINGS, *LIMIT_SETTINGS, "max_input_bytes", "max_output_bytes")


def settings_args(config: dict[str, Any]) -> list[str]:
    """The arguments that carry ``config`` (the shape :func:`parse_settings` returns)."""
    args = [f"{name}={config[name]}" for name in (*TEXT_SETTINGS, "max_input_bytes")]
    args.append(f"max_output_bytes={config['max_output_bytes']}")
    args += [f"{name}={config['limits'][name]}" for name in LIMIT_SETTINGS]
    if config.get("services") is not None:
        args += [f"services_{name}={config['services'][name]}" for name in SERVICES_SETTINGS]
    return args


def parse_settings(args: list[str]) -> dict[str, Any]:
    """``name=value`` arguments → the worker's config; anything else ends the worker."""
    given: dict[str, str] = {}
    for arg in args:
        name, sep, value = arg.partition("=")
        if not sep or name in given:
            os._exit(EXIT_SETUP)
        given[name] = value
    services = [f"services_{name}" for name in SERVICES_SETTINGS]
    wanted = set(SETTINGS) | (set(services) if services[0] in given else set())
    if set(given) != wanted:
        os._exit(EXIT_SETUP)
    try:
        number = {name: int(given[name]) for name in wanted if name not in TEXT_SETTINGS}
    except ValueError:
        os._exit(EXIT_SETUP)
    return {
        "root": given["root"],
        "guest_dir": given["guest_dir"],
        "limits": {name: number[name] for name in LIMIT_SETTINGS},
        "max_input_bytes": number["max_input_bytes"],
        "max_output_bytes": number["max_output_bytes"],
        "services": (
            {name: number[f"services_{name}"] for name in SERVICES_SETTINGS}
            if services[0] in given
            else None
        ),
    }


def _set_limits(limits: dict[str, int]) -> None:
    """Lower soft and hard limits; the function can never raise them again."""
    table = {
        "memory_bytes": resource.RLIMIT_AS,
        "processes": resource.RLIMIT_NPROC,
        "open_files": resource.RLIMIT_NOFILE,
        "file_size_bytes": resource.RLIMIT_FSIZE,
    }
    for name, which in table.items():
        resource.setrlimit(which, (limits[name], limits[name]))
    # Soft = hard: the kernel sends SIGKILL when the CPU seconds are spent. (The worker is
    # pid 1 of its namespace, which ignores SIGXCPU; its children get SIGXCPU first.)
    cpu = limits["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


#: The C library, as ctypes loads it; the sandbox zygote hands its own over (:func:`use_libc`)
#: before it forks (issue 16: loading it again cost each session ≈ 0.1 ms).
LIBC: Any = None


def use_libc(libc: Any) -> None:
    """The sandbox zygote's ``ctypes.CDLL(None, use_errno=True)``, for :func:`_not_dumpable`."""
    global LIBC
    LIBC = libc


def _not_dumpable() -> None:
    """PR_SET_DUMPABLE 0: no ptrace or /proc/<pid>/mem of the worker by other unprivileged
    processes (defence in depth; children that exec become dumpable again)."""
    try:
        libc = LIBC
        if libc is None:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE
    except (ImportError, OSError, AttributeError):
        pass


def _silence_stdio() -> None:
    null_in = os.open(os.devnull, os.O_RDONLY)
    null_out = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null_in, 0)
    os.dup2(null_out, 1)
    os.dup2(null_out, 2)
    os.close(null_in)
    os.close(null_out)
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115


def _describe(exc: BaseException) -> str:
    name = type(exc).__name__
    try:
        message = str(exc)
    except BaseException:  # a hostile __str__ must not kill the worker
        message = "<unprintable exception>"
    message = message[:MAX_ERROR_CHARS]
    return f"{name}: {message}" if message else name


class Channel:
    """The call channel: a blocking stream socket, read and written as a plain descriptor."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        os.set_blocking(fd, True)

    def receive(self, max_bytes: int) -> bytes | None:
        """The next input; None when the channel closes. Head and a small body come in one
        read (issue 16); a larger body then goes straight into a buffer of its length. The
        runtime sends one frame and waits for the reply: more bytes break the protocol."""
        view = memoryview(bytearray(READ_BYTES))
        got = 0
        while got < HEADER.size:
            k = os.readv(self._fd, [view[got:]])
            if k == 0:
                return None
            got += k
        (length,) = HEADER.unpack_from(view)
        end = HEADER.size + length
        if length > max_bytes or got > end:
            os._exit(EXIT_PROTOCOL)
        if got == end:
            return bytes(view[HEADER.size : end])
        body = bytearray(length)
        body[: got - HEADER.size] = view[HEADER.size : got]
        view = memoryview(body)
        while got < end:
            k = os.readv(self._fd, [view[got - HEADER.size :]])
            if k == 0:
                return None
            got += k
        return bytes(body)

    def send(self, status: int, body: bytes = b"") -> None:
        """One reply frame, head and body in one ``writev`` (issue 16: the runtime reads a
        small reply in one wake-up, not one for the head and one for the body)."""
        head = HEADER.pack(len(body) + 1) + bytes((status,))
        sent = os.writev(self._fd, [head, body]) if body else os.write(self._fd, head)
        if sent < len(head):
            self._write_all(memoryview(head)[sent:])
            sent = len(head)
        if sent < len(head) + len(body):
            self._write_all(memoryview(body)[sent - len(head) :])

    def _write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]


def _close_inherited_fds(keep: set[int]) -> None:
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 16)


def _install_guest(config: dict[str, Any]) -> str | None:
    """Load ``cape_encrypt`` as the module every import gets; returns an error text or None."""
    guest_dir: str | None = config.get("guest_dir")
    if guest_dir is None:
        return None
    try:
        module = _exec_source(GUEST_MODULE, os.path.join(guest_dir, GUEST_MODULE + ".py"))
        services: dict[str, int] | None = config.get("services")
        if services is not None:
            module._attach(
                services["fd"], services["max_request_bytes"], services["max_response_bytes"]
            )
    except MemoryError:
        raise
    except Exception as exc:
        return f"the sandbox's {GUEST_MODULE} helper failed to load: {_describe(exc)}"
    sys.modules[GUEST_MODULE] = module
    sys.path.append(guest_dir)  # last: the function's folder and the stdlib come first
    return None


def _new_module(name: str, path: str) -> tuple[ModuleType, SourceFileLoader]:
    """A module for the source file ``path``, as ``importlib.util.module_from_spec`` makes it
    (``__name__``, ``__file__``, ``__spec__``, ``__loader__``, ``__cached__``), not yet run."""
    loader = SourceFileLoader(name, path)
    spec = ModuleSpec(name, loader, origin=path)
    spec.has_location = True
    module = ModuleType(name)
    module.__spec__ = spec
    module.__loader__ = loader
    module.__file__ = path
    module.__cached__ = spec.cached  # type: ignore[attr-defined]
    return module, loader


#: Code objects compiled ahead of the session, by the path of their source in the sandbox:
#: the sandbox zygote (:mod:`cape.enclave.zygote_program`) compiles the guest modules it binds
#: into every sandbox once, from the same bytes, instead of each session compiling them again
#: (issue 16: ≈ 0.8 ms of CPU per session for ``cape_encrypt``). Empty under bubblewrap.
PRECOMPILED: dict[str, CodeType] = {}


def _exec_source(name: str, path: str) -> ModuleType:
    module, loader = _new_module(name, path)
    code = PRECOMPILED.pop(path, None)
    if code is None:
        loader.exec_module(module)
    else:  # what exec_module does with the code it would have compiled from the same file
        exec(code, module.__dict__)  # noqa: S102
    return module


def _find_app(root: str) -> str | None:
    """``app.py`` at the bundle root, or inside its single top-level folder (protocol.md)."""
    if os.path.isfile(os.path.join(root, APP_FILE)):
        return root
    folders = [
        entry.path
        for entry in os.scandir(root)
        if entry.is_dir(follow_symlinks=False) and not entry.name.startswith((".", "__MACOSX"))
    ]
    if len(folders) == 1 and os.path.isfile(os.path.join(folders[0], APP_FILE)):
        return folders[0]
    return None


def _load(root: str) -> tuple[Any, str | None]:
    """Import app.py once; returns (handler, None) or (None, one-line error text)."""
    app_dir = _find_app(root)
    if app_dir is None:
        return None, "the bundle has no app.py (at its root or in its single top-level folder)"
    os.chdir(app_dir)
    sys.path.insert(0, app_dir)
    module, loader = _new_module("app", os.path.join(app_dir, APP_FILE))
    sys.modules["app"] = module
    try:
        loader.exec_module(module)
    except MemoryError:
        raise  # the runtime reports the memory limit
    except BaseException as exc:  # SystemExit and friends included
        return None, f"app.py failed to import: {_describe(exc)}"
    handler = getattr(module, HANDLER, None)
    if handler is None:
        return None, f"app.py defines no {HANDLER}"
    if not callable(handler):
        return None, f"{HANDLER} in app.py is not callable (it is a {type(handler).__name__})"
    return handler, None


def _encode(value: object) -> bytes:
    """The handler contract: bytes as is, str as UTF-8, None as empty, else str(value)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode("utf-8")
    return str(value).encode("utf-8")


def _hint(exc: BaseException, limits: dict[str, int]) -> str:
    if isinstance(exc, MemoryError):
        return f" (the sandbox allows {limits['memory_bytes']} bytes of address space)"
    if isinstance(exc, OSError) and exc.errno == errno.EAGAIN:
        return f" (the sandbox allows at most {limits['processes']} processes and threads)"
    if isinstance(exc, RuntimeError) and "new thread" in str(exc):
        return f" (the sandbox allows at most {limits['processes']} processes and threads)"
    return ""


def _serve(channel: Channel, handler: Any, config: dict[str, Any], main_pid: int) -> None:
    limits: dict[str, int] = config["limits"]
    max_output: int = config["max_output_bytes"]
    while (data := channel.receive(config["max_input_bytes"])) is not None:
        try:
            output = _encode(handler(data))
        except BaseException as exc:  # report everything, keep serving
            if os.getpid() != main_pid:
                os._exit(0)  # a forked child of the function: it must not answer
            text = _describe(exc) + _hint(exc, limits)
            del exc
            channel.send(RAISED, text.encode("utf-8", "replace"))
            continue
        if os.getpid() != main_pid:
            os._exit(0)
        if len(output) > max_output:
            channel.send(TOO_LARGE, str(len(output)).encode())
        else:
            channel.send(OK, output)
        del output


def main(argv: list[str]) -> None:
    fd = int(argv[1])
    config = parse_settings(argv[2:])
    services = config.get("services")
    try:
        _set_limits(config["limits"])
        _not_dumpable()
        _close_inherited_fds({fd} if services is None else {fd, services["fd"]})
        _silence_stdio()
    except OSError:
        os._exit(EXIT_SETUP)
    channel = Channel(fd)
    main_pid = os.getpid()
    # A child forked by the function must not talk on the channel; subprocesses close it too.
    # (cape_encrypt likewise closes the services socket in forked children.)
    os.register_at_fork(after_in_child=lambda: _close_quietly(fd))
    error = _install_guest(config)
    if error is not None:
        channel.send(LOAD_ERROR, error.encode("utf-8", "replace"))
        return
    handler, error = _load(config["root"])
    if os.getpid() != main_pid:
        os._exit(0)
    if error is not None:
        channel.send(LOAD_ERROR, error.encode("utf-8", "replace"))
        return
    channel.send(READY)
    _serve(channel, handler, config, main_pid)


def _close_quietly(fd: int) -> None:
    try:  # noqa: SIM105 - contextlib costs an import per session start
        os.close(fd)
    except OSError:
        pass


def run(argv: list[str]) -> None:
    """The worker's process from its arguments to its exit (never returns): as a script under
    bubblewrap, or called by the sandbox zygote (:mod:`cape.enclave.zygote_program`) in the
    session's pid 1 once that process has built its sandbox."""
    try:
        main(argv)
    except MemoryError:
        os._exit(EXIT_MEMORY)
    except (BrokenPipeError, ConnectionResetError):
        os._exit(0)
    os._exit(0)


if __name__ == "__main__":
    run(sys.argv)
