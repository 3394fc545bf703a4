"""``cape attestation verify``: decoded fields on stdout, exit 0 when valid, 1 with one line."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cape.cli.app import app
from tests.samples import ROOT_PEM, SAMPLES, read_sample, requires_samples

pytestmark = requires_samples
PROD, DEBUG, ANJUNA = SAMPLES
runner = CliRunner()


def run(*args: str, env: dict[str, str] | None = None, stdin: bytes | None = None):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args), env=env, input=stdin)


def error_lines(result) -> list[str]:  # type: ignore[no-untyped-def]
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_real_document_valid_at_its_time() -> None:
    result = run(
        "attestation",
        "verify",
        str(PROD.path),
        "--root",
        str(ROOT_PEM),
        "--at",
        "2024-09-07T15:00:00Z",
    )
    assert result.exit_code == 0, result.stderr
    assert "VALID" in result.stdout and "INVALID" not in result.stdout
    assert PROD.module_id in result.stdout
    assert "AWS Nitro Enclaves Root-G1" in result.stdout
    assert "PCR0" in result.stdout


def test_raw_cbor_file_and_archived_mode(tmp_path: Path) -> None:
    raw = tmp_path / "anjuna.cbor"
    raw.write_bytes(read_sample(ANJUNA))
    result = run("attestation", "verify", str(raw), "--root", str(ROOT_PEM), "--archived")
    assert result.exit_code == 0, result.stderr


def test_stdin_and_env_root() -> None:
    result = run(
        "attestation",
        "verify",
        "-",
        "--at",
        "2024-09-07T15:00:00Z",
        env={"CAPE_ATTESTATION_ROOT": str(ROOT_PEM)},
        stdin=PROD.path.read_bytes(),
    )
    assert result.exit_code == 0, result.stderr


def test_json_output_is_complete() -> None:
    result = run(
        "attestation",
        "verify",
        str(PROD.path),
        "--root",
        str(ROOT_PEM),
        "--at",
        "2024-09-07T15:00:00Z",
        "-o",
        "json",
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["valid"] is True and report["error"] is None
    doc = report["document"]
    assert doc["module_id"] == PROD.module_id
    assert doc["nonce"] == {"length": 1024, "hex": "01" * 1024}
    assert len(doc["pcrs"]) == 16
    assert report["root"]["sha256"].startswith("641a0321")


def test_live_check_of_an_old_document_fails_with_reason() -> None:
    result = run("attestation", "verify", str(PROD.path), "--root", str(ROOT_PEM))
    assert result.exit_code == 1
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("Error: document certificate is valid from")
    assert "INVALID" in result.stdout  # the decoded fields are still shown


def test_debug_document_needs_allow_debug() -> None:
    args = [
        "attestation",
        "verify",
        str(DEBUG.path),
        "--root",
        str(ROOT_PEM),
        "--at",
        "2024-09-07T15:00:00Z",
    ]
    refused = run(*args)
    assert refused.exit_code == 1 and "debug-mode" in refused.stderr
    assert run(*args, "--allow-debug").exit_code == 0


def test_nonce_and_pcr_pins() -> None:
    base = [
        "attestation",
        "verify",
        str(PROD.path),
        "--root",
        str(ROOT_PEM),
        "--at",
        "2024-09-07T15:00:00Z",
    ]
    assert run(*base, "--nonce", "01" * 1024).exit_code == 0
    wrong_nonce = run(*base, "--nonce", "02" * 16)
    assert wrong_nonce.exit_code == 1 and "nonce" in wrong_nonce.stderr
    wrong_pcr = run(*base, "--pcr", "0:" + "11" * 48)
    assert wrong_pcr.exit_code == 1 and "PCR0" in wrong_pcr.stderr
    report = json.loads(run(*base, "-o", "json").stdout)
    pcr0 = report["document"]["pcrs"]["0"]
    assert run(*base, "--pcr", f"0:{'22' * 48}", "--pcr", f"0:{pcr0}").exit_code == 0


def test_another_root_is_rejected(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from cape.enclave.secure_module.simulated import SimulatedAuthority

    other = tmp_path / "other.pem"
    cert = SimulatedAuthority.generate().root_certificate
    other.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    result = run(
        "attestation",
        "verify",
        str(PROD.path),
        "--root",
        str(other),
        "--at",
        "2024-09-07T15:00:00Z",
    )
    assert result.exit_code == 1 and "pinned root" in result.stderr


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--root", "ROOT", "--at", "yesterday"], 2, "ISO 8601"),
        (["--root", "ROOT", "--nonce", "xyz"], 2, "hex"),
        (["--root", "ROOT", "--pcr", "0:abcd"], 1, "32, 48 or 64 bytes"),
        (["--root", "ROOT", "--pcr", "zero"], 1, "INDEX:HEX"),
        (["--root", "ROOT", "--archived", "--at", "2024-09-07T15:00:00Z"], 2, "--archived"),
        (["--root", "ROOT", "--max-age", "-1"], 2, "negative"),
        (["--root", "/does/not/exist.pem"], 1, "cannot read attestation root"),
        ([], 2, "no attestation root"),
    ],
)
def test_bad_arguments_get_one_line(args: list[str], code: int, words: str) -> None:
    argv = [str(ROOT_PEM) if a == "ROOT" else a for a in args]
    result = run("attestation", "verify", str(PROD.path), *argv, env={"CAPE_ATTESTATION_ROOT": ""})
    assert result.exit_code == code
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("Error:") and words in lines[0], result.stderr


@pytest.mark.parametrize(
    "content",
    [b"", b"not a document", base64.b64encode(b"\x84\x01\x02"), b"\x84\x40\xa0\x40\x40"],
)
def test_garbage_documents_get_one_line(tmp_path: Path, content: bytes) -> None:
    doc = tmp_path / "doc"
    doc.write_bytes(content)
    result = run("attestation", "verify", str(doc), "--root", str(ROOT_PEM))
    assert result.exit_code == 1
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr


def test_missing_document_file() -> None:
    result = run("attestation", "verify", "/no/such/doc", "--root", str(ROOT_PEM))
    assert result.exit_code == 1 and "cannot read /no/such/doc" in result.stderr
