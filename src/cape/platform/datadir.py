"""``cape serve``'s data directory: where it is by default, the lock that keeps one server per
directory, the simulated attestation root kept in it, and the record that tells the local
``cape`` where the server is (re-exported by :mod:`cape.platform.serve`)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Final, TextIO

from cryptography import x509

from cape._internal.timefile import write_private
from cape.enclave.secure_module.simulated import SimulatedAuthority
from cape.errors import CapeError, KeyFormatError
from cape.platform.tls import load_ec_private_key
from cape.sdk.config import SERVE_FILE

log = logging.getLogger("cape.serve")
LOCK_FILE: Final = "serve.lock"


def default_data_dir() -> Path:
    """``$CAPE_DATA_DIR``, else ``$XDG_DATA_HOME/cape``, else ``~/.local/share/cape``."""
    if value := os.environ.get("CAPE_DATA_DIR"):
        return Path(value)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "cape"


def load_authority(directory: Path) -> SimulatedAuthority:
    """The simulated attestation root under ``directory``, created on first use."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = directory / "root.pem", directory / "root.key"
    if cert_path.exists() and key_path.exists():
        key = load_ec_private_key(key_path)
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        try:
            return SimulatedAuthority(key, certificate)
        except ValueError as exc:
            raise KeyFormatError(f"{directory}: {exc}") from None
    authority = SimulatedAuthority.generate()
    write_private(key_path, authority.private_key_pem())
    write_private(cert_path, authority.root_pem, 0o644)
    return authority


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


class _DataDirLock:
    """An exclusive ``flock`` on ``DIR/serve.lock`` for the server's lifetime; the file says
    which process holds it and at which URL (the kernel drops the lock if the process dies)."""

    def __init__(self, path: Path, handle: TextIO) -> None:
        self.path = path
        self._handle = handle

    def record(self, url: str | None) -> None:
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(json.dumps({"pid": os.getpid(), "url": url}) + "\n")
        self._handle.flush()

    def __enter__(self) -> _DataDirLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(OSError):
            self._handle.seek(0)
            self._handle.truncate()
        self._handle.close()  # releases the lock


def _lock_data_dir(data_dir: Path) -> _DataDirLock:
    path = data_dir / LOCK_FILE
    try:
        handle = path.open("a+")
    except OSError as exc:
        raise CapeError(f"cannot use the data directory {data_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        text = handle.read()
        handle.close()
        try:
            holder = json.loads(text)
        except ValueError:
            holder = {}
        holder = holder if isinstance(holder, dict) else {}
        pid = holder.get("pid", "unknown")
        where = holder.get("url") or "still starting"
        raise CapeError(
            f"the data directory {data_dir} is in use by another cape serve (PID {pid}, "
            f"{where}); stop that one first, or pass another --data-dir"
        ) from None
    lock = _DataDirLock(path, handle)
    lock.record(None)
    return lock


def _record_for_cli(
    config_dir: Path, url: str, ca_file: Path, root_file: Path, data_dir: Path
) -> None:
    """Tell the local user's ``cape`` where this server is (``serve.json``, 0600)."""
    try:
        _private_dir(config_dir)
        record = {
            "url": url,
            "ca_file": str(ca_file.resolve()),
            "attestation_root": str(root_file.resolve()),
            "data_dir": str(data_dir.resolve()),
        }
        write_private(config_dir / SERVE_FILE, json.dumps(record, indent=2).encode())
    except OSError as exc:
        log.warning("could not record the server for the CLI in %s: %s", config_dir, exc)
