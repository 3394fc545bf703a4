"""The simulated platform on one machine: simulated attestation authority, built-in key service
and enclave launcher, wired together. ``cape serve`` builds on this; tests and benchmarks use
it directly. Simulated mode offers no hardware guarantee: whoever controls this machine
controls the "enclaves" too.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cape.enclave.measure import RuntimeMeasurement, measure_runtime
from cape.enclave.provision import encode_credentials
from cape.enclave.secure_module.simulated import SimulatedAuthority
from cape.host.launcher import SimulatedLauncher, Tap
from cape.kms.base import KeyPolicy
from cape.kms.local import LocalKeyService
from cape.kms.proxy import serve_kms_request

__all__ = ["LocalPlatform", "isolation_problem", "runtime_key_policy"]


def runtime_key_policy(measurement: RuntimeMeasurement) -> KeyPolicy:
    """Keys may be released only to a runtime measuring exactly like this one (PCR0-2)."""
    return KeyPolicy(
        pcrs={
            0: frozenset({measurement.pcr0}),
            1: frozenset({measurement.pcr1}),
            2: frozenset({measurement.pcr2}),
        }
    )


class LocalPlatform:
    """A simulated authority, a key service under ``data_dir`` and a launcher for enclaves."""

    def __init__(
        self,
        data_dir: Path,
        *,
        authority: SimulatedAuthority | None = None,
        master_key: bytes | None = None,
        policy: KeyPolicy | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.authority = authority or SimulatedAuthority.generate()
        self.policy = policy or runtime_key_policy(measure_runtime())
        if master_key is None:
            self.kms = LocalKeyService.open(
                data_dir, trusted_root=self.authority.root_certificate, default_policy=self.policy
            )
        else:
            self.kms = LocalKeyService(
                data_dir / "kms.sqlite3",
                master_key=master_key,
                trusted_root=self.authority.root_certificate,
                default_policy=self.policy,
            )

    def _provision(self) -> Mapping[str, Any]:
        return encode_credentials(self.authority.issue_instance(dt.datetime.now(dt.UTC)))

    def _kms(self, message: dict[str, Any]) -> dict[str, Any]:
        return serve_kms_request(self.kms, message)

    def launcher(
        self,
        *,
        extra_env: Mapping[str, str] | None = None,
        tap: Tap | None = None,
        runtime_args: Sequence[str] = (),
    ) -> SimulatedLauncher:
        return SimulatedLauncher(
            kms=self._kms,
            provision=self._provision,
            extra_env=extra_env,
            tap=tap,
            runtime_args=runtime_args,
        )

    def close(self) -> None:
        self.kms.close()


def runtime_pcrs() -> dict[int, bytes]:
    """PCR0-2 of the enclave runtime this installation would start (what clients pin)."""
    measurement = measure_runtime()
    return {0: measurement.pcr0, 1: measurement.pcr1, 2: measurement.pcr2}


def isolation_problem() -> str | None:
    """Why this machine cannot sandbox user code (bubblewrap, user namespaces, root), with
    the install command; ``None`` when it can. Runs one probe sandbox (cached)."""
    from cape.enclave.sandbox import check_isolation
    from cape.errors import SandboxError

    try:
        check_isolation()
    except SandboxError as exc:
        return exc.diagnostics()
    return None
