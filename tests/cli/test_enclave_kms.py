"""``cape enclave build|describe``, ``cape pcrs --eif`` and ``cape kms rebind|policy|log``:
results on stdout, one ``Error:`` line and a non-zero exit for every bad input."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from typer.testing import CliRunner

from cape.cli.app import app
from cape.crypto.eif_signature import ImageSigner
from cape.crypto.keys import generate_cape_key
from cape.kms.base import KeyPolicy
from cape.kms.local import LocalKeyService
from cape.platform.local import IMAGE_SIGNING_DIR, load_image_signer
from cape.platform.serve import load_authority
from tests.e2e.test_cli_consistency import check_shape
from tests.unit.image.conftest import make_blobs, make_rootfs

runner = CliRunner()


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    signer = ImageSigner.generate("CLI signer")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    key.write_bytes(signer.private_key_pem())
    cert.write_bytes(signer.certificate_pem)
    return {
        "blobs": make_blobs(tmp_path / "blobs"),
        "rootfs": make_rootfs(tmp_path / "rootfs"),
        "key": key,
        "cert": cert,
    }


def build(inputs: dict[str, Path], out: Path, *, signed: bool = True) -> None:
    args = ["enclave", "build", "--blobs", str(inputs["blobs"]), "--rootfs", str(inputs["rootfs"])]
    args += [
        "-o",
        str(out),
        "--name",
        "rt",
        "--version",
        "9",
        "--build-time",
        "2026-01-01T00:00:00Z",
    ]
    if signed:
        args += ["--sign-key", str(inputs["key"]), "--sign-cert", str(inputs["cert"])]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("PCR0\t")


def test_build_then_describe(inputs: dict[str, Path], tmp_path: Path) -> None:
    build(inputs, tmp_path / "rt.eif")
    result = runner.invoke(app, ["enclave", "describe", str(tmp_path / "rt.eif"), "-o", "json"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    check_shape("cape enclave describe", document)
    assert document["signed"] is True and set(document["pcrs"]) == {"0", "1", "2", "8"}
    assert document["metadata"]["ImageName"] == "rt"
    assert [s["type"] for s in document["sections"]][-1] == "signature"
    assert document["signer"]["certificate_valid_now"] is True
    plain = runner.invoke(app, ["enclave", "describe", str(tmp_path / "rt.eif")])
    assert plain.exit_code == 0 and "Signed:     yes, by CN=CLI signer" in plain.stdout
    assert "Warning" not in plain.stderr
    pcrs = runner.invoke(app, ["pcrs", "--eif", str(tmp_path / "rt.eif"), "-o", "json"])
    assert pcrs.exit_code == 0
    assert json.loads(pcrs.stdout) == {f"PCR{i}": v for i, v in document["pcrs"].items()}


def test_expired_signing_certificate_is_reported(inputs: dict[str, Path], tmp_path: Path) -> None:
    # nitro-cli refuses to boot an image whose signing certificate is outside its validity
    # window; the signature itself still verifies, so both commands succeed and warn.
    old = ImageSigner.generate("Old signer", now=dt.datetime(2001, 1, 1, tzinfo=dt.UTC))
    inputs["key"].write_bytes(old.private_key_pem())
    inputs["cert"].write_bytes(old.certificate_pem)
    args = ["enclave", "build", "--blobs", str(inputs["blobs"]), "--rootfs", str(inputs["rootfs"])]
    args += ["-o", str(tmp_path / "old.eif"), "--sign-key", str(inputs["key"])]
    built = runner.invoke(app, [*args, "--sign-cert", str(inputs["cert"])])
    assert built.exit_code == 0, built.stderr
    assert "Warning: the signing certificate expired on 2010-" in built.stderr
    result = runner.invoke(app, ["enclave", "describe", str(tmp_path / "old.eif"), "-o", "json"])
    assert result.exit_code == 0, result.stderr
    signer = json.loads(result.stdout)["signer"]
    assert signer["certificate_valid_now"] is False
    assert signer["not_after"].startswith("2010-12-")
    assert "nitro-cli refuses to run this image" in result.stderr


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "missing", "directory"])
def test_describe_bad_files_is_one_error_line(
    inputs: dict[str, Path], tmp_path: Path, damage: str
) -> None:
    path = tmp_path / "rt.eif"
    build(inputs, path)
    data = path.read_bytes()
    if damage == "flip":
        path.write_bytes(data[:1000] + bytes([data[1000] ^ 0x40]) + data[1001:])
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "missing":
        path.unlink()
    else:
        path.unlink()
        path.mkdir()
    result = runner.invoke(app, ["enclave", "describe", str(path)])
    assert result.exit_code == 1
    (line,) = errors(result.stderr)
    assert line.startswith("Error: ") and "Traceback" not in result.stderr


def test_build_usage_errors(inputs: dict[str, Path], tmp_path: Path) -> None:
    args = ["enclave", "build", "--blobs", str(inputs["blobs"]), "--rootfs", str(inputs["rootfs"])]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "x.eif"), "--sign-key", "k.pem"])
    assert result.exit_code == 2 and "--sign-key needs --sign-cert" in result.stderr
    out = ["-o", str(tmp_path / "x.eif")]
    kms = ["--sign-kms-key", "arn:aws:kms:eu-west-1:123456789012:key/k"]
    for extra, message in (
        (kms, "--sign-kms-key needs --sign-cert"),
        ([*kms, "--sign-key", "k.pem", "--sign-cert", "c.pem"], "not both"),
        (["--sign-cert", "c.pem"], "--sign-cert needs --sign-key or --sign-kms-key"),
    ):
        result = runner.invoke(app, [*args, *out, *extra])
        assert result.exit_code == 2 and message in result.stderr, (extra, result.stderr)
    assert not (tmp_path / "x.eif").exists()
    inputs["key"].write_bytes(b"not a key")
    result = runner.invoke(
        app,
        [*args, "-o", str(tmp_path / "x.eif"), "--sign-key", str(inputs["key"]),
         "--sign-cert", str(inputs["cert"])],
    )  # fmt: skip
    assert result.exit_code == 1
    (line,) = errors(result.stderr)
    assert "PEM private key" in line and not (tmp_path / "x.eif").exists()


def test_kms_policy_aws(tmp_path: Path) -> None:
    pcr8 = "ab" * 48
    role = "arn:aws:iam::123456789012:role/cape-parent"
    result = runner.invoke(app, ["kms", "policy", "--aws", "--pcr8", pcr8, "--role", role])
    assert result.exit_code == 0, result.stderr
    policy = json.loads(result.stdout)
    release = next(s for s in policy["Statement"] if s["Effect"] == "Allow" and "Condition" in s)
    assert release["Principal"] == {"AWS": role}
    assert set(release["Action"]) == {"kms:Decrypt", "kms:GenerateDataKey*"}
    pins = release["Condition"]["StringEqualsIgnoreCase"]
    assert pins["kms:RecipientAttestation:PCR8"] == [pcr8]
    pcr3 = hashlib.sha384(bytes(48) + role.encode()).hexdigest()
    assert pins["kms:RecipientAttestation:PCR3"] == [pcr3]
    # Deny for everyone unless PCR8 matches: StringNotEquals is also true when the key is
    # absent, i.e. a Decrypt without a Recipient.
    denies = [s for s in policy["Statement"] if s["Effect"] == "Deny"]
    assert any(
        s["Principal"] == {"AWS": "*"}
        and "kms:Decrypt" in s["Action"]
        and s["Condition"]
        == {"StringNotEqualsIgnoreCase": {"kms:RecipientAttestation:PCR8": [pcr8]}}
        for s in denies
    )
    for bad in (["--pcr8", "zz"], ["--pcr8", "ab"], []):
        result = runner.invoke(app, ["kms", "policy", "--aws", "--account", "123456789012", *bad])
        assert result.exit_code == 2 and len(errors(result.stderr)) == 1
    result = runner.invoke(app, ["kms", "policy", "--aws", "--pcr8", pcr8])
    assert result.exit_code == 1 and "--account" in result.stderr


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cape serve data directory with one measurement-bound key (alice)."""
    directory = tmp_path / "data"
    authority = load_authority(directory / "attestation")
    load_image_signer(directory / IMAGE_SIGNING_DIR)
    key: RSAPrivateKey = generate_cape_key()
    policy = KeyPolicy.measurement(b"\x01" * 48, b"\x02" * 48, b"\x03" * 48)
    with LocalKeyService.open(
        directory / "kms", trusted_root=authority.root_certificate, default_policy=policy
    ) as service:
        monkeypatch.setattr("cape.kms.local.generate_cape_key", lambda: key)
        service.get_or_create_key("alice")
    return directory


