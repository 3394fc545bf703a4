"""The Nitro launcher against a fake ``nitro-cli`` on PATH (tests/fakes/nitro_cli.py).

The fake records its arguments and runs the real runtime as a local process listening on a
Unix socket per CID (the AF_UNIX side of the socket-family seam; production uses AF_VSOCK with
the same framing). The runtime has the simulated secure module, so the launcher is given the
simulated credentials; everything else — pool, restarts, configure/ready frames, key service
calls with signed answers, attestation — is the real thing.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from cape.crypto.keyanswers import (
    IDENTITY_PCR,
    aws_kms_measurement,
    identity_pcr,
    measured_pcr,
)
from cape.enclave.awskeys import AwsKmsConfig
from cape.errors import TransportError
from cape.host.launcher import expect
from cape.host.nitro import NitroError, NitroLauncher, NitroSettings, UnixFamily
from cape.host.pool import EnclavePool
from cape.image.build import DEFAULT_CMD
from cape.kms.base import KeyPolicy
from tests.fakes import nitro_cli
from tests.fakes.moto_kms import configure, moto_kms, public_key
from tests.integration.harness import Platform, pool_key_document


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake nitro-cli first on PATH; returns its state directory."""
    return nitro_cli.install_on_path(tmp_path, monkeypatch)


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    (tmp_path / "platform").mkdir()
    platform = Platform(tmp_path / "platform")
    yield platform
    platform.close()


def _image(state: Path, *, connect: bool = True, extra: Sequence[str] = ()) -> Path:
    """The fake EIF: the runtime's command (as `cape enclave build` writes it, with the
    simulated secure module) connecting its channel to the Unix socket of its CID."""
    argv = [sys.executable, "-m", "cape.enclave.runtime", *DEFAULT_CMD[3:], *extra]
    argv = [a.replace("/run/cape", f"{state}/work-{{cid}}") for a in argv]
    channel = f"unix:{state}/{{cid}}.sock" if connect else f"unix:{state}/nowhere.sock"
    eif = state / "cape.eif"
    eif.write_text(json.dumps({"argv": argv, "env": {"CAPE_CHANNEL": channel}}))
    return eif


def _launcher(platform: Platform, state: Path, **kwargs: Any) -> NitroLauncher:
    settings = NitroSettings(eif=kwargs.pop("eif", None) or _image(state), memory_mib=512)
    configure = kwargs.pop("configure", lambda: {"kms_identity": platform.identity.public_bytes})
    return NitroLauncher(
        settings,
        kms=platform._kms,
        configure=configure,
        family=UnixFamily(state),
        provision=platform._provision,
        **kwargs,
    )


def _calls(state: Path) -> list[list[str]]:
    path = state / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _enclaves(state: Path) -> list[dict[str, Any]]:
    path = state / "enclaves.json"
    return json.loads(path.read_text()) if path.exists() else []


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def _key(pool: EnclavePool, platform: Platform) -> Mapping[int, bytes]:
    nonce = secrets.token_bytes(16)
    async with pool.session("key", owner="alice", nonce=nonce) as session:
        frame = expect(await session.receive(), "attestation")
    return platform.verify(frame["document"], nonce).pcrs


