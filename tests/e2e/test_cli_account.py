"""`cape signup/login --username U --password-stdin` against a live `cape serve`."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from tests.e2e.server import ServeProcess


def _cape(args: list[str], stdin: str, config_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CAPE_CONFIG_DIR": str(config_dir)}
    for name in ("CAPE_ENCLAVE_HOST", "CAPE_CA_FILE", "CAPE_TOKEN"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-c", "from cape.cli.app import main; main()", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_signup_and_login_use_the_recorded_local_server(
    server: ServeProcess, tmp_path: Path
) -> None:
    config = tmp_path / "config"
    config.mkdir()
    shutil.copy(server.config_dir / "serve.json", config / "serve.json")  # as `cape serve` left it
    username = f"cli{secrets.token_hex(4)}"
    signed = _cape(["signup", "--username", username, "--password-stdin"], "pw one two\n", config)
    assert signed.returncode == 0, signed.stderr
    auth = config / "auth"
    assert auth.stat().st_mode & 0o777 == 0o600
    saved = json.loads(auth.read_text())
    assert saved["username"] == username and saved["url"] == server.url
    assert saved["access_token"] not in signed.stdout + signed.stderr

    logged = _cape(["login", "-u", username, "--password-stdin"], "pw one two\n", config)
    assert logged.returncode == 0, logged.stderr

    wrong = _cape(["login", "-u", username, "--password-stdin"], "nope\n", config)
    assert wrong.returncode == 1
    assert wrong.stderr.count("\n") == 1 and wrong.stderr.startswith("Error: ")
    assert "HTTP 401" in wrong.stderr


def test_account_commands_fail_in_one_line(server: ServeProcess, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    nothing = _cape(["login", "-u", "someone", "--password-stdin"], "pw\n", empty)
    assert nothing.returncode == 1 and "no server configured" in nothing.stderr
    no_flag = _cape(["login", "-u", "someone", "--url", server.url], "", empty)
    assert no_flag.returncode == 2 and "--password-stdin" in no_flag.stderr
    down = _cape(
        [
            "login",
            "-u",
            "someone",
            "--password-stdin",
            "--url",
            "https://127.0.0.1:1",
            "--ca-file",
            str(server.ca_file),
        ],
        "pw\n",
        empty,
    )
    assert down.returncode == 1 and "cannot reach" in down.stderr
    untrusted = _cape(
        ["login", "-u", "someone", "--password-stdin", "--url", server.url], "pw\n", empty
    )
    assert untrusted.returncode == 1 and "Error: " in untrusted.stderr
    assert all(r.stderr.count("\n") == 1 for r in (nothing, no_flag, down, untrusted))
