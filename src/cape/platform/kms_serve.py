"""``cape kms serve``: the key service of a cluster, as its own HTTPS service.

One data directory, laid out as a ``cape serve`` data directory's key-service parts, so the
operator commands ``cape kms log`` and ``cape kms rebind --data-dir DIR`` work on it::

    DIR/kms/master.key, kms.sqlite3     the master key and the default (SQLite) key database
                                        (``database_url``: another SQLite file or PostgreSQL)
    DIR/attestation/root.pem, root.key  the cluster's attestation root (simulated mode)
    DIR/image-signing/key.pem, cert.pem the simulated runtime's release signer (PCR8)
    DIR/tls/pinned.pem, pinned.key      the self-signed certificate nodes pin (no tls_cert)

The answer identity (Ed25519) is derived from the master key. Settings come from
``--config kms.toml``, ``CAPE_KMS_*`` variables and flags, later ones winning
(:data:`KMS_SETTINGS`); a bad one is one error before anything starts. The API is
:mod:`cape.kms.server`.

**Simulated mode has no hardware guarantee**: whoever controls this machine holds every
user's key and the cluster's root.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cape.enclave.secure_module.cluster import INTERMEDIATE_LIFETIME
from cape.errors import CapeError, FormatError
from cape.host.store.backends import check_database_url
from cape.kms.client import read_node_token
from cape.kms.local import DB_FILE, LocalKeyService, load_master_key
from cape.kms.server import KeyServiceApp, create_key_service_app
from cape.kms.store import safe_location
from cape.platform.config import Setting, load_settings
from cape.platform.local import (
    IMAGE_SIGNING_DIR,
    kms_identity,
    load_image_signer,
    signer_key_policy,
    with_kms_identity,
)
from cape.platform.serve import _listen, default_data_dir, load_authority
from cape.platform.tls import ensure_pinned_certificate
from cape.verify.roots import fingerprint

__all__ = [
    "DEFAULT_LISTEN",
    "KMS_ENV_PREFIX",
    "KMS_SETTINGS",
    "KmsServeConfig",
    "load_kms_config",
    "serve_kms",
]

DEFAULT_LISTEN: Final = "127.0.0.1:7443"
KMS_ENV_PREFIX: Final = "CAPE_KMS_"

log = logging.getLogger("cape.kms.serve")


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value or not value.isprintable():
        raise ValueError("a non-empty string")
    return value


def _path(value: Any) -> Path:
    return Path(_text(value)).expanduser()


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) → (host, port).

    Raises:
        FormatError: anything else.
    """
    host, sep, port = text.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise FormatError("listen must be HOST:PORT, e.g. 127.0.0.1:7443 or [::1]:7443")
    return host, int(port)


def _listen_value(value: Any) -> str:
    try:
        parse_listen(_text(value))
    except FormatError:
        raise ValueError("HOST:PORT, e.g. 127.0.0.1:7443 or [::1]:7443") from None
    return str(value).strip()


def _database_url(value: Any) -> str:
    try:
        return check_database_url(_text(value))
    except FormatError as exc:
        raise ValueError(str(exc).removeprefix("database_url: ")) from None


KMS_SETTINGS: Final[Mapping[str, Setting]] = {
    "listen": Setting("listen", _listen_value, "HOST:PORT to serve HTTPS on"),
    "data_dir": Setting("data_dir", _path, "master key, root, signer, default database"),
    "database_url": Setting(
        "database_url", _database_url, "sqlite:///PATH or postgresql+psycopg://… of the keys"
    ),
    "tls_cert": Setting("tls_cert", _path, "the operator's certificate (PEM)"),
    "tls_key": Setting("tls_key", _path, "its private key (PEM)"),
    "node_token_file": Setting("node_token_file", _path, "the shared node token's file"),
    "log_level": Setting("log_level", _text, "debug, info, warning or error"),
}


@dataclass
class KmsServeConfig:
    """What ``cape kms serve`` takes (the defaults are the command's)."""

    node_token_file: Path | None = None
    listen: str = DEFAULT_LISTEN
    data_dir: Path = field(default_factory=lambda: default_data_dir() / "kms-service")
    database_url: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    log_level: str = "info"


