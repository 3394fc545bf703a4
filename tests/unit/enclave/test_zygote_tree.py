"""The zygote's shared mount tree (issue 16, t16m): built once per zygote, copied per session.

What every session's tree shares (the read-only binds, ``/dev``'s device binds, the worker's
files, ``/`` and ``/dev`` themselves) is built by the zygote in a mount namespace of its own
and copied by each session's ``unshare``. Here: what that must not change. Nothing a session
writes is seen by the next; the shared mounts are locked in a session's namespace (even a
process holding every capability there cannot make them writable or unmount them); the
zygote's namespace leaves nothing in the host's, and a host mount made after the zygote
started never reaches a sandbox. The parity with bubblewrap's tree is test_zygote.py's.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cape.enclave import sandbox as sandbox_module
from cape.enclave import zygote as zygote_module
from cape.enclave.sandbox import FunctionSandbox
from cape.enclave.staging import SUPPORT, layout
from cape.enclave.zygote import Zygote, ZygoteSpawn
from cape.errors import SandboxError
from tests.unit.enclave.test_sandbox import LIMITS, call_json, make_function

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the zygote runs where the runtime is root (a uid range)"
)

MS_BIND = 4096
MS_REC = 16384
MS_SHARED = 1 << 20
MNT_DETACH = 2
libc = ctypes.CDLL(None, use_errno=True)

#: Every place a function might write to, as a file and as a directory.
PLACES = [
    "/",
    "/dev",
    "/dev/shm",
    "/tmp",
    "/run",
    "/etc",
    "/usr",
    "/function",
    "/cape-worker",
    "/cape-worker/guest",
    "/proc",
]

MARK_APP = """
import json, os


def _try(action):
    try:
        action()
    except OSError as exc:
        return exc.errno
    return 0


def cape_handler(data):
    request = json.loads(data)
    out = {}
    for place in request["places"]:
        base = place.rstrip("/") + "/cape-mark-" + request["tag"]
        out[place] = [
            _try(lambda: open(base + "-file", "x").write("mark")),
            _try(lambda: os.mkdir(base + "-dir")),
        ]
    out["home"] = os.environ["HOME"]
    out["seen"] = sorted(
        place + "/" + name
        for place in request["places"]
        if os.path.isdir(place)
        for name in os.listdir(place)
        if name.startswith("cape-mark-")
    )
    return json.dumps(out)
"""


def _start(started: list[FunctionSandbox], directory: Path) -> FunctionSandbox:
    box = FunctionSandbox.start(directory, limits=LIMITS)
    started.append(box)
    return box


def _marks(box: FunctionSandbox, tag: str) -> dict[str, object]:
    return call_json(box, {"places": PLACES, "tag": tag})


def test_nothing_one_session_writes_is_seen_by_the_next(
    tmp_path: Path, started: list[FunctionSandbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every session's tree is a copy of one template: a place both could write to would carry
    # one session's files into the next. Each place is written to (a file and a directory)
    # by one session; the next sees none of them, and the outcome of each write is the one
    # bubblewrap's sandbox gives (only the scratch tmpfs take them).
    first = _start(started, make_function(tmp_path, MARK_APP, name="first"))
    assert isinstance(first._spawn, ZygoteSpawn)
    wrote = _marks(first, "first")
    assert wrote["home"] == "/tmp"
    writable = {place for place in PLACES if wrote[place] == [0, 0]}
    assert writable == {"/tmp", "/dev/shm"}
    seen = wrote["seen"]
    assert isinstance(seen, list)
    assert sorted(seen) == sorted(
        f"{place}/cape-mark-first-{kind}" for place in writable for kind in ("file", "dir")
    )
    first.close()
    second = _start(started, make_function(tmp_path, MARK_APP, name="second"))
    assert isinstance(second._spawn, ZygoteSpawn)
    again = _marks(second, "second")
    seen = again["seen"]
    assert isinstance(seen, list)
    assert not [name for name in seen if "first" in name]
    monkeypatch.setattr(zygote_module, "_settings", {"start": "bubblewrap"})
    bwrap = _marks(_start(started, make_function(tmp_path, MARK_APP, name="bwrap")), "bwrap")
    for place in PLACES:
        assert wrote[place] == again[place] == bwrap[place], place


#: Joins a sandbox's user and mount namespaces (every capability in them, as a process that
#: escaped the worker's drop would hold) and tries to change the shared tree.
ENTER = r"""
import ctypes, errno, json, os, sys

libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND = 1, 2, 4, 32, 4096
MNT_DETACH = 2
fds = [os.open(f"/proc/{sys.argv[1]}/ns/{kind}", os.O_RDONLY) for kind in ("user", "mnt")]
for fd in fds:
    if libc.setns(fd, 0) != 0:
        raise SystemExit(f"setns: {os.strerror(ctypes.get_errno())}")


def err(result):
    return "ok" if result == 0 else errno.errorcode[ctypes.get_errno()]


out = {}
for point in ("/", "/usr", "/dev", "/dev/null", "/cape-worker/worker.py", "/etc/passwd"):
    keep = MS_NOSUID | (0 if point == "/dev/null" else MS_NODEV)
    out["remount rw " + point] = err(
        libc.mount(None, point.encode(), None, ctypes.c_ulong(MS_REMOUNT | MS_BIND | keep), None)
    )
    out["umount " + point] = err(libc.umount2(point.encode(), 0))
    out["detach " + point] = err(libc.umount2(point.encode(), MNT_DETACH))
out["remount the root's file system rw"] = err(
    libc.mount(None, b"/", None, ctypes.c_ulong(MS_REMOUNT), None)
)
out["mount over /usr"] = err(libc.mount(b"tmpfs", b"/usr", b"tmpfs", 0, None))
out["/usr after it"] = os.listdir("/usr")
print(json.dumps(out))
"""


def _host_pid(pidfd: int) -> int:
    with open(f"/proc/self/fdinfo/{pidfd}") as info:
        return next(int(line.split()[1]) for line in info if line.startswith("Pid:"))


def test_the_shared_tree_is_locked_in_each_session(
    tmp_path: Path, started: list[FunctionSandbox]
) -> None:
    # The function has no capability and seccomp refuses mount calls (test_sandbox.py). Here
    # a process that holds every capability in the session's namespaces, what an escape from
    # the worker's drop would get: the mounts copied from the zygote's template cannot be
    # made writable or unmounted (locked by the kernel), and what it mounts over them stays
    # in its own session.
    box = _start(started, make_function(tmp_path, "echo_state", name="first"))
    assert isinstance(box._spawn, ZygoteSpawn) and box._pid1_fd is not None
    run = subprocess.run(
        [sys.executable, "-I", "-c", ENTER, str(_host_pid(box._pid1_fd))],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    tried = json.loads(run.stdout)
    for point in ("/", "/usr", "/dev", "/dev/null", "/cape-worker/worker.py", "/etc/passwd"):
        if point != "/dev/null":  # the device binds are writable, as bubblewrap's
            assert tried["remount rw " + point] == "EPERM", point
        assert tried["umount " + point] == "EINVAL", point
        assert tried["detach " + point] == "EINVAL", point
    assert tried["remount the root's file system rw"] == "EPERM"
    assert tried["mount over /usr"] == "ok"
    assert tried["/usr after it"] == []
    # The next session's /usr is the template's, not covered (its interpreter runs from it).
    second = _start(started, make_function(tmp_path, "echo_state", name="second"))
    assert second.call(b"second") == b"second"


def _host_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as table:
        return [line.split()[4] for line in table]


def test_the_zygote_leaves_no_mount_in_the_host(
    tmp_path: Path, started: list[FunctionSandbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A zygote of its own (a layout no other test uses), started and used here.
    before = _host_mounts()
    good = layout()
    fresh = dataclasses.replace(good, symlinks=(*good.symlinks, ("/usr", "/cape-t16m")))
    monkeypatch.setattr(sandbox_module, "layout", lambda: fresh)
    box = _start(started, make_function(tmp_path, "echo_state"))
    assert isinstance(box._spawn, ZygoteSpawn)
    assert box.call(b"x") == b"x"
    zygote = zygote_module._zygotes[fresh]
    assert zygote is not None and zygote.pid is not None
    template = SUPPORT.root / f"zygote-{zygote.pid}"
    # Its tree is in its own mount namespace: the host sees an empty directory, no new mount.
    assert template.is_dir() and list(template.iterdir()) == []
    after = _host_mounts()
    support = str(SUPPORT.root)
    assert [point for point in after if point.startswith(support)] == []
    assert sorted(set(after) - set(before)) == []
    assert os.readlink(f"/proc/{zygote.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")


MOUNTS_APP = """
import os


def cape_handler(data):
    with open("/proc/self/mountinfo") as file:
        points = [line.split()[4] for line in file]
    return " ".join(sorted(p for p in points if p.startswith("/opt/tree"))) + "|" + " ".join(
        sorted(os.listdir("/opt/tree/sub"))
    )
