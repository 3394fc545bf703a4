"""``cape doctor`` against fakes: a fake nitro-cli on PATH (tests/fakes/nitro_cli.py), a fake
sysfs and vsock device, moto's KMS server holding the doctor key, and a document fetch that
succeeds or fails. A real first boot is the only place all of it is real (docs/mocks.md)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from typer.testing import CliRunner

from cape.cli.app import app
from cape.errors import PCRMismatchError
from cape.kms.aws import key_policy_document
from cape.platform.doctor import Check, DoctorOptions, run_doctor
from cape.platform.nitro import image_key_policy
from tests.e2e.test_cli_consistency import check_shape
from tests.fakes import nitro_cli
from tests.fakes.moto_kms import REGION, moto_kms
from tests.unit.host.test_nitro_preflight import _sysfs

ACCOUNT = "123456789012"
ADMIN = f"arn:aws:iam::{ACCOUNT}:role/cape-admin"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/cape-prod-enclave"
PCRS = {0: b"\x10" * 48, 1: b"\x11" * 48, 2: b"\x12" * 48, 8: bytes(range(48))}


@pytest.fixture
def parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fake parent: nitro-cli on PATH, one running fake enclave, an image, sysfs, vsock."""
    state = nitro_cli.install_on_path(tmp_path, monkeypatch)
    image = {
        "argv": [sys.executable, "-c", "import time; time.sleep(120)"],
        "measurements": {f"PCR{i}": v.hex() for i, v in PCRS.items()},
    }
    (tmp_path / "cape.eif").write_text(json.dumps(image))
    _sysfs(tmp_path / "sys", cpus="1,3", pages_2m=1024)
    (tmp_path / "vsock").touch()
    yield tmp_path
    for enclave in (
        json.loads((state / "enclaves.json").read_text() or "[]")
        if (state / "enclaves.json").exists()
        else []
    ):
        nitro_cli.main(["terminate-enclave", "--enclave-id", enclave["id"]])


def _start_enclave(parent: Path) -> None:
    args = ["nitro-cli", "run-enclave", "--eif-path", str(parent / "cape.eif")]
    args += ["--cpu-count", "2", "--memory", "2048", "--enclave-cid", "16"]
    subprocess.run(args, check=True, capture_output=True)


def _options(parent: Path, **changes: object) -> DoctorOptions:
    options = DoctorOptions(
        eif=parent / "cape.eif",
        sysfs=parent / "sys",
        vsock=parent / "vsock",
        doctor_key="alias/cape-doctor/cape-prod",
        account_id=ACCOUNT,
        admin_role_arn=ADMIN,
        enclave_role_arn=ROLE,
    )
    for name, value in changes.items():
        setattr(options, name, value)
    return options


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {check.name: check for check in checks}


def _kms_with_doctor_key(port: int, credentials: object, pcrs: dict[int, bytes]) -> object:
    client = boto3.client(
        "kms",
        region_name=REGION,
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id=credentials.access_key_id,  # type: ignore[attr-defined]
        aws_secret_access_key=credentials.secret_access_key,  # type: ignore[attr-defined]
    )
    policy = key_policy_document(ACCOUNT, ADMIN, ROLE, image_key_policy(pcrs, role_arn=ROLE))
    key = client.create_key(
        KeySpec="RSA_4096",
        KeyUsage="ENCRYPT_DECRYPT",
        Policy=json.dumps(policy),
        BypassPolicyLockoutSafetyCheck=True,
    )
    client.create_alias(
        AliasName="alias/cape-doctor/cape-prod", TargetKeyId=key["KeyMetadata"]["KeyId"]
    )
    return client


def test_a_healthy_parent_passes_every_check(parent: Path) -> None:
    _start_enclave(parent)
    fetched: list[str] = []
    with moto_kms() as (port, credentials):
        client = _kms_with_doctor_key(port, credentials, PCRS)
        checks = asyncio.run(
            run_doctor(_options(parent, kms_client=client, fetch_document=fetched.append))
        )
    by_name = _by_name(checks)
    assert [c.status for c in checks] == ["ok"] * 7, "\n".join(c.line() for c in checks)
    assert by_name["nitro-cli"].detail.startswith("Nitro CLI 1.4.2")
    assert by_name["enclaves"].detail == "1 running (CID 16)"
    assert fetched == [PCRS[8].hex()]  # the document is pinned to the image's PCR8


def test_each_problem_is_one_failed_line(parent: Path) -> None:
    """No enclave running, a short allocator, a key pinned to another image, a document
    that does not verify."""
    other = {**PCRS, 8: b"\x99" * 48}
    (parent / "sys" / "module" / "nitro_enclaves" / "parameters" / "ne_cpus").write_text("1")

    def bad_document(pcr8: str) -> None:
        raise PCRMismatchError(8, [bytes.fromhex(pcr8)], b"\x99" * 48)

    with moto_kms() as (port, credentials):
        client = _kms_with_doctor_key(port, credentials, other)
        checks = _by_name(
            asyncio.run(
                run_doctor(_options(parent, kms_client=client, fetch_document=bad_document))
            )
        )
    assert checks["allocator"].status == "FAIL"
    assert "1 CPUs, 2048 MiB set aside; one enclave needs 2 CPUs" in checks["allocator"].detail
    assert checks["enclaves"].line() == (
        "FAIL  enclaves: no enclave is running: is cape.service up?"
    )
    assert checks["kms key policy"].status == "FAIL"
    assert "to other values than this image and role" in checks["kms key policy"].detail
    assert checks["document"].line().startswith(f"FAIL  document: PCR8 is {'99' * 48}; allowed")
    assert checks["nitro-cli"].status == checks["image"].status == "ok"


def test_cape_doctor_exits_1_when_a_check_fails(parent: Path) -> None:
    result = CliRunner().invoke(
        app, ["doctor", "--eif", str(parent / "missing.eif"), "--aws", "region=us-east-1"]
    )
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 7
    assert any(line.startswith("FAIL  image: nitro-cli describe-eif failed") for line in lines)
    as_json = CliRunner().invoke(
        app, ["doctor", "--eif", str(parent / "missing.eif"), "-o", "json"]
    )
    assert as_json.exit_code == 1
    document = json.loads(as_json.stdout)
    check_shape("cape doctor", document)
    assert document["ok"] is False
    checks = document["checks"]
    assert [c["check"] for c in checks][:3] == ["nitro-cli", "allocator", "vsock"]
    assert {c["status"] for c in checks} == {"ok", "FAIL", "skip"}
