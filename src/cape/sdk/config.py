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
    "Setting",
    "cached_key_path",
    "clear_login",
    "config_dir",
    "effective",
    "ensure_config_dir",
    "login_matches",
    "not_logged_in",
    "pinned_root_path",
    "read_presets",
    "read_serve_record",
    "resolve",
    "same_server",
    "save_token",
    "saved_login",
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
            raise CapeError(not_logged_in(self.url))
        return self.token


def not_logged_in(url: str) -> str:
    """Why there is no token for ``url``, naming the login that exists, if any."""
    auth = saved_login()
    other = auth.get("url")
    if isinstance(other, str) and auth.get("access_token"):
        return (
            f"not logged in at {url}: the saved login is {auth.get('username')} at {other}; "
            f"run `cape login --url {url}`, or pass --url {other} (or --token / CAPE_TOKEN)"
        )
    return f"not logged in at {url}: run `cape login` (or pass --token / CAPE_TOKEN)"


@dataclass(frozen=True)
class Setting:
    """One effective setting and where it came from (what ``cape config`` shows)."""

    value: str | None
    source: str


def _first(*candidates: tuple[object, str]) -> Setting:
    for value, source in candidates:
        if (isinstance(value, str) and value) or isinstance(value, Path):
            return Setting(str(value), source)
    return Setting(None, "unset")


def effective(
    *,
    url: str | None = None,
    ca_file: Path | None = None,
    attestation_root: Path | None = None,
) -> dict[str, Setting]:
    """The settings a command would use, each with its source: flag, environment, presets,
    the local ``cape serve`` record, or the root pinned for the URL."""
    directory = config_dir()
    served = _read_json(directory / SERVE_FILE)
    presets = read_presets()
    env = os.environ
    chosen = _first(
        (url, "--url"),
        (env.get("CAPE_URL"), "env CAPE_URL"),
        (env.get("CAPE_ENCLAVE_HOST"), "env CAPE_ENCLAVE_HOST"),
        (presets.get("url"), f"{PRESETS_FILE}"),
        (served.get("url"), f"the local cape serve ({SERVE_FILE})"),
    )
    if chosen.value is not None:
        chosen = Setting(chosen.value.rstrip("/"), chosen.source)
    local = chosen.value is not None and same_server(served.get("url"), chosen.value)
    ca = _first(
        (ca_file, "--ca-file"),
        (env.get("CAPE_CA_FILE"), "env CAPE_CA_FILE"),
        (presets.get("ca_file"), PRESETS_FILE),
        (served.get("ca_file") if local else None, f"the local cape serve ({SERVE_FILE})"),
    )
    pinned = pinned_root_path(chosen.value) if chosen.value is not None else None
    local_source = f"the local cape serve ({SERVE_FILE})"
    root = _first(
        (attestation_root, "--attestation-root"),
        (env.get("CAPE_ATTESTATION_ROOT"), "env CAPE_ATTESTATION_ROOT"),
        (presets.get("attestation_root"), PRESETS_FILE),
        (served.get("attestation_root") if local else None, local_source),
        (pinned if pinned is not None and pinned.exists() else None, "cape login --trust-root"),
    )
    return {"url": chosen, "ca_file": ca, "attestation_root": root}


def same_server(recorded: object, url: str) -> bool:
    """Whether two URLs name the same server: equal once ``localhost`` is read as
    ``127.0.0.1`` (the loopback address ``cape serve`` prints) and a trailing ``/`` dropped."""
    if not isinstance(recorded, str):
        return False
    return _canonical(recorded) == _canonical(url)


def _canonical(url: str) -> str:
    parts = urlsplit(url.strip().rstrip("/"))
    host = (parts.hostname or "").lower()
    if host == "localhost":
        host = "127.0.0.1"
    return f"{parts.scheme.lower()}://{host}:{parts.port or 443}{parts.path}"


def login_matches(auth: dict[str, Any], url: str, served: dict[str, Any]) -> bool:
    """Whether the saved login ``auth`` is valid at ``url``: made there (see
    :func:`same_server`), or made at the local ``cape serve`` that still serves the same data
    directory, now at ``url`` (a restart with ``--port 0`` picks a new port; the tokens are
    signed with the data directory's key, so they stay valid)."""
    if auth.get("url") is None or same_server(auth.get("url"), url):
        return True
    data_dir = auth.get("serve_data_dir")
    return (
        isinstance(data_dir, str)
        and served.get("data_dir") == data_dir
        and same_server(served.get("url"), url)
    )


def read_serve_record() -> dict[str, Any]:
    """What the local ``cape serve`` recorded (``serve.json``; empty when none)."""
    return _read_json(config_dir() / SERVE_FILE)


def saved_login() -> dict[str, Any]:
    """The saved login record (``url``, ``username``; empty when logged out)."""
    return _read_json(config_dir() / AUTH_FILE)


def resolve(
    *,
    url: str | None = None,
    ca_file: Path | None = None,
    attestation_root: Path | None = None,
    token: str | None = None,
) -> ClientConfig:
    """Flags, then environment, then presets, then the recorded local server and saved login."""
    settings = effective(url=url, ca_file=ca_file, attestation_root=attestation_root)
    chosen_url = settings["url"].value
    if not chosen_url:
        raise CapeError(
            "no server configured: pass --url, set CAPE_ENCLAVE_HOST, or start `cape serve`"
        )
    served = _read_json(config_dir() / SERVE_FILE)
    auth = saved_login()
    logged_in = login_matches(auth, chosen_url, served)
    saved = auth.get("access_token") if logged_in else None
    chosen_token = token or os.environ.get("CAPE_TOKEN") or saved
    username = auth.get("username") if logged_in and chosen_token == saved else None
    return ClientConfig(
        chosen_url,
        _path(settings["ca_file"].value),
        _path(settings["attestation_root"].value),
        chosen_token or None,
        username if isinstance(username, str) else None,
    )


def _path(value: object) -> Path | None:
    return Path(value).expanduser() if isinstance(value, str) and value else None


def save_token(url: str, username: str, token: str) -> Path:
    """Keep the login token for ``url`` in ``auth`` (0600, directory 0700), atomically.

    The cached own Cape key belongs to the previous login, so it is dropped. A login at the
    local ``cape serve`` also records that server's data directory, so that it follows the
    server to a new port (:func:`login_matches`).
    """
    directory = ensure_config_dir()
    (directory / KEY_FILE).unlink(missing_ok=True)
    path = directory / AUTH_FILE
    record: dict[str, str] = {"url": url, "username": username, "access_token": token}
    served = _read_json(directory / SERVE_FILE)
    if same_server(served.get("url"), url) and isinstance(served.get("data_dir"), str):
        record["serve_data_dir"] = served["data_dir"]
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
