"""Fixtures for the image builder: synthetic boot blobs (the real bzImage, init and nsm.ko
exist only on a Nitro parent instance; the format does not care what the bytes are), a small
root filesystem and a P-384 signing key with a self-signed certificate."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from cape.crypto.eif_signature import ImageSigner

CMDLINE = b"reboot=k panic=30 pci=off nomodules console=ttyS0 random.trust_cpu=on\n"


def make_blobs(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bzImage").write_bytes(b"synthetic kernel " * 40)
    (directory / "cmdline").write_bytes(CMDLINE)
    (directory / "init").write_bytes(b"\x7fELF synthetic init")
    (directory / "nsm.ko").write_bytes(b"synthetic nsm driver")
    return directory


def make_rootfs(directory: Path) -> Path:
    (directory / "usr" / "bin").mkdir(parents=True)
    (directory / "etc").mkdir()
    (directory / "run").mkdir()
    tool = directory / "usr" / "bin" / "tool"
    tool.write_bytes(b"#!/bin/sh\necho tool\n")
    tool.chmod(0o755)
    (directory / "etc" / "hostname").write_bytes(b"enclave\n")
    (directory / "etc" / "empty").write_bytes(b"")
    os.symlink("usr/bin", directory / "bin")
    return directory


@pytest.fixture
def blobs(tmp_path: Path) -> Path:
    return make_blobs(tmp_path / "blobs")


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    return make_rootfs(tmp_path / "rootfs")


@pytest.fixture(scope="session")
def signer() -> ImageSigner:
    return ImageSigner.generate("Cape release signer", now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))


@pytest.fixture(scope="session")
def other_signer() -> ImageSigner:
    return ImageSigner.generate("Someone else", now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
