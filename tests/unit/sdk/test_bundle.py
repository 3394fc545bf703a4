"""Client-side bundles: deterministic zips, early checks, vendored requirements (no network)."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import platform
import shutil
import ssl
import stat
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from cape.errors import CapeError, FormatError, LimitExceededError
from cape.formats import runtime as runtime_module
from cape.formats.bundle import BundleLimits, inspect_bundle
from cape.sdk import bundle as bundle_module
from cape.sdk.bundle import (
    Bundle,
    RuntimeTarget,
    build_bundle,
    default_cache_dir,
    pip_command,
)
from cape.sdk.rest import RestClient

APP = b"def cape_handler(data):\n    return data\n"


def make_folder(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def names(bundle: Bundle) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(bundle.data)) as archive:
        return archive.namelist()


def read(bundle: Bundle, name: str) -> bytes:
    with zipfile.ZipFile(io.BytesIO(bundle.data)) as archive:
        return archive.read(name)


@pytest.fixture
def app(tmp_path: Path) -> Path:
    return make_folder(
        tmp_path / "echo",
        {"app.py": APP, "lib/util.py": b"X = 1\n", "data/b.txt": b"b" * 500, "a.txt": b"a"},
    )


# --------------------------------------------------------------------------- determinism


def test_folder_zip_layout(app: Path) -> None:
    bundle = build_bundle(app, vendor=False)
    assert names(bundle) == ["a.txt", "app.py", "data/b.txt", "lib/util.py"]
    assert bundle.files == 4
    assert bundle.vendored == ()
    assert bundle.source == app
    assert bundle.checksum == hashlib.sha256(bundle.data).hexdigest()
    assert inspect_bundle(bundle.data).root == ""  # app.py at the zip's root
    with zipfile.ZipFile(io.BytesIO(bundle.data)) as archive:
        assert archive.comment == b""
        for info in archive.infolist():
            assert info.date_time == (1980, 1, 1, 0, 0, 0)
            assert info.external_attr >> 16 == stat.S_IFREG | 0o644
            assert info.create_system == 3
            assert info.compress_type == zipfile.ZIP_DEFLATED
            assert info.extra == b""
            assert info.comment == b""
            assert not info.is_dir()
        assert archive.read("app.py") == APP


def test_same_folder_same_bytes_anywhere(app: Path, tmp_path: Path) -> None:
    first = build_bundle(app, vendor=False)
    assert build_bundle(app, vendor=False) == first

    old_umask = os.umask(0o077)
    try:
        copy = shutil.copytree(app, tmp_path / "elsewhere" / "renamed", copy_function=shutil.copy)
    finally:
        os.umask(old_umask)
    for number, path in enumerate(sorted(copy.rglob("*"))):
        if path.is_file():
            path.chmod(0o600 if number % 2 else 0o755)
        os.utime(path, (1_000_000 + number, 2_000_000_000 - number))
    (copy / "lib" / "__pycache__").mkdir()
    (copy / "lib" / "__pycache__" / "util.cpython-311.pyc").write_bytes(b"\x00junk")
    second = build_bundle(copy, vendor=False)
    assert second.checksum == first.checksum
    assert second.data == first.data


def test_content_and_names_change_the_checksum(app: Path) -> None:
    before = build_bundle(app, vendor=False).checksum
    (app / "a.txt").write_bytes(b"A")
    changed = build_bundle(app, vendor=False).checksum
    (app / "a.txt").rename(app / "c.txt")
    renamed = build_bundle(app, vendor=False).checksum
    assert len({before, changed, renamed}) == 3


def test_caches_and_vcs_data_are_left_out(app: Path) -> None:
    make_folder(
        app,
        {
            "__pycache__/app.cpython-311.pyc": b"x",
            "lib/__pycache__/util.cpython-311.pyc": b"x",
            "lib/stale.pyc": b"x",
            ".git/HEAD": b"ref: refs/heads/main\n",
            ".mypy_cache/3.11/app.data.json": b"{}",
            ".git/objects/ab/cdef": b"x",
            ".DS_Store": b"x",
            "lib/.DS_Store": b"x",
            ".gitignore": b"*.pyc\n",
        },
    )
    assert names(build_bundle(app, vendor=False)) == [
        ".gitignore",
        "a.txt",
        "app.py",
        "data/b.txt",
        "lib/util.py",
    ]


def test_empty_subfolders_are_dropped(app: Path) -> None:
    (app / "empty" / "deeper").mkdir(parents=True)
    assert "empty/" not in names(build_bundle(app, vendor=False))


def test_extremely_compressible_file_is_stored(app: Path) -> None:
    # Deflate would exceed the enclave's ratio limit (a zip-bomb defence): store it instead.
    (app / "zeros.bin").write_bytes(b"\x00" * 1_000_000)
    bundle = build_bundle(app, vendor=False)
    with zipfile.ZipFile(io.BytesIO(bundle.data)) as archive:
        assert archive.getinfo("zeros.bin").compress_type == zipfile.ZIP_STORED
        assert archive.getinfo("app.py").compress_type == zipfile.ZIP_DEFLATED
    assert build_bundle(app, vendor=False).checksum == bundle.checksum


def test_progress_reports(app: Path) -> None:
    messages: list[str] = []
    bundle = build_bundle(app, vendor=False, progress=messages.append)
    assert len(messages) == 1
    assert bundle.checksum[:12] in messages[0]


# --------------------------------------------------------------------------- refusals


def test_symlink_is_refused_and_named(app: Path) -> None:
    (app / "lib" / "link.py").symlink_to(app / "app.py")
    with pytest.raises(CapeError, match=r"lib/link\.py is a symbolic link"):
        build_bundle(app, vendor=False)


def test_symlinked_folder_is_not_followed(app: Path, tmp_path: Path) -> None:
    outside = make_folder(tmp_path / "outside", {"secret.txt": b"s"})
    (app / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(CapeError, match="linked is a symbolic link"):
        build_bundle(app, vendor=False)


def test_special_file_is_refused(app: Path) -> None:
    os.mkfifo(app / "pipe")
    with pytest.raises(CapeError, match="pipe is a special file"):
        build_bundle(app, vendor=False)


def test_empty_folder_is_refused(tmp_path: Path) -> None:
    empty = make_folder(tmp_path / "empty", {"__pycache__/x.pyc": b"x"})
    with pytest.raises(CapeError, match="has no files"):
        build_bundle(empty)


def test_missing_app_py_is_refused(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "fn", {"sub/app.py": APP, "main.py": APP})
    with pytest.raises(FormatError, match=r"has no app\.py at its top level"):
        build_bundle(folder)


def test_app_without_handler_is_refused_before_upload(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "fn", {"app.py": b"def handler(x):\n    return x\n"})
    with pytest.raises(FormatError, match="does not define cape_handler"):
        build_bundle(folder)


def test_missing_path_and_other_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CapeError, match="cannot read"):
        build_bundle(tmp_path / "nothing")
    (tmp_path / "app.py").write_bytes(APP)
    with pytest.raises(CapeError, match=r"neither a folder nor a \.zip file"):
        build_bundle(tmp_path / "app.py")


def test_too_big_is_refused(app: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (app / "noise.bin").write_bytes(os.urandom(20_000))
    monkeypatch.setattr(bundle_module, "MAX_BUNDLE_BYTES", 10_000)
    with pytest.raises(LimitExceededError, match="bundle size in bytes exceeds the limit"):
        build_bundle(app, vendor=False)


def test_too_many_files_is_refused(app: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundle_module, "_limits", lambda: BundleLimits(max_files=3))
    with pytest.raises(LimitExceededError, match="file count"):
        build_bundle(app, vendor=False)


# --------------------------------------------------------------------------- zip files


def test_zip_is_passed_through_as_is(app: Path, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("echo/app.py", APP)  # the single-top-folder layout is accepted too
        archive.writestr("echo/requirements.txt", b"no-such-package\n")
    upload = tmp_path / "echo.ZIP"
    upload.write_bytes(buffer.getvalue())
    bundle = build_bundle(upload)
    assert bundle.data == buffer.getvalue()
    assert bundle.checksum == hashlib.sha256(buffer.getvalue()).hexdigest()
    assert bundle.files == 2
    assert bundle.vendored == ()


def test_invalid_zip_is_refused_with_its_path(tmp_path: Path) -> None:
    upload = tmp_path / "broken.zip"
    upload.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(FormatError, match=r"broken\.zip: bundle is not a valid zip file"):
        build_bundle(upload)


def test_zip_without_handler_is_refused(tmp_path: Path) -> None:
    upload = tmp_path / "fn.zip"
    with zipfile.ZipFile(upload, "w") as archive:
        archive.writestr("app.py", b"x = 1\n")
    with pytest.raises(FormatError, match="does not define cape_handler"):
        build_bundle(upload)


def test_big_zip_is_refused_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    upload = tmp_path / "big.zip"
    upload.write_bytes(b"\x00" * 2048)
    monkeypatch.setattr(bundle_module, "MAX_BUNDLE_BYTES", 1024)
    monkeypatch.setattr(Path, "read_bytes", lambda _self: pytest.fail("read"))
    with pytest.raises(LimitExceededError, match="got 2048"):
        build_bundle(upload)


# --------------------------------------------------------------------------- vendoring


def _record_hash(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(
    wheelhouse: Path, name: str, version: str = "1.0", requires: tuple[str, ...] = ()
) -> None:
    info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {
        f"{name}/__init__.py": f"NAME = {name!r}\nVERSION = {version!r}\n".encode(),
        f"{info}/METADATA": metadata.encode(),
        f"{info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: cape-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
        f"{info}/entry_points.txt": f"[console_scripts]\n{name}-cli = {name}:main\n".encode(),
    }
    record = "".join(f"{p},sha256={_record_hash(d)},{len(d)}\n" for p, d in files.items())
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    wheelhouse.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheelhouse / f"{name}-{version}-py3-none-any.whl", "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)


@pytest.fixture
def wheelhouse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A local index for pip: no network, no user or machine pip configuration."""
    house = tmp_path / "wheelhouse"
    make_wheel(house, "alpha", requires=("beta",))
    make_wheel(house, "beta")
    make_wheel(house, "gamma", "2.0")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(house))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    return house


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "vendor-cache"


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


