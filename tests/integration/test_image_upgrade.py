"""Upgrades keep keys: real enclave processes, simulated mode's signed runtime (PCR8).

A key created under the platform's signer policy still decrypts ``cape:`` inputs after the
runtime changes (new PCR0, signed by the same key); a runtime signed by another key, or not
signed, is refused with "PCR8 does not match". A key bound to one measurement is locked out
by the upgrade until ``rebind`` moves it to the signer, after which the old, unsigned runtime
loses access.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import cape
from cape.crypto import envelope
from cape.crypto.eif_signature import ImageSigner
from cape.crypto.keys import load_rsa_public_key
from cape.enclave.measure import measure_runtime
from cape.host.launcher import EnclaveConnection, expect
from cape.kms.base import KeyPolicy
from cape.platform.local import runtime_key_policy
from tests.integration.harness import (
    ECHO,
    OWNER,
    Platform,
    deploy,
    invoke,
    requires_enclaves,
)

pytestmark = requires_enclaves

SECRET = b"input only the enclave may read"


@pytest.fixture(scope="module")
def upgraded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Release 2: the runtime's package with one more line (a new PCR0 and PCR2)."""
    site = tmp_path_factory.mktemp("release2")
    shutil.copytree(
        Path(cape.__file__).parent, site / "cape", ignore=shutil.ignore_patterns("__pycache__")
    )
    target = site / "cape" / "enclave" / "session.py"
    target.write_bytes(target.read_bytes() + b"\n# release 2\n")
    return site


def start(platform: Platform, site: Path | None, signer: ImageSigner | None) -> EnclaveConnection:
    """An enclave running the runtime in ``site`` (default: installed), signed by ``signer``."""
    measurement = measure_runtime(site / "cape" if site else None)
    platform.image_signature = signer.sign_pcr0(measurement.pcr0) if signer else None
    env = {"PYTHONPATH": str(site)} if site else None
    connection = platform.run(platform.launcher(extra_env=env).start())
    assert connection.pcrs[0] == measurement.pcr0
    return connection


def run_cape_input(platform: Platform, enclave: EnclaveConnection, bundle: bytes) -> dict[str, Any]:
    public = load_rsa_public_key(platform.kms.get_public_key(OWNER))
    text_form = envelope.encrypt_text(SECRET, public).encode()

    async def flow() -> dict[str, Any]:
        session = await enclave.open_session("run", owner=OWNER, nonce=b"n" * 16, bundle=bundle)
        first = await session.receive()
        if first["t"] != "attestation":
            return first
        doc = platform.verify(first["document"], b"n" * 16)
        reply = await invoke(session, doc, text_form)
        await session.close()
        return reply

    try:
        return platform.run(flow())
    finally:
        platform.run(enclave.close())


@pytest.fixture
def signed_platform(tmp_path: Path) -> Iterator[Platform]:
    platform = Platform(tmp_path)
    yield platform
    platform.close()


def test_signer_key_survives_an_upgrade(signed_platform: Platform, upgraded: Path) -> None:
    platform = signed_platform
    assert platform.policy.kind == "signer"
    genuine = start(platform, None, platform.signer)
    assert genuine.pcrs[8] == platform.signer.identity.pcr8
    try:
        bundle, _ = deploy(genuine, platform, ECHO)
    finally:
        platform.run(genuine.close())
    release2 = start(platform, upgraded, platform.signer)
    assert release2.pcrs[0] != measure_runtime().pcr0
    assert release2.pcrs[8] == platform.signer.identity.pcr8
    assert expect(run_cape_input(platform, release2, bundle), "result")["data"] == SECRET


@pytest.mark.parametrize("who", ["another key", "nobody"])
def test_runtime_signed_by_another_key_or_unsigned_is_refused(
    signed_platform: Platform, upgraded: Path, who: str
) -> None:
    platform = signed_platform
    genuine = start(platform, None, platform.signer)
    try:
        bundle, _ = deploy(genuine, platform, ECHO)
    finally:
        platform.run(genuine.close())
    signer = ImageSigner.generate("mallory") if who == "another key" else None
    rogue = start(platform, upgraded, signer)
    assert rogue.pcrs[8] != platform.signer.identity.pcr8
    message = run_cape_input(platform, rogue, bundle)
    assert message["t"] == "error" and "PCR8 does not match" in message["message"]


def test_rebind_moves_a_measurement_key_and_the_old_runtime_loses_access(
    tmp_path: Path, upgraded: Path
) -> None:
    platform = Platform(tmp_path, policy=runtime_key_policy(measure_runtime()))
    try:
        assert platform.policy.kind == "measurement"
        old = start(platform, None, None)  # release 1, unsigned, as keys were made before
        try:
            bundle, _ = deploy(old, platform, ECHO)
        finally:
            platform.run(old.close())
        release2 = start(platform, upgraded, platform.signer)
        locked = run_cape_input(platform, release2, bundle)
        assert locked["t"] == "error" and "PCR0 does not match" in locked["message"]
        moved = platform.kms.rebind(
            KeyPolicy.signer(platform.signer.identity.pcr8), actor="ops", reason="release 2"
        )
        assert [key.owner for key in moved] == [OWNER]
        release2 = start(platform, upgraded, platform.signer)
        assert expect(run_cape_input(platform, release2, bundle), "result")["data"] == SECRET
        old = start(platform, None, None)
        refused = run_cape_input(platform, old, bundle)
        assert refused["t"] == "error" and "PCR8 does not match" in refused["message"]
        assert [entry.owner for entry in platform.kms.key_log()] == [OWNER]
    finally:
        platform.close()
