"""Root filesystems as cpio members: from a directory, or from an OCI / ``docker save`` archive.

Both give the members of the customer ramdisk under ``rootfs/`` plus the image's ``cmd`` and
``env`` (from the archive's config; for a directory the builder supplies them). Nothing about
the build machine survives: owners become root, times zero, and modes are normalized to
``0755`` (directories, and files with any execute bit) or ``0644`` (other files), ``0777``
for symlinks, so a tree copied under another umask gives the same bytes. Sockets are skipped;
device nodes and FIFOs keep their type (and device number).

Archives are read without a Docker daemon and without unpacking to disk: layers are applied
in memory in order, with OCI whiteouts (``.wh.NAME`` deletes ``NAME``, ``.wh..wh..opq``
empties the directory of what lower layers put there). Member names are checked: absolute
paths and ``..`` are refused, as are links that point outside the archive's files.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from cape.errors import FormatError
from cape.formats.cpio import CpioEntry

__all__ = [
    "ROOTFS_PREFIX",
    "RootFilesystem",
    "normalized_mode",
    "read_directory",
    "read_image_archive",
]

ROOTFS_PREFIX = "rootfs"
_MAX_JSON_BYTES = 16 << 20


@dataclass(frozen=True)
class RootFilesystem:
    """The customer ramdisk's ``rootfs/`` members, and the ``cmd``/``env`` the image names."""

    entries: tuple[CpioEntry, ...]
    cmd: tuple[str, ...] | None = None
    env: tuple[str, ...] | None = None
    docker_info: dict[str, Any] | None = None


def normalized_mode(mode: int) -> int:
    """The file type bits of ``mode`` with the fixed permissions described above."""
    kind = stat.S_IFMT(mode)
    if stat.S_ISLNK(mode):
        return kind | 0o777
    if stat.S_ISDIR(mode) or (stat.S_ISREG(mode) and mode & 0o111):
        return kind | 0o755
    return kind | 0o644


def _opener(path: Path) -> Callable[[], BinaryIO]:
    return lambda: path.open("rb")


def _walk(root: Path) -> Iterator[tuple[str, os.DirEntry[str]]]:
    stack = [(root, "")]
    while stack:
        directory, relative = stack.pop()
        with os.scandir(directory) as it:
            children = sorted(it, key=lambda e: e.name)
        for child in children:
            name = f"{relative}/{child.name}" if relative else child.name
            yield name, child
            if child.is_dir(follow_symlinks=False):
                stack.append((Path(child.path), name))


def read_directory(root: Path) -> RootFilesystem:
    """A directory as the ``rootfs/`` members (symlinks stored, never followed)."""
    root = Path(root)
    if not root.is_dir():
        raise FormatError(f"the root filesystem {root} is not a directory")
    entries = [CpioEntry(ROOTFS_PREFIX, stat.S_IFDIR | 0o755)]
    try:
        for name, child in _walk(root):
            info = child.stat(follow_symlinks=False)
            mode = info.st_mode
            member = f"{ROOTFS_PREFIX}/{name}"
            if stat.S_ISSOCK(mode):
                continue
            if stat.S_ISLNK(mode):
                entries.append(CpioEntry(member, normalized_mode(mode), link=os.readlink(child)))
            elif stat.S_ISREG(mode):
                entries.append(
                    CpioEntry(
                        member,
                        normalized_mode(mode),
                        size=info.st_size,
                        open=_opener(Path(child.path)),
                    )
                )
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                rdev = (os.major(info.st_rdev), os.minor(info.st_rdev))
                entries.append(CpioEntry(member, normalized_mode(mode), rdev=rdev))
            else:
                entries.append(CpioEntry(member, normalized_mode(mode)))
    except OSError as exc:
        raise FormatError(f"cannot read the root filesystem {root}: {exc}") from None
    return RootFilesystem(entries=tuple(entries))


# --- image archives -------------------------------------------------------------------------


@dataclass
class _Node:
    mode: int
    data: bytes = b""
    link: str = ""
    rdev: tuple[int, int] = (0, 0)


def _bytes_opener(data: bytes) -> Callable[[], BinaryIO]:
    return lambda: io.BytesIO(data)


def _clean(name: str) -> str:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise FormatError(f"image archive member {name!r} escapes the root")
    parts = [p for p in path.parts if p not in (".", "")]
    return "/".join(parts)


def _json_member(archive: tarfile.TarFile, name: str) -> Any:
    data = _member_bytes(archive, name)
    if len(data) > _MAX_JSON_BYTES:
        raise FormatError(f"image archive file {name} is too large")
    try:
        return json.loads(data)
    except ValueError:
        raise FormatError(f"image archive file {name} is not valid JSON") from None


def _member_bytes(archive: tarfile.TarFile, name: str) -> bytes:
    try:
        handle = archive.extractfile(_clean(name))
    except KeyError:
        raise FormatError(f"image archive has no {name}") from None
    if handle is None:
        raise FormatError(f"image archive member {name} is not a file")
    with handle:
        return handle.read()


def _layer_stream(data: bytes) -> BinaryIO:
    if data[:2] == b"\x1f\x8b":
        return io.BytesIO(gzip.decompress(data))
    return io.BytesIO(data)


def _remove_tree(nodes: dict[str, _Node], name: str) -> None:
    for key in [k for k in nodes if k == name or k.startswith(name + "/")]:
        del nodes[key]