def load_kms_config(
    path: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, tuple[str, Any]] | None = None,
) -> KmsServeConfig:
    """The file, ``CAPE_KMS_*`` variables and flags, checked (one FormatError otherwise)."""
    values = load_settings(
        path, env=env, flags=flags, settings=KMS_SETTINGS, env_prefix=KMS_ENV_PREFIX
    )
    config = KmsServeConfig(**values)
    if config.node_token_file is None:
        raise FormatError(
            "node_token_file is required: a file holding the secret nodes present "
            "(e.g. `openssl rand -hex 32 > node.token`)"
        )
    if config.log_level not in ("debug", "info", "warning", "error"):
        raise FormatError("log_level must be debug, info, warning or error")
    return config


@dataclass
class KeyServiceServer:
    """The assembled key service; :meth:`run` serves until SIGINT/SIGTERM."""

    config: KmsServeConfig
    url: str = ""
    pin: str = ""
    root_file: Path = field(default_factory=Path)
    database: str = ""

    async def run(self, out: TextIO) -> None:
        config = self.config
        assert config.node_token_file is not None  # load_kms_config checked it
        token = read_node_token(config.node_token_file)
        host, port = parse_listen(config.listen)
        listener = _listen(host, port)
        with listener:
            data_dir = config.data_dir
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            kms_dir = data_dir / "kms"
            master_key = load_master_key(kms_dir)
            authority = load_authority(data_dir / "attestation")
            self.root_file = data_dir / "attestation" / "root.pem"
            signer = load_image_signer(data_dir / IMAGE_SIGNING_DIR)
            assert signer is not None  # created when missing
            identity = kms_identity(master_key)
            database: Path | str = config.database_url or kms_dir / DB_FILE
            self.database = safe_location(database)
            service = await asyncio.to_thread(
                LocalKeyService,
                database,
                master_key=master_key,
                trusted_root=authority.root_certificate,
                default_policy=with_kms_identity(signer_key_policy(signer), identity.public_bytes),
            )
            try:
                if config.tls_cert is not None and config.tls_key is not None:
                    cert_file, key_file = config.tls_cert, config.tls_key
                else:
                    cert_file, key_file = ensure_pinned_certificate(data_dir / "tls", host)
                self.pin = _pin_of(cert_file)

                def issue_intermediate(request_pem: bytes) -> bytes:
                    request = x509.load_pem_x509_csr(request_pem)  # ValueError: a 400
                    certificate = authority.issue_intermediate(
                        request, dt.datetime.now(dt.UTC), lifetime=INTERMEDIATE_LIFETIME
                    )
                    return certificate.public_bytes(serialization.Encoding.PEM)

                app = create_key_service_app(
                    KeyServiceApp(
                        service=service,
                        signer=identity,
                        node_token=token,
                        root_pem=authority.root_pem,
                        issue_intermediate=issue_intermediate,
                        sign_runtime=signer.sign_pcr0,
                        ready=service.ping,
                    )
                )
                server = uvicorn.Server(
                    uvicorn.Config(
                        app,
                        ssl_certfile=str(cert_file),
                        ssl_keyfile=str(key_file),
                        lifespan="off",
                        log_config=None,
                        log_level=config.log_level,
                        server_header=False,
                        timeout_graceful_shutdown=5,
                    )
                )
                task = asyncio.create_task(server.serve(sockets=[listener]))
                while not server.started:
                    if task.done():
                        raise CapeError(f"the key service did not start: {task.exception()}")
                    await asyncio.sleep(0.02)
                shown = host if ":" not in host else f"[{host}]"
                self.url = f"https://{shown}:{listener.getsockname()[1]}"
                self._describe(out, fingerprint(authority.root_certificate))
                await task
            finally:
                service.close()

    def _describe(self, out: TextIO, root_fingerprint: str) -> None:
        print("Cape key service (simulated mode)", file=out)
        print(f"  Data directory:    {self.config.data_dir}", file=out)
        print(f"  Key database:      {self.database}", file=out)
        print(f"  Attestation root:  {self.root_file}", file=out)
        print(f"  Root fingerprint:  sha256:{root_fingerprint}", file=out)
        print(f"  Certificate pin:   sha256:{self.pin}", file=out)
        print(f"Ready: {self.url}", file=out, flush=True)


def _pin_of(cert_file: Path) -> str:
    try:
        certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except OSError as exc:
        raise FormatError(f"cannot read {cert_file}: {exc.strerror}") from None
    except ValueError:
        raise FormatError(f"{cert_file} is not a PEM certificate") from None
    return fingerprint(certificate)


def serve_kms(config: KmsServeConfig, *, out: TextIO = sys.stdout) -> None:
    """Run the key service until SIGINT/SIGTERM (blocking)."""
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    asyncio.run(KeyServiceServer(dataclasses.replace(config)).run(out))
