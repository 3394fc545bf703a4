"""Where a sandbox's files come from: the read-only system layout and the session directory.

bubblewrap resolves bind sources as the sandbox's unprivileged uid, so everything it binds must
be reachable by that uid: the interpreter's prefix (mirrored into a support directory when it
sits somewhere closed, such as pyenv under ``/root``) and the session's function directory
(moved next to a traversable parent for the session when one of its parents is closed, and
chowned to the sandbox uid). Nothing here runs user code.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import stat
import sys
import sysconfig
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from cape._internal.tempdirs import private_tempdir

__all__ = ["SUPPORT", "Layout", "layout", "move_back", "place_function_dir"]

_SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_FILES = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/alternatives",
)
#: The cape package itself: hidden from every sandbox like any site-packages directory.
_CAPE_PACKAGE = str(Path(__file__).resolve().parents[1])


class _Support:
    """A per-process directory (mode 0711) for what the sandbox user must be able to reach."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._root: Path | None = None

    @property
    def root(self) -> Path:
        with self._lock:
            if self._root is None:
                root = private_tempdir("cape-sandbox-")  # a killed runtime's are swept here
                root.chmod(0o711)
                (root / "empty").mkdir(mode=0o555)
                (root / "empty").chmod(0o555)
                atexit.register(shutil.rmtree, root, True)
                self._root = root
            return self._root

    @property
    def empty(self) -> Path:
        return self.root / "empty"


SUPPORT = _Support()


@dataclass(frozen=True)
class Layout:
    python: str  # the interpreter, in the sandbox's paths
    python_bin: str
    binds: tuple[tuple[str, str], ...]  # read-only: (host source, sandbox destination)
    symlinks: tuple[tuple[str, str], ...]  # (target, sandbox path)
    hidden: tuple[str, ...]  # sandbox paths covered by an empty read-only directory


_layout_lock = threading.Lock()
_layout_cache: dict[str, Layout] = {}


def layout() -> Layout:
    with _layout_lock:
        if sys.executable not in _layout_cache:
            _layout_cache[sys.executable] = _build_layout()
        return _layout_cache[sys.executable]


def _build_layout() -> Layout:
    base = os.path.realpath(sys.base_prefix)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    python = os.path.realpath(sys.executable)
    if not _inside(python, base):
        python = os.path.join(base, "bin", f"python{version}")
    if not os.path.isfile(python):
        raise RuntimeError(f"cannot find the base interpreter of {sys.executable}")
    binds: list[tuple[str, str]] = [("/usr", "/usr")]
    symlinks: list[tuple[str, str]] = []
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            symlinks.append((os.readlink(path), path))
        elif os.path.isdir(path):
            binds.append((path, path))
    binds += [(path, path) for path in _ETC_FILES if os.path.exists(path)]
    bound_trees = [dest for _, dest in binds]
    if not _inside(base, "/usr"):
        switching = os.geteuid() == 0
        source = base if not switching or _world_readable(base) else _stage_python(base, python)
        binds.append((source, base))
        bound_trees.append(base)
        if source != base:
            bound_trees.remove(base)  # the staged copy holds no site-packages
    hidden = sorted(
        path
        for path in _site_directories(base, version)
        if os.path.isdir(path) and any(_inside(path, tree) for tree in bound_trees)
    )
    # A path inside another hidden one (the cape package in an installed dist-packages, as
    # in the enclave image) is covered already; bwrap could not mount over it read-only.
    hidden = [p for p in hidden if not any(p != q and _inside(p, q) for q in hidden)]
    return Layout(
        python=python,
        python_bin=os.path.dirname(python),
        binds=tuple(binds),
        symlinks=tuple(symlinks),
        hidden=tuple(hidden),
    )


