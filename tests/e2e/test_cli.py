"""The real ``cape`` executable against a live ``cape serve``: every command, its JSON output,
and its failures (one stderr line ``Error: …``, exit 1; usage errors exit 2; no traceback)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import re
import secrets
import shutil
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)

from tests.e2e.cli import (
    ECHO_APP,
    PASSWORD,
    RAISING_APP,
    Account,
    cape,
    cape_into_closed_pipe,
    check_failures,
    closed_port,
    error,
    fails,
    new_config,
    ok,
    parse_deploy,
    signup,
    write_function,
)
from tests.e2e.server import ServeProcess, zip_app

HEX64 = re.compile(r"^[0-9a-f]{64}$")
HEX96 = re.compile(r"^[0-9a-f]{96}$")
ID22 = re.compile(r"^[A-Za-z0-9]{22}$")
WRONG_PCR = "00" * 48


@dataclass(frozen=True)
class Fn:
    id: str
    checksum: str
    name: str
    folder: Path


def _deploy(account: Account, folder: Path, *args: str) -> Fn:
    data = account("deploy", str(folder), "--no-vendor", "-o", "json", *args).json()
    assert set(data) == {"id", "checksum", "name", "public", "vendored"}, data
    assert ID22.fullmatch(data["id"]) and HEX64.fullmatch(data["checksum"])
    return Fn(data["id"], data["checksum"], data["name"], folder)


@pytest.fixture(scope="module")
def account(server: ServeProcess, tmp_path_factory: pytest.TempPathFactory) -> Account:
    return signup(server, tmp_path_factory.mktemp("cli") / "config")


@pytest.fixture(scope="module")
def echo_fn(account: Account, tmp_path_factory: pytest.TempPathFactory) -> Fn:
    return _deploy(account, write_function(tmp_path_factory.mktemp("fn") / "echo", ECHO_APP))


@pytest.fixture(scope="module")
def boom_fn(account: Account, tmp_path_factory: pytest.TempPathFactory) -> Fn:
    return _deploy(account, write_function(tmp_path_factory.mktemp("fn") / "boom", RAISING_APP))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pem_der(pem: str) -> bytes:
    return load_pem_public_key(pem.encode()).public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unknown_id() -> str:
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(22))


def _time(text: Any) -> dt.datetime:
    assert isinstance(text, str), text
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _one_ciphertext(result_stdout: str) -> str:
    lines = result_stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cape:"), result_stdout
    base64.b64decode(lines[0].removeprefix("cape:"), validate=True)
    return lines[0]


# -- local commands --------------------------------------------------------------------------


def test_version_config_and_pcrs(tmp_path: Path) -> None:
    config = tmp_path / "config"
    version = ok(cape(config, "version"))
    assert re.fullmatch(r"\d+\.\d+\S*\n", version.stdout), version.describe()
    as_json = cape(config, "version", "--output", "json").json()
    assert as_json == {"version": version.stdout.strip()}

    listed = ok(cape(config, "config"))
    for name in ("url", "ca_file", "attestation_root"):
        assert name in listed.stdout, listed.describe()
    shown = cape(config, "config", "-o", "json").json()
    assert set(shown["settings"]) == {"url", "ca_file", "attestation_root"}
    assert shown["presets"] == {} and Path(shown["config_dir"]) == config

    url = "https://cape.example:8443"
    ok(cape(config, "config", "url", url))
    presets = config / "presets.json"
    assert presets.stat().st_mode & 0o777 == 0o600
    assert json.loads(presets.read_text()) == {"url": url}
    assert cape(config, "config", "-o", "json").json()["presets"] == {"url": url}
    assert url in ok(cape(config, "config")).stdout
    ok(cape(config, "config", "url", "--unset"))
    assert json.loads(presets.read_text()) == {}
    error(cape(config, "config", "colour", "blue"), "colour", code=2)
    error(cape(config, "config", "url", "http://cape.example"), "https://", code=2)
    error(cape(config, "config", "url"), code=2)  # neither VALUE nor --unset

    pcrs = ok(cape(config, "pcrs"))
    rows = [line.split("\t") for line in pcrs.stdout.splitlines()]
    assert [row[0] for row in rows] == ["PCR0", "PCR1", "PCR2"], pcrs.describe()
    values = {name: value for name, value in rows}
    assert all(HEX96.fullmatch(value) for value in values.values()), values
    assert cape(config, "pcrs", "-o", "json").json() == values


# -- accounts and keys -----------------------------------------------------------------------


def test_signup_login_key_logout(server: ServeProcess, account: Account, tmp_path: Path) -> None:
    assert account.signup_result.json() == {
        "username": account.username,
        "url": server.url,
        "key_cached": True,
    }
    config = new_config(server, tmp_path / "config")
    username = f"acct{secrets.token_hex(4)}"
    signed = ok(cape(config, "signup", "-u", username, "--password-stdin", stdin=PASSWORD + "\n"))
    assert signed.stdout == "" and username in signed.stderr
    key_file = config / "capekey.pub.der"
    assert key_file.stat().st_mode & 0o777 == 0o600
    error(cape(config, "signup", "-u", username, "--password-stdin", stdin=PASSWORD), "409")

    logged = cape(config, "login", "-u", username, "--password-stdin", "-o", "json", stdin=PASSWORD)
    assert logged.json() == {"username": username, "url": server.url, "key_cached": True}
    assert key_file.stat().st_mode & 0o777 == 0o600

    own = ok(cape(config, "key"))
    assert own.stdout.startswith("-----BEGIN PUBLIC KEY-----\n"), own.describe()
    assert own.stdout.endswith("-----END PUBLIC KEY-----\n"), own.describe()
    assert _pem_der(own.stdout) == key_file.read_bytes()
    own_json = cape(config, "key", "-o", "json").json()
    assert set(own_json) == {"username", "pem", "sha256"}
    assert own_json["pem"] == own.stdout and own_json["sha256"] == _sha256(key_file.read_bytes())
    assert own_json["username"] in (None, username)
    refreshed = cape(config, "key", "--refresh", "-o", "json").json()
    assert refreshed["sha256"] == own_json["sha256"]

    # Another user's key, by name: from an attested document, cached under encryption_keys/.
    other = cape(config, "key", "--username", account.username, "-o", "json").json()
    assert other["username"] == account.username
    assert other["sha256"] == _sha256((account.config / "capekey.pub.der").read_bytes())
    assert other["sha256"] != own_json["sha256"]
    cached = config / "encryption_keys" / account.username / "capekey.pub.der"
    assert _sha256(cached.read_bytes()) == other["sha256"]
    error(cape(config, "key", "--username", f"nobody{secrets.token_hex(4)}"), "404")

    empty = ok(cape(config, "list"))
    assert empty.stdout == "" and "No functions deployed." in empty.stderr
    assert cape(config, "list", "-o", "json").json() == {"deployments": [], "count": 0}

    out = cape(config, "logout", "-o", "json").json()
    assert sorted(Path(p).name for p in out["removed"]) == ["auth", "capekey.pub.der"]
    assert not (config / "auth").exists() and not key_file.exists()
    assert "Not logged in" in ok(cape(config, "logout")).stderr
    error(cape(config, "list"), "not logged in")
    error(cape(config, "key"), "not logged in")
    error(cape(config, "login", "-u", username, "--password-stdin", stdin="wrong password"), "401")


def test_trust_root_pinning_for_a_remote_server(server: ServeProcess, tmp_path: Path) -> None:
    """A config dir that knows nothing of the local serve: --url/--ca-file and --trust-root."""
    flags = ("--url", server.url, "--ca-file", str(server.ca_file))
    fingerprint = _sha256(server.root.public_bytes(Encoding.DER))
    username = f"remote{secrets.token_hex(4)}"

    unpinned = tmp_path / "unpinned"
    first = cape(
        unpinned, "signup", "-u", username, "--password-stdin", "-o", "json", *flags, stdin=PASSWORD
    )
    assert first.json() == {"username": username, "url": server.url, "key_cached": False}
    assert fingerprint in first.stderr and not (unpinned / "capekey.pub.der").exists()

    pinned = tmp_path / "pinned"
    login = ("login", "-u", username, "--password-stdin", "-o", "json", *flags)
    error(cape(pinned, *login, "--trust-root", "ab" * 32, stdin=PASSWORD), "fingerprint")
    assert not (pinned / "auth").exists()
    logged = cape(pinned, *login, "--trust-root", fingerprint, stdin=PASSWORD)
    assert logged.json() == {"username": username, "url": server.url, "key_cached": True}
    assert (pinned / "capekey.pub.der").is_file()
    # Later commands use the pinned root without --attestation-root.
    assert cape(pinned, "list", "-o", "json", *flags).json() == {"deployments": [], "count": 0}
    ok(cape(pinned, "key", "--refresh", *flags))


# -- functions -------------------------------------------------------------------------------


def test_deploy_run_test_list_delete(account: Account, tmp_path: Path) -> None:
    folder = write_function(tmp_path / "echoer", ECHO_APP)
    first = parse_deploy(account("deploy", str(folder), "--no-vendor"))
    assert ID22.fullmatch(first["ID"]) and HEX64.fullmatch(first["Checksum"]), first
    assert first["Name"] == f"{account.username}/echoer"
    os.utime(folder / "app.py", (1_000_000_000, 1_000_000_000))  # mtimes are not in the zip
    second = _deploy(account, folder, "--name", "renamed", "--public")
    assert second.checksum == first["Checksum"] and second.id != first["ID"]
    assert second.name == f"{account.username}/renamed"

    assert ok(account("run", first["ID"], "hello there")).stdout_bytes == b"hello there"
    as_json = account("run", first["ID"], "héllo", "-o", "json").json()
    attested = as_json.pop("attestation")
    assert as_json == {"output": "héllo", "output_base64": _b64("héllo".encode())}
    # What the client verified before sending: this function's code, under the local root.
    assert attested["function_checksum"] == first["Checksum"]
    pcrs = account("pcrs", "-o", "json").json()
    assert attested["pcrs"]["0"] == pcrs["PCR0"] and len(attested["root_sha256"]) == 64
    by_name = account("run", second.name, "by name", "--function-checksum", second.checksum)
    assert ok(by_name).stdout_bytes == b"by name"
    binary = tmp_path / "input.bin"
    binary.write_bytes(b"\x00\xff binary")
    from_file = account("run", first["ID"], "-f", str(binary), "-o", "json").json()
    from_file.pop("attestation")
    assert from_file == {"output": None, "output_base64": _b64(b"\x00\xff binary")}
    piped = ok(account("run", first["ID"], "-f", "-", stdin=b"from stdin"))
    assert piped.stdout_bytes == b"from stdin"

    assert ok(account("test", str(folder), "try me", "--no-vendor")).stdout_bytes == b"try me"
    tried = account("test", str(folder), "-f", str(binary), "--no-vendor", "-o", "json").json()
    assert tried == {"output": None, "output_base64": _b64(b"\x00\xff binary")}
    archive = tmp_path / "echo.zip"
    archive.write_bytes(zip_app(ECHO_APP))
    assert ok(account("test", str(archive), "-f", "-", stdin=b"zipped")).stdout_bytes == b"zipped"

    listed = account("list", "-o", "json").json()
    assert listed["count"] == len(listed["deployments"]) >= 2
    rows = {row["id"]: row for row in listed["deployments"]}
    for fn_id, name, public in ((first["ID"], "echoer", False), (second.id, "renamed", True)):
        row = rows[fn_id]
        assert set(row) == {"id", "name", "created_at", "checksum", "public"}, row
        assert row["name"] in (name, f"{account.username}/{name}"), row
        assert row["checksum"] == second.checksum and row["public"] is public
        assert abs(_time(row["created_at"]) - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=5)
    newest = account("list", "--limit", "1", "-o", "json").json()
    assert len(newest["deployments"]) == 1 and newest["deployments"][0]["id"] == second.id
    assert newest["count"] == listed["count"]  # the total, not the page size
    older = account("list", "--limit", "1", "--offset", "1", "-o", "json").json()
    assert [row["id"] for row in older["deployments"]] == [first["ID"]]

    assert account("delete", first["ID"], "-o", "json").json() == {"deleted": first["ID"]}
    error(account("run", first["ID"], "gone"), "404")
    error(account("delete", first["ID"]), "404")
    deleted = ok(account("delete", second.id))
    assert deleted.stdout == "" and second.id in deleted.stderr
    remaining = {row["id"] for row in account("list", "-o", "json").json()["deployments"]}
    assert not remaining & {first["ID"], second.id}


def test_tables_show_whole_ids_when_piped(account: Account, echo_fn: Fn) -> None:
    """The plain tables are what people copy ids from, also when piped (no terminal width)."""
    table = ok(account("list"))
    assert echo_fn.id in table.stdout, table.describe()
    assert echo_fn.checksum[:12] in table.stdout, table.describe()
    name = f"a-token-named-{secrets.token_hex(4)}"
    created = account("token", "create", "--name", name, "-o", "json").json()
    try:
        tokens = ok(account("token", "list"))
        assert created["id"] in tokens.stdout and name in tokens.stdout, tokens.describe()
    finally:
        ok(account("token", "delete", created["id"]))


def test_function_create(account: Account, tmp_path: Path) -> None:
    created = ok(account("function", "create", "greeter", "--location", str(tmp_path)))
    assert created.stdout == ""
    folder = tmp_path / "greeter"
    assert sorted(p.name for p in folder.iterdir()) == ["app.py", "requirements.txt"]
    error(account("function", "create", "greeter", "--location", str(tmp_path)), "exists")
    typed = account("function", "create", "typed", "-l", str(tmp_path), "--serdio", "-o", "json")
    made = typed.json()
    assert made["files"] == ["app.py", "cape_serdio.py", "requirements.txt"]
    assert Path(made["path"]) == tmp_path / "typed"
    assert (tmp_path / "typed" / "cape_serdio.py").is_file()

    tried = ok(account("test", str(folder), "tester", "--no-vendor"))
    assert tried.stdout_bytes == b"hello, tester"
    greeter = _deploy(account, folder)
    assert greeter.name == f"{account.username}/greeter"
    assert ok(account("run", greeter.id, "world")).stdout_bytes == b"hello, world"


# -- encryption ------------------------------------------------------------------------------


def test_encrypt_round_trips(account: Account, echo_fn: Fn, tmp_path: Path) -> None:
    """Every way to encrypt for oneself gives a `cape:` line the owner's enclave decrypts."""
    key_pem = tmp_path / "capekey.pem"
    key_pem.write_text(ok(account("key")).stdout)
    plain_file = tmp_path / "plain.txt"
    plain_file.write_bytes(b"secret from a file")
    cases = {
        b"secret argument": ("secret argument",),
        b"secret from a file": ("-f", str(plain_file)),
        b"secret with --key": ("--key", str(key_pem), "secret with --key"),
        b"secret by name": ("--username", account.username, "secret by name"),
    }
    sealed_file = tmp_path / "sealed.txt"
    for plaintext, args in cases.items():
        ciphertext = _one_ciphertext(ok(account("encrypt", *args)).stdout)
        assert plaintext not in ciphertext.encode()
        ran = ok(account("run", echo_fn.id, ciphertext))
        assert ran.stdout_bytes == plaintext, ran.describe()
    piped = _one_ciphertext(ok(account("encrypt", "-f", "-", stdin=b"secret on stdin")).stdout)
    sealed_file.write_text(piped + "\n")
    ran = ok(account("run", echo_fn.id, "-f", str(sealed_file)))
    assert ran.stdout_bytes == b"secret on stdin"