@pytest.fixture
def no_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"pip ran: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)


def test_requirements_are_vendored_beside_app(app: Path, wheelhouse: Path, cache: Path) -> None:
    (app / "requirements.txt").write_bytes(b"gamma==2.0\n")
    bundle = build_bundle(app, cache_dir=cache)
    listed = names(bundle)
    assert "gamma/__init__.py" in listed
    assert "gamma-2.0.dist-info/METADATA" in listed
    assert "app.py" in listed and "requirements.txt" in listed
    assert not [n for n in listed if n.startswith("bin/") or "__pycache__" in n]
    assert read(bundle, "gamma/__init__.py") == b"NAME = 'gamma'\nVERSION = '2.0'\n"
    assert bundle.vendored == ("gamma==2.0",)
    assert listed == sorted(listed)
    assert inspect_bundle(bundle.data).root == ""
    assert len(entries(cache)) == 1 and not entries(cache)[0].startswith(".")


def test_dependencies_are_resolved(app: Path, wheelhouse: Path, cache: Path) -> None:
    (app / "requirements.txt").write_bytes(b"# the app needs alpha\nalpha\n")
    bundle = build_bundle(app, cache_dir=cache)
    assert bundle.vendored == ("alpha==1.0", "beta==1.0")
    assert {"alpha/__init__.py", "beta/__init__.py"} <= set(names(bundle))


