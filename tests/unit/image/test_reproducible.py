"""Same inputs, same bytes: builds in other directories, at other times, under other umasks;
and root filesystems from ``docker save`` / OCI archives, read without a Docker daemon."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest

from cape.crypto.eif_signature import ImageSigner
from cape.errors import FormatError
from cape.image.build import build_image
from cape.image.tree import read_image_archive
from cape.verify.eif import describe_eif
from tests.unit.image import spec_reader
from tests.unit.image.conftest import make_blobs, make_rootfs


@contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def _build_in(
    base: Path, mask: int, mtime: int, signer: ImageSigner | None, monkeypatch: pytest.MonkeyPatch
) -> str:
    with umask(mask):
        blobs = make_blobs(base / "in" / "blobs")
        rootfs = make_rootfs(base / "in" / "tree")
        for path in [rootfs, *rootfs.rglob("*"), *blobs.iterdir()]:
            os.utime(path, (mtime, mtime), follow_symlinks=False)
        monkeypatch.chdir(base)
        build_image(blobs=blobs, rootfs=rootfs, output=base / "out" / "runtime.eif", signer=signer)
    return hashlib.sha256((base / "out" / "runtime.eif").read_bytes()).hexdigest()


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_two_builds_are_byte_identical(
    tmp_path: Path, signer: ImageSigner, signed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    key = signer if signed else None
    first = _build_in(tmp_path / "one", 0o022, 1_000_000_000, key, monkeypatch)
    second = _build_in(tmp_path / "two" / "deeper", 0o077, 1_700_000_000, key, monkeypatch)
    assert first == second


def test_one_rootfs_byte_changes_pcr0_and_pcr2_not_pcr1(
    blobs: Path, rootfs: Path, tmp_path: Path
) -> None:
    build_image(blobs=blobs, rootfs=rootfs, output=tmp_path / "a.eif")
    hostname = rootfs / "etc" / "hostname"
    hostname.write_bytes(b"enclavE\n")
    build_image(blobs=blobs, rootfs=rootfs, output=tmp_path / "b.eif")
    before, after = describe_eif(tmp_path / "a.eif").pcrs, describe_eif(tmp_path / "b.eif").pcrs
    assert before[0] != after[0]
    assert before[2] != after[2]
    assert before[1] == after[1]


def test_source_date_epoch_sets_the_build_time(
    blobs: Path, rootfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    build_image(blobs=blobs, rootfs=rootfs, output=tmp_path / "a.eif")
    metadata = describe_eif(tmp_path / "a.eif").metadata
    assert metadata["BuildMetadata"]["BuildTime"] == "2026-01-01T00:00:00+00:00"


# --- image archives ---------------------------------------------------------------------------


def _tar(members: list[tuple[str, bytes | None, int]]) -> bytes:
    """A tar of ``(name, content or None for a directory, mode)``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, content, mode in members:
            info = tarfile.TarInfo(name)
            info.mode = mode
            if content is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _docker_save(path: Path, layers: list[bytes], config: Mapping[str, object]) -> Path:
    members: list[tuple[str, bytes | None, int]] = []
    names = []
    for number, layer in enumerate(layers):
        names.append(f"layer{number}/layer.tar")
        members.append((names[-1], layer, 0o644))
    members.append(("config.json", json.dumps(config).encode(), 0o644))
    manifest = [{"Config": "config.json", "RepoTags": ["cape:test"], "Layers": names}]
    members.append(("manifest.json", json.dumps(manifest).encode(), 0o644))
    path.write_bytes(_tar(members))
    return path


CONFIG: dict[str, object] = {
    "architecture": "amd64",
    "os": "linux",
    "config": {
        "Entrypoint": ["/usr/bin/python3"],
        "Cmd": ["-m", "app"],
        "Env": ["PATH=/usr/bin", "MODE=enclave"],
    },
}


