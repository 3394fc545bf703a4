"""Start the runtime as AWS Nitro Enclaves: ``nitro-cli`` for the lifecycle, vsock for the channel.

:class:`NitroLauncher` is the second :class:`~cape.host.launcher.EnclaveLauncher`: the pool,
its affinity and its restart logic are the same as in simulated mode. For each enclave it

1. picks a free enclave CID and runs ``nitro-cli run-enclave --eif-path … --cpu-count …
   --memory … --enclave-cid …`` (JSON answer: the ``EnclaveID``);
2. accepts the channel the runtime inside opens to the parent (the image's environment says
   ``CAPE_CHANNEL=vsock:3:5000``; ``cape enclave build`` writes it), telling enclaves apart by
   the CID the hypervisor gives their connections;
3. sends the ``configure`` frame (the key service's identity, which the runtime measures into
   PCR16), then relays frames with the same :class:`~cape.host.launcher.EnclaveConnection`
   as the simulated launcher;
4. watches the enclave with ``nitro-cli describe-enclaves`` and closes the channel when it is
   gone (so the pool starts another); closing a connection runs ``nitro-cli
   terminate-enclave --enclave-id …``.

The socket family is a seam (:class:`ChannelFamily`): :class:`VsockFamily` (``AF_VSOCK``,
production) and :class:`UnixFamily` (``AF_UNIX``, one socket file per CID, for tests). Both
carry the same framed channel.

:func:`preflight` gives one clear line when ``nitro-cli``, the allocator's CPUs or memory, or
``/dev/vsock`` are missing, before anything starts.

**Needs real hardware (not exercised on the development machine):** ``nitro-cli`` talking to
the Nitro hypervisor, :class:`VsockFamily` connections, and the allocator's sysfs files on a
parent instance. The tests run this module against a fake ``nitro-cli`` on ``PATH`` that
starts the real runtime as a local process (``tests/fakes/nitro_cli.py``), over
:class:`UnixFamily`; docs/mocks.md lists what that leaves unverified and ``cape doctor``
checks it on a real parent.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import re
import shutil
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cape.errors import CapeError, TransportError
from cape.host.launcher import (
    EnclaveConnection,
    EnclaveLauncher,
    KmsProxy,
    Provider,
    Tap,
)

__all__ = [
    "ChannelFamily",
    "EnclaveInfo",
    "NitroCli",
    "NitroError",
    "NitroLauncher",
    "NitroSettings",
    "UnixFamily",
    "VsockFamily",
    "allocator_resources",
    "preflight",
]

log = logging.getLogger("cape.host.nitro")

DEFAULT_PORT: Final = 5000
"""The parent's vsock port the runtime connects to (``cape enclave build``'s image env)."""
FIRST_CID: Final = 16
"""Enclave CIDs handed out from here (0-3 are reserved; the AWS examples use 16)."""
CLI_TIMEOUT_S: Final = 120.0
CONNECT_TIMEOUT_S: Final = 60.0
WATCH_INTERVAL_S: Final = 5.0
RENEW_INTERVAL_S: Final = 900.0
"""Instance-role credentials last about 6 hours; the enclave gets fresh ones every 15 min."""

Configure = Callable[[], Mapping[str, Any]]
"""Fields of a ``configure`` (or ``credentials``) frame for an enclave."""
_ERROR_LINE = re.compile(r"\[\s*E\d+\s*\].*")


class NitroError(CapeError):
    """``nitro-cli`` or the parent instance cannot run an enclave (one line, what to fix)."""


@dataclass(frozen=True)
class NitroSettings:
    """What every enclave of one pool is started with."""

    eif: Path
    cpu_count: int = 2
    memory_mib: int = 2048
    first_cid: int = FIRST_CID
    debug_mode: bool = False
    """``--debug-mode``: the console is readable and PCR0-2 are zero (no key is released)."""

    def __post_init__(self) -> None:
        if self.cpu_count < 1 or self.memory_mib < 64:
            raise ValueError("an enclave needs at least 1 CPU and 64 MiB of memory")
        if not 3 < self.first_cid < 0xFFFFFFFF:
            raise ValueError("enclave CIDs start above 3")


@dataclass(frozen=True)
class EnclaveInfo:
    """One entry of ``describe-enclaves`` (or the answer of ``run-enclave``)."""

    enclave_id: str
    cid: int
    state: str

    @classmethod
    def from_json(cls, value: object) -> EnclaveInfo:
        if not isinstance(value, dict):
            raise NitroError("nitro-cli answered something other than an enclave description")
        enclave_id, cid = value.get("EnclaveID"), value.get("EnclaveCID")
        if not isinstance(enclave_id, str) or not isinstance(cid, int):
            raise NitroError("nitro-cli's enclave description lacks EnclaveID or EnclaveCID")
        return cls(enclave_id, cid, str(value.get("State", "RUNNING")).upper())


class NitroCli:
    """``nitro-cli`` subcommands, JSON answers parsed, failures as one-line :class:`NitroError`.

    *Needs real hardware*: the real tool talks to ``/dev/nitro_enclaves``.
    """

    def __init__(self, executable: str = "nitro-cli") -> None:
        self.executable = executable

    async def _run(self, *args: str) -> Any:
        try:
            process = await asyncio.create_subprocess_exec(
                self.executable,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise NitroError(f"cannot run {self.executable}: {exc.strerror or exc}") from None
        try:
            out, err = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise NitroError(
                f"nitro-cli {args[0]} did not finish in {CLI_TIMEOUT_S:.0f}s"
            ) from None
        if process.returncode != 0:
            raise NitroError(f"nitro-cli {args[0]} failed: {_error_line(err or out)}")
        try:
            return json.loads(out)
        except ValueError:
            raise NitroError(f"nitro-cli {args[0]} did not answer JSON") from None

    async def run_enclave(self, settings: NitroSettings, cid: int) -> EnclaveInfo:
        args = [
            "run-enclave",
            "--eif-path",
            str(settings.eif),
            "--cpu-count",
            str(settings.cpu_count),
            "--memory",
            str(settings.memory_mib),
            "--enclave-cid",
            str(cid),
        ]
        if settings.debug_mode:
            args.append("--debug-mode")
        return EnclaveInfo.from_json(await self._run(*args))

    async def describe_enclaves(self) -> list[EnclaveInfo]:
        answer = await self._run("describe-enclaves")
        if not isinstance(answer, list):
            raise NitroError("nitro-cli describe-enclaves did not answer a list")
        return [EnclaveInfo.from_json(item) for item in answer]

    async def describe_eif(self, eif: Path) -> dict[int, bytes]:
        """The image's measurements (``Measurements``: ``PCR0``, ``PCR1``, ``PCR2``, and
        ``PCR8`` for a signed image)."""
        answer = await self._run("describe-eif", "--eif-path", str(eif))
        measurements = answer.get("Measurements") if isinstance(answer, dict) else None
        if not isinstance(measurements, dict):
            raise NitroError("nitro-cli describe-eif answered no Measurements")
        pcrs: dict[int, bytes] = {}
        for name, value in measurements.items():
            if re.fullmatch(r"PCR\d{1,2}", name) and isinstance(value, str):
                try:
                    pcrs[int(name[3:])] = bytes.fromhex(value)
                except ValueError:
                    raise NitroError(f"nitro-cli describe-eif: {name} is not hex") from None
        if not {0, 1, 2} <= set(pcrs):
            raise NitroError("nitro-cli describe-eif answered no PCR0, PCR1 and PCR2")
        return pcrs

    async def terminate_enclave(self, enclave_id: str) -> None:
        await self._run("terminate-enclave", "--enclave-id", enclave_id)


def _error_line(output: bytes) -> str:
    """nitro-cli's own error line (``[ E26 ] Insufficient memory requested…``) if any."""
    text = output.decode("utf-8", "replace")
    match = _ERROR_LINE.search(text)
    if match is not None:
        return match.group(0).strip()[:300]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no error message"


