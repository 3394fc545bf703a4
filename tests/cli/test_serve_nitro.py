"""``cape serve --enclave nitro``: its options, and the one-line start-up errors a machine
that is not an enclave-enabled parent instance gets (in process; nothing is started)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cape.cli.app import app
from cape.platform.serve import LOCK_FILE
from tests.samples import ROOT_PEM

runner = CliRunner()
# The real AWS root from ../shared/nitro-samples (never copied into the repository).
AWS_ROOT = ROOT_PEM
needs_root = pytest.mark.skipif(not AWS_ROOT.is_file(), reason=f"no AWS root at {AWS_ROOT}")
ACCOUNT = "123456789012"


def _nitro_args(tmp_path: Path, *extra: str) -> list[str]:
    eif = tmp_path / "cape.eif"
    eif.write_bytes(b"image")
    return [
        "serve", "--data-dir", str(tmp_path / "data"), "--port", "0", "--enclave", "nitro",
        "--eif", str(eif), "--aws", f"root={AWS_ROOT}", "--aws", "region=us-east-1",
        "--aws", f"account={ACCOUNT}",
        "--aws", f"admin-role-arn=arn:aws:iam::{ACCOUNT}:role/cape-admin",
        "--aws", f"enclave-role-arn=arn:aws:iam::{ACCOUNT}:role/cape-enclave", *extra,
    ]  # fmt: skip


def _error(args: list[str]) -> tuple[int, str]:
    result = runner.invoke(app, args)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return result.exit_code, lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--enclave", "vm"], "Error: --enclave must be simulated or nitro, not 'vm'"),
        (["serve", "--eif", "x.eif"], "Error: --eif and --aws need --enclave nitro"),
        (
            ["serve", "--enclave", "nitro", "--aws", "region=us-east-1"],
            "Error: --enclave nitro needs --eif, --aws root=…, --aws account=…",
        ),
        (
            ["serve", "--enclave", "nitro", "--aws", "colour=blue"],
            "Error: --aws 'colour=blue': use one of root, region, account",
        ),
    ],
)
def test_bad_nitro_options_are_one_usage_line(args: list[str], message: str) -> None:
    code, line = _error(args)
    assert code == 2
    assert line.startswith(message)


@needs_root
def test_without_nitro_cli_the_start_fails_before_any_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, line = _error(_nitro_args(tmp_path))
    assert code == 1
    assert line == (
        "Error: nitro-cli is not on PATH: install aws-nitro-enclaves-cli on the parent instance"
    )
    # Only the data directory's lock: no TLS, key service, store or master key yet.
    assert {p.name for p in (tmp_path / "data").iterdir()} <= {LOCK_FILE}


@needs_root
def test_on_a_machine_without_the_nitro_driver_the_allocator_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nitro-cli").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "nitro-cli").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    if Path("/sys/module/nitro_enclaves").exists():
        pytest.skip("this machine has the Nitro Enclaves driver")
    code, line = _error(_nitro_args(tmp_path))
    assert code == 1
    assert line.startswith("Error: the nitro_enclaves kernel module is not loaded")


@needs_root
def test_a_config_file_nitro_table_is_the_same_as_the_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eif = tmp_path / "cape.eif"
    eif.write_bytes(b"image")
    config = tmp_path / "cape.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nport = 0\n\n[nitro]\neif = "{eif}"\n'
        f'aws_root = "{AWS_ROOT}"\nregion = "us-east-1"\naccount_id = "{ACCOUNT}"\n'
        f'admin_role_arn = "arn:aws:iam::{ACCOUNT}:role/cape-admin"\n'
        f'enclave_role_arn = "arn:aws:iam::{ACCOUNT}:role/cape-enclave"\nmemory_mib = 1024\n'
    )
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, line = _error(["serve", "--config", str(config)])
    assert code == 1
    assert line.startswith("Error: nitro-cli is not on PATH")  # Nitro mode, from the file
    config.write_text(config.read_text().replace('region = "us-east-1"\n', "colour = 1\n"))
    code, line = _error(["serve", "--config", str(config)])
    assert code == 1
    assert line.startswith(f"Error: {config}: nitro must be a table of eif, aws_root")
    assert "unknown colour; missing region" in line
