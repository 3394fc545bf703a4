"""Real cluster services for the tests: a PostgreSQL server and an S3 server on loopback.

- :class:`Postgres`: Debian's ``postgresql`` package, a throw-away cluster made with ``initdb``
  in a temporary directory and run with ``pg_ctl`` on a free loopback port (as the
  ``postgres`` system user when the tests run as root: PostgreSQL refuses to run as root).
  Each test asks for its own database (:meth:`Postgres.new_database`).
- :class:`MotoS3`: moto's S3 server (``moto[server]``) in a subprocess on a free loopback port;
  each test asks for its own bucket (:meth:`MotoS3.new_bucket`). This is the one mocked part:
  there is no AWS account here, and moto speaks the S3 HTTP API that boto3 (and so
  :class:`~cape.host.store.s3.S3BlobStore`) uses against AWS (docs/mocks.md).

Both are started once per test session by the fixtures in ``tests/conftest.py``. Without the
programs the fixtures skip, except under CI (``CI`` set), where their absence is a setup bug
(``scripts/setup.sh test`` installs them).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final

START_TIMEOUT_S: Final = 60.0
S3_ENV: Final = {
    # moto accepts any credentials; boto3 needs some (and a region) to sign requests.
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class ServiceMissing(RuntimeError):
    """A program the service needs is not installed."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited early:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen:\n{log.read_text(errors='replace')[-3000:]}")