async def _until(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


def test_starts_enclaves_with_nitro_cli_and_serves_sessions(platform: Platform, fake: Path) -> None:
    async def flow() -> Mapping[int, bytes]:
        pool = EnclavePool(_launcher(platform, fake), 2)
        await pool.start()
        try:
            return await _key(pool, platform)
        finally:
            await pool.close()

    pcrs = platform.run(flow())
    assert pcrs[IDENTITY_PCR] == identity_pcr(platform.identity.public_bytes)
    runs = [call for call in _calls(fake) if call[0] == "run-enclave"]
    assert len(runs) == 2
    for call in runs:
        assert call[call.index("--eif-path") + 1] == str(fake / "cape.eif")
        assert call[call.index("--cpu-count") + 1] == "2"
        assert call[call.index("--memory") + 1] == "512"
    assert sorted(call[call.index("--enclave-cid") + 1] for call in runs) == ["16", "17"]


def test_a_dead_enclave_is_replaced(platform: Platform, fake: Path) -> None:
    async def flow() -> None:
        pool = EnclavePool(_launcher(platform, fake), 1)
        await pool.start()
        try:
            (first,) = _enclaves(fake)
            os.killpg(first["pid"], signal.SIGKILL)
            await _until(lambda: pool.stats().restarts == 1 and pool.stats().alive == 1)
            await _key(pool, platform)  # the new enclave serves
            (second,) = _enclaves(fake)
            assert second["id"] != first["id"]
        finally:
            await pool.close()

    platform.run(flow())
    terminated = [call[2] for call in _calls(fake) if call[0] == "terminate-enclave"]
    assert len(terminated) == 2  # the dead one (cleanup), then the new one at shutdown


def test_an_enclave_describe_enclaves_no_longer_lists_is_replaced(
    platform: Platform, fake: Path
) -> None:
    async def flow() -> str:
        pool = EnclavePool(_launcher(platform, fake, watch_interval_s=0.2), 1)
        await pool.start()
        try:
            (first,) = _enclaves(fake)
            # The enclave disappears from nitro-cli's view (e.g. terminated by an operator)
            # while its channel is still open.
            (fake / "enclaves.json").write_text("[]")
            await _until(lambda: pool.stats().restarts == 1 and pool.stats().alive == 1)
            return str(first["id"])
        finally:
            await pool.close()

    first_id = platform.run(flow())
    assert any(call[0] == "describe-enclaves" for call in _calls(fake))
    assert first_id in {call[2] for call in _calls(fake) if call[0] == "terminate-enclave"}


def test_shutdown_terminates_every_enclave(platform: Platform, fake: Path) -> None:
    async def flow() -> list[dict[str, Any]]:
        pool = EnclavePool(_launcher(platform, fake), 2)
        await pool.start()
        started = _enclaves(fake)
        await pool.close()
        return started

    started = platform.run(flow())
    terminated = {call[2] for call in _calls(fake) if call[0] == "terminate-enclave"}
    assert terminated == {e["id"] for e in started}
    assert _enclaves(fake) == []
    assert all(_gone(e["pid"]) for e in started)


def test_nitro_cli_failure_is_one_clear_line(
    platform: Platform, fake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = (
        "[ E26 ] Insufficient memory requested. User provided `memory` is 512 MB, "
        "but based on the EIF file size, the minimum memory should be 1024 MB"
    )
    monkeypatch.setenv(nitro_cli.FAIL_ENV, f"run-enclave:{message}")
    pool = EnclavePool(_launcher(platform, fake), 1)
    with pytest.raises(NitroError) as raised:
        platform.run(pool.start())
    assert str(raised.value) == f"nitro-cli run-enclave failed: {message}"
    assert "\n" not in str(raised.value)


def test_a_runtime_that_never_connects_is_terminated(platform: Platform, fake: Path) -> None:
    launcher = _launcher(platform, fake, eif=_image(fake, connect=False), connect_timeout_s=2)
    with pytest.raises(TransportError, match=r"\(CID 16\) did not connect its channel within 2s"):
        platform.run(launcher.start())
    assert [call[0] for call in _calls(fake)] == ["run-enclave", "terminate-enclave"]
    assert _enclaves(fake) == []


def test_aws_kms_mode_calls_kms_from_the_enclave(platform: Platform, fake: Path) -> None:
    """``--kms aws``: the runtime calls (moto's) KMS itself with the configured account, roles
    and policy; the host relays no key-service call; the configuration is in PCR16."""
    with moto_kms() as (port, credentials):
        config = AwsKmsConfig(
            region="us-east-1",
            account_id="123456789012",
            admin_role_arn="arn:aws:iam::123456789012:role/cape-admin",
            enclave_role_arn="arn:aws:iam::123456789012:role/cape-enclave",
            policy=KeyPolicy(pcrs={0: frozenset({bytes(range(48))})}),
        )
        relayed: list[dict[str, Any]] = []

        def kms(message: dict[str, Any]) -> dict[str, Any]:
            relayed.append(message)
            return platform._kms(message)

        image = _image(
            fake, extra=["--kms-connect", f"tcp:127.0.0.1:{port}", "--kms-insecure-http"]
        )
        launcher = _launcher(platform, fake, eif=image, configure=configure(config, credentials))
        launcher._kms = kms

        async def flow() -> tuple[dict[int, bytes], bytes]:
            pool = EnclavePool(launcher, 1)
            await pool.start()
            try:
                return await pool_key_document(pool, platform, "alice")
            finally:
                await pool.close()

        pcrs, key = platform.run(flow())
        assert public_key(port, credentials, "alice") == key
    assert relayed == []
    assert pcrs[IDENTITY_PCR] == measured_pcr(aws_kms_measurement(config.canonical()))
