"""``cape kms serve``: a bad setting is one ``Error:`` line before anything starts."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cape.cli.app import app


def _serve(tmp_path: Path, toml: str, *args: str) -> list[str]:
    config = tmp_path / "kms.toml"
    config.write_text(toml)
    result = CliRunner().invoke(app, ["kms", "serve", "--config", str(config), *args])
    assert result.exit_code != 0, result.stdout
    assert "Ready:" not in result.stdout
    return result.stderr.strip().splitlines()


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("lissen = '127.0.0.1:1'\n", "unknown setting 'lissen'"),
        ("listen = 'localhost'\n", "listen must be HOST:PORT"),
        ("listen = '127.0.0.1:99999'\n", "listen must be HOST:PORT"),
        ("database_url = 'mysql://db/keys'\n", "database_url must be 'mysql' is not supported"),
        ("database_url = 'postgresql+asyncpg://db/keys'\n", "use postgresql+psycopg://"),
        ("tls_cert = '/c.pem'\n", "tls_cert and tls_key go together"),
        ("listen = '127.0.0.1:7443'\n", "node_token_file is required"),
    ],
)
def test_bad_settings_are_one_error_line(tmp_path: Path, toml: str, needle: str) -> None:
    lines = _serve(tmp_path, toml, "--data-dir", str(tmp_path / "data"))
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], lines
    assert not (tmp_path / "data").exists()


def test_a_short_token_or_a_missing_token_file_is_one_error(tmp_path: Path) -> None:
    token = tmp_path / "node.token"
    token.write_text("short\n")
    lines = _serve(tmp_path, f"node_token_file = '{token}'\n", "--data-dir", str(tmp_path / "d"))
    assert lines == [
        f"Error: the node token in {token} must be at least 16 printable ASCII characters "
        "without spaces (e.g. `openssl rand -hex 32`)"
    ]
    missing = tmp_path / "missing.token"
    lines = _serve(tmp_path, f"node_token_file = '{missing}'\n")
    assert lines == [f"Error: cannot read the node token file {missing}: No such file or directory"]


def test_a_port_in_use_is_one_error(tmp_path: Path) -> None:
    token = tmp_path / "node.token"
    token.write_text("0123456789abcdef0123\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        lines = _serve(
            tmp_path,
            f"node_token_file = '{token}'\nlisten = '127.0.0.1:{port}'\n",
            "--data-dir",
            str(tmp_path / "data"),
        )
    assert lines == [f"Error: cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_flags_and_environment_override_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cape.platform.kms_serve import load_kms_config

    config = tmp_path / "kms.toml"
    config.write_text("listen = '127.0.0.1:1'\nnode_token_file = '/a'\n")
    monkeypatch.setenv("CAPE_KMS_LISTEN", "127.0.0.1:2")
    loaded = load_kms_config(config, flags={"node_token_file": ("--node-token-file", "/b")})
    assert loaded.listen == "127.0.0.1:2" and loaded.node_token_file == Path("/b")