def _apply_layer(nodes: dict[str, _Node], data: bytes) -> None:
    lower = set(nodes)
    try:
        layer = tarfile.open(fileobj=_layer_stream(data), mode="r:")  # noqa: SIM115 - closed below
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise FormatError(f"an image layer is not a tar archive: {exc}") from None
    with layer:
        for member in layer:
            name = _clean(member.name)
            if not name:
                continue
            parent, _, base = name.rpartition("/")
            if base == ".wh..wh..opq":
                prefix = parent + "/" if parent else ""
                for key in [
                    k for k in nodes if k in lower and k.startswith(prefix) and k != parent
                ]:
                    del nodes[key]
                continue
            if base.startswith(".wh."):
                target = f"{parent}/{base[4:]}" if parent else base[4:]
                _remove_tree(nodes, target)
                continue
            if member.isdir():
                existing = nodes.get(name)
                if existing is not None and stat.S_ISDIR(existing.mode):
                    continue
                _remove_tree(nodes, name)
                nodes[name] = _Node(stat.S_IFDIR | 0o755)
                continue
            _remove_tree(nodes, name)
            if member.issym():
                nodes[name] = _Node(stat.S_IFLNK | 0o777, link=member.linkname)
            elif member.islnk():
                source = nodes.get(_clean(member.linkname))
                if source is None or not stat.S_ISREG(source.mode):
                    raise FormatError(f"image layer hard link {name!r} has no file to point to")
                nodes[name] = _Node(source.mode, data=source.data)
            elif member.isreg():
                handle = layer.extractfile(member)
                content = handle.read() if handle is not None else b""
                nodes[name] = _Node(normalized_mode(stat.S_IFREG | member.mode), data=content)
            elif member.ischr() or member.isblk():
                kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
                nodes[name] = _Node(kind | 0o644, rdev=(member.devmajor, member.devminor))
            elif member.isfifo():
                nodes[name] = _Node(stat.S_IFIFO | 0o644)


def _manifest_layers(archive: tarfile.TarFile) -> tuple[list[str], str]:
    names = set(archive.getnames())
    if "manifest.json" in names:  # docker save
        manifest = _json_member(archive, "manifest.json")
        if (
            not isinstance(manifest, list)
            or len(manifest) != 1
            or not isinstance(manifest[0], dict)
        ):
            raise FormatError("image archive manifest.json must describe exactly one image")
        layers, config = manifest[0].get("Layers"), manifest[0].get("Config")
    elif "index.json" in names:  # OCI image layout
        index = _json_member(archive, "index.json")
        descriptors = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(descriptors, list) or len(descriptors) != 1:
            raise FormatError("image archive index.json must list exactly one manifest")
        manifest = _json_member(archive, _blob(descriptors[0]))
        if not isinstance(manifest, dict):
            raise FormatError("image manifest is not a JSON object")
        layers = [_blob(d) for d in manifest.get("layers") or []]
        config = _blob(manifest.get("config"))
    else:
        raise FormatError("not an image archive: no manifest.json (docker save) or index.json")
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise FormatError("image manifest layers must be a list of file names")
    if not isinstance(config, str):
        raise FormatError("image manifest has no config")
    return layers, config


def _blob(descriptor: Any) -> str:
    digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
    if not isinstance(digest, str) or ":" not in digest:
        raise FormatError("image descriptor has no digest")
    algorithm, _, value = digest.partition(":")
    return f"blobs/{algorithm}/{value}"


def _string_list(value: Any, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FormatError(f"image config {what} must be a list of strings")
    return tuple(value)


def read_image_archive(path: Path) -> RootFilesystem:
    """A ``docker save`` or OCI layout tar archive as ``rootfs/`` members, cmd and env.

    ``cmd`` is the config's ``Entrypoint`` followed by its ``Cmd``; ``env`` its ``Env``.
    """
    try:
        archive = tarfile.open(path, mode="r:*")  # noqa: SIM115 - closed below
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise FormatError(f"cannot read the image archive {path}: {exc}") from None
    with archive:
        layers, config_name = _manifest_layers(archive)
        config = _json_member(archive, config_name)
        if not isinstance(config, dict):
            raise FormatError("image config is not a JSON object")
        nodes: dict[str, _Node] = {}
        for layer in layers:
            _apply_layer(nodes, _member_bytes(archive, layer))
    settings = config.get("config") or {}
    if not isinstance(settings, dict):
        raise FormatError("image config 'config' must be an object")
    entrypoint = _string_list(settings.get("Entrypoint"), "Entrypoint") or ()
    command = _string_list(settings.get("Cmd"), "Cmd") or ()
    env = _string_list(settings.get("Env"), "Env")
    entries = [CpioEntry(ROOTFS_PREFIX, stat.S_IFDIR | 0o755)]
    for name, node in nodes.items():
        member = f"{ROOTFS_PREFIX}/{name}"
        if stat.S_ISREG(node.mode):
            data = node.data
            entries.append(CpioEntry(member, node.mode, size=len(data), open=_bytes_opener(data)))
        else:
            entries.append(CpioEntry(member, node.mode, link=node.link, rdev=node.rdev))
    # Directories implied by deeper members but absent from the layers.
    present = {e.name for e in entries}
    for name in list(present):
        parent = name.rpartition("/")[0]
        while parent and parent not in present:
            entries.append(CpioEntry(parent, stat.S_IFDIR | 0o755))
            present.add(parent)
            parent = parent.rpartition("/")[0]
    return RootFilesystem(
        entries=tuple(entries),
        cmd=(*entrypoint, *command) or None,
        env=env,
        docker_info={"Architecture": config.get("architecture"), "Os": config.get("os")},
    )
