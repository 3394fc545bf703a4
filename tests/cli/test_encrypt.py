"""``cape encrypt --key``: what it writes decrypts with the enclave-side library; every bad
input is one ``Error:`` line and a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from typer.testing import CliRunner

from cape.cli.app import app
from cape.crypto import stream
from cape.crypto.envelope import PREFIX
from cape.crypto.keys import public_key_der, public_key_pem
from cape.crypto.stream import STREAM_PREFIX

runner = CliRunner()


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=4096)


@pytest.fixture(scope="module")
def key_files(key: rsa.RSAPrivateKey, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    der = folder / "capekey.pub.der"
    pem = folder / "capekey.pub.pem"
    der.write_bytes(public_key_der(key))
    pem.write_bytes(public_key_pem(key))
    return {"der": der, "pem": pem}


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


def test_argument_text_form(key: rsa.RSAPrivateKey, key_files: dict[str, Path]) -> None:
    result = runner.invoke(app, ["encrypt", "hello enclave", "--key", str(key_files["der"])])
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert out.startswith("cape:") and out.endswith("\n")
    assert stream.decrypt_any(out.strip(), key) == b"hello enclave"


def test_file_to_output_file_with_pem_key(
    key: rsa.RSAPrivateKey, key_files: dict[str, Path], tmp_path: Path
) -> None:
    plain = tmp_path / "data.bin"
    plain.write_bytes(bytes(range(256)) * 100)
    target = tmp_path / "data.cape"
    result = runner.invoke(
        app, ["encrypt", "-f", str(plain), "--key", str(key_files["pem"]), "-o", str(target)]
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""  # the ciphertext went to the file; messages go to stderr
    assert "text form" in result.stderr
    assert stream.decrypt_any(target.read_bytes(), key) == plain.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".data.cape.")]


def test_stdin_stream_form(
    key: rsa.RSAPrivateKey, key_files: dict[str, Path], tmp_path: Path
) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    target = tmp_path / "out.cape"
    result = runner.invoke(
        app,
        ["encrypt", "-f", "-", "--stream", "--key", str(key_files["der"]), "-o", str(target)],
        input=data,
    )
    assert result.exit_code == 0, result.stderr
    ciphertext = target.read_bytes()
    assert ciphertext.startswith(STREAM_PREFIX)
    assert stream.decrypt_any(ciphertext, key) == data


def test_stdin_small_text_form(key: rsa.RSAPrivateKey, key_files: dict[str, Path]) -> None:
    result = runner.invoke(
        app, ["encrypt", "-f", "-", "--key", str(key_files["der"])], input=b"\x00\xffpiped"
    )
    assert result.exit_code == 0, result.stderr
    assert stream.decrypt_any(result.stdout.strip(), key) == b"\x00\xffpiped"


def _cape(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "cape", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        check=False,
    )


def test_real_entry_point_streams_large_stdin_automatically(
    key: rsa.RSAPrivateKey, key_files: dict[str, Path], tmp_path: Path
) -> None:
    """Over 64 MiB from a pipe (size unknown up front) switches to the streaming form."""
    data = os.urandom(1024 * 1024) * 65 + b"tail"
    proc = _cape("encrypt", "--key", str(key_files["der"]), stdin=data)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(STREAM_PREFIX)
    assert stream.decrypt_any(proc.stdout, key) == data


def test_large_file_uses_streaming_form(
    key: rsa.RSAPrivateKey, key_files: dict[str, Path], tmp_path: Path
) -> None:
    plain = tmp_path / "big.bin"
    with plain.open("wb") as handle:
        handle.truncate(64 * 1024 * 1024 + 1)
    target = tmp_path / "big.cape"
    proc = _cape("encrypt", "-f", str(plain), "--key", str(key_files["der"]), "-o", str(target))
    assert proc.returncode == 0, proc.stderr
    with target.open("rb") as handle:
        assert handle.read(len(STREAM_PREFIX)) == STREAM_PREFIX
    assert stream.decrypt_any(target.read_bytes(), key) == plain.read_bytes()


def test_text_form_is_cape_layout(key: rsa.RSAPrivateKey, key_files: dict[str, Path]) -> None:
    import base64

    out = runner.invoke(app, ["encrypt", "12345", "--key", str(key_files["der"])]).stdout.strip()
    raw = base64.b64decode(out[len(PREFIX) :], validate=True)
    assert len(raw) == 512 + 12 + 5 + 16  # Cape's documented 545 bytes for 5 bytes


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["hello"], "no server configured"),
        (["hello", "--key", "/no/such/key.der"], "cannot read"),
        (["hello", "--key", "KEYDIR"], "cannot read"),
        (["hello", "--key", "NOTAKEY"], "key"),
        (["hello", "--key", "ECKEY"], "RSA"),
        (["hello", "--key", "SMALLKEY"], "2048"),
        (["", "--key", "DER"], "empty"),
        (["hello", "-f", "FILE", "--key", "DER"], "not both"),
        (["-f", "/no/such/input", "--key", "DER"], "cannot read /no/such/input"),
        (["-f", "KEYDIR", "--key", "DER"], "directory"),
        (["hello", "--key", "DER", "-o", "/no/such/dir/out.cape"], "cannot write"),
    ],
)
def test_bad_input_is_one_line(
    args: list[str], words: str, key_files: dict[str, Path], tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    not_a_key = tmp_path / "not-a-key"
    not_a_key.write_bytes(b"-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n")
    ec_key = tmp_path / "ec.pem"
    ec_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    small = tmp_path / "small.pem"
    small.write_bytes(
        public_key_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    )
    some_file = tmp_path / "input.txt"
    some_file.write_text("x")
    names = {
        "DER": str(key_files["der"]),
        "KEYDIR": str(key_files["der"].parent),
        "NOTAKEY": str(not_a_key),
        "ECKEY": str(ec_key),
        "SMALLKEY": str(small),
        "FILE": str(some_file),
    }
    result = runner.invoke(app, ["encrypt", *[names.get(a, a) for a in args]])
    assert result.exit_code != 0
    line = one_error_line(result.stderr)
    assert words in line, line
    assert "Traceback" not in result.stderr + result.stdout


def test_no_decrypt_command() -> None:
    result = runner.invoke(app, ["decrypt", "cape:abc"])
    assert result.exit_code == 2
    help_text = runner.invoke(app, ["--help"]).stdout
    assert "no `cape decrypt`" in help_text
