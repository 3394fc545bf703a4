"""The enclave's warm pool under concurrent sessions of more functions than it holds.

Found by the 16-client cluster test (issue 14): a session whose function another load evicted
while it was being loaded failed with "internal enclave error" (a KeyError in the pool's
bookkeeping), and one whose function was evicted while its sandbox was being copied from it
could not start. The sandbox itself is a stand-in here (:func:`_fake_sandbox`); the pool, its
locks, the real bundle unpacking and the copying of each session's files are not.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
import time
import zipfile
from pathlib import Path

import pytest

from cape.enclave import warm
from cape.enclave.lanes import Lanes
from cape.enclave.sandbox import FunctionSandbox, SandboxLimits
from cape.formats.bundle import BundleLimits

FUNCTIONS = 6
SESSIONS = 48


class FakeSandbox:
    """Stands in for a bubblewrap sandbox: it records the files it was started on."""

    alive = True

    def __init__(self, target: Path) -> None:
        self.files = sorted(p.name for p in target.rglob("*"))

    def close(self) -> None:
        pass


def _no_services(name: str, data: bytes) -> bytes:
    raise AssertionError("the stand-in sandbox calls no service")


def _bundle(n: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("fn/app.py", f"def cape_handler(data):\n    return b'{n}'\n")
    return buffer.getvalue()


@pytest.fixture
def fake_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    def start(target: Path, **_: object) -> FakeSandbox:
        time.sleep(0.002)  # a start takes a while: other loads run meanwhile
        return FakeSandbox(target)

    monkeypatch.setattr(FunctionSandbox, "start", staticmethod(start))


@pytest.mark.usefixtures("fake_sandbox")
@pytest.mark.parametrize("spares", [False, True])
def test_sessions_of_more_functions_than_the_pool_holds_all_start(
    tmp_path: Path, spares: bool
) -> None:
    bundles = [_bundle(n) for n in range(FUNCTIONS)]
    loads = [0] * FUNCTIONS
    lock = threading.Lock()

    async def main() -> list[tuple[bytes, list[str]] | BaseException]:
        pool = warm.WarmPool(
            tmp_path,
            sandbox_limits=SandboxLimits(),
            bundle_limits=BundleLimits(),
            lanes=Lanes(),
            capacity=2,
            spares=spares,
        )

        async def session(i: int) -> tuple[bytes, list[str]]:
            n = i % FUNCTIONS

            async def decrypt() -> bytes:
                await asyncio.sleep(0.001)  # the key service's round trip
                with lock:
                    loads[n] += 1
                return bundles[n]

            checksum, lease = await pool.acquire(
                "alice", bytes([n]) * 32, decrypt, _no_services, party=f"user{i}"
            )
            files = lease.sandbox.files  # type: ignore[attr-defined]
            await asyncio.to_thread(lease.release)
            return checksum, files

        try:
            return await asyncio.gather(
                *(session(i) for i in range(SESSIONS)), return_exceptions=True
            )
        finally:
            await pool.close()

    results = asyncio.run(main())
    failed = [repr(r) for r in results if isinstance(r, BaseException)]
    assert failed == [], failed[:3]
    for i, result in enumerate(results):
        assert not isinstance(result, BaseException)
        checksum, files = result
        assert checksum == hashlib.sha256(bundles[i % FUNCTIONS]).digest()
        assert files == ["app.py"]  # started from its whole function
    assert all(count >= 1 for count in loads)
    assert [p.name for p in tmp_path.iterdir()] == []  # every function and session removed
