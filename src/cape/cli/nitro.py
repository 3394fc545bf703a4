"""Nitro-mode CLI: ``cape serve``'s Nitro options and ``cape doctor`` (parsing and rendering
only; :mod:`cape.platform.nitro` and :mod:`cape.platform.doctor` do the work)."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated

import typer

from cape.cli.common import Common, UsageError, command, emit_json
from cape.platform.nitro import NitroOptions

__all__ = ["app", "nitro_options"]

app = typer.Typer()


_AWS_KEYS = ("root", "region", "account", "admin-role-arn", "enclave-role-arn")
"""``--aws KEY=VALUE`` keys (``cape doctor`` ignores ``root``: it takes ``--attestation-root``)."""


def _aws_settings(aws: Sequence[str]) -> dict[str, str]:
    settings: dict[str, str] = {}
    for item in aws:
        key, sep, value = item.partition("=")
        if not sep or key not in _AWS_KEYS or not value:
            raise UsageError(f"--aws {item[:60]!r}: use one of {', '.join(_AWS_KEYS)} as KEY=VALUE")
        settings[key] = value
    return settings


def nitro_options(
    enclave: str, eif: Path | None, cpus: int, memory_mib: int, aws: Sequence[str]
) -> NitroOptions | None:
    """``cape serve``'s ``--enclave``, ``--eif``, ``--enclave-cpus``, ``--enclave-memory`` and
    ``--aws KEY=VALUE`` options as :class:`NitroOptions` (``None`` in simulated mode).

    Raises:
        UsageError: an unknown mode, a Nitro option in simulated mode, or a missing one.
    """
    if enclave not in ("simulated", "nitro"):
        raise UsageError(f"--enclave must be simulated or nitro, not {enclave[:40]!r}")
    if enclave == "simulated":
        if eif is not None or aws:
            raise UsageError("--eif and --aws need --enclave nitro")
        return None
    settings = _aws_settings(aws)
    missing = [key for key in _AWS_KEYS if key not in settings]
    if eif is None or missing:
        needed = ["--eif"] if eif is None else []
        needed += [f"--aws {key}=…" for key in missing]
        raise UsageError(f"--enclave nitro needs {', '.join(needed)}")
    return NitroOptions(
        eif=eif,
        aws_root=Path(settings["root"]),
        region=settings["region"],
        account_id=settings["account"],
        admin_role_arn=settings["admin-role-arn"],
        enclave_role_arn=settings["enclave-role-arn"],
        cpu_count=cpus,
        memory_mib=memory_mib,
    )


@command(app, "doctor")
def doctor(
    common: Common,
    eif: Annotated[Path, typer.Option("--eif", help="The enclave image.")] = Path(
        "/var/lib/cape/cape.eif"
    ),
    enclave_cpus: Annotated[int, typer.Option("--enclave-cpus", min=1)] = 2,
    enclave_memory: Annotated[int, typer.Option("--enclave-memory", min=64)] = 2048,
    aws: Annotated[
        list[str] | None,
        typer.Option(
            "--aws",
            metavar="KEY=VALUE",
            help="region, account, admin-role-arn, enclave-role-arn (for the key policy "
            "check); repeat for each.",
        ),
    ] = None,
    doctor_key: Annotated[
        str | None, typer.Option("--doctor-key", help="KMS key (alias) to check the policy of.")
    ] = None,
    user: Annotated[
        str | None,
        typer.Option(
            "--user",
            help="Check this user's key document from the server (--url, --ca-file; pin "
            "the AWS root with --attestation-root).",
        ),
    ] = None,
) -> None:
    """Check this Nitro parent instance: nitro-cli, allocator, vsock, image, enclaves, the
    KMS key policy and a key document against the AWS Nitro root (docs/deploy-aws.md).

    Prints one line per check (or JSON) and exits 1 if one fails."""
    from cape.platform.doctor import DoctorOptions, run_doctor

    settings = _aws_settings(aws or [])
    options = DoctorOptions(
        eif=eif,
        cpu_count=enclave_cpus,
        memory_mib=enclave_memory,
        doctor_key=doctor_key,
        account_id=settings.get("account"),
        admin_role_arn=settings.get("admin-role-arn"),
        enclave_role_arn=settings.get("enclave-role-arn"),
    )
    if doctor_key is not None and "region" in settings:
        import boto3

        options.kms_client = boto3.client("kms", region_name=settings["region"])
    if user is not None:
        options.fetch_document = _document_fetcher(common, user)
    checks = asyncio.run(run_doctor(options))
    if common.json:
        emit_json(
            {
                "checks": [
                    {"check": c.name, "status": c.status, "detail": c.detail} for c in checks
                ],
                "ok": all(c.status != "FAIL" for c in checks),
            }
        )
    else:
        for check in checks:
            typer.echo(check.line())
    if any(check.status == "FAIL" for check in checks):
        raise typer.Exit(1)


def _document_fetcher(common: Common, user: str) -> Callable[[str], None]:
    def fetch(pcr8: str) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            common.client().key(
                username=user, key_path=Path(scratch) / "key.der", pcrs={8: [pcr8]}, refresh=True
            )

    return fetch
