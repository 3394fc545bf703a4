"""The enclave's Python runtime, as the wheel tags pip needs to vendor requirements for it.

``GET /v1/runtime`` answers :meth:`RuntimeTarget.to_json`; ``cape deploy`` reads it back with
:meth:`RuntimeTarget.from_json` and installs a function's ``requirements.txt`` for that target
(see :mod:`cape.sdk.bundle`). The answer comes from the host, which users do not trust, so
every field is checked against a strict pattern: the values end up on pip's command line.

Platform tags are derived here rather than with ``packaging`` (not a dependency of Cape, and
its tag order differs between versions): on glibc Linux they are ``manylinux_2_N_<arch>``
from the running glibc down to the oldest manylinux glibc (2.5 on x86, 2.17 elsewhere), with
the legacy aliases (``manylinux2014`` ...) beside their versions, then ``linux_<arch>``.
"""

from __future__ import annotations

import platform
import re
import sys
import sysconfig
from dataclasses import dataclass
from typing import Any, Final

from cape.errors import FormatError

__all__ = ["RuntimeTarget"]

_VERSION = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}")
_IMPLEMENTATION = re.compile(r"[a-z]{2}")
_ABI = re.compile(r"[a-z0-9_]{1,40}")
_PLATFORM = re.compile(r"[a-z0-9_]{1,80}")
_MAX_PLATFORMS: Final = 256
_LEGACY_MANYLINUX: Final = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
_IMPLEMENTATIONS: Final = {"cpython": "cp", "pypy": "pp", "ironpython": "ip", "jython": "jy"}


def _normalize(tag: str) -> str:
    return tag.replace("-", "_").replace(".", "_").replace(" ", "_").lower()


def _glibc() -> tuple[int, int] | None:
    library, version = platform.libc_ver()
    match = re.match(r"([0-9]+)\.([0-9]+)", version)
    if library != "glibc" or match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def _linux_archs() -> list[str]:
    arch = _normalize(sysconfig.get_platform()).removeprefix("linux_")
    if sys.maxsize <= 2**32:  # a 32-bit interpreter on a 64-bit kernel
        arch = {"x86_64": "i686", "aarch64": "armv8l"}.get(arch, arch)
    return ["armv8l", "armv7l"] if arch == "armv8l" else [arch]


def platform_tags() -> tuple[str, ...]:
    """This machine's wheel platform tags, most specific first."""
    generic = _normalize(sysconfig.get_platform())
    if not generic.startswith("linux_"):
        return (generic,)
    archs = _linux_archs()
    tags: list[str] = []
    glibc = _glibc()
    if glibc is not None and glibc[0] == 2:
        for arch in archs:
            oldest = 5 if arch in ("x86_64", "i686") else 17
            for minor in range(glibc[1], oldest - 1, -1):
                tags.append(f"manylinux_2_{minor}_{arch}")
                if minor in _LEGACY_MANYLINUX:
                    tags.append(f"{_LEGACY_MANYLINUX[minor]}_{arch}")
    tags.extend(f"linux_{arch}" for arch in archs)
    return tuple(tags)


@dataclass(frozen=True)
class RuntimeTarget:
    """The interpreter and platforms that vendored wheels must fit.

    Raises :class:`~cape.errors.FormatError` when a field does not look like a wheel tag.
    """

    python_version: str
    """``"3.11"``."""
    implementation: str
    """``"cp"`` for CPython."""
    abi: str
    """``"cp311"`` (``"cp313t"`` for a free-threaded build)."""
    platforms: tuple[str, ...]
    """Platform tags, most specific first, e.g. ``("manylinux_2_17_x86_64", ...)``."""

    def __post_init__(self) -> None:
        checks = (
            ("python_version", self.python_version, _VERSION),
            ("implementation", self.implementation, _IMPLEMENTATION),
            ("abi", self.abi, _ABI),
        )
        for name, value, pattern in checks:
            if not isinstance(value, str) or not pattern.fullmatch(value):
                raise FormatError(f"runtime {name} {value!r} is not a valid tag")
        if not isinstance(self.platforms, tuple) or not 0 < len(self.platforms) <= _MAX_PLATFORMS:
            raise FormatError(f"runtime platforms must list 1 to {_MAX_PLATFORMS} tags")
        for tag in self.platforms:
            if not isinstance(tag, str) or not _PLATFORM.fullmatch(tag):
                raise FormatError(f"runtime platform {tag!r} is not a valid tag")
        if len(set(self.platforms)) != len(self.platforms):
            raise FormatError("runtime platforms repeat a tag")

    @classmethod
    def local(cls) -> RuntimeTarget:
        """The running interpreter on this machine."""
        major, minor = sys.version_info[:2]
        name = sys.implementation.name
        implementation = _IMPLEMENTATIONS.get(name, name[:2])
        if implementation == "cp":
            threaded = "t" if sysconfig.get_config_var("Py_GIL_DISABLED") else ""
            abi = f"cp{major}{minor}{threaded}"
        else:
            # As packaging does: "pypy310-pp73-x86_64-linux-gnu" -> "pypy310_pp73".
            soabi = str(sysconfig.get_config_var("SOABI") or "none")
            abi = _normalize("_".join(soabi.split("-")[:2]))
        return cls(f"{major}.{minor}", implementation, abi, platform_tags())

    def to_json(self) -> dict[str, Any]:
        """The JSON object ``GET /v1/runtime`` answers."""
        return {
            "python_version": self.python_version,
            "implementation": self.implementation,
            "abi": self.abi,
            "platforms": list(self.platforms),
        }

    @classmethod
    def from_json(cls, value: object) -> RuntimeTarget:
        """Parse :meth:`to_json`'s shape (unknown keys are ignored, for newer servers)."""
        if not isinstance(value, dict):
            raise FormatError("the runtime description is not a JSON object")
        fields: dict[str, str] = {}
        for name in ("python_version", "implementation", "abi"):
            item = value.get(name)
            if not isinstance(item, str):
                raise FormatError(f"the runtime description lacks a string {name!r}")
            fields[name] = item
        platforms = value.get("platforms")
        if not isinstance(platforms, list) or not all(isinstance(p, str) for p in platforms):
            raise FormatError("the runtime description lacks a list of strings 'platforms'")
        return cls(platforms=tuple(platforms), **fields)
