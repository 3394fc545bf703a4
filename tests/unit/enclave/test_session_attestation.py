"""Where a session's attestation document is made (issue 16): a module that only computes in
the runtime's process (the simulated NSM) is called on the event loop, one that waits on a
device on the attestation lane's thread; either way the session holds one of that lane's
slots while the document is made, so its admission, per-party fairness and busy errors are
the lane's, unchanged."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from pathlib import Path
from typing import Any

import pytest

from cape.enclave.lanes import LaneLimits, Lanes
from cape.enclave.secure_module.simulated import SimulatedAuthority, SimulatedSecureModule
from cape.enclave.session import Inbox, SessionConfig, run_session
from cape.formats.attestation import parse_attestation

T0 = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
#: One attestation slot, one per party, one waiting per party: a second party fills the queue.
ONE_SLOT = LaneLimits(threads=1, per_party=1, queue_per_party=1, queue=1)


class Recording(SimulatedSecureModule):
    """The simulated NSM, noting which thread each request ran on and whether the session
    held a slot of the attestation lane at that moment."""

    lanes: Lanes | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, int]] = []  # (thread id, attestation slots taken)

    def process(self, request: bytes) -> bytes:
        taken = -1 if self.lanes is None else self.lanes.attestation.running()
        self.seen.append((threading.get_ident(), taken))
        return super().process(request)


class Device(Recording):
    """As if each request waited on the NSM device (``/dev/nsm``)."""

    waits = True


@pytest.fixture(scope="module")
def authority() -> SimulatedAuthority:
    return SimulatedAuthority.generate(now=T0 - dt.timedelta(days=30))


def _module(kind: type[Recording], authority: SimulatedAuthority, lanes: Lanes) -> Recording:
    credentials = authority.issue_instance(T0, instance_id="i-0123456789abcdef0")
    module = kind(credentials, pcrs={i: bytes(48) for i in range(16)}, clock=lambda: T0)
    module.lanes = lanes
    return module


async def _deploy_session(
    module: Recording, lanes: Lanes, tmp_path: Path, sent: list[dict[str, Any]], party: str
) -> None:
    """A deploy session up to its document; its client then leaves."""

    async def send(reply: dict[str, Any]) -> None:
        sent.append(reply)
        if reply["t"] == "attestation":
            inbox.close()

    inbox = Inbox()
    await run_session(
        {"sid": 1, "kind": "deploy", "owner": party, "nonce": b"n" * 16},
        module=module,
        keys=None,  # type: ignore[arg-type]  # a deploy session asks for no key before its bundle
        config=SessionConfig(workdir=tmp_path, lanes=lanes),
        send=send,
        inbox=inbox,
    )


@pytest.mark.parametrize(("kind", "on_loop"), [(Recording, True), (Device, False)])
def test_the_document_is_made_on_the_loop_only_when_the_module_does_not_wait(
    kind: type[Recording], on_loop: bool, authority: SimulatedAuthority, tmp_path: Path
) -> None:
    lanes = Lanes()
    module = _module(kind, authority, lanes)
    sent: list[dict[str, Any]] = []
    loop_thread = threading.get_ident()  # asyncio.run runs the loop in this thread
    try:
        asyncio.run(_deploy_session(module, lanes, tmp_path, sent, "alice"))
    finally:
        lanes.close()
    assert [reply["t"] for reply in sent] == ["attestation", "close"]
    parse_attestation(sent[0]["document"])
    ((thread, taken),) = module.seen
    assert (thread == loop_thread) is on_loop
    assert taken == 1  # the session held its attestation slot meanwhile
    assert lanes.attestation.running() == 0  # and gave it back


def test_a_document_on_the_loop_waits_for_its_slot_and_is_busy_when_the_queue_is_full(
    authority: SimulatedAuthority, tmp_path: Path
) -> None:
    lanes = Lanes(attestation=ONE_SLOT)
    module = _module(Recording, authority, lanes)
    first: list[dict[str, Any]] = []
    second: list[dict[str, Any]] = []
    third: list[dict[str, Any]] = []

    async def main() -> None:
        release = asyncio.Event()

        async def hold() -> None:  # another party's work holds the lane's only slot
            async with lanes.attestation.slot("mallory"):
                await release.wait()

        holder = asyncio.create_task(hold())
        await asyncio.sleep(0)
        waiting = asyncio.create_task(_deploy_session(module, lanes, tmp_path, first, "alice"))
        await asyncio.sleep(0.05)
        assert first == [] and lanes.attestation.waiting("alice") == 1  # admitted only later
        # The queue (one place) is full: the next party is told at once that it is busy.
        await _deploy_session(module, lanes, tmp_path, second, "bob")
        release.set()
        await holder
        await waiting
        await _deploy_session(module, lanes, tmp_path, third, "bob")

    try:
        asyncio.run(main())
    finally:
        lanes.close()
    assert [reply["t"] for reply in first] == ["attestation", "close"]
    assert [reply["t"] for reply in third] == ["attestation", "close"]
    assert len(second) == 1 and second[0]["t"] == "error" and second[0].get("busy") is True
    assert len(module.seen) == 2
