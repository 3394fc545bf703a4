from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.server import ServeProcess

requires_enclaves = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("bwrap") is None,
    reason="simulated enclaves need root (namespaces) and bubblewrap",
)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        pytest.skip("simulated enclaves need root (namespaces) and bubblewrap")
    base: Path = tmp_path_factory.mktemp("serve")
    # Every test signs up fresh users from 127.0.0.1, more than the default signup rate per
    # address allows; tests/e2e/test_tenant_accounts.py checks that limit on its own server.
    process = ServeProcess(
        base / "data", base / "config", base / "logs", extra_args=["--signup-rate", "0"]
    ).start()
    try:
        yield process
    finally:
        if process.process is not None and process.process.poll() is None:
            code = process.stop()
            assert code == 0, process.stderr()[-3000:]