def test_kms_rebind_needs_a_proven_signature(
    data_dir: Path, inputs: dict[str, Path], tmp_path: Path
) -> None:
    base = ["kms", "rebind", "--data-dir", str(data_dir)]
    build(inputs, tmp_path / "unsigned.eif", signed=False)
    result = runner.invoke(
        app, [*base, "--eif", str(tmp_path / "unsigned.eif"), "--cert", str(inputs["cert"])]
    )
    assert result.exit_code == 1 and "not signed" in result.stderr
    build(inputs, tmp_path / "signed.eif")
    # Signed, but not by the data directory's image-signing certificate (the default).
    result = runner.invoke(app, [*base, "--eif", str(tmp_path / "signed.eif")])
    assert result.exit_code == 1 and "not by the expected certificate" in result.stderr
    assert runner.invoke(app, ["kms", "log", "--data-dir", str(data_dir)]).stdout == ""
    result = runner.invoke(
        app,
        [*base, "--eif", str(tmp_path / "signed.eif"), "--cert", str(inputs["cert"]),
         "--reason", "release 9", "-o", "json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    check_shape("cape kms rebind", report)
    assert report["moved"] == ["alice"] and report["kind"] == "signer"
    log = runner.invoke(app, ["kms", "log", "--data-dir", str(data_dir), "-o", "json"])
    (entry,) = json.loads(log.stdout)["entries"]
    assert entry["owner"] == "alice" and entry["reason"] == "release 9"


def test_kms_rebind_installed_runtime_and_bad_directory(data_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["kms", "rebind", "--data-dir", str(data_dir), "--to", "measurement"]
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "alice\n"
    result = runner.invoke(app, ["kms", "rebind", "--data-dir", str(tmp_path / "nowhere")])
    assert result.exit_code == 1
    (line,) = errors(result.stderr)
    assert "no image-signing certificate" in line
    result = runner.invoke(app, ["kms", "rebind", "--data-dir", str(data_dir), "--to", "other"])
    assert result.exit_code == 2


def test_pcrs_with_a_data_directory_adds_the_signers_pcr8(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CAPE_DATA_DIR", raising=False)
    plain = json.loads(runner.invoke(app, ["pcrs", "-o", "json"]).stdout)
    assert set(plain) == {"PCR0", "PCR1", "PCR2"}
    result = runner.invoke(app, ["pcrs", "--data-dir", str(data_dir), "-o", "json"])
    signer = load_image_signer(data_dir / IMAGE_SIGNING_DIR, create=False)
    assert signer is not None
    assert json.loads(result.stdout) == plain | {"PCR8": signer.identity.pcr8.hex()}
