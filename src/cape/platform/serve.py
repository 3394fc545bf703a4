"""``cape serve``: the whole platform on one machine (simulated mode).

One data directory holds everything, created on first start and reused afterwards::

    DIR/tls/ca.pem, ca.key, server.pem, server.key    the local TLS CA and server certificate
    DIR/attestation/root.pem, root.key                 the simulated attestation root
    DIR/kms/kms.sqlite3, master.key                    the built-in key service
    DIR/image-signing/key.pem, cert.pem                signs the runtime's measurement (PCR8)
    DIR/auth/signing.key                               the token signing key
    DIR/metadata.sqlite3                               users, functions, token records
    DIR/blobs/                                         encrypted function bundles
    DIR/keydocs/                                       stored key attestation documents

Start-up order: files, stores (with the orphan sweep, before anything is served), the key
service, the enclave pool, then the HTTPS/WSS server. On SIGINT/SIGTERM the server stops
taking new sessions, lets calls and deploys in progress finish (idle sessions get an error
frame and close 1001), then stops the enclaves; a second signal stops at once.

**Simulated mode has no hardware guarantee**: whoever controls this machine controls the
simulated secure module, the key service's master key and the "enclaves".
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TextIO

import uvicorn
from starlette.types import ASGIApp

from cape._internal.heap import steady_heap
from cape._internal.timefile import write_private
from cape.enclave.sandbox import describe_containment
from cape.enclave.uids import DEFAULT_RANGE, check_range, parse_range
from cape.enclave.zygote import describe_start
from cape.errors import CapeError, FormatError
from cape.host.admission import Admission
from cape.host.api.app import create_app
from cape.host.api.frames import MAX_TEXT_FRAME_BYTES
from cape.host.api.operations import Metrics, Readiness, create_operation_routes
from cape.host.api.rest import ApiDeps
from cape.host.api.sessions import Lifecycle, SessionDeps
from cape.host.auth import Accounts, TokenIssuer
from cape.host.hashgate import PasswordHashGate
from cape.host.keydocs import KeyDocuments
from cape.host.launcher import EnclaveLauncher, Tap
from cape.host.pool import EnclavePool
from cape.host.ratelimit import DEFAULT_SIGNUPS_PER_HOUR, LoginRateLimiter, SignupRateLimiter
from cape.host.signup import SignupMode
from cape.host.store.backends import (
    open_blob_store,
    open_metadata_store,
    safe_database_url,
    sweep_age_s,
)
from cape.host.store.deploys import sweep_orphans
from cape.host.store.invites import InviteStore
from cape.host.store.metadata import User
from cape.host.store.throttle import SqlThrottle
from cape.kms.local import load_master_key
from cape.platform.datadir import LOCK_FILE as LOCK_FILE
from cape.platform.datadir import (
    _DataDirLock,
    _lock_data_dir,
    _private_dir,
    _record_for_cli,
    default_data_dir,
    load_authority,
)
from cape.platform.kms_node import NodePlatform
from cape.platform.limits import ServerLimits
from cape.platform.local import (
    IMAGE_SIGNING_DIR,
    LocalPlatform,
    SimulatedPlatform,
    isolation_problem,
    load_image_signer,
)
from cape.platform.nitro import NitroOptions, nitro_launcher
from cape.platform.nitro import root_pem as nitro_root_pem
from cape.platform.tls import WILDCARD_HOSTS, ensure_tls
from cape.platform.uvicorn_server import _DenialNoise, _Uvicorn
from cape.platform.uvicorn_server import _listen as _listen
from cape.platform.wire_limits import SizedWebSocketProtocol, http_protocol
from cape.sdk.config import config_dir
from cape.verify.roots import fingerprint

__all__ = [
    "ServeConfig",
    "Server",
    "default_data_dir",
    "load_authority",
    "parse_forwarded_allow_ips",
    "serve",
]

log = logging.getLogger("cape.serve")
DEFAULT_PORT: Final = 8443
THROTTLE_PEPPER: Final = b"cape throttle key names v1"
"""HKDF info: the throttle table's row names are keyed by this secret (cape.host.store.throttle)."""

