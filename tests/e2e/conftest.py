"""The shared ``cape serve`` of the end-to-end tests, on either storage backend.

``server`` is the embedded node (SQLite and a blob directory in its data directory). A test
marked ``all_backends`` runs twice, once more on a node storing into a real PostgreSQL server
and moto's S3 server (``tests/services.py``) through ``CAPE_DATABASE_URL`` and
``CAPE_BLOB_STORE``: the same test, not a second copy. Each backend's node starts once per
session, on first use.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.server import ServeProcess
from tests.services import MotoS3, Postgres

requires_enclaves = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("bwrap") is None,
    reason="simulated enclaves need root (namespaces) and bubblewrap",
)

BACKENDS = ("local", "postgres_s3")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("all_backends") and (
        "server" in metafunc.fixturenames
    ):
        metafunc.parametrize("backend", BACKENDS, indirect=True, scope="session")


def cluster_env(postgres: Postgres, moto_s3: MotoS3) -> dict[str, str]:
    """A node's settings for a fresh database and bucket (as an operator's would be)."""
    return {
        "CAPE_DATABASE_URL": postgres.new_database(),
        "CAPE_BLOB_STORE": f"s3://{moto_s3.new_bucket()}/blobs",
        "CAPE_BLOB_ENDPOINT_URL": moto_s3.endpoint_url,
    }


def _serve(base: Path, env: dict[str, str] | None = None) -> Iterator[ServeProcess]:
    """A node for the session; on shared storage, its data directory must hold neither."""
    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        pytest.skip("simulated enclaves need root (namespaces) and bubblewrap")
    # Every test signs up fresh users from 127.0.0.1, more than the default signup rate per
    # address allows; tests/e2e/test_tenant_accounts.py checks that limit on its own server.
    process = ServeProcess(
        base / "data",
        base / "config",
        base / "logs",
        extra_args=["--signup-rate", "0"],
        env=env or {},
    ).start()
    try:
        yield process
    finally:
        if process.process is not None and process.process.poll() is None:
            code = process.stop()
            assert code == 0, process.stderr()[-3000:]
    if env:
        assert not (process.data_dir / "metadata.sqlite3").exists()
        assert not (process.data_dir / "blobs").exists()


@pytest.fixture(scope="session")
def local_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    yield from _serve(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="session")
def postgres_s3_server(
    tmp_path_factory: pytest.TempPathFactory, postgres: Postgres, moto_s3: MotoS3
) -> Iterator[ServeProcess]:
    yield from _serve(tmp_path_factory.mktemp("serve-pg-s3"), cluster_env(postgres, moto_s3))


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "local"))


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest, backend: str) -> ServeProcess:
    process: ServeProcess = request.getfixturevalue(f"{backend}_server")
    return process