"""


def test_a_host_mount_made_after_the_zygote_started_never_reaches_a_sandbox(
    tmp_path: Path, started: list[FunctionSandbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bound tree that is a shared mount on the host (as / is under systemd): a mount made
    # there later propagates to every namespace that holds a slave copy of it. The zygote's
    # template is private: a session started after the host mount sees the tree as it was.
    # Reachable by any uid, as a bind source must be (pytest's own directories are not).
    tree = Path(tempfile.mkdtemp(prefix="cape-t16m-tree-"))
    (tree / "sub").mkdir(mode=0o755)
    tree.chmod(0o755)
    assert libc.mount(str(tree).encode(), str(tree).encode(), None, MS_BIND, None) == 0
    try:
        assert libc.mount(None, str(tree).encode(), None, MS_SHARED, None) == 0
        good = layout()
        wider = dataclasses.replace(good, binds=(*good.binds, (str(tree), "/opt/tree")))
        monkeypatch.setattr(sandbox_module, "layout", lambda: wider)
        first = _start(started, make_function(tmp_path, MOUNTS_APP, name="first"))
        assert isinstance(first._spawn, ZygoteSpawn)
        assert first.call(b"").decode() == "/opt/tree|"
        sub = str(tree / "sub").encode()
        assert libc.mount(b"tmpfs", sub, b"tmpfs", 0, b"mode=0777") == 0
        try:
            (tree / "sub" / "host-file").write_text("x")
            second = _start(started, make_function(tmp_path, MOUNTS_APP, name="second"))
            assert isinstance(second._spawn, ZygoteSpawn)
            assert second.call(b"").decode() == "/opt/tree|"
        finally:
            libc.umount2(sub, MNT_DETACH)
    finally:
        libc.umount2(str(tree).encode(), MNT_DETACH)
        shutil.rmtree(tree)


#: Loads sandbox_root as the zygote does, in a mount namespace of its own, and binds a tree
#: with a mount below it the way a session binds its function (mount_setattr, or remounts).
RESTRICT = r"""
import ctypes, json, os, sys
from importlib.machinery import SourceFileLoader

root = SourceFileLoader("cape_sandbox_root", sys.argv[1]).load_module()
if sys.argv[2] == "fallback":
    root.SYS_MOUNT_SETATTR = 1023  # no such system call: ENOSYS, as before Linux 5.12
base = sys.argv[3]
root.check(root.libc.unshare(root.CLONE_NEWNS), "unshare")
root.mount(None, "/", None, root.MS_REC | root.MS_PRIVATE)
root.mount("tmpfs", base, "tmpfs", 0)
os.makedirs(base + "/src/below")
os.makedirs(base + "/newroot/function")
root.mount("tmpfs", base + "/src/below", "tmpfs", 0)
root._Tree(base).bind(base + "/src", "/function", made=True)
with open("/proc/self/mountinfo") as table:
    print(json.dumps({
        fields[4][len(base) :]: fields[5] for fields in (line.split() for line in table)
        if fields[4].startswith(base + "/newroot")
    }))
"""


@pytest.mark.parametrize("way", ["mount_setattr", "fallback"])
def test_a_sessions_bind_makes_every_mount_below_it_read_only(tmp_path: Path, way: str) -> None:
    program = Path(zygote_module.PROGRAM).with_name("sandbox_root.py")
    run = subprocess.run(
        [sys.executable, "-I", "-c", RESTRICT, str(program), way, str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    flags = {point: set(options.split(",")) for point, options in json.loads(run.stdout).items()}
    assert set(flags) == {"/newroot/function", "/newroot/function/below"}
    for point, options in flags.items():
        assert {"ro", "nosuid", "nodev"} <= options, point


def test_a_source_behind_a_closed_directory_fails_as_under_bubblewrap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bubblewrap resolves every bind source as the session's uid; the zygote builds the
    # template as root, but resolves its sources as an unprivileged uid with no group: a source
    # only root can reach is refused both ways, not bound.
    closed = tmp_path / "closed"
    (closed / "tree").mkdir(parents=True)
    closed.chmod(0o700)
    (closed / "tree").chmod(0o755)
    good = layout()
    bad = dataclasses.replace(good, binds=(*good.binds, (str(closed / "tree"), "/opt/tree")))
    zygote = Zygote(bad)
    monkeypatch.setattr(sandbox_module, "zygote_for", lambda *_: zygote)
    try:
        with pytest.raises(SandboxError) as info:
            FunctionSandbox.start(make_function(tmp_path, "marker_at_import"), limits=LIMITS)
    finally:
        zygote.close()
    assert info.value.reason == "unavailable"
    assert str(info.value) == (
        "the sandbox zygote could not build the sandbox: "
        f"cape-zygote: bind {closed / 'tree'}: Permission denied"
    )
