"""Where the client finds its server, trust anchors, token and cached keys (cape-reference.md §2.1).

Each setting comes from, in order: the explicit argument (a CLI flag), the environment
(``CAPE_ENCLAVE_HOST``/``CAPE_URL``, ``CAPE_CA_FILE``, ``CAPE_ATTESTATION_ROOT``,
``CAPE_TOKEN``), ``presets.json`` (written by ``cape config``), then what ``cape serve``
recorded for this user (``serve.json``) and ``cape login`` saved (``auth``). Everything lives in
the config directory (``$CAPE_CONFIG_DIR``, else ``$CAPE_LOCAL_CONFIG_DIR`` as pycape names it,
else ``$XDG_CONFIG_HOME/cape``, else ``~/.config/cape``); the directory is 0700 and every file
0600.

Cached public keys: the caller's own Cape key in ``capekey.pub.der`` (Cape's and pycape's
name), other users' keys in ``encryption_keys/<user>/capekey.pub.der`` (pycape's layout).
Attestation roots pinned by fingerprint for a server live in ``roots/<host>_<port>.pem``.
"""

from __future__ import annotations

import json
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from cape._internal.timefile import write_private
from cape.errors import CapeError, FormatError
from cape.formats import names

__all__ = [
    "AUTH_FILE",
    "KEY_FILE",
    "PRESETS",
    "PRESETS_FILE",
    "SERVE_FILE",
    "ClientConfig",
    "cached_key_path",
    "clear_login",
    "config_dir",
    "ensure_config_dir",
    "pinned_root_path",
    "read_presets",
    "resolve",
    "save_token",
    "write_presets",
]

AUTH_FILE: Final = "auth"
SERVE_FILE: Final = "serve.json"
KEY_FILE: Final = "capekey.pub.der"
PRESETS_FILE: Final = "presets.json"

#: Settings ``cape config KEY VALUE`` accepts, with what each one means.
PRESETS: Final = {
    "url": "server URL (https://…); env CAPE_ENCLAVE_HOST",
    "ca_file": "CA certificate file trusted for TLS; env CAPE_CA_FILE",
    "attestation_root": "pinned attestation root certificate file; env CAPE_ATTESTATION_ROOT",
}


def config_dir() -> Path:
    for name in ("CAPE_CONFIG_DIR", "CAPE_LOCAL_CONFIG_DIR"):
        if value := os.environ.get(name):
            return Path(value)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cape"


def ensure_config_dir() -> Path:
    """The config directory, created 0700 (and tightened to 0700 if it exists)."""
    directory = config_dir()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)
    except OSError as exc:
        raise CapeError(f"cannot use the config directory {directory}: {exc.strerror}") from None
    return directory


def _read_json(path: Path) -> dict[str, Any]:
    try:
        parsed = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise FormatError(f"cannot read {path}: {exc}") from None
    return parsed if isinstance(parsed, dict) else {}


def read_presets() -> dict[str, str]:
    presets = _read_json(config_dir() / PRESETS_FILE)
    return {k: v for k, v in presets.items() if k in PRESETS and isinstance(v, str)}


def write_presets(updates: dict[str, str | None]) -> Path:
    """Set (or, with ``None``, remove) presets; unknown keys are refused."""
    for key in updates:
        if key not in PRESETS:
            known = ", ".join(sorted(PRESETS))
            raise FormatError(f"unknown setting {key!r} (known: {known})")
    presets: dict[str, str] = read_presets()
    for key, value in updates.items():
        if value is None:
            presets.pop(key, None)
        else:
            presets[key] = value
    path = ensure_config_dir() / PRESETS_FILE
    write_private(path, (json.dumps(presets, indent=2, sort_keys=True) + "\n").encode())
    return path


@dataclass(frozen=True)
class ClientConfig:
    url: str
    ca_file: Path | None
    attestation_root: Path | None
    token: str | None
    username: str | None = None
    """The logged-in account's name, when the token is the saved login for this server."""

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
    """Flags, then environment, then presets, then the recorded local server and saved login."""
    directory = config_dir()
    served = _read_json(directory / SERVE_FILE)
    presets = read_presets()
    auth = _read_json(directory / AUTH_FILE)
    chosen_url = (
        url
        or os.environ.get("CAPE_URL")
        or os.environ.get("CAPE_ENCLAVE_HOST")
        or presets.get("url")
        or served.get("url")
    )
    if not chosen_url:
        raise CapeError(
            "no server configured: pass --url, set CAPE_ENCLAVE_HOST, or start `cape serve`"
        )
    chosen_url = str(chosen_url).rstrip("/")
    local = served.get("url") == chosen_url
    ca = (
        ca_file
        or _path(os.environ.get("CAPE_CA_FILE"))
        or _path(presets.get("ca_file"))
        or (_path(served.get("ca_file")) if local else None)
    )
    root = (
        attestation_root
        or _path(os.environ.get("CAPE_ATTESTATION_ROOT"))
        or _path(presets.get("attestation_root"))
        or (_path(served.get("attestation_root")) if local else None)
    )
    if root is None and pinned_root_path(chosen_url).exists():
        root = pinned_root_path(chosen_url)
    logged_in = auth.get("url") in (None, chosen_url)
    saved = auth.get("access_token") if logged_in else None
    chosen_token = token or os.environ.get("CAPE_TOKEN") or saved
    username = auth.get("username") if logged_in and chosen_token == saved else None
    return ClientConfig(
        chosen_url,
        ca,
        root,
        chosen_token or None,
        username if isinstance(username, str) else None,
    )


def _path(value: object) -> Path | None:
    return Path(value).expanduser() if isinstance(value, str) and value else None


def save_token(url: str, username: str, token: str) -> Path:
    """Keep the login token for ``url`` in ``auth`` (0600, directory 0700), atomically.

    The cached own Cape key belongs to the previous login, so it is dropped.
    """
    directory = ensure_config_dir()
    (directory / KEY_FILE).unlink(missing_ok=True)
    path = directory / AUTH_FILE
    record = {"url": url, "username": username, "access_token": token}
    write_private(path, json.dumps(record).encode())
    return path


def clear_login() -> list[Path]:
    """Forget the saved login and the cached own key; returns the files removed."""
    removed = []
    for name in (AUTH_FILE, KEY_FILE):
        path = config_dir() / name
        if path.exists():
            path.unlink()
            removed.append(path)
    return removed


def check_username(username: str) -> str:
    """The account name in the server's canonical form (it also names a cache folder)."""
    try:
        return names.check_username(username)
    except FormatError:
        raise FormatError(f"{username!r} is not a valid user name") from None


def cached_key_path(username: str | None = None) -> Path:
    """Where a public Cape key is cached: one's own, or another user's by name."""
    if username is None:
        return config_dir() / KEY_FILE
    return config_dir() / "encryption_keys" / check_username(username) / KEY_FILE


def pinned_root_path(url: str) -> Path:
    """Where the attestation root pinned for ``url`` is kept."""
    parts = urlsplit(url)
    host = re.sub(r"[^A-Za-z0-9.-]", "_", parts.hostname or "server")
    return config_dir() / "roots" / f"{host}_{parts.port or 443}.pem"


def write_config_file(path: Path, data: bytes) -> Path:
    """Write a file under the config directory, its parents 0700 and the file 0600."""
    base = ensure_config_dir()
    for parent in reversed(path.relative_to(base).parents[:-1]):
        (base / parent).mkdir(mode=0o700, exist_ok=True)
    write_private(path, data)
    return path