def test_encrypt_output_option(account: Account, echo_fn: Fn, tmp_path: Path) -> None:
    """`-o json` prints {"ciphertext","form"}; `-o FILE` writes the file (stdout stays empty)."""
    as_json = account("encrypt", "json secret", "-o", "json").json()
    assert as_json["form"] == "text"
    ciphertext = _one_ciphertext(as_json["ciphertext"])
    assert ok(account("run", echo_fn.id, ciphertext)).stdout_bytes == b"json secret"

    text_file = tmp_path / "sealed.txt"
    written = ok(account("encrypt", "file secret", "-o", str(text_file)))
    assert written.stdout == "", written.describe()
    _one_ciphertext(text_file.read_text())
    ran = ok(account("run", echo_fn.id, "-f", str(text_file)))
    assert ran.stdout_bytes == b"file secret"

    stream_file = tmp_path / "sealed.bin"
    streamed = ok(account("encrypt", "--stream", "stream secret", "-o", str(stream_file)))
    assert streamed.stdout == "", streamed.describe()
    assert stream_file.read_bytes().startswith(b"cape-stream-v1:")
    ran = ok(account("run", echo_fn.id, "-f", str(stream_file)))
    assert ran.stdout_bytes == b"stream secret"
    error(account("encrypt", "--stream", "x", "-o", "json"), "-o FILE", code=2)


