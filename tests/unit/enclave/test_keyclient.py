"""The enclave's key client against the real local key service (the host's relay is a direct
call): one recipient document serves a short run of releases, and a refusal of a reused one is
retried once with a fresh document."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from pathlib import Path
from typing import Any

import pytest

from cape.crypto import envelope
from cape.crypto.keys import load_rsa_public_key
from cape.enclave import keyclient
from cape.enclave.keyclient import EnclaveKeyClient
from cape.enclave.measure import measure_runtime, simulated_pcrs
from cape.enclave.secure_module.simulated import SimulatedAuthority, SimulatedSecureModule
from cape.errors import KeyReleaseDeniedError
from cape.kms.base import KeyPolicy
from cape.kms.local import LocalKeyService
from cape.kms.proxy import serve_kms_request

OWNER = "alice"


class CountingModule(SimulatedSecureModule):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.documents = 0

    def attestation(self, **kwargs: Any) -> bytes:
        self.documents += 1
        return super().attestation(**kwargs)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[CountingModule, LocalKeyService]:
    now = dt.datetime.now(dt.UTC)
    authority = SimulatedAuthority.generate(now=now - dt.timedelta(days=1))
    instance = authority.issue_instance(now - dt.timedelta(minutes=1))
    pcrs = simulated_pcrs(measure_runtime(), instance_id=instance.instance_id)
    module = CountingModule(instance, pcrs=pcrs)
    service = LocalKeyService(
        tmp_path / "kms.sqlite3",
        master_key=os.urandom(32),
        trusted_root=authority.root_certificate,
        default_policy=KeyPolicy(pcrs={0: frozenset({pcrs[0]})}),
    )
    return module, service


async def _unwraps(
    module: CountingModule, service: LocalKeyService, blob: bytes, count: int
) -> list[bytes]:
    client: EnclaveKeyClient

    async def relay(message: dict[str, Any]) -> None:  # the host: pass it to the key service
        reply = await asyncio.to_thread(serve_kms_request, service, message)
        client.resolve({"rid": message["rid"], **reply})

    client = EnclaveKeyClient(module, relay)
    return [await client.unwrap(OWNER, blob) for _ in range(count)]


def _blob(service: LocalKeyService, dek: bytes) -> bytes:
    service.get_or_create_key(OWNER)
    return envelope.wrap_key(dek, load_rsa_public_key(service.get_public_key(OWNER)))


def test_one_document_serves_a_run_of_releases(
    setup: tuple[CountingModule, LocalKeyService],
) -> None:
    module, service = setup
    dek = os.urandom(32)
    assert asyncio.run(_unwraps(module, service, _blob(service, dek), 3)) == [dek] * 3
    assert module.documents == 1
    assert service._documents.hits == 2


def test_documents_are_renewed_after_the_reuse_window(
    setup: tuple[CountingModule, LocalKeyService], monkeypatch: pytest.MonkeyPatch
) -> None:
    module, service = setup
    monkeypatch.setattr(keyclient, "DOCUMENT_REUSE_S", 0.0)
    dek = os.urandom(32)
    assert asyncio.run(_unwraps(module, service, _blob(service, dek), 2)) == [dek] * 2
    assert module.documents == 2


def test_a_refused_reused_document_is_retried_once_fresh(
    setup: tuple[CountingModule, LocalKeyService], monkeypatch: pytest.MonkeyPatch
) -> None:
    module, service = setup
    dek = os.urandom(32)
    blob = _blob(service, dek)
    refusals = iter([False, True])  # the second release is refused once, as "too old"
    decrypt = service.decrypt

    def sometimes_refuse(*args: Any, **kwargs: Any) -> bytes:
        if next(refusals, False):
            raise KeyReleaseDeniedError("attestation document is too old")
        return decrypt(*args, **kwargs)

    monkeypatch.setattr(service, "decrypt", sometimes_refuse)
    assert asyncio.run(_unwraps(module, service, blob, 2)) == [dek] * 2
    assert module.documents == 2


def test_a_refused_fresh_document_is_not_retried(
    setup: tuple[CountingModule, LocalKeyService], monkeypatch: pytest.MonkeyPatch
) -> None:
    module, service = setup
    blob = _blob(service, os.urandom(32))

    def refuse(*args: Any, **kwargs: Any) -> bytes:
        raise KeyReleaseDeniedError("attestation PCR0 does not match the key policy")

    monkeypatch.setattr(service, "decrypt", refuse)
    with pytest.raises(KeyReleaseDeniedError, match="PCR0"):
        asyncio.run(_unwraps(module, service, blob, 1))
    assert module.documents == 1
