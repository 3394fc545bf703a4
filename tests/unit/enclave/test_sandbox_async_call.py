"""A call from the event loop (``FunctionSandbox.call_async``, issue 16): no thread per call,
and every deadline, limit and failure of the blocking ``call`` kept.

Real bubblewrap sandboxes and a real calls :class:`~cape.enclave.lanes.Lane`; each test counts
what the call handed to the lane's threads (``offload``), so "no thread hop" is checked, not
assumed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cape.enclave.lanes import Lane, LaneLimits, Offload
from cape.enclave.sandbox import FunctionSandbox, SandboxLimits, Services
from cape.errors import FunctionError, LimitExceededError, SandboxError
from tests.unit.enclave import test_sandbox

pytestmark = test_sandbox.pytestmark
LIMITS = test_sandbox.LIMITS
MIB = test_sandbox.MIB
make_function = test_sandbox.make_function
processes_of = test_sandbox.processes_of
T = TypeVar("T")


class Counted:
    """A calls lane whose offloaded work is recorded by name."""

    def __init__(self) -> None:
        self.lane = Lane("calls", LaneLimits(threads=2, per_party=2, queue_per_party=4, queue=8))
        self.offloaded: list[str] = []

    async def call(self, box: FunctionSandbox, data: bytes) -> bytes:
        async def counted(offload: Offload, payload: bytes) -> bytes:
            def recording(fn: Callable[..., T], /, *args: Any) -> Awaitable[T]:
                self.offloaded.append(getattr(fn, "__name__", None) or fn.func.__name__)  # type: ignore[attr-defined]
                return offload(fn, *args)

            return await box.call_async(recording, payload)

        return await self.lane.run_async("alice", counted, data)


@pytest.fixture
def lane() -> Iterator[Counted]:
    counted = Counted()
    yield counted
    assert counted.lane.running() == 0  # every slot given back, whatever happened
    counted.lane.close()


def run(scenario: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(scenario, 60)

    return asyncio.run(bounded())


def test_calls_run_on_the_event_loop_with_state_kept(
    tmp_path: Path, started: list[FunctionSandbox], lane: Counted
) -> None:
    box = start(started, make_function(tmp_path, "echo_state"))

    async def scenario() -> list[bytes]:
        return [await lane.call(box, f"call {i}".encode()) for i in range(3)]

    assert run(scenario()) == [b"call 0", b"call 1", b"call 2"]
    assert lane.offloaded == []  # no thread per call
    payload = bytes(range(256)) * (2 * MIB // 256 // 2)  # over one frame write, under the limit
    assert run(lane.call(box, payload)) == payload
    assert lane.offloaded == []


def test_the_deadline_kills_the_sandbox(
    tmp_path: Path, started: list[FunctionSandbox], lane: Counted
) -> None:
    box = start(started, make_function(tmp_path, "spin"), replace(call_timeout_s=1.5))
    began = time.monotonic()
    with pytest.raises(SandboxError) as info:
        run(lane.call(box, b""))
    assert time.monotonic() - began < 1.5 + 3
    assert info.value.reason == "timeout"
    assert info.value.diagnostics() == "the call exceeded the time limit of 1.5 s"
    assert not box.alive
    assert processes_of(box.host_uid) == []
    with pytest.raises(SandboxError, match="no longer running"):
        run(lane.call(box, b""))


def test_oversized_output_refused_then_forged_frame_kills(
    tmp_path: Path, started: list[FunctionSandbox], lane: Counted
) -> None:
    huge = start(started, make_function(tmp_path, "huge_output", name="huge"))
    with pytest.raises(LimitExceededError) as refused:
        run(lane.call(huge, str(100 * MIB).encode()))
    assert refused.value.actual == 100 * MIB
    at_limit = str(LIMITS.max_output_bytes).encode()
    assert run(lane.call(huge, at_limit)) == b"x" * LIMITS.max_output_bytes  # session goes on
    forged = start(started, make_function(tmp_path, "forge_frame", name="forged"))
    with pytest.raises(SandboxError) as info:
        run(lane.call(forged, b""))
    assert info.value.reason == "output"
    assert "(1073741823 bytes announced)" in str(info.value)
    assert not forged.alive
    assert processes_of(forged.host_uid) == []


def test_a_sandbox_that_dies_mid_call_says_why(
    tmp_path: Path, started: list[FunctionSandbox], lane: Counted
) -> None:
    box = start(started, make_function(tmp_path, "exit3"))
    with pytest.raises(SandboxError) as info:
        run(lane.call(box, b""))
    assert info.value.reason == "crashed"
    assert info.value.diagnostics() == (
        "the function ended the worker during the call (exit status 3)"
    )
    assert processes_of(box.host_uid) == []
    raised = start(started, make_function(tmp_path, "raises", name="raises"))
    with pytest.raises(FunctionError):
        run(lane.call(raised, b"boom"))
    assert raised.alive


def test_closing_the_session_mid_call_ends_it(
    tmp_path: Path, started: list[FunctionSandbox], lane: Counted
) -> None:
    box = start(started, make_function(tmp_path, "spin"))
    closer = threading.Timer(0.3, box.close)  # the session's inbox closes it from a thread

    async def scenario() -> None:
        closer.start()
        await lane.call(box, b"")

    began = time.monotonic()
    with pytest.raises(SandboxError) as info:
        run(scenario())
    closer.join()
    assert time.monotonic() - began < LIMITS.call_timeout_s
    assert info.value.reason == "crashed"
    assert info.value.diagnostics() == "the sandbox was closed"
    assert processes_of(box.host_uid) == []


def test_a_cancelled_call_kills_the_sandbox(
    tmp_path: Path, started: list[FunctionSandbox], lane: Counted
) -> None:
    box = start(started, make_function(tmp_path, "spin"))

    async def scenario() -> None:
        task = asyncio.create_task(lane.call(box, b""))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())
    with pytest.raises(SandboxError, match="a call was cancelled"):
        run(lane.call(box, b""))  # its channel may be mid-frame: never reused
    box.close()
    assert processes_of(box.host_uid) == []


def test_encryption_requests_are_served_in_the_lanes_thread(
    tmp_path: Path, started: list[FunctionSandbox], lane: Counted
) -> None:
    app = (
        "import cape_encrypt\n\n"
        "def cape_handler(data):\n"
        "    return cape_encrypt.decrypt(cape_encrypt.encrypt(data)) + b'!'\n"
    )
    threads: list[str] = []

    def services(op: str, data: bytes) -> bytes:
        threads.append(threading.current_thread().name)
        return data[::-1]

    box = start(started, make_function(tmp_path, app), services=services)
    assert run(lane.call(box, b"hello")) == b"hello!"
    assert threads and all(name.startswith("cape-calls") for name in threads)
    assert lane.offloaded == ["serve_until_readable"]
    assert run(lane.call(box, b"again")) == b"again!"


# --- helpers --------------------------------------------------------------------------------


def start(
    started: list[FunctionSandbox],
    directory: Path,
    limits: SandboxLimits = LIMITS,
    services: Services | None = None,
) -> FunctionSandbox:
    box = FunctionSandbox.start(directory, limits=limits, services=services)
    started.append(box)
    return box


def replace(**changes: float) -> SandboxLimits:
    return test_sandbox.dataclass_replace(**changes)