def test_second_build_uses_the_cache(
    app: Path, wheelhouse: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (app / "requirements.txt").write_bytes(b"alpha\n")
    first = build_bundle(app, cache_dir=cache)
    shutil.rmtree(wheelhouse)  # the cache must not need the index again
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip ran again"))
    messages: list[str] = []
    second = build_bundle(app, cache_dir=cache, progress=messages.append)
    assert second == first
    assert any("cached" in m for m in messages)


def test_changed_requirements_make_a_new_cache_entry(
    app: Path, wheelhouse: Path, cache: Path
) -> None:
    (app / "requirements.txt").write_bytes(b"beta\n")
    build_bundle(app, cache_dir=cache)
    (app / "requirements.txt").write_bytes(b"beta\ngamma\n")
    bundle = build_bundle(app, cache_dir=cache)
    assert bundle.vendored == ("beta==1.0", "gamma==2.0")
    assert len(entries(cache)) == 2


def test_another_target_makes_a_new_cache_entry(app: Path, wheelhouse: Path, cache: Path) -> None:
    (app / "requirements.txt").write_bytes(b"beta\n")
    local = RuntimeTarget.local()
    build_bundle(app, cache_dir=cache, target=local)
    other = RuntimeTarget("3.12", "cp", "cp312", ("manylinux_2_28_aarch64", "linux_aarch64"))
    assert build_bundle(app, cache_dir=cache, target=other).vendored == ("beta==1.0",)
    assert len(entries(cache)) == 2


def test_unknown_requirement_is_one_line_and_caches_nothing(
    app: Path, wheelhouse: Path, cache: Path
) -> None:
    (app / "requirements.txt").write_bytes(b"no-such-package==1.0\n")
    with pytest.raises(CapeError) as caught:
        build_bundle(app, cache_dir=cache)
    message = str(caught.value)
    assert "\n" not in message
    assert "pip could not install" in message
    assert "no-such-package" in message
    assert "ERROR" not in message
    assert entries(cache) == []  # neither an entry nor a staging directory is left


def test_no_vendor_skips_requirements(
    app: Path, wheelhouse: Path, cache: Path, no_pip: None
) -> None:
    (app / "requirements.txt").write_bytes(b"no-such-package\n")
    bundle = build_bundle(app, vendor=False, cache_dir=cache)
    assert "requirements.txt" in names(bundle)
    assert bundle.vendored == ()
    assert not cache.exists()


def test_requirements_without_packages_run_no_pip(app: Path, cache: Path, no_pip: None) -> None:
    (app / "requirements.txt").write_bytes(b"# nothing yet\n\n")
    assert build_bundle(app, cache_dir=cache).vendored == ()


def test_clash_between_folder_and_vendored_files_is_refused(
    app: Path, wheelhouse: Path, cache: Path
) -> None:
    (app / "requirements.txt").write_bytes(b"gamma\n")
    make_folder(app, {"gamma/__init__.py": b"# my own copy\n"})
    with pytest.raises(CapeError, match=r"gamma/__init__\.py clashes with a file installed"):
        build_bundle(app, cache_dir=cache)


def test_file_shadowing_a_vendored_folder_is_refused(
    app: Path, wheelhouse: Path, cache: Path
) -> None:
    (app / "requirements.txt").write_bytes(b"gamma\n")
    (app / "Gamma").write_bytes(b"not a package\n")  # case-insensitive file systems clash too
    with pytest.raises(CapeError, match="Gamma clashes"):
        build_bundle(app, cache_dir=cache)


def test_pip_command_line(tmp_path: Path) -> None:
    target = RuntimeTarget("3.11", "cp", "cp311", ("manylinux_2_17_x86_64", "linux_x86_64"))
    command = pip_command(target, tmp_path / "site", tmp_path / "requirements.txt")
    assert command[:4] == [sys.executable, "-m", "pip", "install"]
    assert "--only-binary=:all:" in command
    assert "--no-deps" not in command
    assert f"--target={tmp_path / 'site'}" in command
    assert "--python-version=3.11" in command
    assert "--implementation=cp" in command
    assert "--abi=cp311" in command
    assert [c for c in command if c.startswith("--platform")] == [
        "--platform=manylinux_2_17_x86_64",
        "--platform=linux_x86_64",
    ]
    assert not [c for c in command if "index" in c or "find-links" in c]
    assert command[-2:] == ["-r", str(tmp_path / "requirements.txt")]


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CAPE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "cape" / "vendor"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "cape" / "vendor"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "cape" / "vendor"
    monkeypatch.setenv("CAPE_CACHE_DIR", str(tmp_path / "cape"))
    assert default_cache_dir() == tmp_path / "cape" / "vendor"


# --------------------------------------------------------------------------- RuntimeTarget


def test_local_runtime_target() -> None:
    target = RuntimeTarget.local()
    major, minor = sys.version_info[:2]
    assert target.python_version == f"{major}.{minor}"
    assert target.implementation == "cp"
    assert target.abi.startswith(f"cp{major}{minor}")
    assert RuntimeTarget.from_json(target.to_json()) == target


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.uname().machine not in ("x86_64", "aarch64"),
    reason="manylinux tags are derived for x86_64 and aarch64 Linux",
)
def test_platform_tags_match_packaging() -> None:
    tags = pytest.importorskip("packaging.tags")
    ours = runtime_module.platform_tags()
    assert set(ours) == set(tags.platform_tags())
    machine = os.uname().machine
    assert ours[-1] == f"linux_{machine}"
    assert ours[0].startswith("manylinux_2_")
    assert f"manylinux_2_17_{machine}" in ours and f"manylinux2014_{machine}" in ours


