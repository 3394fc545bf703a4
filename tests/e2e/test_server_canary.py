"""Invariant 1 through the real server: plaintext code, inputs and outputs never reach the host.

A fresh random canary is put in a function's code, in plaintext inputs (HPKE-sealed by the
client), in ``cape:`` inputs (text, binary and stream forms) and, through the function, in
every output; the key, deploy, run (by id and by name) and test flows carry it through a real
``cape serve`` over TLS. Afterwards the canary — raw, hex and base64 at each alignment, as in
``tests/integration/test_canary.py`` — must be absent from:

- every file under the server's data directory (SQLite databases with their WAL files, looked
  at while the server runs and after it stopped; blobs; key documents; the key service);
- on a node storing into PostgreSQL and S3 (subprocess variant), every row of its database
  and every object in its bucket, while it runs and after it stopped;
- the server's logs (its stdout and stderr; in the in-process variant every log record at
  DEBUG, and everything written to file descriptors 1 and 2, enclaves' stderr included);
- the server's traffic (in-process variant): every enclave channel frame (``ServeConfig.tap``)
  and every HTTP body and websocket message the API application received or sent
  (``ServeConfig.wrap_app``);
- the server process's writable memory (subprocess variant, read through /proc).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import logging
import re
import secrets
import ssl
import threading
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

import pytest
from cryptography import x509
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cape.crypto import envelope, stream
from cape.errors import FunctionError
from cape.platform.serve import ServeConfig, Server
from cape.sdk import flows as sdk
from cape.sdk.flows import Deployed, deploy, fetch_key, run_path
from cape.sdk.rest import RestClient
from cape.sdk.session import Session, SessionOptions
from tests.e2e.conftest import cluster_env, requires_enclaves
from tests.e2e.server import ServeProcess
from tests.e2e.test_crash import deploy_one_frame
from tests.integration.test_canary import forms
from tests.services import MotoS3, Postgres

pytestmark = requires_enclaves

PASSWORD: Final = "correct horse battery"
START_TIMEOUT_S: Final = 90.0
LOGGERS: Final = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def canary_bundle(canary: bytes) -> bytes:
    """A zip whose app.py holds the canary. Stored, not deflated: a leaked plaintext bundle
    then shows the canary as it is, so the search would find it."""
    code = (
        b"SECRET = %r\n"
        b"def cape_handler(data):\n"
        b"    if data.startswith(b'raise:'):\n"
        b"        raise ValueError(data)\n"
        b"    return SECRET + b'|' + data\n" % canary
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("app.py", code)
    bundle = buffer.getvalue()
    assert canary in bundle
    return bundle


def findings(sources: Iterable[tuple[str, bytes]], canary: bytes) -> list[str]:
    """Where any form of ``canary`` occurs (empty when it occurs nowhere)."""
    needles = forms(canary)
    return [
        f"{where}: form {index}"
        for where, data in sources
        for index, needle in enumerate(needles)
        if needle in data
    ]


def files_under(root: Path) -> Iterator[tuple[str, bytes]]:
    """Every regular file under ``root`` (a WAL file may vanish while we walk)."""
    for path in sorted(root.rglob("*")):
        try:
            if path.is_file():
                yield str(path), path.read_bytes()
        except FileNotFoundError:
            continue


def writable_memory(pid: int) -> Iterator[tuple[str, bytes]]:
    """Every readable, writable mapping of process ``pid``: heap, anonymous maps, stacks."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            fields = line.split()
            if not fields[1].startswith("rw"):
                continue
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except OSError:
                continue
            yield f"memory {line.strip()}", data


async def carry_canary(
    url: str, options: SessionOptions, ssl_context: ssl.SSLContext, canary: bytes
) -> tuple[list[bytes], Deployed]:
    """signup, key, deploy (chunked and in one frame), run by id and by name, test: every
    output, and the chunked deploy."""
    username = f"canary{secrets.token_hex(4)}"
    with RestClient(url, ssl_context) as rest:
        token = rest.signup(username, PASSWORD)["access_token"]
    key = await fetch_key(url, token, options)
    bundle = canary_bundle(canary)
    deployed = await deploy(url, token, options, bundle, name="canary", key=key)
    inputs = [
        canary,  # plaintext, HPKE-sealed by the client
        envelope.encrypt_text(canary, key).encode(),  # cape: text form
        envelope.encrypt(canary, key),  # cape: binary form
        stream.encrypt_stream_bytes(canary * 1000, key, chunk_size=1024),  # stream form
    ]
    outputs: list[bytes] = []
    checked = dataclasses.replace(options, function_checksum=deployed.checksum)
    session = await Session.open(url, run_path(deployed.id), token, checked)
    try:
        for data in inputs:
            outputs.append(await session.invoke(data))
        # A function error quoting its input: sealed to the client like a result.
        with pytest.raises(FunctionError) as raised:
            await session.invoke(b"raise:" + canary)
        assert canary.decode() in str(raised.value)
    finally:
        await session.close()
    session = await Session.open(url, run_path(f"{username}/canary"), token, options)
    try:
        outputs.append(await session.invoke(canary))
    finally:
        await session.close()
    outputs += await sdk.test(url, token, options, bundle, inputs[:2])
    # Cape's own deploy (one binary frame, the server relays it whole) and a run of it.
    single = await deploy_one_frame(url, token, options, bundle, "canary1", key)
    session = await Session.open(url, run_path(single.id), token, options)
    try:
        outputs.append(await session.invoke(canary))
    finally:
        await session.close()
    with RestClient(url, ssl_context, token) as rest:
        listed = rest.request("GET", "/v1/functions")
    assert {f["id"] for f in listed} == {deployed.id, single.id}
    return outputs, deployed


