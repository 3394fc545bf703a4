"""A node's settings: the TOML file, CAPE_* variables and flags (later ones win), every bad
setting one clear error before anything starts; and ``cape serve --config`` in process."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cape.cli.app import app
from cape.errors import CapeError, FormatError
from cape.host.signup import SignupMode
from cape.host.store.backends import open_metadata_store, safe_database_url
from cape.platform.config import SETTINGS, load_settings
from cape.platform.serve import ServeConfig

FULL = """
node_name = "api-1"
host = "0.0.0.0"
port = 8443
enclaves = 4
idle_timeout_s = 600
signup = "invite"
signup_rate = 0
trusted_proxies = ["10.0.0.5", "10.1.0.0/16"]
database_url = "postgresql+psycopg://cape:pw@db.internal:5432/cape"
blob_store = "s3://cape-bundles/prod"
blob_endpoint_url = "https://minio.internal:9000"
tls_cert = "/etc/cape/tls/server.pem"
tls_key = "/etc/cape/tls/server.key"
attestation_dir = "/srv/cape/attestation"
kms_dir = "/srv/cape/kms"
auth_dir = "/srv/cape"
image_signing_dir = "/srv/cape/image-signing"
log_format = "json"
max_input_bytes = 1048576
limits = ["bundle_bytes=8388608"]
sandbox_uids = "3000000000-3000049999"
sandbox_start = "bubblewrap"
run_functions = false
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cape.toml"
    path.write_text(text)
    return path


def test_a_full_file_fills_the_serve_config(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, FULL), env={})
    config = ServeConfig(data_dir=tmp_path, **settings)
    assert config.node_name == "api-1" and config.port == 8443 and config.enclaves == 4
    assert config.signup is SignupMode.invite and config.signups_per_hour == 0
    assert config.forwarded_allow_ips == ("10.0.0.5", "10.1.0.0/16")
    assert config.database_url == "postgresql+psycopg://cape:pw@db.internal:5432/cape"
    assert config.blob_store == "s3://cape-bundles/prod"
    assert config.tls_cert == Path("/etc/cape/tls/server.pem")
    assert config.log_format == "json"
    assert config.max_input_bytes == 1 << 20 and config.limits.bundle_bytes == 8 << 20
    assert config.sandbox_uids == "3000000000-3000049999" and config.run_functions is False
    assert config.sandbox_start == "bubblewrap"
    # Every setting but the data directory (a flag's job), the [nitro] table
    # (tests/cli/test_serve_nitro.py) and the network key service's (below: they replace
    # kms_dir, attestation_dir and image_signing_dir) is shown here.
    shown = {line.split(" = ")[0] for line in FULL.split("\n")[1:-1]}
    assert set(SETTINGS) - {"data_dir", "nitro", *KEY_SERVICE} == shown


KEY_SERVICE = ("key_service_url", "key_service_pin", "key_service_token_file")
PIN = "sha256:" + "AB" * 32


def test_a_node_of_a_network_key_service(tmp_path: Path) -> None:
    text = (
        'key_service_url = "https://kms.internal:7443/"\n'
        f'key_service_pin = "{PIN}"\n'
        'key_service_token_file = "/etc/cape/node.token"\n'
    )
    config = ServeConfig(data_dir=tmp_path, **load_settings(write(tmp_path, text), env={}))
    assert config.key_service_url == "https://kms.internal:7443"
    assert config.key_service_pin == "ab" * 32
    assert config.key_service_token_file == Path("/etc/cape/node.token")


def test_environment_overrides_the_file_and_flags_override_both(tmp_path: Path) -> None:
    path = write(tmp_path, 'enclaves = 4\nnode_name = "from-file"\nsignup = "closed"\n')
    env = {"CAPE_ENCLAVES": "6", "CAPE_TRUSTED_PROXIES": "10.0.0.1, 10.0.0.2"}
    settings = load_settings(path, env=env, flags={"enclaves": ("--enclaves", 8)})
    assert settings["enclaves"] == 8
    assert settings["node_name"] == "from-file"
    assert settings["forwarded_allow_ips"] == ("10.0.0.1", "10.0.0.2")
    assert load_settings(None, env={}) == {}  # the embedded default needs nothing


