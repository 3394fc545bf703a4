"""``cape kms serve`` in a subprocess, for the tests of the network key service.

A real process serving real TLS on a loopback port; stdout/stderr kept in files. The pin it
prints is what nodes configure (``key_service_pin``); :meth:`KeyServiceProcess.node_env`
gives a ``cape serve`` node those settings through ``CAPE_*`` variables.
"""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from tests.services import CapeProcess, free_port


@dataclass
class KeyServiceProcess(CapeProcess):
    data_dir: Path
    log_dir: Path
    token_file: Path
    port: int = field(default_factory=free_port)
    database_url: str | None = None
    """``--database-url`` (default: SQLite in the data directory)."""
    process: subprocess.Popen[bytes] | None = None
    url: str = ""
    pin: str = ""
    what: ClassVar[str] = "cape kms serve"

    @classmethod
    def create(cls, base: Path, database_url: str | None = None) -> KeyServiceProcess:
        token_file = base / "node.token"
        base.mkdir(parents=True, exist_ok=True)
        token_file.write_text(secrets.token_hex(32) + "\n")
        return cls(base / "data", base / "logs", token_file, database_url=database_url)

    def start(self) -> KeyServiceProcess:
        args = ["kms", "serve", "--listen", f"127.0.0.1:{self.port}"]
        args += ["--data-dir", str(self.data_dir), "--node-token-file", str(self.token_file)]
        args += ["--database-url", self.database_url] if self.database_url else []
        offset = self.launch(args)
        self.url = ""

        def pin_seen(line: str) -> None:
            if line.strip().startswith("Certificate pin:"):
                self.pin = line.split()[-1]

        self.url = self.wait_ready(offset, pin_seen)
        return self

    def node_env(self, **overrides: str) -> dict[str, str]:
        """A node's ``CAPE_*`` settings for this key service."""
        return {
            "CAPE_KEY_SERVICE_URL": self.url,
            "CAPE_KEY_SERVICE_PIN": self.pin,
            "CAPE_KEY_SERVICE_TOKEN_FILE": str(self.token_file),
            **overrides,
        }