def test_platform_tags_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(sysconfig, "get_platform", lambda: "linux-aarch64")
    assert runtime_module.platform_tags() == ("linux_aarch64",)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.28"))
    tags = runtime_module.platform_tags()
    assert tags[0] == "manylinux_2_28_aarch64"
    assert tags[-3:] == ("manylinux_2_17_aarch64", "manylinux2014_aarch64", "linux_aarch64")
    monkeypatch.setattr(sysconfig, "get_platform", lambda: "macosx-14.0-arm64")
    assert runtime_module.platform_tags() == ("macosx_14_0_arm64",)


@pytest.mark.parametrize(
    "value",
    [
        [],
        "3.11",
        {"implementation": "cp", "abi": "cp311", "platforms": ["linux_x86_64"]},
        {"python_version": 3.11, "implementation": "cp", "abi": "cp311", "platforms": ["x"]},
        {"python_version": "3.11", "implementation": "cp", "abi": "cp311", "platforms": []},
        {"python_version": "3.11", "implementation": "cp", "abi": "cp311", "platforms": "x"},
        {"python_version": "3.11", "implementation": "cp", "abi": "cp311", "platforms": [1]},
        {"python_version": "latest", "implementation": "cp", "abi": "cp311", "platforms": ["x"]},
        {"python_version": "3.11", "implementation": "cpy", "abi": "cp311", "platforms": ["x"]},
        {"python_version": "3.11", "implementation": "cp", "abi": "cp-311", "platforms": ["x"]},
        # option injection through a tag must be impossible: values land on pip's command line
        {
            "python_version": "3.11",
            "implementation": "cp",
            "abi": "cp311",
            "platforms": ["--index-url=https://evil.example"],
        },
        {"python_version": "3.11", "implementation": "cp", "abi": "cp311", "platforms": ["x", "x"]},
    ],
)
def test_runtime_target_from_bad_json(value: object) -> None:
    with pytest.raises(FormatError):
        RuntimeTarget.from_json(value)


