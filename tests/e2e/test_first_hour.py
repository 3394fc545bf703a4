"""Issue 12, "the first hour": what a new user tripped over, through the real ``cape`` executable
against live ``cape serve`` processes (one test per item, numbered as in the issue)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.client import ClientProtocol
from websockets.uri import parse_uri

from tests.e2e.cli import (
    ECHO_APP,
    PASSWORD,
    Account,
    _env,
    cape,
    closed_port,
    error,
    new_config,
    ok,
    signup,
    write_function,
)
from tests.e2e.conftest import requires_enclaves
from tests.e2e.server import ServeProcess

ROOT = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _deploy(account: Account, folder: Path, *args: str) -> dict[str, str]:
    data: dict[str, str] = account("deploy", str(folder), "--no-vendor", "-o", "json", *args).json()
    return data


@pytest.fixture(scope="module")
def account(server: ServeProcess, tmp_path_factory: pytest.TempPathFactory) -> Account:
    return signup(server, tmp_path_factory.mktemp("first-hour") / "config", prefix="fh")


@pytest.fixture(scope="module")
def echo(account: Account, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return _deploy(account, write_function(tmp_path_factory.mktemp("fn") / "echo", ECHO_APP))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """A second server whose input limit is 1 MiB (so that limits are cheap to reach)."""
    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        pytest.skip("simulated enclaves need root (namespaces) and bubblewrap")
    base = tmp_path_factory.mktemp("small")
    process = ServeProcess(
        base / "data",
        base / "config",
        base / "logs",
        enclaves=1,
        extra_args=["--max-input-mib", "1"],
    ).start()
    try:
        yield process
    finally:
        if process.process is not None and process.process.poll() is None:
            assert process.stop() == 0, process.stderr()[-3000:]


# -- 1. cape encrypt writes what cape run can send --------------------------------------------


def test_1_encrypt_picks_the_form_by_output_size_and_limit_errors_say_what_to_do(
    small: ServeProcess, tmp_path: Path
) -> None:
    user = signup(small, tmp_path / "config", prefix="big")
    folder = write_function(tmp_path / "echo", ECHO_APP)
    fn = _deploy(user, folder)["id"]
    # 900 KB: under the 1 MiB limit as it is, over it as text (a third larger).
    data = os.urandom(900_000)
    plain = tmp_path / "input.bin"
    plain.write_bytes(data)
    sealed = tmp_path / "input.cape"
    written = ok(user("encrypt", "-f", str(plain), "-o", str(sealed)))
    assert "streaming form" in written.stderr, written.describe()
    assert sealed.read_bytes().startswith(b"cape-stream-v1:")
    assert sealed.stat().st_size <= 1 << 20
    assert ok(user("run", fn, "-f", str(sealed))).stdout_bytes == data
    # To stdout as well (the README's `cape encrypt … > file`).
    piped = ok(user("encrypt", "-f", str(plain)))
    assert piped.stdout_bytes.startswith(b"cape-stream-v1:")
    # A small input stays in the text form.
    assert ok(user("encrypt", "small")).stdout.startswith("cape:")

    # Over the limit in any form: encrypt says so; run's refusal says what to do.
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom((1 << 20) + 10))
    noted = ok(user("encrypt", "-f", str(big), "-o", str(tmp_path / "big.cape")))
    assert "--max-input-mib" in noted.stderr, noted.describe()
    line = error(user("run", fn, "-f", str(big)), "exceeds the limit", "--max-input-mib")
    assert "--stream" in line
    # --key with no server to ask: the default limit (64 MiB) decides, offline.
    key = tmp_path / "key.pem"
    key.write_text(ok(user("key")).stdout)
    offline = tmp_path / "offline"
    offline.mkdir()
    text = ok(cape(offline, "encrypt", "--key", str(key), "-f", str(plain)))
    assert text.stdout.startswith("cape:")


# -- 2. cape serve checks isolation at start ---------------------------------------------------


def _path_without_bwrap(tmp_path: Path) -> str:
    """This machine's PATH, as one folder of links, without bubblewrap: the simulated missing
    install (the enclaves still find unshare, mount and the rest)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not folder or not Path(folder).is_dir():
            continue
        for entry in Path(folder).iterdir():
            target = bin_dir / entry.name
            if entry.name != "bwrap" and not target.exists() and not target.is_symlink():
                target.symlink_to(entry)
    assert shutil.which("bwrap", path=str(bin_dir)) is None
    return str(bin_dir)


