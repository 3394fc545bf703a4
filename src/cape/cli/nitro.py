"""Nitro-mode options of ``cape serve`` (parsing only; the platform does the work)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cape.cli.common import UsageError
from cape.platform.nitro import NitroOptions

__all__ = ["nitro_options"]


_AWS_KEYS = ("root", "region", "account", "admin-role-arn", "enclave-role-arn")


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
    settings: dict[str, str] = {}
    for item in aws:
        key, sep, value = item.partition("=")
        if not sep or key not in _AWS_KEYS or not value:
            raise UsageError(f"--aws {item[:60]!r}: use one of {', '.join(_AWS_KEYS)} as KEY=VALUE")
        settings[key] = value
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