#: The docs page whose statement on hardware enclaves the banner repeats (keep them equal:
#: tests/e2e/test_first_hour.py checks the page says what the banner says).
HARDWARE_STATUS_DOC: Final = "docs/concepts.md"
HARDWARE_STATUS: Final = (
    "For confidentiality from the operator you need hardware-backed enclaves (AWS Nitro "
    "Enclaves): this release builds and signs their images and runs them with cape serve "
    "--enclave nitro, a path tested here against stand-ins, not on Nitro hardware."
)
BANNER: Final = "\n".join(
    [
        "  SIMULATED MODE: no hardware guarantee. The secure module, the key service's master key",
        "  and the enclaves all run on this machine; whoever controls it can read everything.",
        *textwrap.wrap(
            f"Use it to develop and test. {HARDWARE_STATUS} See {HARDWARE_STATUS_DOC}.",
            width=90,
            break_on_hyphens=False,
            initial_indent="  ",
            subsequent_indent="  ",
        ),
    ]
)


@dataclass
class ServeConfig:
    """What ``cape serve`` takes; the defaults are the command's."""

    data_dir: Path = field(default_factory=default_data_dir)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    enclaves: int = 2
    idle_timeout_s: float = 120.0
    drain_timeout_s: float = 30.0
    max_input_bytes: int = 64 << 20
    """The largest function input (``--max-input-mib``)."""
    limits: ServerLimits = field(default_factory=ServerLimits)
    """Sessions, deploys, bundle sizes and client deadlines (``--limit NAME=VALUE``)."""
    run_functions: bool = True
    """False (``cape serve --no-run``): start without OS isolation for user code; keys and
    deploys work, every run and test is refused. True refuses to start without isolation."""
    signup: SignupMode = SignupMode.open
    """Who may sign up: anyone, holders of an invite code, or nobody (docs/limits.md)."""
    signups_per_hour: int = DEFAULT_SIGNUPS_PER_HOUR
    """Signups one client address may make per hour (0: no limit)."""
    forwarded_allow_ips: Sequence[str] = ()
    """Proxies whose ``X-Forwarded-For`` names the client (addresses or networks, ``*`` for
    any); by default none, so the client is always the TCP peer."""
    runtime_args: Sequence[str] = ()
    sandbox_uids: str = str(DEFAULT_RANGE)
    """Host uids for sandboxes, ``START-END``: checked at every start against the ranges the
    system hands out (issue 18, finding 5); the enclaves get it as ``--sandbox-uids``."""
    sandbox_start: str = "auto"
    """How sandboxes start: ``auto`` (the enclave's sandbox zygote where the enclave runs as
    root, else bubblewrap) or ``bubblewrap`` (always); the enclaves get it as
    ``--sandbox-start``."""
    extra_env: Mapping[str, str] | None = None
    record_for_cli: bool = True
    config_dir: Path = field(default_factory=config_dir)
    log_level: str = "info"
    tap: Tap | None = None
    """Test and audit hook: observes every enclave channel frame."""
    # Scale-out (docs/cluster.md): shared stores and keys, set by cape.platform.config.
    node_name: str = field(default_factory=socket.gethostname)
    database_url: str | None = None
    """Default ``sqlite:///DATA_DIR/metadata.sqlite3``; ``postgresql+psycopg://…`` to share."""
    blob_store: str | None = None
    """Default ``DATA_DIR/blobs``; ``s3://BUCKET[/PREFIX]`` to share."""
    blob_endpoint_url: str | None = None
    tls_cert: Path | None = None
    """The operator's certificate chain and key; default the local CA's under DATA_DIR/tls."""
    tls_key: Path | None = None
    attestation_dir: Path | None = None
    """Default DATA_DIR/attestation; one shared directory gives a cluster one root."""
    kms_dir: Path | None = None
    """Default DATA_DIR/kms; shared by the nodes of a cluster on one machine."""
    auth_dir: Path | None = None
    """The directory holding ``auth/signing.key``; default DATA_DIR."""
    image_signing_dir: Path | None = None
    """The simulated runtime's image-signing key (PCR8, which new keys' release policy names);
    default DATA_DIR/image-signing. Shared by a cluster's nodes, or one node's enclaves could
    not receive keys made through another."""
    key_service_url: str | None = None
    """``https://HOST:PORT`` of the cluster's ``cape kms serve``: keys, the attestation root
    and the runtime signer live there, none on this node (docs/cluster.md)."""
    key_service_pin: str | None = None
    """The key service certificate's SHA-256 (hex), checked before anything is sent."""
    key_service_token_file: Path | None = None
    """The file holding the shared node token the key service expects."""
    log_format: str = "text"
    nitro: NitroOptions | None = None
    """``--enclave nitro``: real Nitro Enclaves calling AWS KMS themselves (docs/deploy-aws.md)."""
    wrap_app: Callable[[ASGIApp], ASGIApp] | None = None
    """Test and audit hook: wraps the API application before uvicorn serves it (e.g. an ASGI
    middleware that records every websocket message received and sent). Not for production:
    whatever it wraps in sees every request, token included."""


