"""The simulated platform on one machine: simulated attestation authority, built-in key service
and enclave launcher, wired together. ``cape serve`` builds on this; tests and benchmarks use
it directly. Simulated mode offers no hardware guarantee: whoever controls this machine
controls the "enclaves" too.

**Signed runtime.** As a Nitro release is a signed EIF, the simulated runtime is signed: the
platform holds an image-signing key (``cape serve`` keeps it in ``DIR/image-signing/``),
signs the runtime's measured PCR0 with it and provisions the signature section with every
enclave, whose secure module then reports that signer's PCR8. New keys get a ``signer``
policy (PCR8), so an upgraded runtime signed by the same key keeps every user's key; a
runtime changed after signing, or signed by another key, has another PCR8 and is refused.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cape._internal.timefile import write_private
from cape.crypto.eif_signature import ImageSigner
from cape.crypto.keyanswers import IDENTITY_PCR, AnswerSigner, identity_pcr
from cape.enclave.measure import RuntimeMeasurement, measure_runtime
from cape.enclave.provision import encode_credentials
from cape.enclave.secure_module.simulated import InstanceCredentials, SimulatedAuthority
from cape.host.launcher import SimulatedLauncher, Tap
from cape.kms.base import KeyPolicy
from cape.kms.local import DB_FILE, LocalKeyService, load_master_key
from cape.kms.proxy import serve_kms_request

__all__ = [
    "IMAGE_SIGNING_DIR",
    "InstanceIssuer",
    "LocalPlatform",
    "SimulatedPlatform",
    "isolation_problem",
    "kms_identity",
    "load_image_signer",
    "runtime_key_policy",
    "signer_key_policy",
    "with_kms_identity",
]

IMAGE_SIGNING_DIR = "image-signing"
_KEY_FILE, _CERT_FILE = "key.pem", "cert.pem"


def kms_identity(master_key: bytes) -> AnswerSigner:
    """The built-in key service's identity key, derived from its master key (HKDF-SHA256), so
    it is stable across restarts without another secret file."""
    seed = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"cape-kms-identity-v1"
    ).derive(master_key)
    return AnswerSigner(Ed25519PrivateKey.from_private_bytes(seed))


def with_kms_identity(policy: KeyPolicy, identity: bytes) -> KeyPolicy:
    """``policy``, releasing keys only to enclaves that trust the key service ``identity``
    (PCR16, measured by the runtime from its configuration)."""
    pcrs = dict(policy.pcrs)
    pcrs[IDENTITY_PCR] = frozenset({identity_pcr(identity)})
    return KeyPolicy(
        pcrs=pcrs, allow_debug=policy.allow_debug, max_document_age=policy.max_document_age
    )


def runtime_key_policy(measurement: RuntimeMeasurement) -> KeyPolicy:
    """Keys may be released only to a runtime measuring exactly like this one (PCR0-2)."""
    return KeyPolicy.measurement(measurement.pcr0, measurement.pcr1, measurement.pcr2)


def signer_key_policy(signer: ImageSigner) -> KeyPolicy:
    """Keys may be released to any runtime signed by ``signer`` (PCR8)."""
    return KeyPolicy.signer(signer.identity.pcr8)


def load_image_signer(directory: Path, *, create: bool = True) -> ImageSigner | None:
    """The image-signing key in ``directory`` (``key.pem`` 0600, ``cert.pem``), created on
    first use unless ``create`` is false (then ``None`` when absent)."""
    key_path, cert_path = directory / _KEY_FILE, directory / _CERT_FILE
    if key_path.exists() and cert_path.exists():
        return ImageSigner.from_pem(key_path.read_bytes(), cert_path.read_bytes())
    if not create:
        return None
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    signer = ImageSigner.generate("Cape simulated runtime signer")
    write_private(key_path, signer.private_key_pem())
    write_private(cert_path, signer.certificate_pem, 0o644)
    return signer


class InstanceIssuer(Protocol):
    """Issues a simulated secure module's instance credentials: the cluster's
    :class:`SimulatedAuthority` itself, or a node's intermediate
    (:class:`~cape.enclave.secure_module.cluster.NodeAuthority`)."""

    @property
    def root_certificate(self) -> x509.Certificate: ...

    def issue_instance(self, now: dt.datetime) -> InstanceCredentials: ...


class SimulatedPlatform:
    """What simulated enclaves are started with: instance credentials from ``authority``, the
    runtime's signature (PCR8), and key-service calls answered by :meth:`_kms`, signed by the
    key service whose public identity the runtime measures into PCR16."""

    authority: InstanceIssuer
    image_signature: bytes | None
    identity_public: bytes

    def _provision(self) -> Mapping[str, Any]:
        return encode_credentials(
            self.authority.issue_instance(dt.datetime.now(dt.UTC)),
            image_signature=self.image_signature,
        )

    def _kms(self, message: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

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
            runtime_args=["--kms-identity", self.identity_public.hex(), *runtime_args],
        )

    def close(self) -> None:
        """Release what the platform holds (override)."""


class LocalPlatform(SimulatedPlatform):
    """A simulated authority, a key service under ``data_dir`` and a launcher for enclaves."""

    def __init__(
        self,
        data_dir: Path,
        *,
        authority: SimulatedAuthority | None = None,
        master_key: bytes | None = None,
        policy: KeyPolicy | None = None,
        signer: ImageSigner | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.authority = authority or SimulatedAuthority.generate()
        self.signer = signer or ImageSigner.generate("Cape simulated runtime signer")
        self.image_signature = self.signer.sign_pcr0(measure_runtime().pcr0)
        if master_key is None:
            master_key = load_master_key(data_dir)
        self.identity = kms_identity(master_key)
        self.identity_public = self.identity.public_bytes
        self.policy = policy or with_kms_identity(
            signer_key_policy(self.signer), self.identity.public_bytes
        )
        self.kms = LocalKeyService(
            data_dir / DB_FILE,
            master_key=master_key,
            trusted_root=self.authority.root_certificate,
            default_policy=self.policy,
        )

    def _kms(self, message: dict[str, Any]) -> dict[str, Any]:
        return serve_kms_request(self.kms, message, signer=self.identity)

    def close(self) -> None:
        self.kms.close()


def runtime_pcrs(data_dir: Path | None = None) -> dict[int, bytes]:
    """PCR0-2 of the enclave runtime this installation would start (what clients pin), and
    PCR8 when ``data_dir`` (a ``cape serve`` data directory) holds an image-signing key."""
    measurement = measure_runtime()
    pcrs = {0: measurement.pcr0, 1: measurement.pcr1, 2: measurement.pcr2}
    if data_dir is not None:
        signer = load_image_signer(data_dir / IMAGE_SIGNING_DIR, create=False)
        if signer is not None:
            pcrs[8] = signer.identity.pcr8
    return pcrs


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
