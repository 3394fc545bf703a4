"""``cape_encrypt`` inside the sandbox: real bubblewrap sandboxes, a test ``services`` callback.

The callback stands in for the session's keys: encrypt is ``cape:`` + base64 of the reversed
data, decrypt the inverse. The functions are inline ``app.py`` sources.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import resource
import threading
import time
from pathlib import Path

import pytest

from cape.enclave.sandbox import FunctionSandbox, SandboxLimits, Services, services_response_limit
from cape.errors import DecryptionError, FunctionError, SandboxError
from tests.unit.enclave import test_sandbox

pytestmark = test_sandbox.pytestmark
LIMITS = test_sandbox.LIMITS
processes_of = test_sandbox.processes_of
NOT_AVAILABLE = "encryption services are not available in this session"

# One function for most tests: a JSON command in, {"ok": result} or {"error": "Type: text"} out.
PROBE = """
import base64
import json
import os
import socket
import struct
import sys
import time

import cape_encrypt

AT_IMPORT = cape_encrypt.encrypt(b"module level")


def _raw(payload, reply):
    fd = cape_encrypt._fd  # the services socket
    os.write(fd, payload)
    if not reply:
        time.sleep(8)  # the runtime acts on the garbage while the call is under way
        return "survived"
    sock = socket.socket(fileno=os.dup(fd))
    (length,) = struct.unpack(">I", sock.recv(4, socket.MSG_WAITALL))
    body = sock.recv(length, socket.MSG_WAITALL)
    sock.detach()
    return [body[0], body[1:].decode()]


def _run(do, arg):
    if do == "encrypt":
        return cape_encrypt.encrypt(arg.encode())
    if do == "encrypt_size":
        return len(cape_encrypt.encrypt(b"x" * arg))
    if do == "decrypt":
        return cape_encrypt.decrypt(arg).decode()
    if do == "decrypt_bytes":
        return cape_encrypt.decrypt(base64.b64decode(arg)).decode()
    if do == "encrypt_str":
        return cape_encrypt.encrypt(arg)
    if do == "decrypt_int":
        return cape_encrypt.decrypt(7)
    if do == "at_import":
        return AT_IMPORT
    if do == "raw":
        return _raw(base64.b64decode(arg), reply=True)
    if do == "garbage":
        return _raw(base64.b64decode(arg), reply=False)
    if do == "garbage_padded":  # [base64 bytes, this many more junk bytes]
        return _raw(base64.b64decode(arg[0]) + b"j" * arg[1], reply=False)
    if do == "partial_then_close":
        os.write(cape_encrypt._fd, b"\\x00\\x00")
        os.close(cape_encrypt._fd)
        return "closed"
    if do == "uncaught":
        return cape_encrypt.decrypt(arg)
    raise ValueError(do)


def cape_handler(data):
    request = json.loads(data)
    if request["do"] == "uncaught":
        _run("uncaught", request["arg"])
    try:
        return json.dumps({"ok": _run(request["do"], request.get("arg"))})
    except Exception as exc:
        return json.dumps({"error": f"{type(exc).__name__}: {exc}"})
"""


class Keys:
    """The test ``services`` callback; records every request it sees."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []
        self.fail_with: BaseException | None = None
        self.result: object = None

    def __call__(self, op: str, data: bytes) -> bytes:
        self.seen.append((op, data))
        if self.fail_with is not None:
            raise self.fail_with
        if self.result is not None:
            return self.result  # type: ignore[return-value]
        if op == "encrypt":
            return b"cape:" + base64.b64encode(data[::-1])
        for prefix in (b"cape:", b"cape-stream-v1:"):
            if data.startswith(prefix):
                body = data[len(prefix) :]
                try:
                    return base64.b64decode(body, validate=True)[::-1]
                except binascii.Error:
                    return body[::-1]  # the binary form
        raise DecryptionError("the ciphertext could not be decrypted")


def token(plaintext: bytes) -> str:
    return "cape:" + base64.b64encode(plaintext[::-1]).decode()


def make(tmp_path: Path, source: str = PROBE, *, name: str = "fn", **files: str) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "app.py").write_text(source)
    for file, text in files.items():
        (directory / file).write_text(text)
    return directory


def start(
    started: list[FunctionSandbox],
    directory: Path,
    services: Services | None,
    limits: SandboxLimits = LIMITS,
) -> FunctionSandbox:
    box = FunctionSandbox.start(directory, limits=limits, services=services)
    started.append(box)
    return box


def run(box: FunctionSandbox, do: str, arg: object = None) -> dict[str, object]:
    result = json.loads(box.call(json.dumps({"do": do, "arg": arg}).encode()))
    assert isinstance(result, dict)
    return result


