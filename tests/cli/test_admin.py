"""``cape admin invite`` on a data directory and ``cape serve``'s account flags, in process
(the e2e twin, through the real executable and a live server, is
tests/e2e/test_tenant_accounts.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cape.cli.app import app
from cape.host.store.metadata import SqlMetadataStore
from cape.platform.serve import parse_forwarded_allow_ips

runner = CliRunner()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    SqlMetadataStore(f"sqlite:///{tmp_path / 'metadata.sqlite3'}").close()
    return tmp_path


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_create_list_revoke(data_dir: Path) -> None:
    code, out, err = invoke(
        "admin", "invite", "create", "--data-dir", str(data_dir), "--count", "2"
    )
    assert code == 0, err
    codes = out.split()
    assert len(codes) == 2 and len(set(codes)) == 2 and "works once" in err
    code, out, _ = invoke("admin", "invite", "list", "--data-dir", str(data_dir), "-o", "json")
    listed = json.loads(out)["invites"]
    assert [item["state"] for item in listed] == ["unused", "unused"]
    assert not any(c in out for c in codes)
    code, _, err = invoke("admin", "invite", "revoke", listed[0]["id"], "--data-dir", str(data_dir))
    assert code == 0 and "Revoked" in err
    code, out, _ = invoke("admin", "invite", "list", "--data-dir", str(data_dir))
    assert listed[1]["id"] in out and listed[0]["id"] not in out


@pytest.mark.parametrize(
    ("args", "needle", "exit_code"),
    [
        (("create", "--expires-in", "0s"), "--expires-in", 2),
        (("create", "--expires-in", "400d"), "366 days", 1),
        (("create", "--note", "x" * 300), "note", 1),
        (("revoke", "nope"), "no invite", 1),
        (("revoke", " "), "give the id", 2),
    ],
)
def test_bad_admin_input_is_one_error_line(
    data_dir: Path, args: tuple[str, ...], needle: str, exit_code: int
) -> None:
    code, out, err = invoke("admin", "invite", *args, "--data-dir", str(data_dir))
    assert (code, out) == (exit_code, "")
    assert err.startswith("Error: ") and needle in err and len(err.splitlines()) == 1


def test_a_directory_without_a_database_is_refused(tmp_path: Path) -> None:
    code, _, err = invoke("admin", "invite", "list", "--data-dir", str(tmp_path))
    assert code == 1 and "not a Cape data directory" in err
    assert not (tmp_path / "metadata.sqlite3").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--signup", "sometimes"), "--signup must be open, invite or closed"),
        (("--forwarded-allow-ips", "10.0.0.1,proxy.example"), "is not an IP address"),
        (("--signup-rate", "-1"), "--signup-rate"),
    ],
)
def test_bad_serve_account_flags_are_refused_before_starting(
    tmp_path: Path, args: tuple[str, ...], needle: str
) -> None:
    code, _, err = invoke("serve", "--data-dir", str(tmp_path / "data"), "--port", "0", *args)
    assert code != 0 and needle in err
    assert not (tmp_path / "data").exists()


def test_forwarded_allow_ips_parsing() -> None:
    assert parse_forwarded_allow_ips("") == ()
    assert parse_forwarded_allow_ips(" 10.0.0.1, 10.1.0.0/16 ,::1,*") == (
        "10.0.0.1",
        "10.1.0.0/16",
        "::1",
        "*",
    )