def test_other_users_keys_and_public_functions(
    server: ServeProcess, account: Account, echo_fn: Fn, tmp_path: Path
) -> None:
    bob = signup(server, tmp_path / "bob", prefix="bob")
    bob_fn = _deploy(bob, write_function(tmp_path / "bobecho", ECHO_APP), "--public")
    assert bob_fn.name == f"{bob.username}/bobecho"
    for_bob = _one_ciphertext(ok(account("encrypt", "--username", bob.username, "for bob")).stdout)
    assert ok(bob("run", bob_fn.id, for_bob)).stdout_bytes == b"for bob"
    # Bob's function is public: the other account runs it by name; the reverse is refused.
    assert ok(account("run", bob_fn.name, "hi bob")).stdout_bytes == b"hi bob"
    error(bob("run", echo_fn.id, "let me in"))


# -- tokens ----------------------------------------------------------------------------------


def test_tokens(account: Account, echo_fn: Fn, boom_fn: Fn) -> None:
    plain = ok(account("token", "create", "--name", "plain-token"))
    assert len(plain.stdout.splitlines()) == 1, plain.describe()
    everything = plain.stdout.strip()
    assert account("list", "-o", "json", "-t", everything).json()["count"] >= 1

    scoped = account(
        "token",
        "create",
        "--name",
        "scoped",
        "--description",
        "echo only",
        "--function",
        echo_fn.id,
        "--expiry",
        "1h",
        "-o",
        "json",
    ).json()
    assert set(scoped) == {"id", "token"} and ID22.fullmatch(scoped["id"]), scoped

    listed = account("token", "list", "-o", "json").json()
    tokens = listed["tokens"]
    assert isinstance(tokens, list) and listed["count"] == len(tokens)
    rows = {row["name"]: row for row in tokens}
    keys = {"id", "name", "description", "created_at", "expires_at", "last_used", "function_id"}
    assert all(set(row) == keys for row in tokens), tokens
    row = rows["scoped"]
    assert row["id"] == scoped["id"] and row["description"] == "echo only"
    assert row["function_id"] == echo_fn.id
    lifetime = _time(row["expires_at"]) - _time(row["created_at"])
    assert dt.timedelta(minutes=59) <= lifetime <= dt.timedelta(minutes=61), row
    assert rows["plain-token"]["function_id"] is None and rows["plain-token"]["expires_at"] is None
    assert rows["plain-token"]["last_used"] is not None  # it listed the functions above

    token = scoped["token"]
    ran = ok(account("run", echo_fn.id, "scoped run", "-t", token))
    assert ran.stdout_bytes == b"scoped run"
    error(account("run", boom_fn.id, "x", "-t", token), "scoped")
    error(account("deploy", str(echo_fn.folder), "--no-vendor", "-t", token), "scoped")

    assert account("token", "delete", scoped["id"], "-o", "json").json() == {
        "deleted": scoped["id"]
    }
    error(account("run", echo_fn.id, "x", "-t", token), "401")
    error(account("token", "delete", scoped["id"]), "404")
    removed = ok(account("token", "delete", rows["plain-token"]["id"]))
    assert removed.stdout == ""
    error(account("list", "-t", everything), "401")
    left = {row["id"] for row in account("token", "list", "-o", "json").json()["tokens"]}
    assert not left & {scoped["id"], rows["plain-token"]["id"]}
    error(account("token", "create", "--name", "later", "--expiry", "soon"), "--expiry", code=2)


