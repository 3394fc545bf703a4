"""deploy/aws: the CloudFormation kit is cfn-lint clean, its KMS key policy is exactly what
Cape's generator writes, the commands its user data runs are ones this cape accepts, and the
``cape serve --config`` file it writes is one Cape's own loader accepts, sharing what a cluster
must share (database, bucket, token-signing key, certificate).

What cannot run here (an AWS account, a parent instance) is listed on docs/mocks.md; the
template's commands are checked as far as this machine can: parsed by the real CLI, which
then stops at the first check that needs Nitro hardware.
"""

from __future__ import annotations

import datetime as dt
import json
import os
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
from cape.host.ids import new_id
from cape.host.tokens import TokenIssuer
from cape.kms.aws import key_policy_document
from cape.platform.config import load_settings
from cape.platform.nitro import NitroOptions, image_key_policy
from cape.platform.operator import role_pcr3
from tests.samples import ROOT_PEM
from tests.services import S3_ENV, MotoS3

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
    "CapePackage": "cape[postgres,aws]",
    "AWS::Region": REGION,
    "AWS::AccountId": ACCOUNT,
    "AWS::StackName": STACK,
    "AWS::Partition": "aws",
    "InstanceRole.Arn": ROLE,
    "Database.Endpoint.Address": "cape.abc123.eu-west-1.rds.amazonaws.com",
    "Database.Endpoint.Port": "5432",
    "DatabaseSecret": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:DatabaseSecret-abc",
    "SigningKeySeed": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:SigningKeySeed-abc",
    "TlsSecretArn": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:cape-tls-abc",
}
PASSWORD = "Sample0Password1FromSecretsManager"
CONFIG = "/etc/cape/cape.toml.in"


def _template() -> dict[str, Any]:
    template, problems = decode(str(TEMPLATE))
    assert not problems and template is not None
    return dict(template)


def _sub(text: str, parameters: dict[str, str] = PARAMETERS) -> str:
    return re.sub(r"\$\{([^}]+)\}", lambda m: parameters[m.group(1)], text)


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


