"""SDK pieces of issue 12: fingerprints as printed, logins bound to servers, error hints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cape.errors import CapeError, FormatError, FunctionError, TransportError
from cape.sdk import config
from cape.sdk.client import normalize_fingerprint
from cape.sdk.hints import add_hint, hint

HEX = "6b25" + "0a" * 30


@pytest.mark.parametrize(
    "form",
    [
        HEX,
        HEX.upper(),
        f"sha256:{HEX}",
        f"SHA256:{HEX.upper()}",
        "sha256:" + ":".join(HEX[i : i + 2] for i in range(0, 64, 2)),
        f"  sha256:{HEX}\n",
    ],
)
def test_every_printed_form_of_a_fingerprint_is_accepted(form: str) -> None:
    assert normalize_fingerprint(form) == HEX


@pytest.mark.parametrize(
    "bad", ["", "sha256:", HEX[:-1], HEX + "00", "sha1:" + HEX, HEX[:-1] + "g"]
)
def test_anything_else_is_refused(bad: str) -> None:
    with pytest.raises(FormatError, match="not a SHA-256 fingerprint"):
        normalize_fingerprint(bad)


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("CAPE_URL", "CAPE_ENCLAVE_HOST", "CAPE_TOKEN", "CAPE_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("CAPE_ATTESTATION_ROOT", raising=False)
    monkeypatch.setenv("CAPE_CONFIG_DIR", str(tmp_path))
    return tmp_path


def _serve(directory: Path, url: str, data_dir: str = "/srv/cape") -> None:
    record = {
        "url": url,
        "ca_file": "/ca.pem",
        "attestation_root": "/root.pem",
        "data_dir": data_dir,
    }
    (directory / "serve.json").write_text(json.dumps(record))


def test_localhost_and_127_0_0_1_share_a_login(config_dir: Path) -> None:
    _serve(config_dir, "https://127.0.0.1:8443")
    config.save_token("https://127.0.0.1:8443", "alice", "tok")
    resolved = config.resolve(url="https://localhost:8443/")
    assert resolved.token == "tok" and resolved.username == "alice"
    assert resolved.ca_file == Path("/ca.pem")  # the local server's CA as well
    assert config.resolve(url="https://localhost:8444").token is None


def test_a_login_follows_the_local_server_to_a_new_port_but_not_elsewhere(
    config_dir: Path,
) -> None:
    _serve(config_dir, "https://127.0.0.1:40000")
    config.save_token("https://127.0.0.1:40000", "alice", "tok")
    _serve(config_dir, "https://127.0.0.1:40001")  # restarted with --port 0
    assert config.resolve().token == "tok"
    _serve(config_dir, "https://127.0.0.1:40002", data_dir="/elsewhere")  # another server
    assert config.resolve().token is None
    message = config.not_logged_in("https://127.0.0.1:40002")
    assert "https://127.0.0.1:40002" in message and "alice at https://127.0.0.1:40000" in message


def test_effective_settings_name_their_source(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(config_dir, "https://127.0.0.1:8443")
    settings = config.effective()
    assert settings["url"] == config.Setting(
        "https://127.0.0.1:8443", "the local cape serve (serve.json)"
    )
    monkeypatch.setenv("CAPE_ENCLAVE_HOST", "https://cape.example")
    settings = config.effective()
    assert settings["url"] == config.Setting("https://cape.example", "env CAPE_ENCLAVE_HOST")
    assert settings["ca_file"] == config.Setting(None, "unset")  # not the local server's CA


@pytest.mark.parametrize(
    ("message", "needle"),
    [
        ("cannot reach x: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed", "--ca-file"),
        ("ModuleNotFoundError: No module named 'pandas'", "requirements.txt"),
        ("No module named 'pandas.core'", "add pandas "),
        ("input size in bytes exceeds the limit of 67108864 (got 70000000)", "--stream"),
        ("input size in bytes exceeds the limit of 67108864", "--max-input-mib"),
    ],
)
def test_stuck_messages_get_a_hint(message: str, needle: str) -> None:
    suggestion = hint(message)
    assert suggestion is not None and needle in suggestion


def test_hints_keep_the_error_type_and_are_added_once() -> None:
    error = add_hint(TransportError("certificate verify failed", close_code=1011))
    assert isinstance(error, TransportError) and error.close_code == 1011
    once = str(error)
    assert str(add_hint(error)) == once and "--ca-file" in once
    plain = add_hint(FunctionError("ValueError: nope"))
    assert str(plain) == "ValueError: nope"
    assert hint("not logged in") is None and isinstance(add_hint(CapeError()), CapeError)