def test_runtime_target_ignores_unknown_keys() -> None:
    value = {
        "python_version": "3.12",
        "implementation": "cp",
        "abi": "cp312",
        "platforms": ["manylinux_2_28_x86_64", "linux_x86_64"],
        "future": {"anything": True},
    }
    target = RuntimeTarget.from_json(value)
    assert target.platforms == ("manylinux_2_28_x86_64", "linux_x86_64")
    assert target.to_json() == {k: v for k, v in value.items() if k != "future"}


# --------------------------------------------------------------------------- RestClient.runtime


def rest_client(handler: Callable[[httpx.Request], httpx.Response]) -> RestClient:
    client = RestClient("https://cape.example", ssl.create_default_context())
    client.close()
    client._client = httpx.Client(transport=httpx.MockTransport(handler))
    return client


def test_rest_client_runtime() -> None:
    target = RuntimeTarget("3.11", "cp", "cp311", ("manylinux_2_17_x86_64", "linux_x86_64"))
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=target.to_json())

    with rest_client(handler) as client:
        assert client.runtime() == target
    assert [(r.method, str(r.url)) for r in seen] == [("GET", "https://cape.example/v1/runtime")]
    assert "authorization" not in seen[0].headers


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, json=["not", "an", "object"]),
        httpx.Response(200, json={"python_version": "3.11"}),
        httpx.Response(200, content=b"<html>", headers={"content-type": "text/html"}),
    ],
)
def test_rest_client_runtime_refuses_bad_shapes(response: httpx.Response) -> None:
    with rest_client(lambda _request: response) as client, pytest.raises(FormatError):
        client.runtime()
