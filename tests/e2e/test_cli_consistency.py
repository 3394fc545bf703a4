"""Every ``cape`` command alike: one JSON document per ``-o json`` whose shape the CLI reference
documents (``cape.cli.shapes``), ``-f`` always ``--file``, flags shown as flags, no server
options on commands that make no request (issue 12, item 10)."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cape.cli.shapes import OBJECTS, SHAPES
from tests.e2e.cli import (
    ECHO_APP,
    PASSWORD,
    Result,
    _env,
    cape,
    new_config,
    ok,
    write_function,
)
from tests.e2e.server import ServeProcess

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = (
    "version",
    "logout",
    "config",
    "pcrs",
    "function create",
    "admin invite create",  # the operator's commands work on the data directory
    "admin invite list",
    "admin invite revoke",
    "enclave build",  # images, key policies and the key log: local files only
    "enclave describe",
    "kms rebind",
    "kms policy",
    "kms log",
)
#: Run (and their JSON checked against SHAPES) in tests/cli/test_enclave_kms.py, which has
#: the enclave images and image-signing keys they need.
SHAPES_CHECKED_ELSEWHERE = ("cape enclave describe", "cape kms rebind", "cape doctor")
# (cape doctor: tests/integration/test_doctor.py, on a fake parent instance)
SERVER_OPTIONS = ("--url", "--token", "--attestation-root", "--ca-file")


def _commands() -> dict[str, Any]:
    """Every runnable ``cape`` command (no groups) by path, from the click tree ``cape`` runs."""
    from cape.cli.app import cli_root

    found: dict[str, Any] = {}

    def walk(command: Any, path: str) -> None:
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                walk(sub, f"{path} {name}")
        else:
            found[path] = command

    walk(cli_root(), "cape")
    return found


def _options(command: Any) -> dict[str, list[str]]:
    return {param.name: list(param.opts) for param in command.params if param.opts}


def check_shape(path: str, document: Any) -> None:
    """``document`` is one of the shapes :data:`SHAPES` documents for command ``path``."""
    assert isinstance(document, dict), (path, document)
    forms = [set(shape) for shape in SHAPES[path]]
    assert set(document) in forms, f"{path}: keys {sorted(document)} not one of {forms}"
    shape = next(s for s in SHAPES[path] if set(s) == set(document))
    for key, meaning in shape.items():
        listed = re.match(r"list of (\w+)", meaning)
        if listed and listed.group(1) in OBJECTS:
            wanted = set(OBJECTS[listed.group(1)])
            for item in document[key]:
                assert set(item) == wanted, f"{path}: {key} item {sorted(item)} != {wanted}"


def test_every_command_has_a_documented_json_shape() -> None:
    commands = _commands()
    with_json = {path for path, cmd in commands.items() if "output" in _options(cmd)}
    with_json.discard("cape serve")
    with_json.discard("cape enclave build")  # its -o is the image file it writes
    assert with_json == set(SHAPES), with_json ^ set(SHAPES)
    from tests.unit.test_docs import generator

    page = generator().cli_markdown()
    section = page[page.index("## JSON output") :]
    for path, forms in SHAPES.items():
        rows = [line for line in section.splitlines() if line.startswith(f"| `{path}` |")]
        for shape in forms:
            assert any(all(f"`{key}`" in row for key in shape) for row in rows), (path, shape)
    for name in OBJECTS:
        assert f"{name}:" in section


def test_every_command_prints_one_documented_json_document(
    server: ServeProcess, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}

    def record(path: str, result: Result) -> Any:
        document = result.json()  # one JSON document: json.loads refuses trailing data
        check_shape(path, document)
        seen[path] = document
        return document

    config = new_config(server, tmp_path / "config")
    username = f"shape{secrets.token_hex(4)}"
    account = ("-u", username, "--password-stdin", "-o", "json")
    record("cape signup", cape(config, "signup", *account, stdin=PASSWORD))
    record("cape login", cape(config, "login", *account, stdin=PASSWORD))
    record("cape version", cape(config, "version", "-o", "json"))
    record("cape key", cape(config, "key", "-o", "json"))
    record("cape pcrs", cape(config, "pcrs", "-o", "json"))
    record("cape config", cape(config, "config", "-o", "json"))
    record("cape config", cape(config, "config", "ca_file", str(server.ca_file), "-o", "json"))
    ok(cape(config, "config", "ca_file", "--unset"))
    folder = write_function(tmp_path / "echo", ECHO_APP)
    deployed = record(
        "cape deploy", cape(config, "deploy", str(folder), "--no-vendor", "-o", "json")
    )
    record("cape run", cape(config, "run", deployed["id"], "hi", "-o", "json"))
    record("cape test", cape(config, "test", str(folder), "hi", "--no-vendor", "-o", "json"))
    listed = record("cape list", cape(config, "list", "-o", "json"))
    assert [row["id"] for row in listed["deployments"]] == [deployed["id"]]
    # The same object, the same keys and values, wherever it is printed.
    row = listed["deployments"][0]
    assert {k: row[k] for k in ("id", "checksum", "public")} == {
        k: deployed[k] for k in ("id", "checksum", "public")
    }
    created = record(
        "cape token create",
        cape(config, "token", "create", "--name", "t", "--function", deployed["id"], "-o", "json"),
    )
    tokens = record("cape token list", cape(config, "token", "list", "-o", "json"))
    assert tokens["count"] == 1 and tokens["tokens"][0]["id"] == created["id"]
    record("cape token delete", cape(config, "token", "delete", created["id"], "-o", "json"))
    record("cape encrypt", cape(config, "encrypt", "secret", "-o", "json"))
    record(
        "cape function create",
        cape(config, "function", "create", "made", "-l", str(tmp_path), "-o", "json"),
    )
    bogus = tmp_path / "document.bin"
    bogus.write_bytes(b"not an attestation document")
    root = server.data_dir / "attestation" / "root.pem"
    verified = cape(config, "attestation", "verify", str(bogus), "--root", str(root), "-o", "json")
    assert verified.returncode == 1
    check_shape("cape attestation verify", json.loads(verified.stdout))
    seen["cape attestation verify"] = True
    data = ("--data-dir", str(server.data_dir))
    made = record(
        "cape admin invite create",
        cape(config, "admin", "invite", "create", *data, "--note", "shape", "-o", "json"),
    )
    invites = record(
        "cape admin invite list", cape(config, "admin", "invite", "list", *data, "-o", "json")
    )
    assert made["invites"][0]["id"] in [item["id"] for item in invites["invites"]]
    assert invites["count"] == len(invites["invites"])
    ok(cape(config, "admin", "invite", "revoke", made["invites"][0]["id"], *data))
    record("cape kms log", cape(config, "kms", "log", *data, "-o", "json"))
    pcr8 = "ab" * 48
    record(
        "cape kms policy",
        cape(config, "kms", "policy", "--aws", "--account", "123456789012", "--pcr8", pcr8),
    )
    seen.update(dict.fromkeys(SHAPES_CHECKED_ELSEWHERE, True))
    record("cape delete", cape(config, "delete", deployed["id"], "-o", "json"))
    record("cape logout", cape(config, "logout", "-o", "json"))
    assert set(seen) == set(SHAPES), set(SHAPES) - set(seen)


def _help(path: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "cape", *path.split()[1:], "-h"],
        capture_output=True,
        text=True,
        env={**_env(Path("/nonexistent")), "COLUMNS": "120"},
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done
    return done.stdout


def test_help_shows_flags_as_flags_and_plain_usage_lines() -> None:
    paths = sorted(_commands())
    with ThreadPoolExecutor(max_workers=4) as pool:
        pages = dict(zip(paths, pool.map(_help, paths), strict=True))
    for path, page in pages.items():
        assert "<bool>" not in page, (path, page)
        assert "[[" not in page, (path, page)


def test_f_is_file_everywhere_and_offline_commands_take_no_server_options() -> None:
    for path, command in _commands().items():
        options = _options(command)
        for names in options.values():
            if "-f" in names:
                assert "--file" in names, (path, names)
        offered = {name for names in options.values() for name in names}
        if path in ("cape serve", "cape kms serve", "cape attestation verify"):
            continue  # the servers themselves; a local check with its own --root
        offline = path.removeprefix("cape ") in OFFLINE
        for name in SERVER_OPTIONS:
            assert (name in offered) is not offline, (path, name)


def test_config_shows_effective_values_and_their_source(
    server: ServeProcess, tmp_path: Path
) -> None:
    config = new_config(server, tmp_path / "config")
    shown = ok(cape(config, "config")).stdout
    assert server.url in shown and "(unset)" not in shown.split("\n", 3)[2], shown
    assert "from the local cape serve" in shown, shown
    as_json = ok(cape(config, "config", "-o", "json")).json()
    assert as_json["settings"]["url"]["value"] == server.url
    ok(cape(config, "config", "url", "https://cape.example:8443"))
    as_json = ok(cape(config, "config", "-o", "json")).json()
    assert as_json["settings"]["url"] == {
        "value": "https://cape.example:8443",
        "source": "presets.json",
    }


def test_serve_logs_no_migration_chatter(server: ServeProcess) -> None:
    assert "alembic" not in server.stderr().lower(), server.stderr()[-3000:]


def test_the_serdio_scaffold_pins_msgpack_exactly(tmp_path: Path) -> None:
    ok(cape(tmp_path / "config", "function", "create", "calc", "-l", str(tmp_path), "--serdio"))
    requirements = (tmp_path / "calc" / "requirements.txt").read_text().splitlines()
    pins = [line for line in requirements if line and not line.startswith("#")]
    assert len(pins) == 1 and re.fullmatch(r"msgpack==\d+\.\d+\.\d+", pins[0]), requirements


@pytest.mark.parametrize("argv", [("token", "create", "--name", "x", "-f", "y")])
def test_token_create_has_no_f_for_function(tmp_path: Path, argv: tuple[str, ...]) -> None:
    result = cape(tmp_path / "config", *argv)
    assert result.returncode == 2 and "-f" in result.stderr, result.describe()