def test_2_serve_refuses_to_start_without_isolation(server: ServeProcess, tmp_path: Path) -> None:
    env = {**_env(tmp_path / "config"), "PATH": _path_without_bwrap(tmp_path)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cape",
            "serve",
            "--data-dir",
            str(tmp_path / "data"),
            "--port",
            "0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done
    assert "Ready" not in done.stdout, done.stdout
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    for needle in ("bubblewrap", "apt-get install bubblewrap", "--no-run"):
        assert needle in lines[0], lines[0]


def test_2_serve_no_run_starts_for_keys_and_deploys(server: ServeProcess, tmp_path: Path) -> None:
    keys_only = ServeProcess(
        tmp_path / "data",
        tmp_path / "config",
        tmp_path / "logs",
        enclaves=1,
        extra_args=["--no-run"],
        env={"PATH": _path_without_bwrap(tmp_path)},
    ).start()
    try:
        assert "NOT RUNNABLE" in keys_only.stdout() and "bubblewrap" in keys_only.stdout()
        user = signup(keys_only, tmp_path / "user")
        assert ok(user("key")).stdout.startswith("-----BEGIN PUBLIC KEY-----")
        fn = _deploy(user, write_function(tmp_path / "echo", ECHO_APP))
        error(user("run", fn["id"], "x"), "bubblewrap")
    finally:
        code = keys_only.stop()
    assert code == 0, keys_only.stderr()[-3000:]


# -- 3. one server per data directory ----------------------------------------------------------


def test_3_a_second_serve_on_the_same_data_directory_is_one_clear_error(
    small: ServeProcess,
) -> None:
    assert small.process is not None
    done = subprocess.run(
        [sys.executable, "-m", "cape", "serve", "--data-dir", str(small.data_dir), "--port", "0"],
        env=_env(small.config_dir),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1 and "Ready" not in done.stdout, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    assert str(small.process.pid) in lines[0] and small.url in lines[0], lines[0]
    # The first server's record is untouched and it still serves.
    assert json.loads((small.config_dir / "serve.json").read_text())["url"] == small.url
    ok(cape(small.config_dir, "version"))


# -- 4. clean shutdown ---------------------------------------------------------------------------


def _open_websocket(url: str, ca_file: Path, path: str, token: str) -> ssl.SSLSocket:
    """A raw TLS websocket to ``path`` (handshake done), for misbehaving on purpose."""
    uri = parse_uri(url.replace("https://", "wss://") + path)
    raw = socket.create_connection((uri.host, uri.port), timeout=30)
    tls = ssl.create_default_context(cafile=str(ca_file)).wrap_socket(raw, server_hostname=uri.host)
    protocol = ClientProtocol(uri, subprotocols=["cape.runtime", token])  # type: ignore[list-item]
    protocol.send_request(protocol.connect())
    tls.sendall(b"".join(protocol.data_to_send()))
    while protocol.handshake_exc is None and not protocol.events_received():
        chunk = tls.recv(65536)
        assert chunk, "the server closed during the handshake"
        protocol.receive_data(chunk)
        if protocol.state.name == "OPEN":
            break
    assert protocol.state.name == "OPEN", protocol.handshake_exc
    protocol.send_close(1000)
    tls.sendall(b"".join(protocol.data_to_send()))
    return tls  # never read again: the server's TLS shutdown stays in flight


@requires_enclaves
def test_4a_sigterm_while_a_peer_is_closing_exits_cleanly(tmp_path: Path) -> None:
    served = ServeProcess(tmp_path / "data", tmp_path / "config", tmp_path / "logs", enclaves=1)
    served.start()
    try:
        user = signup(served, tmp_path / "user")
        sockets = [
            _open_websocket(served.url, served.ca_file, "/v1/key", user.token) for _ in range(3)
        ]
        time.sleep(1)  # the server has read the close frames and is closing those transports
        code = served.stop()
        for sock in sockets:
            sock.close()
    finally:
        served.kill()
    log = served.stderr()
    assert code == 0, log[-3000:]
    assert "Traceback" not in log and "InvalidState" not in log, log[-3000:]


@contextlib.contextmanager
def _busy_cpus() -> Iterator[None]:
    """Every CPU busy (two spinning processes per CPU) while the block runs."""
    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(2 * (os.cpu_count() or 1))
    ]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def _enclave_dirs(pid: int) -> list[Path]:
    return list(Path("/tmp").glob(f"cape-enclave-p{pid}-*"))


@requires_enclaves
def test_4b_signalling_the_process_group_drains_without_restarts_under_load(
    tmp_path: Path,
) -> None:
    served = ServeProcess(
        tmp_path / "data", tmp_path / "config", tmp_path / "logs", enclaves=2, new_session=True
    )
    served.start()
    assert served.process is not None
    pid = served.process.pid
    try:
        user = signup(served, tmp_path / "user")
        fn = _deploy(user, write_function(tmp_path / "echo", ECHO_APP))["id"]
        assert ok(user("run", fn, "warm")).stdout_bytes == b"warm"
        assert _enclave_dirs(pid)
        with _busy_cpus():
            os.killpg(pid, signal.SIGTERM)  # as systemd and `timeout` do
            code = served.process.wait(120)
    finally:
        served.kill()
    log = served.stderr()
    assert code == 0, log[-3000:]
    for needle in ("starting a new one", "Traceback", "never retrieved", "ERROR"):
        assert needle not in log, log[-3000:]
    assert not _enclave_dirs(pid), _enclave_dirs(pid)


# -- 5. cape run writes results byte-exact -------------------------------------------------------


def test_5_run_output_is_byte_exact_into_files_and_pipes(
    account: Account, echo: dict[str, str], tmp_path: Path
) -> None:
    binary = bytes(range(256)) * 4
    source = tmp_path / "in.bin"
    source.write_bytes(binary)
    assert ok(account("run", echo["id"], "-f", str(source))).stdout_bytes == binary
    assert ok(account("run", echo["id"], "text")).stdout_bytes == b"text"
    # On a terminal, text still ends with a newline (so the prompt starts on its own line).
    shown = _in_terminal(account.config, "run", echo["id"], "on a terminal")
    assert shown.replace("\r\n", "\n").endswith("on a terminal\n"), repr(shown)


# -- 6. the fingerprint as printed -----------------------------------------------------------------


def test_6_trust_root_accepts_the_printed_fingerprint(server: ServeProcess, tmp_path: Path) -> None:
    printed = re.search(r"Root fingerprint:\s+(sha256:[0-9a-f]{64})", server.stdout())
    assert printed is not None, server.stdout()
    hex_digits = printed.group(1).removeprefix("sha256:")
    colons = "SHA256:" + ":".join(hex_digits[i : i + 2] for i in range(0, 64, 2)).upper()
    username = signup(server, tmp_path / "owner").username
    for number, form in enumerate((printed.group(1), colons, hex_digits.upper())):
        config = new_config(server, tmp_path / f"c{number}")
        result = ok(
            cape(
                config,
                "login",
                "-u",
                username,
                "--password-stdin",
                "--trust-root",
                form,
                stdin=PASSWORD,
            )
        )
        assert "Pinned the attestation root" in result.stderr, result.describe()
    bad = cape(
        new_config(server, tmp_path / "bad"),
        "login",
        "-u",
        username,
        "--password-stdin",
        "--trust-root",
        "sha256:12zz",
        stdin=PASSWORD,
    )
    error(bad, "--trust-root", "not a SHA-256 fingerprint", code=2)

    from cape.sdk.client import Cape

    sdk = Cape(server.url, ca_file=server.ca_file)
    os.environ["CAPE_CONFIG_DIR"] = str(tmp_path / "sdk")
    try:
        assert sdk.trust_root(colons).subject == server.root.subject
    finally:
        del os.environ["CAPE_CONFIG_DIR"]


# -- 7. logins and URLs ----------------------------------------------------------------------------


def test_7_logins_follow_localhost_and_a_restarted_server_and_errors_name_urls(
    server: ServeProcess, small: ServeProcess, tmp_path: Path
) -> None:
    user = signup(server, tmp_path / "config")
    localhost = server.url.replace("127.0.0.1", "localhost")
    assert ok(user("list", "--url", localhost, "-o", "json")).json()["count"] == 0

    # A login at another server: the error names the URL and the login that exists.
    other = ("--url", small.url, "--ca-file", str(small.ca_file))
    line = error(user("list", *other), "not logged in at " + small.url)
    assert user.username in line and server.url in line
    # An unreachable server is reported as such, login or not.
    down = f"https://127.0.0.1:{closed_port()}"
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    error(cape(fresh, "list", "--url", down), "cannot reach", down)
    error(user("list", "--url", down), "cannot reach", down)


@requires_enclaves
def test_7_a_login_follows_the_local_server_to_its_new_port(tmp_path: Path) -> None:
    served = ServeProcess(tmp_path / "data", tmp_path / "config", tmp_path / "logs", enclaves=1)
    served.start()
    try:
        user = signup(served, tmp_path / "user")
        assert served.stop() == 0
        served.start()  # --port 0: a new port
        new_config_dir = user.config
        shutil.copy(served.config_dir / "serve.json", new_config_dir / "serve.json")
        listed = ok(cape(new_config_dir, "list", "-o", "json")).json()
        assert listed["count"] == 0
        shown = ok(cape(new_config_dir, "config", "-o", "json")).json()
        assert shown["settings"]["url"] == {
            "value": served.url,
            "source": "the local cape serve (serve.json)",
        }
        assert shown["login"]["valid_for_url"] is True
    finally:
        if served.process is not None and served.process.poll() is None:
            served.stop()


# -- 8. tables on an 80-column terminal --------------------------------------------------------


def _in_terminal(config: Path, *args: str, columns: int = 80) -> str:
    """``cape ARGS`` with stdout on a pseudo-terminal ``columns`` wide; what it showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {**_env(config), "COLUMNS": str(columns), "NO_COLOR": "1", "TERM": "xterm"}
    process = subprocess.Popen(
        [sys.executable, "-m", "cape", *args],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert process.stderr is not None
    with process.stderr:
        stderr = process.stderr.read().decode()
    assert process.wait(120) == 0, stderr
    return ANSI.sub("", b"".join(chunks).decode())


def test_8_tables_keep_ids_and_names_whole_at_80_columns(
    server: ServeProcess, account: Account, echo: dict[str, str], tmp_path: Path
) -> None:
    long_name = "a-rather-long-function-name-to-copy"
    fn = _deploy(account, write_function(tmp_path / "f", ECHO_APP), "--name", long_name)
    shown = _in_terminal(account.config, "list")
    lines = shown.splitlines()
    for needle in (fn["id"], long_name, echo["id"]):
        assert any(needle in line for line in lines), shown
    assert "…" not in shown, shown

    token = account(
        "token", "create", "--name", "a-long-token-name-for-the-ci", "-d", "x" * 40, "-o", "json"
    ).json()
    shown = _in_terminal(account.config, "token", "list")
    assert any(token["id"] in line for line in shown.splitlines()), shown
    assert any("a-long-token-name-for-the-ci" in line for line in shown.splitlines()), shown
    assert "…" not in shown, shown
    assert all(len(line) <= 80 for line in shown.splitlines()), shown

    # The operator's table too: invite ids are what `cape admin invite revoke` takes.
    data = ("--data-dir", str(server.data_dir))
    made = ok(
        cape(account.config, "admin", "invite", "create", *data, "-n", "n" * 30, "-o", "json")
    )
    invite_id = made.json()["invites"][0]["id"]
    shown = _in_terminal(account.config, "admin", "invite", "list", *data)
    assert any(invite_id in line for line in shown.splitlines()), shown
    assert "…" not in shown, shown
    assert all(len(line) <= 80 for line in shown.splitlines()), shown
    ok(cape(account.config, "admin", "invite", "revoke", invite_id, *data))


# -- 9. messages that leave users stuck ---------------------------------------------------------


MISSING_MODULE_APP = """import cape_first_hour_missing_module


def cape_handler(input: bytes) -> bytes:
    return input
"""


def test_9_stuck_messages_say_what_to_do(
    server: ServeProcess, account: Account, tmp_path: Path
) -> None:
    # TLS verification: the server's own CA is not trusted without --ca-file.
    bare = tmp_path / "bare"
    bare.mkdir()
    line = error(cape(bare, "list", "--url", server.url, "-t", account.token), "certificate")
    assert "--ca-file" in line and "cape config ca_file" in line, line

    folder = write_function(tmp_path / "needs", MISSING_MODULE_APP)
    line = error(account("test", str(folder), "x", "--no-vendor"), "cape_first_hour_missing_module")
    assert "requirements.txt" in line, line

    for args in (("list",), ("token", "list"), ("version",), ("encrypt", "x")):
        line = error(cape(bare, *args, "-o", "yaml"), "yaml", code=2)
        assert "Value error" not in line, line


def test_9_the_sync_client_works_in_a_running_event_loop(
    server: ServeProcess, account: Account, echo: dict[str, str]
) -> None:
    from cape.sdk.client import Cape

    cape_client = Cape(
        server.url,
        token=account.token,
        ca_file=server.ca_file,
        attestation_root=server.data_dir / "attestation" / "root.pem",
    )

    def notebook_cell() -> object:  # plain code, as a Jupyter cell runs it
        return cape_client.run(echo["id"], None, b"in a notebook")

    async def kernel() -> object:  # a running loop in this thread, as in Jupyter
        return notebook_cell()

    assert asyncio.run(kernel()) == b"in a notebook"

    async def coroutine() -> object:  # pycape's callers await it in async code
        return await cape_client.run(echo["id"], None, b"awaited")

    assert asyncio.run(coroutine()) == b"awaited"


# -- 11. the banner stays true to the docs ---------------------------------------------------


def test_11_the_banner_says_what_the_docs_say(server: ServeProcess) -> None:
    out = server.stdout()
    banner = " ".join(out[: out.index("TLS CA:")].split())
    assert "deploy on AWS Nitro Enclaves for real" not in banner
    cited = re.search(r"Use it to develop and test\. (.*?) See (docs/[\w/-]+\.md)\.", banner)
    assert cited is not None, banner
    claim, page = cited.groups()
    assert claim and claim in " ".join((ROOT / page).read_text().split()), (claim, page)
