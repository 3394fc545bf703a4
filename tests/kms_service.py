"""``cape kms serve`` in a subprocess, for the tests of the network key service.

A real process serving real TLS on a loopback port; stdout/stderr kept in files. The pin it
prints is what nodes configure (``key_service_pin``); :meth:`KeyServiceProcess.node_env`
gives a ``cape serve`` node those settings through ``CAPE_*`` variables.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from tests.services import free_port

START_TIMEOUT_S: Final = 60.0


@dataclass
class KeyServiceProcess:
    data_dir: Path
    log_dir: Path
    token_file: Path
    port: int = field(default_factory=free_port)
    database_url: str | None = None
    """``--database-url`` (default: SQLite in the data directory)."""
    process: subprocess.Popen[bytes] | None = None
    url: str = ""
    pin: str = ""

    @classmethod
    def create(cls, base: Path, database_url: str | None = None) -> KeyServiceProcess:
        token_file = base / "node.token"
        base.mkdir(parents=True, exist_ok=True)
        token_file.write_text(secrets.token_hex(32) + "\n")
        return cls(base / "data", base / "logs", token_file, database_url=database_url)

    def start(self) -> KeyServiceProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        stdout_log = self.log_dir / "stdout.log"
        offset = stdout_log.stat().st_size if stdout_log.exists() else 0
        with stdout_log.open("ab") as out, (self.log_dir / "stderr.log").open("ab") as err:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from cape.cli.app import main; main()",
                    "kms",
                    "serve",
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--data-dir",
                    str(self.data_dir),
                    "--node-token-file",
                    str(self.token_file),
                    *(["--database-url", self.database_url] if self.database_url else []),
                ],
                stdout=out,
                stderr=err,
            )
        self.url = ""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for line in self.stdout()[offset:].splitlines():
                if line.strip().startswith("Certificate pin:"):
                    self.pin = line.split()[-1]
                if line.startswith("Ready: "):
                    self.url = line.removeprefix("Ready: ").strip()
            if self.url:
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"cape kms serve exited early:\n{self.stderr()[-3000:]}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"cape kms serve did not become ready:\n{self.stderr()[-3000:]}")

    def node_env(self, **overrides: str) -> dict[str, str]:
        """A node's ``CAPE_*`` settings for this key service."""
        return {
            "CAPE_KEY_SERVICE_URL": self.url,
            "CAPE_KEY_SERVICE_PIN": self.pin,
            "CAPE_KEY_SERVICE_TOKEN_FILE": str(self.token_file),
            **overrides,
        }

    def stdout(self) -> str:
        return (self.log_dir / "stdout.log").read_text(errors="replace")

    def stderr(self) -> str:
        return (self.log_dir / "stderr.log").read_text(errors="replace")

    def stop(self, timeout_s: float = 30.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
