"""A real ``cape serve`` process on loopback, and a client that verifies as the SDK does."""

from __future__ import annotations

import asyncio
import io
import os
import secrets
import ssl
import subprocess
import zipfile
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from cryptography import x509

from cape.sdk.flows import Deployed, deploy, fetch_key
from cape.sdk.rest import RestClient
from cape.sdk.session import Session, SessionOptions
from tests.services import CapeProcess

T = TypeVar("T")
START_TIMEOUT_S = 90.0


def zip_app(source: str | bytes, extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("app.py", source)
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


@dataclass
class ServeProcess(CapeProcess):
    """``python -m cape.cli.app serve`` in a subprocess; stdout/stderr kept in files."""

    data_dir: Path
    config_dir: Path
    log_dir: Path
    enclaves: int = 2
    extra_args: list[str] = field(default_factory=list)
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    new_session: bool = False
    """Start it as the leader of its own process group (to signal the group, as systemd
    and `timeout` do)."""
    process: subprocess.Popen[bytes] | None = None
    url: str = ""
    what: ClassVar[str] = "cape serve"
    start_timeout_s: ClassVar[float] = START_TIMEOUT_S
    stop_timeout_s: ClassVar[float] = 60.0

    def start(self) -> ServeProcess:
        self.url = ""
        args = ["serve", "--data-dir", str(self.data_dir), "--port", str(self.port)]
        args += ["--enclaves", str(self.enclaves), *self.extra_args]
        env = {**os.environ, "CAPE_CONFIG_DIR": str(self.config_dir), **self.env}
        self.url = self.wait_ready(self.launch(args, env, self.new_session))
        return self

    @property
    def ca_file(self) -> Path:
        return self.data_dir / "tls" / "ca.pem"

    @property
    def root(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(
            (self.data_dir / "attestation" / "root.pem").read_bytes()
        )

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def options(self, **kwargs: Any) -> SessionOptions:
        return SessionOptions(root=self.root, ssl_context=self.ssl_context(), **kwargs)

    def rest(self, token: str | None = None) -> RestClient:
        return RestClient(self.url, self.ssl_context(), token)


@dataclass
class User:
    server: ServeProcess
    username: str
    token: str

    @classmethod
    def signup(cls, server: ServeProcess, prefix: str = "user") -> User:
        username = f"{prefix}{secrets.token_hex(4)}"
        rest = server.rest()
        try:
            token = rest.signup(username, "correct horse battery")["access_token"]
        finally:
            rest.close()
        return cls(server, username, token)

    def api(
        self, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None
    ) -> Any:
        with self.server.rest(token or self.token) as rest:
            return rest.request(method, path, body)

    async def deploy(self, source: str | bytes, name: str = "fn", public: bool = False) -> Deployed:
        key = await fetch_key(self.server.url, self.token, self.server.options())
        return await deploy(
            self.server.url,
            self.token,
            self.server.options(),
            zip_app(source),
            name=name,
            public=public,
            key=key,
        )

    async def session(self, function: str, token: str | None = None, **kwargs: Any) -> Session:
        from cape.sdk.flows import run_path

        return await Session.open(
            self.server.url, run_path(function), token or self.token, self.server.options(**kwargs)
        )

    async def run(
        self, function: str, data: bytes, token: str | None = None, **kwargs: Any
    ) -> bytes:
        session = await self.session(function, token, **kwargs)
        try:
            return await session.invoke(data)
        finally:
            await session.close()


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(_wrap(coro))


async def _wrap(coro: Awaitable[T]) -> T:
    return await coro


WHEELHOUSE = Path(__file__).resolve().parents[2] / ".wheelhouse"


def use_wheelhouse(patch: Any, cache_dir: Path, wheel: str) -> None:
    """Let pip install only from the local wheelhouse (tests never reach an index).

    ``bash scripts/setup.sh test`` fills it; without ``wheel`` there the test skips, or fails
    under CI, where its absence is a setup bug. ``patch`` is a ``pytest.MonkeyPatch``.
    """
    import pytest

    if not any(WHEELHOUSE.glob(f"{wheel}-*.whl")):
        if os.environ.get("CI"):
            pytest.fail(f"no {wheel} wheel in .wheelhouse: run `bash scripts/setup.sh test`")
        pytest.skip(f"no {wheel} wheel in .wheelhouse (bash scripts/setup.sh test fills it)")
    patch.setenv("PIP_NO_INDEX", "1")
    patch.setenv("PIP_FIND_LINKS", str(WHEELHOUSE))
    patch.setenv("CAPE_CACHE_DIR", str(cache_dir))
