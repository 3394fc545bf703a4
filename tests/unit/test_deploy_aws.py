"""deploy/aws: the CloudFormation kit is cfn-lint clean, its KMS key policy is exactly what
Cape's generator writes, and the commands its user data runs are ones this cape accepts.

What cannot run here (an AWS account, a parent instance) is listed on docs/mocks.md; the
template's commands are checked as far as this machine can: parsed by the real CLI, which
then stops at the first check that needs Nitro hardware.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cfnlint.decode import decode
from typer.testing import CliRunner

from cape.cli.app import app
from cape.kms.aws import key_policy_document
from cape.platform.nitro import image_key_policy
from cape.platform.operator import role_pcr3

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "deploy" / "aws" / "cape-nitro.yaml"
ACCOUNT = "123456789012"
STACK = "cape-prod"
REGION = "eu-west-1"
ADMIN = f"arn:aws:iam::{ACCOUNT}:role/cape-admin"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/{STACK}-enclave"
PCR8 = bytes(range(48))
IMAGE_PCRS = {0: b"\x10" * 48, 1: b"\x11" * 48, 2: b"\x12" * 48, 8: PCR8}
PARAMETERS = {
    "AdminRoleArn": ADMIN,
    "Pcr8": PCR8.hex(),
    "Pcr3": role_pcr3(ROLE).hex(),
    "EnclaveMemoryMiB": "2048",
    "Bucket": "cape-prod-bucket",
    "EifKey": "cape.eif",
    "CapePackage": "cape[aws]",
    "AWS::Region": REGION,
    "AWS::AccountId": ACCOUNT,
    "AWS::StackName": STACK,
    "AWS::Partition": "aws",
    "InstanceRole.Arn": ROLE,
}


def _template() -> dict[str, Any]:
    template, problems = decode(str(TEMPLATE))
    assert not problems and template is not None
    return dict(template)


def _sub(text: str) -> str:
    return re.sub(r"\$\{([^}]+)\}", lambda m: PARAMETERS[m.group(1)], text)


def _resolve(value: Any) -> Any:
    """Resolve the intrinsic functions the template uses, for PARAMETERS."""
    if isinstance(value, dict):
        if set(value) == {"Ref"}:
            return PARAMETERS[value["Ref"]]
        if set(value) == {"Fn::GetAtt"}:
            target = value["Fn::GetAtt"]
            return PARAMETERS[target if isinstance(target, str) else ".".join(target)]
        if set(value) == {"Fn::Sub"}:
            return _sub(value["Fn::Sub"])
        return {key: _resolve(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item) for item in value]
    return value


def test_cfn_lint_is_clean() -> None:
    """``cfn-lint deploy/aws/*.yaml`` (its console script, from the test extra)."""
    templates = sorted(str(p) for p in TEMPLATE.parent.glob("*.yaml"))
    cfn_lint = Path(sys.executable).with_name("cfn-lint")
    result = subprocess.run([str(cfn_lint), *templates], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_doctor_key_has_the_policy_cape_gives_every_key() -> None:
    resource = _template()["Resources"]["DoctorKey"]["Properties"]
    assert resource["KeySpec"] == "RSA_4096" and resource["KeyUsage"] == "ENCRYPT_DECRYPT"
    in_template = _resolve(resource["KeyPolicy"])
    # What `cape serve --enclave nitro` pins new keys to for a signed image on this role.
    generated = key_policy_document(
        ACCOUNT, ADMIN, ROLE, image_key_policy(IMAGE_PCRS, role_arn=ROLE)
    )
    assert in_template == generated
    # And what the guide has the operator print (docs/deploy-aws.md, step 3).
    printed = CliRunner().invoke(
        app,
        ["kms", "policy", "--aws", "--pcr8", PCR8.hex(), "--role", ROLE, "--account", ACCOUNT,
         "--admin-role", ADMIN, "-o", "json"],
    )  # fmt: skip
    assert printed.exit_code == 0, printed.stderr
    assert json.loads(printed.stdout) == in_template


def _user_data() -> str:
    launch = _template()["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]
    return _sub(launch["UserData"]["Fn::Base64"]["Fn::Sub"])


def test_vsock_proxy_reaches_only_kms_of_the_region() -> None:
    script = _user_data()
    allowlist = script.split("vsock-proxy.yaml <<'EOF'", 1)[1].split("EOF", 1)[0]
    assert re.findall(r"address: ([^,}]+)", allowlist) == [f"kms.{REGION}.amazonaws.com"]
    assert f"vsock-proxy 8000 kms.{REGION}.amazonaws.com 443" in script


def test_the_systemd_unit_runs_a_serve_command_this_cape_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (line,) = [x for x in _user_data().splitlines() if x.startswith("ExecStart=/opt/cape/")]
    argv = shlex.split(line.removeprefix("ExecStart="))
    assert argv[:2] == ["/opt/cape/bin/cape", "serve"]
    args = [
        {"/var/lib/cape/root.pem": str(ROOT / "deploy/aws/AWS_NitroEnclaves_Root-G1.pem")}.get(
            a.removeprefix("root="), a
        )
        for a in argv[1:]
    ]
    args = [f"root={a}" if a.endswith(".pem") else a for a in args]
    monkeypatch.setenv("CAPE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "no-nitro-cli"))
    result = CliRunner().invoke(app, args)
    # Every option parsed (a usage error would exit 2); it stops at the parent-instance check.
    assert result.exit_code == 1, result.stderr
    assert result.stderr.strip() == (
        "Error: nitro-cli is not on PATH: install aws-nitro-enclaves-cli on the parent instance"
    )