def parse_forwarded_allow_ips(text: str) -> tuple[str, ...]:
    """``--forwarded-allow-ips``: comma-separated addresses or networks, or ``*``.

    Raises:
        FormatError: an entry that is neither.
    """
    entries = tuple(part.strip() for part in text.split(",") if part.strip())
    for entry in entries:
        if entry == "*":
            continue
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise FormatError(
                f"--forwarded-allow-ips: {entry[:60]!r} is not an IP address or network "
                "(e.g. 10.0.0.5, 10.0.0.0/24, ::1, or * for any)"
            ) from None
    return entries


class Server:
    """The assembled platform: use :meth:`running` to start and stop it."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.data_dir = config.data_dir
        self.url = ""
        self.storage = ("", "")
        """The database URL (no password) and blob store this node uses, once started."""
        self.lifecycle = Lifecycle()
        self._uvicorn: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None
        self.isolation_problem: str | None = None
        """Why user code cannot run here (``None`` when it can); set at start."""

    @property
    def ca_file(self) -> Path:
        return self.data_dir / "tls" / "ca.pem"

    @property
    def root_file(self) -> Path:
        if self.config.nitro is not None:
            return self.config.nitro.aws_root
        return (self.config.attestation_dir or self.data_dir / "attestation") / "root.pem"

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Server]:
        """Start everything and serve until the block ends (or a signal drains it)."""
        # Before anything starts: one clear line when the sandbox uids overlap the system's.
        check_range(parse_range(self.config.sandbox_uids))
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = _lock_data_dir(self.data_dir)  # one server per data directory
        with lock:
            async with self._running(lock) as server:
                yield server

    @contextlib.asynccontextmanager
    async def _running(self, lock: _DataDirLock) -> AsyncIterator[Server]:
        config = self.config
        sandbox_uids = parse_range(config.sandbox_uids)  # checked in running()
        if config.nitro is None:  # on Nitro the sandboxes are inside the enclave image
            self.isolation_problem = await asyncio.to_thread(isolation_problem)
        if self.isolation_problem is not None and config.run_functions:
            raise CapeError(
                f"cannot run functions on this machine: {self.isolation_problem}. Fix that, or "
                "start with `cape serve --no-run` to serve keys and deploys only"
            )
        listener = _listen(config.host, config.port)  # fail fast, before starting enclaves
        with listener:
            nitro = None  # Nitro Enclaves calling AWS KMS themselves: checked before any file
            if config.nitro is not None:
                nitro = await nitro_launcher(config.nitro, config.enclaves, tap=config.tap)
            tls = ensure_tls(self.data_dir / "tls", config.host)
            node: NodePlatform | None = None
            if config.key_service_url is not None:  # before the stores: fail fast, one line
                node = await _connect_key_service(config, self.data_dir)
                self.root_fingerprint = fingerprint(node.root)
            else:
                authority = load_authority(config.attestation_dir or self.data_dir / "attestation")
                self.root_fingerprint = fingerprint(authority.root_certificate)
            database_url = config.database_url or f"sqlite:///{self.data_dir / 'metadata.sqlite3'}"
            blob_url = config.blob_store or str(self.data_dir / "blobs")
            self.storage = (safe_database_url(database_url), blob_url)
            store = await asyncio.to_thread(open_metadata_store, database_url)
            blobs = open_blob_store(blob_url, endpoint_url=config.blob_endpoint_url)
            swept = await asyncio.to_thread(
                sweep_orphans, store, blobs, min_age_s=sweep_age_s(database_url, blob_url)
            )
            if swept:
                log.info("removed %d unfinished deploy(s) left by an earlier run", swept)
            platform: SimulatedPlatform
            if node is not None:
                platform, root_pem = node, node.root_pem
            else:
                kms_dir = config.kms_dir or self.data_dir / "kms"
                platform = LocalPlatform(
                    kms_dir,
                    authority=authority,
                    master_key=load_master_key(kms_dir),
                    signer=load_image_signer(
                        config.image_signing_dir or self.data_dir / IMAGE_SIGNING_DIR
                    ),
                )
                root_pem = authority.root_pem
            launcher: EnclaveLauncher = platform.launcher(
                extra_env=config.extra_env,
                tap=config.tap,
                runtime_args=[
                    *config.runtime_args,
                    *("--sandbox-uids", str(sandbox_uids)),
                    *("--sandbox-start", config.sandbox_start),
                ],
            )
            if nitro is not None:
                launcher, aws_root = nitro
                root_pem, self.root_fingerprint = nitro_root_pem(aws_root), fingerprint(aws_root)
            pool = EnclavePool(launcher, config.enclaves)
            try:
                await pool.start()
                issuer = TokenIssuer.open(config.auth_dir or self.data_dir)
                # Login and signup counts in the database: every node of a cluster sees them.
                throttle = SqlThrottle(store, pepper=issuer.derive_secret(THROTTLE_PEPPER))
                accounts = Accounts(
                    store,
                    issuer,
                    signup_mode=config.signup,
                    invites=InviteStore(store),
                    limiter=LoginRateLimiter(tables=throttle),
                    signup_limiter=SignupRateLimiter(
                        per_hour=config.signups_per_hour, tables=throttle
                    ),
                )
                keydocs = KeyDocuments(self.data_dir / "keydocs", store)

                async def key_document(username: str) -> bytes | None:
                    document = await asyncio.to_thread(keydocs.get, username)
                    if document is not None:
                        return document
                    try:
                        user = await asyncio.to_thread(store.get_user_by_name, username)
                    except FormatError:
                        return None
                    return None if user is None else await keydocs.ensure(user, pool)

                async def on_signup(user: User) -> None:
                    await keydocs.ensure(user, pool)

                metrics = Metrics(
                    config.node_name,
                    live_enclaves=lambda: pool.stats().alive,
                    restarts=lambda: pool.stats().restarts,
                    active=lambda: self.lifecycle.active,
                )
                readiness = Readiness(
                    database=store.ping,
                    blob_store=blobs.check,
                    live_enclaves=lambda: pool.stats().alive,
                    draining=self.lifecycle.draining.is_set,
                    key_service=None if node is None else node.check_ready,
                )
                app = create_app(
                    ApiDeps(
                        store=store,
                        blobs=blobs,
                        accounts=accounts,
                        attestation_root_pem=root_pem,
                        key_documents=key_document,
                        on_signup=on_signup,
                        max_input_bytes=config.max_input_bytes,
                        hash_gate=PasswordHashGate(
                            config.limits.password_hashes, config.limits.password_hash_queue
                        ),
                    ),
                    SessionDeps(
                        store=store,
                        blobs=blobs,
                        accounts=accounts,
                        pool=pool,
                        lifecycle=self.lifecycle,
                        admission=Admission(config.limits.admission()),
                        idle_timeout_s=config.idle_timeout_s,
                        frame_timeout_s=config.limits.frame_timeout_s,
                        max_input_bytes=config.max_input_bytes,
                        max_bundle_bytes=config.limits.bundle_bytes,
                    ),
                    create_operation_routes(readiness, metrics),
                    body_timeout_s=config.limits.body_timeout_s,
                )
                counted = metrics.wrap(app)
                served = counted if config.wrap_app is None else config.wrap_app(counted)
                uv_config = uvicorn.Config(
                    served,
                    host=config.host,
                    port=config.port,
                    ssl_certfile=str(config.tls_cert or tls.server_cert),
                    ssl_keyfile=str(config.tls_key or tls.server_key),
                    # Per-message websocket limits, set by each session before each message
                    # (the first is a nonce), and a deadline for HTTP request heads.
                    ws=SizedWebSocketProtocol,
                    ws_max_size=MAX_TEXT_FRAME_BYTES,
                    http=http_protocol(config.limits.header_timeout_s),
                    ws_per_message_deflate=False,
                    lifespan="off",
                    log_config=None,
                    log_level=config.log_level,
                    server_header=False,
                    timeout_graceful_shutdown=5,
                    # X-Forwarded-For only from proxies the operator listed (uvicorn's own
                    # default trusts any loopback peer, so a local client could pick its
                    # address and slip past per-address limits).
                    proxy_headers=bool(config.forwarded_allow_ips),
                    forwarded_allow_ips=list(config.forwarded_allow_ips),
                )
                server = _Uvicorn(
                    uv_config, self.lifecycle, config.drain_timeout_s, on_drain=pool.stop_healing
                )
                self._uvicorn = server
                task = self._task = asyncio.create_task(server.serve(sockets=[listener]))
                while not server.started:
                    if task.done():
                        raise CapeError(f"the API server did not start: {task.exception()}")
                    await asyncio.sleep(0.02)
                port = listener.getsockname()[1]
                host = config.host if ":" not in config.host else f"[{config.host}]"
                if config.host in WILDCARD_HOSTS:
                    host = "127.0.0.1"
                self.url = f"https://{host}:{port}"
                lock.record(self.url)
                if config.record_for_cli:
                    _record_for_cli(
                        config.config_dir, self.url, self.ca_file, self.root_file, self.data_dir
                    )
                try:
                    yield self
                finally:
                    if not task.done():
                        server.request_shutdown()
                    await task
            finally:
                await pool.close()
                platform.close()
                store.close()

    def request_shutdown(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.request_shutdown()

    async def wait(self) -> None:
        """Return when the server has stopped (after a signal has drained it)."""
        if self._task is not None:
            await asyncio.wait({self._task})


async def _connect_key_service(config: ServeConfig, data_dir: Path) -> NodePlatform:
    """The network key service's side of this node (:mod:`cape.platform.kms_node`); the
    cluster root is kept in ``DATA_DIR/attestation/root.pem`` for clients of this machine."""
    if config.key_service_pin is None or config.key_service_token_file is None:
        raise CapeError("key_service_url needs key_service_pin and key_service_token_file")
    node = await asyncio.to_thread(
        NodePlatform.connect,
        config.key_service_url or "",
        config.key_service_pin,
        config.key_service_token_file,
        config.node_name,
    )
    try:
        directory = _private_dir(data_dir / "attestation")
        write_private(directory / "root.pem", node.root_pem, 0o644)
    except OSError as exc:
        node.close()
        raise CapeError(f"cannot write {data_dir / 'attestation'}: {exc.strerror}") from None
    return node


def describe(server: Server, out: TextIO) -> None:
    """The start-up banner and the ``Ready:`` line (the last line, once serving)."""
    config = server.config
    if config.nitro is None:
        print(f"Cape (simulated mode), data directory {server.data_dir}", file=out)
        print(BANNER, file=out)
    else:
        print(f"Cape on AWS Nitro Enclaves ({config.nitro.eif}), data {server.data_dir}", file=out)
    print(f"  TLS CA:            {server.ca_file}", file=out)
    print(f"  Attestation root:  {server.root_file}", file=out)
    print(f"  Root fingerprint:  sha256:{server.root_fingerprint}", file=out)
    if config.key_service_url is not None:
        print(f"  Key service:       {config.key_service_url}", file=out)
    print(f"  Enclaves:          {config.enclaves}", file=out)
    if config.database_url or config.blob_store:
        print(f"  Node:              {config.node_name}", file=out)
        print(f"  Database:          {server.storage[0]}", file=out)
        print(f"  Blob store:        {server.storage[1]}", file=out)
    print(f"  Sandbox uids:      {config.sandbox_uids}", file=out)
    print(f"  Sandbox limits:    {describe_containment()}", file=out)
    print(f"  Sandbox start:     {describe_start(config.sandbox_start)}", file=out)
    if server.isolation_problem is not None:
        print(
            f"  Functions:         NOT RUNNABLE (--no-run): {server.isolation_problem}",
            file=out,
        )
    print(f"  Signup:            {config.signup.value}", file=out)
    if config.forwarded_allow_ips:
        print(f"  Trusted proxies:   {', '.join(config.forwarded_allow_ips)}", file=out)
    print(f"Ready: {server.url}", file=out, flush=True)


async def _serve(
    config: ServeConfig, out: TextIO, on_ready: Callable[[Server], None] | None
) -> None:
    server = Server(config)
    async with server.running():
        describe(server, out)
        if on_ready is not None:
            on_ready(server)
        await server.wait()


def serve(
    config: ServeConfig,
    *,
    out: TextIO = sys.stdout,
    on_ready: Callable[[Server], None] | None = None,
) -> None:
    """Run the platform until SIGINT/SIGTERM (blocking)."""
    steady_heap()  # no page faults per large relayed call (issue 16, cape._internal.heap)
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if config.log_format == "json":
        from cape.platform.logs import JsonFormatter

        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter(config.node_name))
    logging.getLogger("uvicorn.error").addFilter(_DenialNoise())
    # Alembic reports each migration step at INFO, before the banner; only problems matter.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # httpx logs every key-service request at INFO (a network key service): only problems.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    asyncio.run(_serve(config, out, on_ready))