def _inside(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def _world_readable(path: str) -> bool:
    """Whether any uid can reach ``path`` (every ancestor o+x) and read it (o+r)."""
    current = Path(path)
    if not os.stat(current).st_mode & stat.S_IROTH:
        return False
    return all(os.stat(parent).st_mode & stat.S_IXOTH for parent in [current, *current.parents])


def _site_directories(base: str, version: str) -> set[str]:
    """Every place the host keeps installed packages (the runtime's among them)."""
    found = {
        sysconfig.get_paths()["purelib"],
        sysconfig.get_paths()["platlib"],
        sysconfig.get_paths(vars={"base": base, "platbase": base})["purelib"],
        sysconfig.get_paths(vars={"base": base, "platbase": base})["platlib"],
        _CAPE_PACKAGE,
    }
    for lib in ("/usr/lib", "/usr/local/lib", "/usr/lib64", "/usr/local/lib64"):
        for pattern in (
            "python3*/site-packages",
            "python3*/dist-packages",
            "python3/dist-packages",
        ):
            found.update(str(p) for p in Path(lib).glob(pattern))
    found.add(os.path.join(base, "lib", f"python{version}", "site-packages"))
    return {os.path.realpath(p) for p in found}


def _stage_python(base: str, python: str) -> str:
    """Mirror the interpreter (no site-packages) where the sandbox uid can read it.

    Used when the prefix sits in a directory other users cannot enter (pyenv under /root):
    bubblewrap resolves bind sources as the unprivileged uid. Files are hard links when the
    file system allows, copies otherwise; the mirror is mounted at the original prefix.
    """
    stage = SUPPORT.root / "python"
    if stage.exists():
        return str(stage)
    work = Path(tempfile.mkdtemp(prefix="python-", dir=SUPPORT.root))
    libdir = str(sysconfig.get_config_var("LIBDIR") or os.path.join(base, "lib"))
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    wanted: list[tuple[str, str]] = [(python, os.path.relpath(python, base))]
    if _inside(libdir, base):
        for entry in os.scandir(libdir):
            if entry.name.startswith("libpython"):
                wanted.append((entry.path, os.path.relpath(entry.path, base)))
    stdlib = os.path.join(base, "lib", version)
    skip = {os.path.join(stdlib, "site-packages"), os.path.join(stdlib, "test")}
    for directory, dirs, files in os.walk(stdlib):
        dirs[:] = [d for d in dirs if os.path.join(directory, d) not in skip]
        wanted += [
            (p, os.path.relpath(p, base)) for p in (os.path.join(directory, f) for f in files)
        ]
    for source, rel in wanted:
        target = work / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if os.path.islink(source):
            os.symlink(os.readlink(source), target)
            continue
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
    (work / "lib" / version / "site-packages").mkdir(exist_ok=True)  # stays empty
    for directory, _, _ in os.walk(work):
        os.chmod(directory, 0o755)  # noqa: S103 - the sandbox uid must read the stdlib
    work.rename(stage)  # complete or absent: layout() builds it once, under its lock
    return str(stage)


def place_function_dir(function_dir: Path, uid: int | None) -> tuple[Path, Path | None]:
    """Make the directory reachable and writable for the sandbox uid.

    bubblewrap resolves bind sources as that uid, so every parent must be traversable by
    others. If one is not (a 0700 ``mkdtemp``), the directory is moved for the session into a
    0711 holder we create next to the deepest reachable parent (same file system, so a
    rename), or into our support directory; :func:`_move_back` undoes it. Returns the path
    to bind and the original path when it was moved.
    """
    if uid is None:
        return function_dir, None
    source, original = function_dir, None
    if not all(os.stat(p).st_mode & stat.S_IXOTH for p in function_dir.parents):
        source, original = _relocate(function_dir), function_dir
    _chown_tree(source, uid)
    return source, original


def _relocate(function_dir: Path) -> Path:
    reachable = Path("/")
    for parent in reversed(function_dir.parents):
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            break
        reachable = parent
    errors = []
    for place in (reachable, SUPPORT.root):
        try:
            holder = Path(tempfile.mkdtemp(prefix=".cape-sandbox-", dir=place))
        except OSError as exc:
            errors.append(f"{place}: {exc.strerror}")
            continue
        holder.chmod(0o711)
        try:
            function_dir.rename(holder / "function")
        except OSError as exc:
            holder.rmdir()
            errors.append(f"{place}: {exc.strerror}")
            continue
        return holder / "function"
    raise ValueError(
        f"{function_dir}: a parent directory is closed to the sandbox user and the directory "
        f"cannot be moved next to a reachable one ({'; '.join(errors)}); create session "
        "directories with mode 0711 under a traversable directory"
    )


def _chown_tree(top: Path, uid: int) -> None:
    os.chown(top, uid, uid, follow_symlinks=False)
    top.chmod(stat.S_IMODE(top.stat().st_mode) | 0o700)
    for directory, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
                continue  # a hard link might be shared with a file outside: never give it away
            os.chown(path, uid, uid, follow_symlinks=False)


def move_back(source: Path, original: Path) -> None:
    """Undo :func:`_relocate`: the directory returns, our holder goes."""
    try:
        source.rename(original)
    except OSError:
        shutil.rmtree(source, ignore_errors=True)  # the runtime discarded the session already
    with contextlib.suppress(OSError):
        source.parent.rmdir()
