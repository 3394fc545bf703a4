"""Fixtures shared by the sandbox tests (test_sandbox*.py, test_zygote.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cape.enclave.sandbox import FunctionSandbox
from tests.unit.enclave.test_sandbox import processes_of


@pytest.fixture
def started() -> Iterator[list[FunctionSandbox]]:
    """Sandboxes a test starts; closed afterwards, and checked to leave no process behind.
    All are closed before any uid is checked: a uid vacated by one sandbox may be handed to a
    later one (uids.py), whose processes are not the first one's leftovers."""
    sandboxes: list[FunctionSandbox] = []
    yield sandboxes
    for box in sandboxes:
        box.close()
        assert not box.alive
    for box in sandboxes:
        assert processes_of(box.host_uid) == []
