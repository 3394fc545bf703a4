"""Session-wide services: a real PostgreSQL server and moto's S3 server (tests/services.py),
started on first use and stopped when the session ends."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import S3_ENV, MotoS3, Postgres, ServiceMissing


def _missing(exc: ServiceMissing) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{exc}: scripts/setup.sh test installs it")
    pytest.skip(str(exc))


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    base = Path(tempfile.mkdtemp(prefix="cape-test-postgres-"))
    server = Postgres(base)
    try:
        try:
            server.start()
        except ServiceMissing as exc:
            _missing(exc)
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    server = MotoS3(tmp_path_factory.mktemp("moto"))
    try:
        server.start()
    except ServiceMissing as exc:
        _missing(exc)
    saved = {name: os.environ.get(name) for name in S3_ENV}
    os.environ.update(S3_ENV)  # boto3 in this process and in every cape serve it starts
    try:
        yield server
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
