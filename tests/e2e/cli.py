"""Run the real ``cape`` executable against a live ``cape serve`` (see test_cli.py).

Each call is a subprocess ``python -m cape …`` with its own ``CAPE_CONFIG_DIR``; every call
checks that no Python traceback reaches stdout or stderr.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.e2e.server import ServeProcess

PASSWORD = "correct horse battery"
#: Environment that would change where the CLI looks (or how wide rich thinks the screen is).
SCRUBBED_ENV = (
    "CAPE_CONFIG_DIR",
    "CAPE_LOCAL_CONFIG_DIR",
    "CAPE_ENCLAVE_HOST",
    "CAPE_URL",
    "CAPE_CA_FILE",
    "CAPE_ATTESTATION_ROOT",
    "CAPE_TOKEN",
    "COLUMNS",
    "LINES",
)

ECHO_APP = """def cape_handler(input: bytes) -> bytes:
    return input
"""

RAISING_APP = """def cape_handler(input: bytes) -> bytes:
    raise ValueError("kaboom " + input.decode() + "\\nsecond line of the message")
"""

_DEPLOY_LINE = re.compile(r"^Function (ID|Checksum|Name) +➜  (\S+)$")


@dataclass(frozen=True)
class Result:
    args: tuple[str, ...]
    returncode: int
    stdout_bytes: bytes
    stderr: str

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", errors="replace")

    def describe(self) -> str:
        return (
            f"cape {' '.join(self.args)}\n[exit {self.returncode}]\n"
            f"--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-3000:]}"
        )

    def json(self) -> Any:
        ok(self)
        try:
            return json.loads(self.stdout)
        except ValueError:
            raise AssertionError(f"stdout is not JSON:\n{self.describe()}") from None


def _env(config: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env["CAPE_CONFIG_DIR"] = str(config)
    return env


def cape(config: Path, *args: str, stdin: str | bytes = b"", timeout: float = 120.0) -> Result:
    """``cape ARGS`` with ``CAPE_CONFIG_DIR=config`` and ``stdin`` (never a terminal)."""
    completed = subprocess.run(
        [sys.executable, "-m", "cape", *args],
        input=stdin.encode() if isinstance(stdin, str) else stdin,
        capture_output=True,
        env=_env(config),
        timeout=timeout,
        check=False,
    )
    result = Result(
        tuple(args),
        completed.returncode,
        completed.stdout,
        completed.stderr.decode("utf-8", errors="replace"),
    )
    assert "Traceback" not in result.stdout + result.stderr, result.describe()
    return result


def cape_into_closed_pipe(config: Path, *args: str, timeout: float = 120.0) -> Result:
    """``cape ARGS | true``: stdout is a pipe whose reader has already gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "cape", *args],
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.PIPE,
            env=_env(config),
            timeout=timeout,
            check=False,
        )
    finally:
        os.close(write_end)
    return Result(tuple(args), completed.returncode, b"", completed.stderr.decode(errors="replace"))


def ok(result: Result) -> Result:
    assert result.returncode == 0, result.describe()
    return result


def error(result: Result, *needles: str, code: int = 1) -> str:
    """Check the failure shape: exit ``code``, nothing on stdout, exactly one stderr line
    ``Error: …`` containing every needle (case-insensitive). Returns the line."""
    assert result.returncode == code, result.describe()
    assert result.stdout == "", result.describe()
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and result.stderr.endswith("\n"), result.describe()
    line = lines[0]
    assert line.startswith("Error: "), result.describe()
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in {line!r}"
    return line


@dataclass(frozen=True)
class Failure:
    """A call expected to fail: exit ``code`` and one line ``Error: …`` with every needle."""

    args: tuple[str, ...]
    needles: tuple[str, ...]
    code: int
    stdin: bytes


def fails(*args: str, says: str | tuple[str, ...] = (), code: int = 1, stdin: str = "") -> Failure:
    return Failure(args, (says,) if isinstance(says, str) else says, code, stdin.encode())


def check_failures(config: Path, *failures: Failure) -> None:
    """Run independent failing calls concurrently (each is a subprocess), then check each."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda f: cape(config, *f.args, stdin=f.stdin), failures))
    for failure, result in zip(failures, results, strict=True):
        error(result, *failure.needles, code=failure.code)


def parse_deploy(result: Result) -> dict[str, str]:
    """The three plain lines of ``cape deploy`` as {"ID", "Checksum", "Name"}."""
    ok(result)
    fields: dict[str, str] = {}
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.describe()
    for line in lines:
        match = _DEPLOY_LINE.match(line)
        assert match is not None, result.describe()
        fields[match.group(1)] = match.group(2)
    return fields


def new_config(server: ServeProcess, path: Path) -> Path:
    """A fresh config dir that knows the local server (its ``serve.json``), not logged in."""
    path.mkdir(parents=True)
    shutil.copy(server.config_dir / "serve.json", path / "serve.json")
    return path


@dataclass(frozen=True)
class Account:
    """A user signed up through ``cape signup``, with its own config dir."""

    server: ServeProcess
    config: Path
    username: str
    signup_result: Result

    def __call__(self, *args: str, stdin: str | bytes = b"") -> Result:
        return cape(self.config, *args, stdin=stdin)

    @property
    def token(self) -> str:
        token: str = json.loads((self.config / "auth").read_text())["access_token"]
        return token


def signup(server: ServeProcess, config: Path, prefix: str = "cli") -> Account:
    username = f"{prefix}{secrets.token_hex(4)}"
    new_config(server, config)
    result = ok(
        cape(config, "signup", "-u", username, "--password-stdin", "-o", "json", stdin=PASSWORD)
    )
    return Account(server, config, username, result)


def write_function(directory: Path, source: str) -> Path:
    directory.mkdir(parents=True)
    (directory / "app.py").write_text(source)
    return directory


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