class ChannelFamily(abc.ABC):
    """How the host takes the channel of enclave ``cid``: the runtime in the image connects
    to the parent (``CAPE_CHANNEL=vsock:3:PORT``), the host listens and accepts it."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise :class:`NitroError` when this family cannot be used on this machine."""

    @abc.abstractmethod
    def prepare(self, cid: int) -> None:
        """Be ready for enclave ``cid``'s connection (called before the enclave starts)."""

    @abc.abstractmethod
    async def accept(self, cid: int) -> socket.socket:
        """The connection from enclave ``cid`` (the caller bounds the wait)."""

    @abc.abstractmethod
    def forget(self, cid: int) -> None:
        """Stop waiting for ``cid`` (its start failed or it was accepted)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop listening."""


class VsockFamily(ChannelFamily):
    """One ``AF_VSOCK`` listener on ``port``; connections are told apart by the peer's CID
    (the hypervisor sets it: an enclave cannot claim another's). *Needs real hardware*."""

    def __init__(self, port: int = DEFAULT_PORT, device: Path = Path("/dev/vsock")) -> None:
        self.port = port
        self.device = device
        self._listener: socket.socket | None = None
        self._waiting: dict[int, asyncio.Future[socket.socket]] = {}
        self._acceptor: asyncio.Task[None] | None = None

    def check(self) -> None:
        if not hasattr(socket, "AF_VSOCK"):
            raise NitroError("this Python has no AF_VSOCK support")
        if not self.device.exists():
            raise NitroError(
                f"{self.device} is missing: this is not an enclave-enabled parent instance "
                "(or the vsock driver is not loaded)"
            )

    def prepare(self, cid: int) -> None:
        if self._listener is None:
            listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            listener.bind((socket.VMADDR_CID_ANY, self.port))
            listener.listen(16)
            listener.setblocking(False)
            self._listener = listener
            self._acceptor = asyncio.create_task(self._accept_loop(listener))
        self._waiting[cid] = asyncio.get_running_loop().create_future()

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            connection, (peer, _) = await loop.sock_accept(listener)
            future = self._waiting.pop(peer, None)
            if future is None or future.done():
                log.warning("closing a vsock connection from unexpected CID %d", peer)
                connection.close()
            else:
                future.set_result(connection)

    async def accept(self, cid: int) -> socket.socket:
        return await self._waiting[cid]

    def forget(self, cid: int) -> None:
        future = self._waiting.pop(cid, None)
        if future is not None:
            future.cancel()

    def close(self) -> None:
        if self._acceptor is not None:
            self._acceptor.cancel()
        if self._listener is not None:
            self._listener.close()
            self._listener = None


