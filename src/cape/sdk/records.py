"""What the SDK's calls return: deployed functions, attestation facts, function and token
records (re-exported by :mod:`cape.sdk.client`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cape.sdk.function_ref import FunctionRef


@dataclass(frozen=True)
class Deployed:
    """A function just deployed: its id, the checksum the enclave measured, ``user/name``."""

    id: str
    checksum: str
    name: str
    vendored: tuple[str, ...] = ()

    @property
    def function_ref(self) -> FunctionRef:
        return FunctionRef(
            id=self.id, name=self.name if "/" in self.name else None, checksum=self.checksum
        )


@dataclass(frozen=True)
class Attested:
    """What the last verified session's attestation document established."""

    root_sha256: str
    module_id: str
    issued_at: str
    pcrs: dict[int, str]
    function_checksum: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "root_sha256": self.root_sha256,
            "module_id": self.module_id,
            "issued_at": self.issued_at,
            "pcrs": {str(i): v for i, v in self.pcrs.items()},
            "function_checksum": self.function_checksum,
        }


@dataclass(frozen=True)
class FunctionInfo:
    id: str
    name: str
    created_at: str
    checksum: str | None
    public: bool


@dataclass(frozen=True)
class TokenInfo:
    id: str
    name: str
    description: str
    created_at: str
    expires_at: str | None
    last_used: str | None
    function_id: str | None


@dataclass(frozen=True)
class CreatedToken:
    """A new token. ``token`` is shown once; the server keeps only its metadata."""

    id: str
    token: str