@pytest.mark.parametrize(
    ("text", "env", "needle"),
    [
        ("databse_url = 'x'\n", {}, "unknown setting 'databse_url'"),
        ("enclaves = 'many'\n", {}, "enclaves must be an integer from 1 to 64"),
        ("enclaves = 0\n", {}, "enclaves must be an integer from 1 to 64"),
        ("signup = 'sometimes'\n", {}, "signup must be open or invite or closed"),
        ("database_url = 'mysql://db/cape'\n", {}, "'mysql' is not supported"),
        ("database_url = 'postgresql+asyncpg://db/cape'\n", {}, "use postgresql+psycopg://"),
        ("blob_store = 'gs://bucket'\n", {}, "blob_store must be a directory"),
        ("trusted_proxies = ['proxy.example']\n", {}, "is not an IP address"),
        ("log_format = 'xml'\n", {}, "log_format must be text or json"),
        ("run_functions = 'maybe'\n", {}, "run_functions must be true or false"),
        ("limits = ['speed=9']\n", {}, "limits must be NAME=VALUE server limits"),
        ("tls_cert = '/c.pem'\n", {}, "tls_cert and tls_key go together"),
        ("[server]\nport = 1\n", {}, "[server]: settings are top-level names"),
        ("port = \n", {}, "not valid TOML"),
        ("", {"CAPE_PORT": "eighty"}, "CAPE_PORT: port must be an integer"),
        (
            "key_service_url = 'http://kms:7443'\n",
            {},
            "key_service_url must be https://HOST[:PORT] (no path)",
        ),
        ("key_service_pin = 'ab12'\n", {}, "key_service_pin must be sha256: and 64 hex digits"),
        (
            "key_service_url = 'https://kms:7443'\n",
            {},
            "key_service_url set without key_service_pin, key_service_token_file",
        ),
        (
            f"key_service_url = 'https://kms'\nkey_service_pin = '{PIN}'\n"
            "key_service_token_file = '/t'\nkms_dir = '/srv/kms'\n",
            {},
            "kms_dir cannot be set with key_service_url",
        ),
    ],
)
def test_bad_settings_are_one_clear_error(
    tmp_path: Path, text: str, env: dict[str, str], needle: str
) -> None:
    with pytest.raises(FormatError) as raised:
        load_settings(write(tmp_path, text), env=env)
    assert needle in str(raised.value)


def test_a_database_password_is_never_repeated(tmp_path: Path) -> None:
    with pytest.raises(FormatError) as raised:
        load_settings(write(tmp_path, "database_url = 'oracle://u:hunter22@db/x'\n"), env={})
    assert "hunter22" not in str(raised.value)


def test_cape_serve_config_errors_are_one_line_before_starting(tmp_path: Path) -> None:
    path = write(tmp_path, "enclaves = 'many'\n")
    result = CliRunner().invoke(
        app, ["serve", "--config", str(path), "--data-dir", str(tmp_path / "data")]
    )
    assert result.exit_code != 0
    assert result.stderr.strip().splitlines() == [
        f"Error: {path}: enclaves must be an integer from 1 to 64"
    ]
    assert not (tmp_path / "data").exists()
    result = CliRunner().invoke(app, ["serve", "--config", str(tmp_path / "missing.toml")])
    assert result.exit_code != 0 and "cannot read" in result.stderr


def test_every_setting_is_in_the_docs_table() -> None:
    page = (Path(__file__).resolve().parents[3] / "docs" / "cluster.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    for name in SETTINGS:
        assert any(f"`{name}`" in row.split(" | ")[0] for row in rows), name


def test_an_unreachable_database_is_one_error_without_its_password() -> None:
    url = "postgresql+psycopg://cape:hunter22@127.0.0.1:1/cape"  # nothing listens on port 1
    assert safe_database_url(url) == "postgresql+psycopg://cape:***@127.0.0.1:1/cape"
    with pytest.raises(CapeError) as raised:
        open_metadata_store(url)
    assert str(raised.value).startswith("database postgresql+psycopg://cape:***@127.0.0.1:1/cape:")
    assert "hunter22" not in str(raised.value)