def test_a_reader_that_goes_away_is_not_an_error(account: Account) -> None:
    """`cape key | head -1` and the like: a closed stdout is not a bug in cape."""
    for args in (("pcrs",), ("key",), ("list", "-o", "json")):
        result = cape_into_closed_pipe(account.config, *args)
        assert "unexpected" not in result.stderr, result.describe()
        assert "Traceback" not in result.stderr, result.describe()


# -- verification and errors -----------------------------------------------------------------


def test_pcr_pins(account: Account, echo_fn: Fn) -> None:
    """`cape pcrs` predicts what the local (simulated) enclaves measure."""
    pcrs = account("pcrs", "-o", "json").json()
    pins = [arg for i in range(3) for arg in ("--pcr", f"{i}:{pcrs[f'PCR{i}']}")]
    assert ok(account("run", echo_fn.id, "pinned", *pins)).stdout_bytes == b"pinned"
    assert ok(account("key", "--refresh", *pins)).stdout.startswith("-----BEGIN PUBLIC KEY-----")
    wrong = ("--pcr", f"0:{WRONG_PCR}")
    line = error(account("run", echo_fn.id, "x", *wrong), "PCR0", WRONG_PCR)
    assert pcrs["PCR0"] in line  # what the enclave measured
    error(account("key", "--refresh", *wrong), "PCR0")
    error(account("deploy", str(echo_fn.folder), "--no-vendor", *wrong), "PCR0")
    assert (account.config / "capekey.pub.der").is_file()  # a failed refresh keeps the cache


