"""The image's userland really runs.

Builds an EIF from the standard root filesystem (``scripts/enclave-rootfs.sh``, found through
``$CAPE_ENCLAVE_ROOTFS``; CI builds it), unpacks the built customer ramdisk with the
independent reader, and starts its ``cmd`` with its ``env`` under bubblewrap with that
``rootfs`` as ``/`` — Debian's CPython, the wheels, this package as installed there — with a
Unix socket standing in for vsock (``CAPE_CHANNEL=unix:…``) and the simulated secure module
instead of ``/dev/nsm`` (no Nitro hardware here; see docs/mocks.md). The host side then
completes key, deploy and run sessions against it, verifying every attestation document as a
client does, and a ``cape:`` input is decrypted with the owner's key.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cape.crypto import envelope
from cape.crypto.keys import load_rsa_public_key
from cape.host.launcher import EnclaveConnection, expect
from cape.image.build import build_image
from tests.integration.harness import (
    ECHO,
    OWNER,
    Platform,
    attested,
    deploy,
    invoke,
    requires_enclaves,
    user_data,
)
from tests.unit.image import spec_reader
from tests.unit.image.conftest import make_blobs

ROOTFS = os.environ.get("CAPE_ENCLAVE_ROOTFS")

pytestmark = [
    *requires_enclaves,
    pytest.mark.skipif(
        not ROOTFS or not Path(ROOTFS, "usr/bin/python3").exists(),
        reason="set CAPE_ENCLAVE_ROOTFS to a tree made by scripts/enclave-rootfs.sh",
    ),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap"),
]


def unpack(data: bytes, target: Path) -> None:
    """Write a newc archive's members under ``target`` (device nodes come from bwrap)."""
    for member in spec_reader.read_newc(data):
        path = target / member.name
        kind = stat.S_IFMT(member.mode)
        if kind == stat.S_IFDIR:
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(stat.S_IMODE(member.mode))
        elif kind == stat.S_IFLNK:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(member.data.decode(), path)
        elif kind == stat.S_IFREG:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(member.data)
            path.chmod(stat.S_IMODE(member.mode))


@pytest.fixture(scope="session")  # also test_image_userland_aws.py's: one build per run
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert ROOTFS is not None
    work = tmp_path_factory.mktemp("image")
    eif = work / "runtime.eif"
    build_image(blobs=make_blobs(work / "blobs"), rootfs=Path(ROOTFS), output=eif)
    image = spec_reader.read(eif.read_bytes())
    customer = [s for s in image.sections if s.type == "ramdisk"][-1]
    unpacked = work / "unpacked"
    unpack(customer.data, unpacked)
    return unpacked


def bwrap(root: Path, host_dir: Path, argv: list[str]) -> list[str]:
    """The image's root as ``/``, no network, the host's directory at /run/host.

    ``/proc`` is the host's, bound whole: the runtime's own sandboxes mount a fresh proc in
    their user namespaces, which the kernel allows only where proc is fully visible (bwrap's
    ``--proc`` covers parts of it). In an enclave, init mounts a plain proc.
    """
    return [
        "bwrap", "--bind", str(root / "rootfs"), "/", "--bind", "/proc", "/proc",
        "--dev", "/dev", "--tmpfs", "/tmp", "--bind", str(host_dir), "/run/host",
        "--unshare-net", "--unshare-ipc", "--die-with-parent", "--cap-add", "ALL", "--",
        *argv,
    ]  # fmt: skip


def image_env(root: Path) -> dict[str, str]:
    env = dict(line.split("=", 1) for line in (root / "env").read_text().splitlines() if line)
    assert env["CAPE_CHANNEL"].startswith("vsock:") and env["CAPE_SECURE_MODULE"] == "nitro"
    # The two stand-ins: a Unix socket for vsock, the simulated module for /dev/nsm.
    env["CAPE_CHANNEL"] = "unix:/run/host/channel.sock"
    env["CAPE_SECURE_MODULE"] = "simulated"
    return env


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    platform = Platform(tmp_path_factory.mktemp("platform"))
    yield platform
    platform.close()


def start(platform: Platform, root: Path, host_dir: Path) -> EnclaveConnection:
    cmd = (root / "cmd").read_text().splitlines()
    env = image_env(root)
    # The release step: measure the runtime inside its own root filesystem, then sign it.
    measured = subprocess.run(
        bwrap(root, host_dir, [cmd[0], "-c", "from cape.enclave.measure import "
              "measure_runtime; print(measure_runtime().pcr0.hex())"]),
        env=env, capture_output=True, text=True, timeout=120, check=True,
    ).stdout.strip()  # fmt: skip
    platform.image_signature = platform.signer.sign_pcr0(bytes.fromhex(measured))

    async def launch() -> EnclaveConnection:
        loop = asyncio.get_running_loop()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(host_dir / "channel.sock"))
        listener.listen(1)
        listener.setblocking(False)
        process = await asyncio.create_subprocess_exec(
            *bwrap(root, host_dir, cmd), env=env, stdin=asyncio.subprocess.DEVNULL
        )
        try:
            sock, _ = await asyncio.wait_for(loop.sock_accept(listener), 120)
        finally:
            listener.close()
        connection = await EnclaveConnection.over(sock, platform._kms, process)
        # The image's runtime learns its key service from the host (measured into PCR16).
        await connection.send({"t": "configure", "kms_identity": platform.identity.public_bytes})
        await connection.start(platform._provision())
        return connection

    return platform.run(launch())


def test_image_userland_serves_key_deploy_and_run(
    platform: Platform, image_root: Path, tmp_path: Path
) -> None:
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    enclave = start(platform, image_root, host_dir)
    try:
        assert enclave.pcrs[8] == platform.signer.identity.pcr8  # the signed image runtime

        async def key() -> bytes:
            session, doc = await attested(enclave, platform, "key")
            assert (await session.receive())["t"] == "close"
            return base64.b64decode(user_data(doc)["key"])

        assert platform.run(key()) == platform.kms.get_public_key(OWNER)
        bundle, _ = deploy(enclave, platform, ECHO)
        public = load_rsa_public_key(platform.kms.get_public_key(OWNER))
        secret = envelope.encrypt_text(b"decrypted inside the image", public).encode()

        async def run() -> bytes:
            session, doc = await attested(enclave, platform, "run", bundle=bundle)
            result = expect(await invoke(session, doc, secret), "result")["data"]
            await session.close()
            return bytes(result)

        assert platform.run(run()) == b"decrypted inside the image"
    finally:
        platform.run(enclave.close())