class UnixFamily(ChannelFamily):
    """One ``AF_UNIX`` listener per enclave at ``directory/<cid>.sock``: the tests' stand-in
    (the image's runtime is started with ``CAPE_CHANNEL=unix:<that path>``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._listeners: dict[int, socket.socket] = {}

    def path(self, cid: int) -> Path:
        return self.directory / f"{cid}.sock"

    def check(self) -> None:
        if not self.directory.is_dir():
            raise NitroError(f"{self.directory} is not a directory")

    def prepare(self, cid: int) -> None:
        path = self.path(cid)
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)
        listener.setblocking(False)
        self._listeners[cid] = listener

    async def accept(self, cid: int) -> socket.socket:
        connection, _ = await asyncio.get_running_loop().sock_accept(self._listeners[cid])
        self.forget(cid)
        return connection

    def forget(self, cid: int) -> None:
        listener = self._listeners.pop(cid, None)
        if listener is not None:
            listener.close()
            self.path(cid).unlink(missing_ok=True)

    def close(self) -> None:
        for cid in list(self._listeners):
            self.forget(cid)


def _cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def allocator_resources(sysfs: Path = Path("/sys")) -> tuple[int, int]:
    """CPUs and MiB of huge pages the Nitro allocator has set aside, read from sysfs.

    The allocator service (``nitro-enclaves-allocator``) offlines the CPUs listed in
    ``module/nitro_enclaves/parameters/ne_cpus`` and reserves huge pages
    (``kernel/mm/hugepages/hugepages-<N>kB/nr_hugepages``). *Needs real hardware*: on
    other machines the module is absent, which is reported as :class:`NitroError`.
    """
    ne_cpus = sysfs / "module" / "nitro_enclaves" / "parameters" / "ne_cpus"
    try:
        cpus = len(_cpu_list(ne_cpus.read_text()))
    except FileNotFoundError:
        raise NitroError(
            "the nitro_enclaves kernel module is not loaded (no ne_cpus): install "
            "aws-nitro-enclaves-cli and start nitro-enclaves-allocator"
        ) from None
    except ValueError:
        raise NitroError(f"{ne_cpus} does not hold a CPU list") from None
    memory_kib = 0
    for pages in sorted((sysfs / "kernel" / "mm" / "hugepages").glob("hugepages-*kB")):
        size = re.fullmatch(r"hugepages-(\d+)kB", pages.name)
        if size is None:
            continue
        with contextlib.suppress(FileNotFoundError, ValueError):
            memory_kib += int(size.group(1)) * int((pages / "nr_hugepages").read_text())
    return cpus, memory_kib // 1024


def preflight(
    settings: NitroSettings,
    enclaves: int,
    family: ChannelFamily,
    *,
    nitro_cli: str = "nitro-cli",
    sysfs: Path = Path("/sys"),
) -> None:
    """Check that ``enclaves`` enclaves of ``settings`` can start here; one line each if not.

    Raises:
        NitroError: nitro-cli is not on ``PATH``, the EIF is missing, the allocator set aside
            too few CPUs or too little memory, or the channel family cannot be used.
    """
    if shutil.which(nitro_cli) is None:
        raise NitroError(
            f"{nitro_cli} is not on PATH: install aws-nitro-enclaves-cli on the parent instance"
        )
    if not settings.eif.is_file():
        raise NitroError(f"enclave image {settings.eif} does not exist")
    cpus, memory = allocator_resources(sysfs)
    need_cpus, need_memory = enclaves * settings.cpu_count, enclaves * settings.memory_mib
    if cpus < need_cpus:
        raise NitroError(
            f"the Nitro allocator set aside {cpus} CPUs; {enclaves} enclave(s) of "
            f"{settings.cpu_count} need {need_cpus} (cpu_count in "
            "/etc/nitro_enclaves/allocator.yaml)"
        )
    if memory < need_memory:
        raise NitroError(
            f"the Nitro allocator set aside {memory} MiB; {enclaves} enclave(s) of "
            f"{settings.memory_mib} MiB need {need_memory} MiB (memory_mib in "
            "/etc/nitro_enclaves/allocator.yaml)"
        )
    family.check()


class _NitroConnection(EnclaveConnection):
    """An enclave connection that terminates its enclave when it closes."""

    def __init__(self, *args: Any, cli: NitroCli, info: EnclaveInfo, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cli = cli
        self.info = info
        self._watcher: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None

    def watch(self, interval: float) -> None:
        self._watcher = asyncio.create_task(self._watch(interval))

    def renew(self, renew: Configure, interval: float) -> None:
        self._renewer = asyncio.create_task(self._renew(renew, interval))

    async def _renew(self, renew: Configure, interval: float) -> None:
        """Send fresh AWS credentials now and then (they authenticate; they cannot decrypt)."""
        while self.alive:
            await asyncio.sleep(interval)
            try:
                fields = await asyncio.to_thread(renew)
                await self.send({**fields, "t": "credentials"})
            except (CapeError, OSError) as exc:
                log.warning("enclave %s: cannot renew credentials: %s", self.info.enclave_id, exc)

    async def _watch(self, interval: float) -> None:
        """Close the channel once ``describe-enclaves`` no longer lists a running enclave."""
        while self.alive:
            await asyncio.sleep(interval)
            try:
                running = {
                    e.enclave_id for e in await self.cli.describe_enclaves() if e.state == "RUNNING"
                }
            except NitroError as exc:
                log.warning("cannot describe enclaves: %s", exc)
                continue
            if self.info.enclave_id not in running:
                log.warning("enclave %s is no longer running", self.info.enclave_id)
                self.close_channel()
                return

    async def close(self) -> None:
        for task in (self._watcher, self._renewer):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        try:
            await super().close()
        finally:
            try:
                await self.cli.terminate_enclave(self.info.enclave_id)
            except NitroError as exc:
                log.warning("enclave %s: %s", self.info.enclave_id, exc)


class NitroLauncher(EnclaveLauncher):
    """Starts enclaves from ``settings.eif`` with ``nitro-cli``; see the module docstring."""

    def __init__(
        self,
        settings: NitroSettings,
        *,
        kms: KmsProxy,
        configure: Configure,
        family: ChannelFamily | None = None,
        cli: NitroCli | None = None,
        provision: Provider | None = None,
        tap: Tap | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        watch_interval_s: float = WATCH_INTERVAL_S,
        renew: Configure | None = None,
        renew_interval_s: float = RENEW_INTERVAL_S,
    ) -> None:
        """``configure`` returns the ``configure`` frame's fields for a new enclave: the
        built-in key service's ``kms_identity``, or ``aws_kms`` and ``credentials`` (then
        ``renew`` gives fresh ``credentials`` every ``renew_interval_s``).

        ``provision`` is for tests only: a fake ``nitro-cli`` runs the runtime with the
        simulated secure module, which needs its credentials; a real enclave needs none."""
        self.settings = settings
        self._kms = kms
        self._configure = configure
        self._renew = renew
        self._renew_interval = renew_interval_s
        self.family = family or VsockFamily()
        self.cli = cli or NitroCli()
        self._provision = provision
        self._tap = tap
        self._connect_timeout = connect_timeout_s
        self._watch_interval = watch_interval_s
        self._cids: set[int] = set()

    def _take_cid(self) -> int:
        cid = self.settings.first_cid
        while cid in self._cids:
            cid += 1
        self._cids.add(cid)
        return cid

    async def _accept(self, cid: int) -> socket.socket:
        try:
            return await asyncio.wait_for(self.family.accept(cid), self._connect_timeout)
        except TimeoutError:
            raise TransportError(
                f"the enclave (CID {cid}) did not connect its channel within "
                f"{self._connect_timeout:.0f}s"
            ) from None

    async def start(self) -> EnclaveConnection:
        cid = self._take_cid()
        try:
            self.family.prepare(cid)
            info = await self.cli.run_enclave(self.settings, cid)
        except BaseException:
            self.family.forget(cid)
            self._cids.discard(cid)
            raise
        try:
            sock = await self._accept(info.cid)
            connection = await _NitroConnection.over(
                sock, self._kms, None, self._tap, cli=self.cli, info=info
            )
        except BaseException:
            self.family.forget(cid)
            self._cids.discard(cid)
            with contextlib.suppress(NitroError):
                await self.cli.terminate_enclave(info.enclave_id)
            raise
        connection.on_close(lambda: self._cids.discard(cid))
        try:
            await connection.send({**self._configure(), "t": "configure"})
            await connection.start(self._provision() if self._provision else None)
        except (CapeError, TimeoutError) as exc:
            await connection.close()
            if isinstance(exc, TimeoutError):
                raise TransportError("the enclave did not become ready in time") from None
            raise
        connection.watch(self._watch_interval)
        if self._renew is not None:
            connection.renew(self._renew, self._renew_interval)
        log.info("enclave %s started (CID %d)", info.enclave_id, info.cid)
        return connection
