"""``cape doctor``: check a Nitro parent instance on first boot, one line per check.

Checks, in order (each reports ``ok``, ``FAIL`` or ``skip`` with what it saw):

1. ``nitro-cli``: on ``PATH`` and answers ``--version``.
2. ``allocator``: the CPUs and huge-page memory the allocator set aside fit one enclave.
3. ``vsock``: ``/dev/vsock`` exists.
4. ``image``: ``nitro-cli describe-eif`` reads the image; a signed image has a PCR8.
5. ``enclaves``: ``describe-enclaves`` lists running enclaves, none in debug mode.
6. ``kms key policy``: the doctor key's policy (AWS KMS ``GetKeyPolicy``) is exactly a Cape key
   policy for this account and roles, pinned to the image's PCR8 and the role's PCR3.
7. ``document``: the running server's key document for a user verifies against the AWS Nitro
   root with the image's PCR8 (the SDK's own verification, over the server's TLS).

**Needs real hardware and an AWS account**: every check reads the real parent instance
(nitro-cli, sysfs, ``/dev/vsock``), AWS KMS (instance-role credentials) or the running
enclave. Tests run each check against fakes (a fake ``nitro-cli``, a fake sysfs, moto's KMS
server, a failing fetch); docs/mocks.md lists what only a real first boot shows.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cape.errors import CapeError
from cape.host.nitro import NitroCli, NitroError, allocator_resources
from cape.kms.aws import key_policy_from_document
from cape.kms.base import KeyPolicy
from cape.platform.nitro import image_key_policy

__all__ = ["Check", "DoctorOptions", "run_doctor"]


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "ok", "FAIL" or "skip"
    detail: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.name}: {self.detail}"


@dataclass
class DoctorOptions:
    eif: Path = Path("/var/lib/cape/cape.eif")
    cpu_count: int = 2
    memory_mib: int = 2048
    nitro_cli: str = "nitro-cli"
    sysfs: Path = Path("/sys")
    vsock: Path = Path("/dev/vsock")
    kms_client: Any = None
    """A boto3 KMS client for the key-policy check (``None``: skipped)."""
    doctor_key: str | None = None
    account_id: str | None = None
    admin_role_arn: str | None = None
    enclave_role_arn: str | None = None
    fetch_document: Callable[[str], None] | None = None
    """Fetches a key document and verifies it pinning PCR8 to this hex (``None``: skipped)."""
    image_pcrs: dict[int, bytes] = field(default_factory=dict)


def _nitro_cli(options: DoctorOptions) -> Check:
    if shutil.which(options.nitro_cli) is None:
        return Check("nitro-cli", "FAIL", "not on PATH: install aws-nitro-enclaves-cli")
    result = subprocess.run(
        [options.nitro_cli, "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        return Check("nitro-cli", "FAIL", f"--version failed: {result.stderr.strip()[:200]}")
    return Check("nitro-cli", "ok", result.stdout.strip()[:100])


def _allocator(options: DoctorOptions) -> Check:
    try:
        cpus, memory = allocator_resources(options.sysfs)
    except NitroError as exc:
        return Check("allocator", "FAIL", exc.diagnostics())
    fits = cpus >= options.cpu_count and memory >= options.memory_mib
    detail = f"{cpus} CPUs, {memory} MiB set aside; one enclave needs "
    detail += f"{options.cpu_count} CPUs, {options.memory_mib} MiB"
    return Check("allocator", "ok" if fits else "FAIL", detail)


def _vsock(options: DoctorOptions) -> Check:
    if options.vsock.exists():
        return Check("vsock", "ok", f"{options.vsock} present")
    return Check("vsock", "FAIL", f"{options.vsock} is missing (not an enclave-enabled instance?)")


async def _image(options: DoctorOptions, cli: NitroCli) -> Check:
    try:
        options.image_pcrs = await cli.describe_eif(options.eif)
    except NitroError as exc:
        return Check("image", "FAIL", exc.diagnostics())
    if not any(options.image_pcrs.get(8, b"")):
        return Check("image", "FAIL", f"{options.eif} is not signed (no PCR8): keys would be "
                     "pinned to PCR0-2 and lost with every new image")  # fmt: skip
    return Check("image", "ok", f"PCR8 {options.image_pcrs[8].hex()[:16]}…")


async def _enclaves(cli: NitroCli) -> Check:
    try:
        enclaves = await cli.describe_enclaves()
    except NitroError as exc:
        return Check("enclaves", "FAIL", exc.diagnostics())
    running = [e for e in enclaves if e.state == "RUNNING"]
    if not running:
        return Check("enclaves", "FAIL", "no enclave is running: is cape.service up?")
    cids = ", ".join(str(e.cid) for e in running)
    return Check("enclaves", "ok", f"{len(running)} running (CID {cids})")


def _kms_policy(options: DoctorOptions) -> Check:
    needed = (options.doctor_key, options.account_id, options.admin_role_arn)
    if options.kms_client is None or not all(needed) or options.enclave_role_arn is None:
        return Check("kms key policy", "skip", "no --doctor-key and --aws account/roles given")
    if not options.image_pcrs:
        return Check("kms key policy", "skip", "the image's PCRs are unknown")
    try:
        # GetKeyPolicy takes a key id or ARN, not an alias: resolve it first.
        described = options.kms_client.describe_key(KeyId=options.doctor_key)
        key_id = described["KeyMetadata"]["KeyId"]
        answer = options.kms_client.get_key_policy(KeyId=key_id, PolicyName="default")
        found = key_policy_from_document(
            answer["Policy"],
            account_id=str(options.account_id),
            admin_role_arn=str(options.admin_role_arn),
            enclave_role_arn=options.enclave_role_arn,
        )
    except CapeError as exc:
        return Check("kms key policy", "FAIL", exc.diagnostics())
    except Exception as exc:  # botocore's errors: reported, not raised
        return Check("kms key policy", "FAIL", f"{type(exc).__name__}: {exc}"[:300])
    expected = image_key_policy(options.image_pcrs, role_arn=options.enclave_role_arn)
    if dict(found.pcrs) != dict(expected.pcrs):
        pinned = ", ".join(f"PCR{i}" for i in found.pcrs)
        return Check(
            "kms key policy", "FAIL", f"pins {pinned} to other values than this image and role"
        )
    return Check("kms key policy", "ok", _pins(expected))


def _pins(policy: KeyPolicy) -> str:
    return ", ".join(f"PCR{i}={next(iter(v)).hex()[:16]}…" for i, v in policy.pcrs.items())


def _document(options: DoctorOptions) -> Check:
    if options.fetch_document is None:
        return Check("document", "skip", "no --user given")
    if not any(options.image_pcrs.get(8, b"")):
        return Check("document", "skip", "the image's PCR8 is unknown")
    try:
        options.fetch_document(options.image_pcrs[8].hex())
    except CapeError as exc:
        return Check("document", "FAIL", exc.diagnostics())
    return Check("document", "ok", "verifies against the AWS Nitro root with the image's PCR8")


async def run_doctor(options: DoctorOptions) -> list[Check]:
    """Run every check (none raises); the caller prints :meth:`Check.line` of each."""
    cli = NitroCli(options.nitro_cli)
    checks = [_nitro_cli(options), _allocator(options), _vsock(options)]
    checks.append(await _image(options, cli))
    checks.append(await _enclaves(cli))
    checks.append(await asyncio.to_thread(_kms_policy, options))
    checks.append(await asyncio.to_thread(_document, options))
    return checks