def test_request_errors(account: Account, echo_fn: Fn, boom_fn: Fn) -> None:
    wrong_checksum = _sha256(b"some other code")
    unknown = _unknown_id()
    check_failures(
        account.config,
        # A bad token: refused by the server (401), whichever way the command talks to it.
        fails("run", echo_fn.id, "x", "-t", "garbage", says="401"),
        fails("run", echo_fn.id, "x", "-t", "garbage", "-o", "json", says="401"),
        fails("list", "-t", "garbage", says="401"),
        fails("deploy", str(echo_fn.folder), "--no-vendor", "-t", "garbage", says="401"),
        # The enclave attests other code than the pinned checksum.
        fails(
            "run",
            echo_fn.id,
            "x",
            "--function-checksum",
            wrong_checksum,
            says=("checksum does not match", echo_fn.checksum, wrong_checksum),
        ),
        # Unknown functions, by id and by name.
        fails("run", unknown, "x", says="404"),
        fails("delete", unknown, says="404"),
        fails("run", f"{account.username}/no-such-function", "x", says="404"),
        fails("run", f"nobody{secrets.token_hex(4)}/echo", "x", says="404"),
        fails("run", "not-an-id", "x", says="not-an-id", code=2),
        # The function's own exception, its multi-line message included, in one line.
        fails("run", boom_fn.id, "oops", says=("ValueError", "kaboom oops", "second line")),
        fails("test", str(boom_fn.folder), "oops", "--no-vendor", says="kaboom oops"),
    )