def _user_data(parameters: dict[str, str] = PARAMETERS) -> str:
    launch = _template()["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]
    return _sub(launch["UserData"]["Fn::Base64"]["Fn::Sub"], parameters)


def _heredocs(script: str) -> list[tuple[str, str, str]]:
    """Each ``COMMAND <<'EOF' ... EOF`` of the script: (command line, body, the shell text
    between it and the previous heredoc)."""
    found, position = [], 0
    for match in re.finditer(r"^([^\n]*)<<'EOF'\n(.*?)^EOF$", script, re.MULTILINE | re.DOTALL):
        found.append((match.group(1).strip(), match.group(2), script[position : match.start()]))
        position = match.end()
    return found


def _written(script: str, path: str) -> str:
    """What the script's ``cat > PATH`` and ``cat >> PATH`` heredocs leave in ``path``, as a
    shell would run them: the block after ``if [ -n '' ]`` (TlsSecretArn empty) is skipped."""
    text = ""
    for command, body, before in _heredocs(script):
        if command in (f"cat > {path}", f"cat >> {path}"):
            if "if [ -n '' ]" in before.splitlines()[-1]:
                continue
            text = body if command.startswith("cat > ") else text + body
    assert text, f"the user data writes no {path}"
    return text


def _config_text(*, tls: bool) -> str:
    """The configuration the user data writes, the boot script's password placeholder filled."""
    parameters = {**PARAMETERS, "TlsSecretArn": PARAMETERS["TlsSecretArn"] if tls else ""}
    return _written(_user_data(parameters), CONFIG).replace("@DATABASE_PASSWORD@", PASSWORD)


@pytest.mark.parametrize("tls", [True, False], ids=["operator-certificate", "own-ca"])
def test_the_config_file_is_one_cape_serve_accepts_and_shares_the_cluster_state(
    tmp_path: Path, tls: bool
) -> None:
    config = tmp_path / "cape.toml"
    config.write_text(_config_text(tls=tls), encoding="utf-8")
    settings = load_settings(config, env={})  # Cape's own loader: a misspelt key fails here
    database = PARAMETERS["Database.Endpoint.Address"]
    assert settings["database_url"] == (
        f"postgresql+psycopg://cape:{PASSWORD}@{database}:5432/cape?sslmode=require"
    )
    assert settings["blob_store"] == f"s3://{PARAMETERS['Bucket']}/state"
    assert settings["auth_dir"] == Path("/etc/cape/shared")  # where the boot script puts the key
    assert settings["nitro"] == NitroOptions(
        eif=Path("/var/lib/cape/cape.eif"), aws_root=Path("/var/lib/cape/root.pem"),
        region=REGION, account_id=ACCOUNT, admin_role_arn=ADMIN, enclave_role_arn=ROLE,
        cpu_count=2, memory_mib=2048,
    )  # fmt: skip
    if tls:
        assert settings["tls_cert"] == Path("/etc/cape/tls/fullchain.pem")
        assert settings["tls_key"] == Path("/etc/cape/tls/privkey.pem")
    else:
        assert "tls_cert" not in settings and "tls_key" not in settings


def test_the_instances_may_read_exactly_the_secrets_the_boot_script_reads() -> None:
    resources = _template()["Resources"]
    statements = resources["InstanceRole"]["Properties"]["Policies"][0]["PolicyDocument"]
    (readable,) = [
        s["Resource"]
        for s in statements["Statement"]
        if s["Action"] == "secretsmanager:GetSecretValue"
    ]
    # The TLS secret only when one was given (Fn::If on HasTls).
    assert readable[:2] == [{"Ref": "DatabaseSecret"}, {"Ref": "SigningKeySeed"}]
    assert readable[2] == {"Fn::If": ["HasTls", {"Ref": "TlsSecretArn"}, {"Ref": "AWS::NoValue"}]}
    read = re.findall(r'secret\("\$\{(\w+)\}"\)', _boot_script())
    assert sorted(read) == ["DatabaseSecret", "SigningKeySeed", "TlsSecretArn"]
    # Generated once by the stack, so every instance gets the same; none is in plain text.
    for name in ("DatabaseSecret", "SigningKeySeed"):
        assert "GenerateSecretString" in resources[name]["Properties"]
    database = resources["Database"]["Properties"]
    assert "{{resolve:secretsmanager:${DatabaseSecret}" in database["MasterUserPassword"]["Fn::Sub"]


def _boot_script() -> str:
    (body,) = [b for c, b, _ in _heredocs(_sub_raw()) if c == "/opt/cape/bin/python -"]
    return body


def _sub_raw() -> str:
    launch = _template()["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]
    return str(launch["UserData"]["Fn::Base64"]["Fn::Sub"])


@pytest.fixture(scope="module")
def secrets_manager(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """moto's server standing in for AWS Secrets Manager (no AWS account here; docs/mocks.md)."""
    server = MotoS3(tmp_path_factory.mktemp("moto-secrets")).start()
    try:
        yield server
    finally:
        server.stop()


def test_two_instances_booted_from_the_same_secrets_share_the_token_key(
    tmp_path: Path, secrets_manager: MotoS3
) -> None:
    """The user data's boot script, run as written (its /etc/cape moved under tmp_path)
    against Secrets Manager: two instances write the same token-signing key, a config Cape
    loads with the database password in it, and the operator's certificate."""
    import boto3

    client = boto3.client(
        "secretsmanager", endpoint_url=secrets_manager.endpoint_url, region_name=REGION,
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
    )  # fmt: skip
    arns = {
        "DatabaseSecret": client.create_secret(
            Name=f"db-{tmp_path.name}",
            SecretString=json.dumps({"username": "cape", "password": PASSWORD}),
        )["ARN"],
        "SigningKeySeed": client.create_secret(
            Name=f"seed-{tmp_path.name}", SecretString="a" * 20 + "B7" * 22
        )["ARN"],
        "TlsSecretArn": client.create_secret(
            Name=f"tls-{tmp_path.name}",
            SecretString=json.dumps({"certificate": "CHAIN\n", "private_key": "KEY\n"}),
        )["ARN"],
    }
    keys = []
    for node in ("a", "b"):
        etc = tmp_path / node / "etc-cape"
        etc.mkdir(parents=True)
        script = _user_data({**PARAMETERS, **arns}).replace("/etc/cape", str(etc))
        template = _written(script, str(etc / "cape.toml.in"))
        (etc / "cape.toml.in").write_text(template, encoding="utf-8")
        boot = next(b for c, b, _ in _heredocs(script) if c == "/opt/cape/bin/python -")
        result = subprocess.run(
            [sys.executable, "-c", boot], capture_output=True, text=True, timeout=120,
            env={**os.environ, **S3_ENV, "AWS_ENDPOINT_URL": secrets_manager.endpoint_url},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        settings = load_settings(etc / "cape.toml", env={})
        assert PASSWORD in settings["database_url"] and "tls_cert" in settings
        assert (etc / "cape.toml").stat().st_mode & 0o077 == 0
        assert (etc / "tls" / "fullchain.pem").read_text() == "CHAIN\n"
        assert (etc / "tls" / "privkey.pem").read_text() == "KEY\n"
        keys.append(TokenIssuer.open(etc / "shared"))  # Cape's own key loader (mode checks)
    now = dt.datetime.now(dt.UTC)
    user = new_id()
    token = keys[0].issue(subject=user, token_id=new_id(), kind="access", issued_at=now)
    assert keys[1].verify(token, now=now).subject == user  # issued by a, accepted by b


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
    assert argv == ["/opt/cape/bin/cape", "serve", "--config", "/etc/cape/cape.toml"]
    # The file the boot script writes, with this machine's copy of the AWS root.
    config = tmp_path / "cape.toml"
    root = ROOT_PEM  # ../shared/nitro-samples: never copied into the repository
    if not root.is_file():
        pytest.skip(f"no AWS root at {root}")
    text = _config_text(tls=False).replace("/var/lib/cape/root.pem", str(root))
    config.write_text(text, encoding="utf-8")
    args = ["serve", "--config", str(config)]
    monkeypatch.setenv("CAPE_DATA_DIR", str(tmp_path / "data"))  # the environment wins
    monkeypatch.setenv("PATH", str(tmp_path / "no-nitro-cli"))
    result = CliRunner().invoke(app, args)
    # Every option parsed (a usage error would exit 2); it stops at the parent-instance check.
    assert result.exit_code == 1, result.stderr
    assert result.stderr.strip() == (
        "Error: nitro-cli is not on PATH: install aws-nitro-enclaves-cli on the parent instance"
    )
