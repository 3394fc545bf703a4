"""The built image's userland in Nitro mode's AWS key path, launched by the Nitro launcher.

The standard root filesystem (``scripts/enclave-rootfs.sh``, ``$CAPE_ENCLAVE_ROOTFS``) is
built into an EIF, its customer ramdisk unpacked and its ``cmd`` started under bubblewrap
(no network) by a fake ``nitro-cli`` (tests/fakes/nitro_cli.py). Stand-ins: a Unix socket per
CID for vsock, the simulated secure module for ``/dev/nsm``, a Unix-socket relay to moto's KMS
server for ``vsock-proxy`` to AWS KMS (plain HTTP instead of TLS, via the test-only
``--kms-connect``/``--kms-insecure-http`` flags). What runs is the image's own Python and
wheels: botocore inside the image signs, the runtime there creates the owner's key in (moto's)
KMS and attests to it; the host relays no key-service call.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cape.crypto.keyanswers import IDENTITY_PCR, aws_kms_measurement, measured_pcr
from cape.enclave.awskeys import AwsKmsConfig
from cape.host.nitro import NitroLauncher, NitroSettings, UnixFamily
from cape.host.pool import EnclavePool
from cape.kms.base import KeyPolicy
from tests.fakes import nitro_cli
from tests.fakes.moto_kms import REGION, configure, moto_kms, public_key
from tests.integration.harness import Platform, pool_key_document
from tests.integration.test_image_userland import bwrap, image_env, image_root
from tests.integration.test_image_userland import pytestmark as userland_marks

pytestmark = userland_marks
__all__ = ["image_root"]  # the module fixture, shared with test_image_userland

ACCOUNT = "123456789012"


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    (tmp_path / "platform").mkdir()
    platform = Platform(tmp_path / "platform")
    yield platform
    platform.close()


async def _relay(path: Path, port: int) -> asyncio.Server:
    """vsock-proxy's role: bytes from the enclave's socket to KMS (moto) and back."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    return await asyncio.start_unix_server(connected, path=str(path))


def test_the_image_calls_kms_itself(
    platform: Platform, image_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    nitro_cli.install_on_path(tmp_path, monkeypatch)
    cmd = (image_root / "cmd").read_text().splitlines()
    cmd += ["--kms-connect", "unix:/run/host/kms.sock", "--kms-insecure-http"]
    env = {**image_env(image_root), "CAPE_CHANNEL": "unix:/run/host/{cid}.sock"}
    eif = tmp_path / "cape.eif"
    # The "enclave" outlives the nitro-cli call that started it (terminate-enclave stops it).
    argv = [a for a in bwrap(image_root, host_dir, cmd) if a != "--die-with-parent"]
    eif.write_text(json.dumps({"argv": argv, "env": env}))
    config = AwsKmsConfig(
        region=REGION,
        account_id=ACCOUNT,
        admin_role_arn=f"arn:aws:iam::{ACCOUNT}:role/cape-admin",
        enclave_role_arn=f"arn:aws:iam::{ACCOUNT}:role/cape-enclave",
        policy=KeyPolicy.signer(platform.signer.identity.pcr8),
    )
    relayed: list[dict[str, Any]] = []

    def host_kms(message: dict[str, Any]) -> dict[str, Any]:
        relayed.append(message)
        return {"error": "no host key service", "kind": "error"}

    with moto_kms() as (port, credentials):
        launcher = NitroLauncher(
            NitroSettings(eif=eif, memory_mib=512),
            kms=host_kms,
            configure=configure(config, credentials),
            family=UnixFamily(host_dir),
            provision=platform._provision,
            connect_timeout_s=120,
        )

        async def flow() -> tuple[dict[int, bytes], bytes]:
            relay = await _relay(host_dir / "kms.sock", port)
            pool = EnclavePool(launcher, 1)
            try:
                await pool.start()
                return await pool_key_document(pool, platform, "alice")
            finally:
                await pool.close()
                relay.close()

        pcrs, key = platform.run(flow())
        assert public_key(port, credentials, "alice") == key
    assert relayed == []
    assert pcrs[IDENTITY_PCR] == measured_pcr(aws_kms_measurement(config.canonical()))