def assert_fresh_session_works(tmp_path: Path) -> None:
    keys = Keys()
    directory = make(tmp_path, name=f"fresh-{time.monotonic_ns()}")
    with FunctionSandbox.start(directory, limits=LIMITS, services=keys) as fresh:
        assert run(fresh, "encrypt", "again") == {"ok": token(b"again")}


# --- honest use --------------------------------------------------------------------------------


def test_round_trip_at_call_time_and_at_import(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    keys = Keys()
    box = start(started, make(tmp_path), keys)
    assert keys.seen == [("encrypt", b"module level")]  # served while app.py loaded
    assert run(box, "at_import") == {"ok": token(b"module level")}

    assert run(box, "encrypt", "h\u00e9llo") == {"ok": token("h\u00e9llo".encode())}
    assert keys.seen[-1] == ("encrypt", "h\u00e9llo".encode())
    assert run(box, "decrypt", token(b"hello")) == {"ok": "hello"}  # text form, as str
    assert keys.seen[-1] == ("decrypt", token(b"hello").encode())
    binary = b"cape:" + b"\x00raw"[::-1]
    assert run(box, "decrypt_bytes", base64.b64encode(binary).decode()) == {"ok": "\x00raw"}
    assert keys.seen[-1] == ("decrypt", binary)  # passed on exactly as given
    stream = "cape-stream-v1:" + base64.b64encode(b"olleh").decode()
    assert run(box, "decrypt", stream) == {"ok": "hello"}
    assert keys.seen[-1] == ("decrypt", stream.encode())
    assert run(box, "encrypt", "") == {"ok": "cape:"}
    assert len(keys.seen) == 6


def test_threads_share_the_helper_one_request_at_a_time(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    source = """
import threading
import cape_encrypt

def cape_handler(data):
    results = {}
    def work(i):
        for _ in range(5):
            plain = str(i).encode() * 5000
            results[i] = cape_encrypt.decrypt(cape_encrypt.encrypt(plain)) == plain
    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return str(sorted(results.items()))
"""
    keys = Keys()
    box = start(started, make(tmp_path, source), keys)
    assert box.call(b"") == str([(i, True) for i in range(6)]).encode()
    assert len(keys.seen) == 60


def test_a_request_between_calls_is_served_by_the_next_call(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    source = """
import threading
import time
import cape_encrypt

state = {}

def later():
    time.sleep(0.2)
    state["token"] = cape_encrypt.encrypt(b"later")

def cape_handler(data):
    if data == b"start":
        state["thread"] = threading.Thread(target=later)
        state["thread"].start()
        return b"started"
    state["thread"].join()
    return state["token"]
"""
    keys = Keys()
    box = start(started, make(tmp_path, source), keys)
    assert box.call(b"start") == b"started"
    time.sleep(0.6)
    assert keys.seen == []  # nobody serves the sandbox between calls
    assert box.call(b"collect") == token(b"later").encode()
    assert keys.seen == [("encrypt", b"later")]


def test_a_forked_child_cannot_use_the_helper_and_the_parent_still_can(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    source = """
import json
import os
import cape_encrypt

def cape_handler(data):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            cape_encrypt.encrypt(b"child")
            message = "no error"
        except cape_encrypt.CapeEncryptError as exc:
            message = str(exc)
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 4096).decode()
    os.waitpid(pid, 0)
    return json.dumps({"child": child, "parent": cape_encrypt.encrypt(b"parent")})
"""
    keys = Keys()
    box = start(started, make(tmp_path, source), keys)
    outcome = json.loads(box.call(b""))
    assert outcome["child"].startswith("encryption services are not available in a process")
    assert outcome["parent"] == token(b"parent")
    assert keys.seen == [("encrypt", b"parent")]


# --- errors ------------------------------------------------------------------------------------


def test_a_cape_error_reaches_the_function_as_cape_encrypt_error(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    keys = Keys()
    box = start(started, make(tmp_path), keys)
    assert run(box, "decrypt", "not a ciphertext") == {
        "error": "CapeEncryptError: the ciphertext could not be decrypted"
    }
    keys.fail_with = DecryptionError("key release\n   denied  for this owner")
    assert run(box, "decrypt", token(b"x")) == {
        "error": "CapeEncryptError: key release denied for this owner"  # one line
    }
    keys.fail_with = None
    with pytest.raises(FunctionError) as info:  # uncaught: an ordinary handler exception
        run(box, "uncaught", "nope")
    assert info.value.diagnostics() == (
        "function raised CapeEncryptError: the ciphertext could not be decrypted"
    )
    assert run(box, "encrypt", "still") == {"ok": token(b"still")}  # the session goes on


def test_other_callback_failures_are_an_internal_error_logged_without_data(
    tmp_path: Path, started: list[FunctionSandbox], caplog: pytest.LogCaptureFixture
) -> None:
    keys = Keys()
    box = start(started, make(tmp_path), keys)
    keys.fail_with = RuntimeError("secret-plaintext-in-message")
    with caplog.at_level(logging.ERROR, logger="cape.enclave"):
        assert run(box, "encrypt", "secret-plaintext") == {
            "error": "CapeEncryptError: internal error"
        }
    assert "RuntimeError" in caplog.text
    assert "secret-plaintext" not in caplog.text
    keys.fail_with, keys.result = None, "cape:not bytes"
    assert run(box, "encrypt", "x") == {"error": "CapeEncryptError: internal error"}
    keys.result = None
    assert run(box, "encrypt", "x") == {"ok": token(b"x")}


def test_a_callback_that_raises_base_exception_kills_the_sandbox(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    class Stop(BaseException):
        pass

    keys = Keys()
    box = start(started, make(tmp_path), keys)
    keys.fail_with = Stop()
    with pytest.raises(Stop):
        run(box, "encrypt", "x")
    assert not box.alive
    assert processes_of(box.host_uid) == []


def test_the_callback_runs_under_the_call_wall_clock(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    def sleepy(op: str, data: bytes) -> bytes:
        time.sleep(1.3)  # at import too: the load's own clock (10 s) allows it
        return b"cape:"

    box = start(started, make(tmp_path), sleepy, dataclasses.replace(LIMITS, call_timeout_s=1.0))
    with pytest.raises(SandboxError) as info:
        run(box, "encrypt", "x")
    assert info.value.reason == "timeout"
    assert processes_of(box.host_uid) == []


def test_without_services_the_helper_says_so(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    source = PROBE.replace('AT_IMPORT = cape_encrypt.encrypt(b"module level")', "AT_IMPORT = 1")
    box = start(started, make(tmp_path, source), None)
    assert run(box, "encrypt", "x") == {"error": f"CapeEncryptError: {NOT_AVAILABLE}"}
    assert run(box, "decrypt", token(b"x")) == {"error": f"CapeEncryptError: {NOT_AVAILABLE}"}


def test_module_level_use_fails_the_load_clearly_without_services(tmp_path: Path) -> None:
    with pytest.raises(SandboxError) as info:
        FunctionSandbox.start(make(tmp_path), limits=LIMITS)
    assert info.value.reason == "load"
    assert info.value.diagnostics() == f"app.py failed to import: CapeEncryptError: {NOT_AVAILABLE}"


def test_wrong_argument_types_are_type_errors(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    keys = Keys()
    box = start(started, make(tmp_path), keys)
    assert run(box, "encrypt_str", "text") == {"error": "TypeError: encrypt() takes bytes, not str"}
    assert run(box, "decrypt_int") == {"error": "TypeError: decrypt() takes bytes or str, not int"}
    assert len(keys.seen) == 1  # the import's


# --- sizes -------------------------------------------------------------------------------------


def test_oversized_requests_are_refused_in_the_sandbox(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    keys = Keys()
    box = start(started, make(tmp_path), keys)
    limit = LIMITS.max_input_bytes
    assert run(box, "encrypt_size", limit + 1) == {
        "error": f"CapeEncryptError: encrypt: the data is {limit + 1} bytes, "
        f"over the limit of {limit} bytes"
    }
    assert len(keys.seen) == 1  # nothing reached the callback
    assert run(box, "encrypt_size", limit) == {"ok": len(token(b"x" * limit))}
    assert keys.seen[-1] == ("encrypt", b"x" * limit)


def test_oversized_results_are_refused_by_the_runtime(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    keys = Keys()
    box = start(started, make(tmp_path), keys)
    limit = services_response_limit(LIMITS.max_input_bytes)
    keys.result = b"c" * (limit + 1)
    assert run(box, "encrypt", "x") == {
        "error": f"CapeEncryptError: the result of encrypt is {limit + 1} bytes, "
        f"over the limit of {limit} bytes"
    }
    keys.result = None
    assert run(box, "encrypt", "x") == {"ok": token(b"x")}


def test_a_forged_huge_request_kills_the_sandbox_without_reading_it(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    keys = Keys()
    box = start(started, make(tmp_path), keys)
    forged = (0xFFFFFFFF).to_bytes(4, "big") + b"\x01"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(SandboxError) as info:
        run(box, "garbage_padded", [base64.b64encode(forged).decode(), 64 << 20])
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # KiB
    assert info.value.reason == "crashed"
    assert info.value.diagnostics() == (
        "the sandbox worker broke the protocol (an encryption-services request of "
        f"{0xFFFFFFFF - 1} bytes, over the limit of {LIMITS.max_input_bytes} bytes)"
    )
    assert len(keys.seen) == 1
    assert not box.alive
    assert processes_of(box.host_uid) == []
    assert_fresh_session_works(tmp_path)


# --- a hostile function on the services socket -----------------------------------------------


def test_an_empty_frame_kills_the_sandbox(tmp_path: Path, started: list[FunctionSandbox]) -> None:
    box = start(started, make(tmp_path), Keys())
    with pytest.raises(SandboxError) as info:
        run(box, "garbage", base64.b64encode(b"\x00\x00\x00\x00junk").decode())
    assert info.value.reason == "crashed"
    assert "an empty encryption-services request" in info.value.diagnostics()
    assert processes_of(box.host_uid) == []
    assert_fresh_session_works(tmp_path)


def test_an_unknown_operation_gets_an_error_and_the_stream_stays_in_step(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    keys = Keys()
    box = start(started, make(tmp_path), keys)
    frame = (4).to_bytes(4, "big") + b"\x09abc"
    assert run(box, "raw", base64.b64encode(frame).decode()) == {
        "ok": [1, "unknown encryption-services operation 9"]
    }
    assert len(keys.seen) == 1
    assert run(box, "encrypt", "in step") == {"ok": token(b"in step")}


def test_closing_the_socket_mid_frame_only_ends_the_services(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    box = start(started, make(tmp_path), Keys())
    assert run(box, "partial_then_close") == {"ok": "closed"}
    assert run(box, "encrypt", "x") == {
        "error": "CapeEncryptError: the connection to the runtime's encryption services was lost"
    }
    assert box.alive
    assert (
        box.call(json.dumps({"do": "at_import"}).encode())
        == json.dumps({"ok": token(b"module level")}).encode()
    )


def test_a_half_sent_request_times_out_the_call(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    limits = dataclasses.replace(LIMITS, call_timeout_s=1.5)
    box = start(started, make(tmp_path), Keys(), limits)
    frame = (100).to_bytes(4, "big") + b"\x01abc"  # 97 bytes promised, 2 sent
    with pytest.raises(SandboxError) as info:
        run(box, "garbage", base64.b64encode(frame).decode())
    assert info.value.reason == "timeout"
    assert processes_of(box.host_uid) == []
    assert_fresh_session_works(tmp_path)


def test_concurrent_sessions_are_served_independently(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    first, second = Keys(), Keys()
    a = start(started, make(tmp_path, name="a"), first)
    b = start(started, make(tmp_path, name="b"), second)
    results: dict[str, object] = {}

    def use(name: str, box: FunctionSandbox) -> None:
        results[name] = [run(box, "encrypt", f"{name}{i}") for i in range(10)]

    threads = [threading.Thread(target=use, args=item) for item in (("a", a), ("b", b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, keys in (("a", first), ("b", second)):
        assert results[name] == [{"ok": token(f"{name}{i}".encode())} for i in range(10)]
        assert [data for _, data in keys.seen[1:]] == [f"{name}{i}".encode() for i in range(10)]


# --- what the function sees -------------------------------------------------------------------


def test_the_helper_is_importable_but_cape_is_not_and_a_bundle_cannot_shadow_it(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    source = """
import json
import sys
import cape_encrypt

def _try_import(name):
    try:
        __import__(name)
    except ImportError as exc:
        return type(exc).__name__
    return "imported"

def _try_write(path):
    try:
        with open(path, "w") as file:
            file.write("x")
    except OSError as exc:
        return f"error {exc.errno}"
    return "written"

def cape_handler(data):
    import helper  # the function's own modules still come first
    return json.dumps({
        "file": cape_encrypt.__file__,
        "impostor": hasattr(cape_encrypt, "IMPOSTOR"),
        "helper": helper.VALUE,
        "first": sys.path[0],
        "last": sys.path[-1],
        "cape": _try_import("cape"),
        "cape.enclave": _try_import("cape.enclave.guest.cape_encrypt"),
        "cryptography": _try_import("cryptography"),
        "write": _try_write("/cape-worker/guest/cape_encrypt.py"),
        "write_new": _try_write("/cape-worker/guest/x.py"),
        "api": sorted(cape_encrypt.__all__),
    })
"""
    directory = make(
        tmp_path,
        source,
        **{"cape_encrypt.py": "IMPOSTOR = True\n", "helper.py": "VALUE = 'own'\n"},
    )
    seen = json.loads(start(started, directory, Keys()).call(b""))
    assert seen == {
        "file": "/cape-worker/guest/cape_encrypt.py",
        "impostor": False,
        "helper": "own",
        "first": "/function",
        "last": "/cape-worker/guest",
        "cape": "ModuleNotFoundError",
        "cape.enclave": "ModuleNotFoundError",
        "cryptography": "ModuleNotFoundError",
        "write": "error 30",  # EROFS
        "write_new": "error 30",
        "api": ["CapeEncryptError", "decrypt", "encrypt"],
    }
