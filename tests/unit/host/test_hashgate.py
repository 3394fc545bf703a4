"""The password-hashing gate: bounded hashes at once, a bounded queue, then 503 at once."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from cape.host.admission import ServerBusyError
from cape.host.api.errors import error_response
from cape.host.hashgate import NICE, PasswordHashGate
from cape.platform.limits import parse_limits

LIVENESS_S = 60.0


def test_beyond_the_turns_and_the_queue_a_request_is_refused_at_once() -> None:
    async def flow() -> None:
        gate = PasswordHashGate(concurrency=1, queue=1)
        release = threading.Event()
        started = threading.Event()

        def hold() -> int:
            started.set()
            assert release.wait(LIVENESS_S)
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        first = asyncio.create_task(gate.run(hold))
        await asyncio.to_thread(started.wait, LIVENESS_S)
        second = asyncio.create_task(gate.run(lambda: 7))
        while gate.waiting < 1:  # the second is queued (event loop only: no thread waits)
            await asyncio.sleep(0)
        with pytest.raises(ServerBusyError) as busy:
            await gate.run(lambda: 8)  # refused before it runs anything
        response = error_response(busy.value)
        assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
        assert (gate.running, gate.waiting, gate.refused) == (1, 1, 1)
        release.set()
        priority = await asyncio.wait_for(first, LIVENESS_S)
        assert await asyncio.wait_for(second, LIVENESS_S) == 7
        assert priority >= NICE  # the hashing thread runs at a lower priority
        assert (gate.admitted, gate.peak, gate.running, gate.waiting) == (2, 1, 0, 0)
        assert await gate.run(lambda: 9) == 9  # free again

    asyncio.run(flow())


def test_the_gate_is_a_serve_limit_with_a_cpu_based_default() -> None:
    limits = parse_limits(["password_hashes=3", "password-hash-queue=2"])
    assert (limits.password_hashes, limits.password_hash_queue) == (3, 2)
    assert parse_limits([]).password_hashes == max(1, (os.cpu_count() or 1) // 2)
    with pytest.raises(ValueError):
        PasswordHashGate(concurrency=0)