def test_docker_save_archive_layers_and_whiteouts(tmp_path: Path) -> None:
    base = _tar(
        [
            ("usr/", None, 0o755),
            ("usr/bin/", None, 0o755),
            ("usr/bin/python3", b"python", 0o755),
            ("etc/", None, 0o755),
            ("etc/secret", b"remove me", 0o600),
            ("opt/", None, 0o755),
            ("opt/old/", None, 0o755),
            ("opt/old/file", b"old", 0o644),
        ]
    )
    top = _tar(
        [
            ("etc/.wh.secret", b"", 0o644),
            ("opt/.wh..wh..opq", b"", 0o644),
            ("opt/new", b"new", 0o640),
            ("app.py", b"print('hi')", 0o644),
        ]
    )
    archive = _docker_save(tmp_path / "image.tar", [base, top], CONFIG)
    tree = read_image_archive(archive)
    names = {e.name for e in tree.entries}
    assert "rootfs/etc/secret" not in names
    assert "rootfs/opt/old/file" not in names and "rootfs/opt/old" not in names
    assert {"rootfs/opt/new", "rootfs/app.py", "rootfs/usr/bin/python3"} <= names
    modes = {e.name: stat.S_IMODE(e.mode) for e in tree.entries}
    assert modes["rootfs/usr/bin/python3"] == 0o755 and modes["rootfs/opt/new"] == 0o644
    assert tree.cmd == ("/usr/bin/python3", "-m", "app")
    assert tree.env == ("PATH=/usr/bin", "MODE=enclave")


def test_archive_rootfs_builds_the_same_image_as_the_same_directory(
    blobs: Path, tmp_path: Path
) -> None:
    layer = _tar(
        [("etc/", None, 0o755), ("etc/hostname", b"enclave\n", 0o644), ("run/", None, 0o755)]
    )
    archive = _docker_save(tmp_path / "image.tar", [layer], CONFIG)
    directory = tmp_path / "dir"
    (directory / "etc").mkdir(parents=True)
    (directory / "run").mkdir()
    (directory / "etc" / "hostname").write_bytes(b"enclave\n")
    cmd, env = ["/usr/bin/python3", "-m", "app"], ["PATH=/usr/bin", "MODE=enclave"]
    build_image(blobs=blobs, rootfs=archive, output=tmp_path / "a.eif")
    build_image(blobs=blobs, rootfs=directory, output=tmp_path / "d.eif", cmd=cmd, env=env)
    from_archive = spec_reader.read((tmp_path / "a.eif").read_bytes())
    from_directory = spec_reader.read((tmp_path / "d.eif").read_bytes())
    assert from_archive.sections[4].data == from_directory.sections[4].data


def test_oci_layout_archive(tmp_path: Path) -> None:
    layer = _tar([("hello", b"world", 0o644)])
    config = json.dumps(CONFIG).encode()

    def blob(data: bytes) -> tuple[str, bytes]:
        return f"sha256:{hashlib.sha256(data).hexdigest()}", data

    layer_digest, _ = blob(layer)
    config_digest, _ = blob(config)
    manifest = json.dumps(
        {"config": {"digest": config_digest}, "layers": [{"digest": layer_digest}]}
    ).encode()
    manifest_digest, _ = blob(manifest)
    index = json.dumps({"manifests": [{"digest": manifest_digest}]}).encode()
    members: list[tuple[str, bytes | None, int]] = [
        ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}', 0o644),
        ("index.json", index, 0o644),
    ]
    for digest, data in (
        (layer_digest, layer),
        (config_digest, config),
        (manifest_digest, manifest),
    ):
        members.append((f"blobs/sha256/{digest.split(':')[1]}", data, 0o644))
    (tmp_path / "oci.tar").write_bytes(_tar(members))
    tree = read_image_archive(tmp_path / "oci.tar")
    assert "rootfs/hello" in {e.name for e in tree.entries}
    assert tree.cmd == ("/usr/bin/python3", "-m", "app")


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("../evil", b"x", 0o644)], "escapes the root"),
        ([("/abs", b"x", 0o644)], "escapes the root"),
    ],
)
def test_hostile_layers_are_refused(
    tmp_path: Path, members: list[tuple[str, bytes | None, int]], message: str
) -> None:
    archive = _docker_save(tmp_path / "image.tar", [_tar(members)], CONFIG)
    with pytest.raises(FormatError, match=message):
        read_image_archive(archive)


def test_not_an_image_archive(tmp_path: Path) -> None:
    (tmp_path / "plain.tar").write_bytes(_tar([("file", b"x", 0o644)]))
    with pytest.raises(FormatError, match=r"no manifest\.json"):
        read_image_archive(tmp_path / "plain.tar")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(FormatError, match="cannot read the image archive"):
        read_image_archive(tmp_path / "junk.tar")
    shutil.rmtree(tmp_path / "missing", ignore_errors=True)