def test_input_and_source_errors(account: Account, echo_fn: Fn, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.txt")
    directory = str(tmp_path)
    no_app = tmp_path / "no_app"
    no_app.mkdir()
    (no_app / "README.md").write_text("no app.py here\n")
    (tmp_path / "empty").mkdir()
    not_zip = tmp_path / "bundle.zip"
    not_zip.write_bytes(b"this is not a zip")
    odd = tmp_path / "app.txt"
    odd.write_text("x")
    folder = str(echo_fn.folder)
    check_failures(
        account.config,
        # Input files that cannot be read.
        fails("run", echo_fn.id, "-f", missing, says=("cannot read", missing)),
        fails("run", echo_fn.id, "-f", directory, says=("cannot read", directory)),
        fails("test", folder, "-f", missing, "--no-vendor", says=("cannot read", missing)),
        fails("encrypt", "-f", missing, says=("cannot read", missing)),
        fails("encrypt", "-f", directory, says=("cannot read", directory)),
        # Function sources that are not functions.
        fails("deploy", str(no_app), "--no-vendor", says="app.py"),
        fails("test", str(no_app), "x", "--no-vendor", says="app.py"),
        fails("deploy", str(tmp_path / "empty"), "--no-vendor"),
        fails("deploy", str(tmp_path / "nowhere"), "--no-vendor", says="does not exist"),
        fails("deploy", str(not_zip), "--no-vendor", says="zip"),
        fails("deploy", str(odd), "--no-vendor", says="zip"),
        # Usage errors exit 2.
        fails("run", echo_fn.id, says="input", code=2),
        fails("test", folder, "--no-vendor", says="input", code=2),
        fails("run", echo_fn.id, "both", "-f", missing, code=2),
        fails("run", echo_fn.id, "x", "--pcr", "0:zz", says="--pcr", code=2),
        fails("run", echo_fn.id, "x", "--function-checksum", "xyz", says="checksum", code=2),
        # Errors found by the argument parser: one line too, with where to look.
        fails("run", says=("Missing argument", "cape run -h"), code=2),
        fails("list", "-o", "xml", says="xml", code=2),
        fails("list", "--limit", "5000", says="--limit", code=2),
        fails("frobnicate", says="frobnicate", code=2),
    )


def test_not_logged_in(server: ServeProcess, echo_fn: Fn, tmp_path: Path) -> None:
    folder = str(echo_fn.folder)
    check_failures(
        new_config(server, tmp_path / "fresh"),  # knows the server, but no login
        fails("list", says="not logged in"),
        fails("run", echo_fn.id, "x", says="not logged in"),
        fails("deploy", folder, "--no-vendor", says="not logged in"),
        fails("encrypt", "x", says="not logged in"),
        fails("key", says="not logged in"),
        fails("token", "list", says="not logged in"),
        fails("delete", echo_fn.id, says="not logged in"),
    )


def test_server_down(server: ServeProcess, account: Account, echo_fn: Fn, tmp_path: Path) -> None:
    down = f"https://127.0.0.1:{closed_port()}"
    flags = ("--url", down, "--ca-file", str(server.ca_file), "-t", account.token)
    root = ("--attestation-root", str(server.data_dir / "attestation" / "root.pem"))
    check_failures(
        account.config,
        fails("list", *flags, says=("cannot reach", down)),
        fails("run", echo_fn.id, "x", *flags, *root, says=("cannot reach", down)),
    )

    # A config whose recorded `cape serve` has gone away.
    stale = tmp_path / "stale"
    shutil.copytree(account.config, stale)
    for name in ("serve.json", "auth"):
        record = json.loads((stale / name).read_text())
        record["url"] = down
        (stale / name).write_text(json.dumps(record))
    check_failures(
        stale,
        fails("list", says="cannot reach"),
        fails("run", echo_fn.id, "x", says="cannot reach"),
        fails("key", "--refresh", says="cannot reach"),
        fails("deploy", str(echo_fn.folder), "--no-vendor", says="cannot reach"),
        fails("token", "list", says="cannot reach"),
        fails(
            "login", "-u", account.username, "--password-stdin", stdin=PASSWORD, says="cannot reach"
        ),
    )