def check_outputs(outputs: list[bytes], canary: bytes) -> None:
    """The flows really carried the canary end to end, in and out."""
    expected = [canary, canary, canary, canary * 1000, canary, canary, canary, canary]
    for output, data in zip(outputs, expected, strict=True):
        assert output == canary + b"|" + data


# --------------------------------------------------------------------------- the search itself


def test_the_search_finds_every_form(tmp_path: Path) -> None:
    """The search this module relies on finds a planted canary in each form it claims to."""
    canary = b"CANARY-" + secrets.token_hex(12).encode()
    other = b"CANARY-" + secrets.token_hex(12).encode()
    planted = {
        "raw": b"x" + canary + b"y",
        "hex": b"id=" + canary.hex().encode() + b";",
        "sqlite-ish": b"\x00\x01" + canary + b"\x00",
    }
    for shift in range(3):  # inside a longer base64 text, at each alignment
        planted[f"b64-{shift}"] = b'{"m":"' + base64.b64encode(b"q" * shift + canary) + b'"}'
        planted[f"b64-tail-{shift}"] = base64.b64encode(b"\x07" * shift + canary + b"\x00" * 5)
    for name, data in planted.items():
        (tmp_path / "nested").mkdir(exist_ok=True)
        (tmp_path / "nested" / name).write_bytes(data)
    (tmp_path / "clean").write_bytes(other + other.hex().encode() + base64.b64encode(other))
    found = findings(files_under(tmp_path), canary)
    for name in planted:
        assert any(f"/nested/{name}:" in hit for hit in found), (name, found)
    assert not any("/clean:" in hit for hit in found)


# --------------------------------------------------------------------------- in-process server


