"""Where the client finds its server, trust anchors and token (cape-reference.md §2.1).

Each setting comes from, in order: the explicit argument (a CLI flag), the environment
(``CAPE_ENCLAVE_HOST``, ``CAPE_CA_FILE``, ``CAPE_ATTESTATION_ROOT``, ``CAPE_TOKEN``), then what
``cape serve`` recorded for this user (``serve.json``) and ``cape login`` saved (``auth``), both
in the config directory (``$CAPE_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/cape``, else
``~/.config/cape``; directory 0700, files 0600).
"""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cape._internal.timefile import write_private
from cape.errors import CapeError, FormatError

__all__ = ["AUTH_FILE", "SERVE_FILE", "ClientConfig", "config_dir", "resolve", "save_token"]

AUTH_FILE = "auth"
SERVE_FILE = "serve.json"


def config_dir() -> Path:
    if value := os.environ.get("CAPE_CONFIG_DIR"):
        return Path(value)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cape"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        parsed = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise FormatError(f"cannot read {path}: {exc}") from None
    return parsed if isinstance(parsed, dict) else {}


@dataclass(frozen=True)
class ClientConfig:
    url: str
    ca_file: Path | None
    attestation_root: Path | None
    token: str | None

    def ssl_context(self) -> ssl.SSLContext:
        """TLS that trusts the configured CA file (or the system store without one)."""
        try:
            return ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file is not None else None
            )
        except (OSError, ssl.SSLError) as exc:
            raise CapeError(f"cannot load the CA file {self.ca_file}: {exc}") from None

    def require_token(self) -> str:
        if not self.token:
            raise CapeError("not logged in: run `cape login` (or pass --token / CAPE_TOKEN)")
        return self.token


def resolve(
    *,
    url: str | None = None,
    ca_file: Path | None = None,
    attestation_root: Path | None = None,
    token: str | None = None,
) -> ClientConfig:
    """Flags, then environment, then the recorded local server and saved login."""
    directory = config_dir()
    served = _read_json(directory / SERVE_FILE)
    auth = _read_json(directory / AUTH_FILE)
    chosen_url = url or os.environ.get("CAPE_ENCLAVE_HOST") or served.get("url")
    if not chosen_url:
        raise CapeError(
            "no server configured: pass --url, set CAPE_ENCLAVE_HOST, or start `cape serve`"
        )
    ca = ca_file or _path(os.environ.get("CAPE_CA_FILE")) or _path(served.get("ca_file"))
    root = (
        attestation_root
        or _path(os.environ.get("CAPE_ATTESTATION_ROOT"))
        or _path(served.get("attestation_root"))
    )
    saved = auth.get("access_token") if auth.get("url") in (None, chosen_url) else None
    chosen_token = token or os.environ.get("CAPE_TOKEN") or saved
    return ClientConfig(str(chosen_url).rstrip("/"), ca, root, chosen_token or None)


def _path(value: object) -> Path | None:
    return Path(value) if isinstance(value, str) and value else None


def save_token(url: str, username: str, token: str) -> Path:
    """Keep the login token for ``url`` in ``auth`` (0600, directory 0700), atomically."""
    directory = config_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    path = directory / AUTH_FILE
    record = {"url": url, "username": username, "access_token": token}
    write_private(path, json.dumps(record).encode())
    return path
