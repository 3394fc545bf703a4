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

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cape.crypto.keyanswers import IDENTITY_PCR, AnswerSigner, identity_pcr
from cape.enclave.measure import RuntimeMeasurement, measure_runtime
from cape.enclave.provision import encode_credentials
from cape.enclave.secure_module.simulated import SimulatedAuthority
from cape.host.launcher import SimulatedLauncher, Tap
from cape.kms.base import KeyPolicy
from cape.kms.local import DB_FILE, LocalKeyService, load_master_key
from cape.kms.proxy import serve_kms_request

__all__ = ["LocalPlatform", "kms_identity", "runtime_key_policy"]


def kms_identity(master_key: bytes) -> AnswerSigner:
    """The built-in key service's identity key, derived from its master key (HKDF-SHA256), so
    it is stable across restarts without another secret file."""
    seed = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"cape-kms-identity-v1"
    ).derive(master_key)
    return AnswerSigner(Ed25519PrivateKey.from_private_bytes(seed))


def runtime_key_policy(measurement: RuntimeMeasurement, identity: bytes | None = None) -> KeyPolicy:
    """Keys may be released only to a runtime measuring exactly like this one (PCR0-2) and,
    given the key service's ``identity``, trusting exactly that key service (PCR16)."""
    pcrs = {
        0: frozenset({measurement.pcr0}),
        1: frozenset({measurement.pcr1}),
        2: frozenset({measurement.pcr2}),
    }
    if identity is not None:
        pcrs[IDENTITY_PCR] = frozenset({identity_pcr(identity)})
    return KeyPolicy(pcrs=pcrs)


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
        if master_key is None:
            master_key = load_master_key(data_dir)
        self.identity = kms_identity(master_key)
        self.policy = policy or runtime_key_policy(measure_runtime(), self.identity.public_bytes)
        self.kms = LocalKeyService(
            data_dir / DB_FILE,
            master_key=master_key,
            trusted_root=self.authority.root_certificate,
            default_policy=self.policy,
        )

    def _provision(self) -> Mapping[str, Any]:
        return encode_credentials(self.authority.issue_instance(dt.datetime.now(dt.UTC)))

    def _kms(self, message: dict[str, Any]) -> dict[str, Any]:
        return serve_kms_request(self.kms, message, signer=self.identity)

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
            runtime_args=["--kms-identity", self.identity.public_bytes.hex(), *runtime_args],
        )

    def close(self) -> None:
        self.kms.close()


def runtime_pcrs() -> dict[int, bytes]:
    """PCR0-2 of the enclave runtime this installation would start (what clients pin)."""
    measurement = measure_runtime()
    return {0: measurement.pcr0, 1: measurement.pcr1, 2: measurement.pcr2}