class Recorder:
    """An ASGI middleware recording what the API application receives and sends."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[bytes] = []
        self.sent: list[bytes] = []
        self.kinds: set[str] = set()

    def _record(self, into: list[bytes], message: Message) -> None:
        parts: list[bytes] = []
        for name in ("bytes", "text", "body", "reason"):
            value = message.get(name)
            if isinstance(value, str):
                value = value.encode()
            if value:
                parts.append(value)
        for header, value in message.get("headers") or ():
            parts.append(bytes(header) + b": " + bytes(value))
        with self.lock:
            self.kinds.add(str(message["type"]))
            into.extend(parts)

    def wrap(self, app: ASGIApp) -> ASGIApp:
        async def recorded(scope: Scope, receive: Receive, send: Send) -> None:
            request = [scope.get("path", "").encode(), scope.get("query_string", b"")]
            request += [bytes(k) + b": " + bytes(v) for k, v in scope.get("headers") or ()]
            with self.lock:
                self.received.extend(request)

            async def receive_recorded() -> Message:
                message = await receive()
                self._record(self.received, message)
                return message

            async def send_recorded(message: Message) -> None:
                self._record(self.sent, message)
                await send(message)

            await app(scope, receive_recorded, send_recorded)

        return recorded


class Records(logging.Handler):
    """Every log record, formatted with its arguments and any traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class InProcess:
    """``Server.running()`` on its own event loop in a thread."""

    def __init__(self, config: ServeConfig) -> None:
        self.server = Server(config)
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._thread, name="cape-serve")

    def _thread(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.error = exc
        finally:
            self.ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        async with self.server.running():
            self.ready.set()
            await self.server.wait()

    def __enter__(self) -> Server:
        self.thread.start()
        self.ready.wait(START_TIMEOUT_S)
        if self.error is not None or not self.server.url:
            self.stop()
            raise RuntimeError("the in-process server did not start") from self.error
        return self.server

    def stop(self) -> None:
        if self.loop is not None and self.thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop already closed
                self.loop.call_soon_threadsafe(self.server.request_shutdown)
        self.thread.join(60)
        assert not self.thread.is_alive(), "the in-process server did not stop"

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        if self.error is not None:
            raise self.error


def test_canary_never_reaches_the_server_in_process(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    canary = b"CANARY-" + secrets.token_hex(12).encode()
    frames: list[bytes] = []
    recorder = Recorder()
    records = Records()
    data_dir = tmp_path / "data"
    config = ServeConfig(
        data_dir=data_dir,
        port=0,
        config_dir=tmp_path / "config",
        record_for_cli=False,
        log_level="debug",
        tap=lambda _direction, frame: frames.append(frame),
        wrap_app=recorder.wrap,
    )
    saved = {name: logging.getLogger(name).level for name in LOGGERS}
    root = logging.getLogger()
    root.addHandler(records)
    root.setLevel(logging.DEBUG)
    try:
        with InProcess(config) as server:
            options = SessionOptions(
                root=x509.load_pem_x509_certificate(server.root_file.read_bytes()),
                ssl_context=ssl.create_default_context(cafile=str(server.ca_file)),
            )
            outputs, deployed = asyncio.run(
                carry_canary(server.url, options, options.ssl_context, canary)
            )
            while_running = [f"(running) {hit}" for hit in findings(files_under(data_dir), canary)]
            wal_seen = [p.name for p in data_dir.rglob("*-wal")]
    finally:
        root.removeHandler(records)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
    captured = capfd.readouterr()
    check_outputs(outputs, canary)

    # Each place searched really holds what passed through the server.
    assert any(p.name == "kms.sqlite3" for p in data_dir.rglob("*"))
    assert (data_dir / "metadata.sqlite3").exists() and wal_seen, wal_seen
    assert any(deployed.id in line for line in records.lines), "no log record was captured"
    assert any(line.startswith("uvicorn") for line in records.lines)
    assert len(frames) > 20
    assert any(len(frame) > 1000 for frame in frames)
    assert {"websocket.receive", "websocket.send", "http.request", "http.response.body"} <= (
        recorder.kinds
    ), recorder.kinds
    assert any(deployed.id.encode() in message for message in recorder.sent)
    assert any(len(message) > 1000 for message in recorder.received)

    sources: list[tuple[str, bytes]] = [
        *files_under(data_dir),
        ("log records", "\n".join(records.lines).encode()),
        ("stdout", captured.out.encode()),
        ("stderr", captured.err.encode()),
        *((f"channel frame {i}", frame) for i, frame in enumerate(frames)),
        *((f"received {i}", message) for i, message in enumerate(recorder.received)),
        *((f"sent {i}", message) for i, message in enumerate(recorder.sent)),
    ]
    leaks = while_running + findings(sources, canary)
    assert not leaks, leaks


# --------------------------------------------------------------------------- cape serve process


@pytest.mark.parametrize("backend", ["local", "postgres_s3"])
def test_canary_never_reaches_the_server_process(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """On the embedded node, and on one storing into PostgreSQL and S3: there every row of its
    database (``pg_dump``) and every object of its bucket are searched too."""
    canary = b"CANARY-" + secrets.token_hex(12).encode()
    planted = "PLANTED-" + secrets.token_hex(12)
    env = {"CAPE_TEST_PLANTED": planted}
    if backend == "postgres_s3":
        env |= cluster_env(request.getfixturevalue("postgres"), request.getfixturevalue("moto_s3"))

    def shared_stores() -> list[tuple[str, bytes]]:
        """Every row of the node's PostgreSQL database and every object of its bucket."""
        if backend != "postgres_s3":
            return []
        postgres: Postgres = request.getfixturevalue("postgres")
        moto_s3: MotoS3 = request.getfixturevalue("moto_s3")
        bucket = env["CAPE_BLOB_STORE"].removeprefix("s3://").split("/")[0]
        return [
            ("database dump", postgres.dump(env["CAPE_DATABASE_URL"])),
            *((f"object {name}", data) for name, data in moto_s3.objects(bucket)),
        ]

    process = ServeProcess(
        tmp_path / "data", tmp_path / "config", tmp_path / "logs", env=env
    ).start()
    try:
        outputs, deployed = asyncio.run(
            carry_canary(process.url, process.options(), process.ssl_context(), canary)
        )
        assert process.process is not None
        memory = list(writable_memory(process.process.pid))
        while_running = [
            f"(running) {hit}"
            for hit in findings([*files_under(process.data_dir), *shared_stores()], canary)
        ]
    finally:
        code = process.stop()
    assert code == 0, process.stderr()[-3000:]
    check_outputs(outputs, canary)
    shared = shared_stores()
    if backend == "postgres_s3":  # the node really stored there, and only there
        assert not (process.data_dir / "metadata.sqlite3").exists()
        assert not (process.data_dir / "blobs").exists()
        assert deployed.id.encode() in shared[0][1]
        assert len(shared) == 1 + 2  # the dump and the two deploys' blobs
    # The memory reader sees the server's memory: its environment, and in its heap the id
    # it made for the deploy; the logs are the server's.
    assert findings(memory, planted.encode()), "the memory scan read nothing useful"
    heap = [(where, data) for where, data in memory if "[stack]" not in where]
    assert findings(heap, deployed.id.encode()), "the memory scan missed the server's heap"
    assert re.search(rf"deployed function {deployed.id}", process.stderr())
    assert "Ready: " in process.stdout()

    sources = [
        *files_under(process.data_dir),
        *shared,
        ("stdout", process.stdout().encode()),
        ("stderr", process.stderr().encode()),
        *memory,
    ]
    leaks = while_running + findings(sources, canary)
    assert not leaks, leaks