class CapeProcess:
    """A ``cape`` command (``cape serve``, ``cape kms serve``) in a subprocess, stdout and
    stderr appended to files in ``log_dir``, ready once it prints ``Ready: <url>``.
    :class:`tests.e2e.server.ServeProcess` and :class:`tests.kms_service.KeyServiceProcess`
    are these; subclasses (dataclasses) declare ``log_dir`` and ``process``."""

    log_dir: Path
    process: subprocess.Popen[bytes] | None
    what: ClassVar[str] = "cape"
    start_timeout_s: ClassVar[float] = START_TIMEOUT_S
    stop_timeout_s: ClassVar[float] = 30.0

    def launch(
        self, args: list[str], env: dict[str, str] | None = None, new_session: bool = False
    ) -> int:
        """Starts ``cape <args>``; returns where this start's output begins in the stdout
        log (logs are appended, so that a restart keeps what came before)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        stdout_log = self.log_dir / "stdout.log"
        offset = stdout_log.stat().st_size if stdout_log.exists() else 0
        with stdout_log.open("ab") as out, (self.log_dir / "stderr.log").open("ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-c", "from cape.cli.app import main; main()", *args],
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=new_session,
            )
        return offset

    def wait_ready(self, offset: int, line_seen: Callable[[str], None] | None = None) -> str:
        """The URL of the ``Ready:`` line printed after ``offset``; every line of this start
        printed by then also goes to ``line_seen``. Kills the process if it is not ready in
        time."""
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            url = ""
            for line in self.stdout()[offset:].splitlines():
                if line.startswith("Ready: "):
                    url = line.removeprefix("Ready: ").strip()
                if line_seen is not None:
                    line_seen(line)
            if url:
                return url
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.what} exited early:\n{self.stderr()[-3000:]}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"{self.what} did not become ready:\n{self.stderr()[-3000:]}")

    def stdout(self) -> str:
        return (self.log_dir / "stdout.log").read_text(errors="replace")

    def stderr(self) -> str:
        return (self.log_dir / "stderr.log").read_text(errors="replace")

    def stop(self, timeout_s: float | None = None) -> int:
        """SIGTERM, then the exit status (``subprocess.TimeoutExpired`` if it lingers)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(self.stop_timeout_s if timeout_s is None else timeout_s)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def postgres_bindir() -> Path:
    """Where Debian's PostgreSQL programs are (``/usr/lib/postgresql/N/bin``, newest N)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    raise ServiceMissing("PostgreSQL is not installed (Debian: apt-get install postgresql)")


@dataclass
class Postgres:
    """A PostgreSQL server in ``base`` on a loopback port (see the module docstring).

    ``base`` must be reachable by the ``postgres`` user when running as root: not under
    pytest's own temporary directory (0700, root's), so the fixture makes one in /tmp.
    """

    base: Path
    port: int = 0
    process_user: str | None = None
    _databases: list[str] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    def _run(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        user = self.process_user
        done = subprocess.run(
            list(args),
            capture_output=True,
            user=user,
            group=pwd.getpwnam(user).pw_gid if user else None,
            cwd=self.base,
            timeout=START_TIMEOUT_S,
        )
        if done.returncode:
            output = (done.stdout + done.stderr).decode(errors="replace")
            raise RuntimeError(f"{Path(args[0]).name} failed:\n{output[-3000:]}")
        return done

    def start(self) -> Postgres:
        bindir = postgres_bindir()
        self.base.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self.process_user = "postgres"
            try:
                entry = pwd.getpwnam(self.process_user)
            except KeyError:
                raise ServiceMissing("no 'postgres' user (Debian's package adds it)") from None
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        self._run(
            str(bindir / "initdb"),
            "--pgdata",
            str(self.data_dir),
            "--username",
            "postgres",
            "--auth",
            "trust",  # loopback only, a throw-away cluster: no password to keep anywhere
            "--encoding",
            "UTF8",
            "--no-instructions",
        )
        for _attempt in range(5):
            self.port = free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                f"-c unix_socket_directories='' -c max_connections=300 "
                # The tests kill cape nodes, never PostgreSQL: its own fsync only costs time.
                "-c fsync=off -c full_page_writes=off"
            )
            try:
                self._run(
                    str(bindir / "pg_ctl"),
                    "--pgdata",
                    str(self.data_dir),
                    "--log",
                    str(self.base / "server.log"),
                    "--wait",
                    "--options",
                    options,
                    "start",
                )
                return self
            except RuntimeError:
                if "already in use" not in self.log():
                    raise RuntimeError(f"PostgreSQL did not start:\n{self.log()[-3000:]}") from None
        raise RuntimeError(f"PostgreSQL found no free port:\n{self.log()[-3000:]}")

    def log(self) -> str:
        path = self.base / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._run(
                str(postgres_bindir() / "pg_ctl"),
                "--pgdata",
                str(self.data_dir),
                "--mode",
                "immediate",
                "stop",
            )

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def execute(self, sql: str, database: str = "postgres") -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname=database, autocommit=True
        ) as connection:
            cursor = connection.execute(sql.encode())
            return cursor.fetchall() if cursor.description else []

    def new_database(self) -> str:
        """A fresh empty database's SQLAlchemy URL."""
        name = f"cape_{secrets.token_hex(6)}"
        self.execute(f"CREATE DATABASE {name}")
        self._databases.append(name)
        return self.url(name)

    def dump(self, database_url: str) -> bytes:
        """Every row of a database, as ``pg_dump`` writes it (for the canary search)."""
        name = database_url.rsplit("/", 1)[1]
        return subprocess.run(
            [
                str(postgres_bindir() / "pg_dump"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--username",
                "postgres",
                "--no-password",
                name,
            ],
            check=True,
            capture_output=True,
            timeout=START_TIMEOUT_S,
        ).stdout


@dataclass
class MotoS3:
    """moto's S3 server in a subprocess (see the module docstring)."""

    base: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoS3:
        try:
            import moto.server  # noqa: F401
        except ImportError:
            raise ServiceMissing("moto[server] is not installed (the test extra)") from None
        self.base.mkdir(parents=True, exist_ok=True)
        log = self.base / "moto.log"
        self.port = free_port()
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **S3_ENV},
            )
        _wait_for_port(self.port, self.process, "moto's S3 server", log)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=S3_ENV["AWS_DEFAULT_REGION"],
        )

    def new_bucket(self) -> str:
        """A fresh empty bucket's name."""
        name = f"cape-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str) -> Iterator[tuple[str, bytes]]:
        """Every object in ``bucket`` with its bytes, and every unfinished upload's key."""
        client = self.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", ()):
                body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
                yield item["Key"], body

    def uploads(self, bucket: str) -> list[str]:
        """The keys of unfinished multipart uploads in ``bucket``."""
        reply = self.client().list_multipart_uploads(Bucket=bucket)
        return [upload["Key"] for upload in reply.get("Uploads", ())]
