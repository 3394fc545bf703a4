"""Bundle validation: every rule has a zip that breaks it, and unpacking stays inside."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import pytest

from cape.enclave.unpack import unpack_bundle
from cape.errors import FormatError, LimitExceededError
from cape.formats.bundle import BundleLimits, inspect_bundle

APP = b"def cape_handler(data):\n    return data\n"


def make_zip(
    entries: dict[str, bytes],
    *,
    modes: dict[str, int] | None = None,
    compression: int = zipfile.ZIP_DEFLATED,
) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, content in entries.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = compression
            info.create_system = 3
            mode = (modes or {}).get(name, stat.S_IFREG | 0o644)
            info.external_attr = mode << 16
            archive.writestr(info, content)
    return buffer.getvalue()


def test_app_at_root() -> None:
    info = inspect_bundle(make_zip({"app.py": APP, "data/model.bin": b"\x00" * 10}))
    assert info.root == "" and info.files == 2


def test_app_in_single_top_folder_as_cape_cli_zips() -> None:
    info = inspect_bundle(make_zip({"echo/app.py": APP, "echo/lib/util.py": b"x = 1\n"}))
    assert info.root == "echo"


@pytest.mark.parametrize(
    "source",
    [
        b"def cape_handler(x):\n    return x\n",
        b"async def cape_handler(x):\n    return x\n",
        b"import serdio\n@serdio.lift_io(as_handler=True)\ndef cape_handler(x):\n    return x\n",
        b"from serdio import lift_io\ndef f(x): return x\ncape_handler = lift_io(f)\n",
        b"from handlers import echo as cape_handler\n",
        b"cape_handler: object = print\n",
    ],
)
def test_handler_forms_accepted(source: bytes) -> None:
    inspect_bundle(make_zip({"app.py": source}))


@pytest.mark.parametrize(
    ("entries", "words"),
    [
        ({"main.py": APP}, "no app.py"),
        ({"a/app.py": APP, "b/x.py": b""}, "no app.py"),
        ({"app.py": b"def handler(x):\n    return x\n"}, "does not define cape_handler"),
        ({"app.py": b"def cape_handler(:\n"}, "does not parse"),
        ({"app.py": b"if True:\n    def cape_handler(x): return x\n"}, "does not define"),
        ({"app.py": APP, "/etc/passwd": b"x"}, "absolute"),
        ({"app.py": APP, "../escape.py": b"x"}, "plain relative"),
        ({"app.py": APP, "a/../../escape.py": b"x"}, "plain relative"),
        ({"app.py": APP, "./app2.py": b"x"}, "plain relative"),
        ({"app.py": APP, "a\\..\\b.py": b"x"}, "not allowed"),
        ({"app.py": APP, "C:/x.py": b"x"}, "absolute"),
        ({"app.py": APP, "App.py": b"x"}, "duplicate"),
    ],
)
def test_invalid_bundles(entries: dict[str, bytes], words: str) -> None:
    with pytest.raises(FormatError, match=words):
        inspect_bundle(make_zip(entries))


def test_symlink_entry_refused() -> None:
    data = make_zip({"app.py": APP, "link": b"/etc/shadow"}, modes={"link": stat.S_IFLNK | 0o777})
    with pytest.raises(FormatError, match="symlink"):
        inspect_bundle(data)


def test_device_entry_refused() -> None:
    data = make_zip({"app.py": APP, "dev": b""}, modes={"dev": stat.S_IFCHR | 0o644})
    with pytest.raises(FormatError, match="special file"):
        inspect_bundle(data)


def test_not_a_zip_and_empty_zip() -> None:
    with pytest.raises(FormatError, match="not a valid zip"):
        inspect_bundle(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(FormatError, match="empty"):
        inspect_bundle(make_zip({}))


def test_encrypted_entry_refused() -> None:
    data = bytearray(make_zip({"app.py": APP}))
    # Set the "encrypted" flag bit in the central directory entry.
    central = data.rfind(b"PK\x01\x02")
    data[central + 8] |= 0x01
    with pytest.raises(FormatError, match="encrypted"):
        inspect_bundle(bytes(data))


def test_zip_bomb_refused_by_ratio() -> None:
    bomb = make_zip({"app.py": APP, "zeros.bin": b"\x00" * (8 << 20)})
    with pytest.raises(LimitExceededError, match="compression ratio"):
        inspect_bundle(bomb)


def test_limits_on_files_and_sizes() -> None:
    many = make_zip({"app.py": APP, **{f"f{i}.txt": b"x" for i in range(20)}})
    with pytest.raises(LimitExceededError, match="file count"):
        inspect_bundle(many, BundleLimits(max_files=10))
    big = make_zip(
        {"app.py": APP, "blob": bytes(range(256)) * 4096}, compression=zipfile.ZIP_STORED
    )
    with pytest.raises(LimitExceededError, match="unpacked size"):
        inspect_bundle(big, BundleLimits(max_unpacked_bytes=100_000))
    with pytest.raises(LimitExceededError, match="bundle size"):
        inspect_bundle(big, BundleLimits(max_bundle_bytes=1000))


def test_lying_size_header_is_caught_while_unpacking(tmp_path: Path) -> None:
    data = bytearray(
        make_zip({"app.py": APP, "data.bin": b"A" * 5000}, compression=zipfile.ZIP_STORED)
    )
    # Shrink data.bin's declared size in the central directory (offset 24: uncompressed size).
    central = data.find(b"PK\x01\x02", data.find(b"PK\x01\x02") + 1)
    data[central + 24 : central + 28] = (10).to_bytes(4, "little")
    with pytest.raises((FormatError, LimitExceededError)):
        unpack_bundle(bytes(data), tmp_path / "out")


def test_unpack_writes_tree_and_returns_app_folder(tmp_path: Path) -> None:
    target = tmp_path / "fn"
    target.mkdir()
    root = unpack_bundle(make_zip({"echo/app.py": APP, "echo/sub/data.txt": b"hi"}), target)
    assert root == target.resolve() / "echo"
    assert (root / "app.py").read_bytes() == APP
    assert (root / "sub" / "data.txt").read_bytes() == b"hi"
    assert {p.name for p in tmp_path.iterdir()} == {"fn"}  # nothing written outside


def test_unpack_refuses_before_writing_anything(tmp_path: Path) -> None:
    target = tmp_path / "fn"
    target.mkdir()
    with pytest.raises(FormatError):
        unpack_bundle(make_zip({"app.py": APP, "../evil": b"x"}), target)
    assert list(target.iterdir()) == []


def test_zip_without_file_type_bits_is_fine() -> None:
    # zipfile.writestr(name, ...) records mode 0o600 with no S_IFMT bits.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("fn/app.py", APP)
    assert inspect_bundle(buffer.getvalue()).root == "fn"


# -- memoryview input (a bundle decrypted in place) ---------------------------------------------


def _inside(data: bytes) -> tuple[bytearray, memoryview]:
    """``data`` as a view in the middle of a larger buffer, as after in-place decryption."""
    buffer = bytearray(b"H" * 37 + data + b"T" * 16)
    return buffer, memoryview(buffer)[37 : 37 + len(data)]


def test_inspects_a_memoryview_like_bytes() -> None:
    data = make_zip({"fn/app.py": APP, "fn/data.bin": bytes(range(256)) * 64})
    buffer, view = _inside(data)
    assert inspect_bundle(view) == inspect_bundle(data)
    view.release()
    buffer.clear()  # nothing inspect_bundle made still holds the buffer


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_memoryview_errors_match_bytes(compression: int) -> None:
    broken = make_zip({"lib.py": b"x = 1\n"}, compression=compression)
    with pytest.raises(FormatError, match=r"no app\.py"):
        inspect_bundle(_inside(broken)[1])
    with pytest.raises(FormatError, match="not a valid zip"):
        inspect_bundle(_inside(b"PK\x03\x04 definitely not a zip")[1])
    with pytest.raises(LimitExceededError):
        inspect_bundle(_inside(make_zip({"app.py": APP}))[1], BundleLimits(max_bundle_bytes=10))


def test_memoryview_is_read_without_a_full_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    copies: list[int] = []
    real = io.BytesIO

    def spy(initial: bytes = b"") -> io.BytesIO:
        copies.append(len(initial))
        return real(initial)

    monkeypatch.setattr(io, "BytesIO", spy)
    _buffer, view = _inside(make_zip({"app.py": APP, "big.bin": bytes(range(256)) * 256}))
    inspect_bundle(view)
    assert not [n for n in copies if n >= len(view)]


def test_view_reader_seeks_and_reads() -> None:
    from cape.formats.bundle import _ViewReader

    with _ViewReader(memoryview(b"0123456789")) as reader:
        assert reader.readable() and reader.seekable()
        assert reader.read(3) == b"012"
        assert reader.seek(-2, io.SEEK_END) == 8
        assert reader.read() == b"89"
        assert reader.read(5) == b""
        assert reader.seek(2, io.SEEK_CUR) == 12
        assert reader.read(1) == b""
        assert reader.seek(4) == 4 and reader.tell() == 4
        out = bytearray(3)
        assert reader.readinto(out) == 3 and out == b"456"
        with pytest.raises(ValueError):
            reader.seek(-1)
        with pytest.raises(ValueError):
            reader.seek(0, 7)
    with pytest.raises(ValueError):
        reader.tell()
