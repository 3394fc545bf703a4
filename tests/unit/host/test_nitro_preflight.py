"""Start-up checks of the Nitro launcher: one clear line for each missing piece.

The allocator's sysfs files and /dev/vsock are laid out in a temporary directory (this
machine is not a parent instance); the nitro-cli check uses PATH.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cape.host.nitro import (
    NitroError,
    NitroSettings,
    UnixFamily,
    VsockFamily,
    allocator_resources,
    preflight,
)


def _sysfs(root: Path, cpus: str = "1,3", pages_2m: int = 1024, pages_1g: int = 0) -> Path:
    params = root / "module" / "nitro_enclaves" / "parameters"
    params.mkdir(parents=True)
    (params / "ne_cpus").write_text(cpus + "\n")
    for size, count in (("2048kB", pages_2m), ("1048576kB", pages_1g)):
        pages = root / "kernel" / "mm" / "hugepages" / f"hugepages-{size}"
        pages.mkdir(parents=True)
        (pages / "nr_hugepages").write_text(f"{count}\n")
    return root


@pytest.fixture
def nitro_cli_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "nitro-cli"
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.fixture
def eif(tmp_path: Path) -> Path:
    path = tmp_path / "cape.eif"
    path.write_bytes(b"image")
    return path


def test_allocator_resources_read_cpu_list_and_huge_pages(tmp_path: Path) -> None:
    sysfs = _sysfs(tmp_path / "sys", cpus="1-3,5", pages_2m=512, pages_1g=2)
    assert allocator_resources(sysfs) == (4, 512 * 2 + 2 * 1024)


@pytest.mark.usefixtures("nitro_cli_on_path")
def test_enough_resources_pass(tmp_path: Path, eif: Path) -> None:
    sysfs = _sysfs(tmp_path / "sys", cpus="1,3,5,7", pages_2m=2048)
    preflight(
        NitroSettings(eif, cpu_count=2, memory_mib=2048), 2, UnixFamily(tmp_path), sysfs=sysfs
    )


@pytest.mark.usefixtures("nitro_cli_on_path")
@pytest.mark.parametrize(
    ("cpus", "pages", "message"),
    [
        ("1,3", 4096, r"set aside 2 CPUs; 2 enclave\(s\) of 2 need 4 \(cpu_count in"),
        ("1-4", 1024, r"set aside 2048 MiB; 2 enclave\(s\) of 2048 MiB need 4096 MiB"),
    ],
)
def test_a_short_allocator_is_named(
    tmp_path: Path, eif: Path, cpus: str, pages: int, message: str
) -> None:
    sysfs = _sysfs(tmp_path / "sys", cpus=cpus, pages_2m=pages)
    with pytest.raises(NitroError, match=message):
        preflight(NitroSettings(eif, memory_mib=2048), 2, UnixFamily(tmp_path), sysfs=sysfs)


@pytest.mark.usefixtures("nitro_cli_on_path")
def test_no_nitro_module_is_named(tmp_path: Path, eif: Path) -> None:
    with pytest.raises(NitroError, match="nitro_enclaves kernel module is not loaded"):
        preflight(NitroSettings(eif), 1, UnixFamily(tmp_path), sysfs=tmp_path / "empty")


def test_missing_nitro_cli_is_named(
    tmp_path: Path, eif: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(
        NitroError, match="nitro-cli is not on PATH: install aws-nitro-enclaves-cli"
    ):
        preflight(NitroSettings(eif), 1, UnixFamily(tmp_path), sysfs=_sysfs(tmp_path / "s"))


@pytest.mark.usefixtures("nitro_cli_on_path")
def test_missing_image_is_named(tmp_path: Path) -> None:
    with pytest.raises(NitroError, match=r"enclave image .*missing.eif does not exist"):
        preflight(NitroSettings(tmp_path / "missing.eif"), 1, UnixFamily(tmp_path), sysfs=tmp_path)


@pytest.mark.usefixtures("nitro_cli_on_path")
def test_missing_dev_vsock_is_named(tmp_path: Path, eif: Path) -> None:
    family = VsockFamily(device=tmp_path / "dev-vsock")
    with pytest.raises(NitroError, match=r"dev-vsock is missing: this is not an enclave-enabled"):
        preflight(NitroSettings(eif, memory_mib=512), 1, family, sysfs=_sysfs(tmp_path / "s"))
