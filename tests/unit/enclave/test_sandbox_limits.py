"""Whole-function limits (issue 18, finding 4): what a hostile function cannot get past.

Measured from the sandbox's cgroup and /proc, against real bubblewrap sandboxes: forked children
share one memory limit, the limits are the configured ones, and nothing of the function
outlives its session. The cgroup back ends are also driven against fake hierarchies (v2 cannot
be exercised on this machine's v1 layout).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import cast

import pytest

from cape.enclave import cgroups
from cape.enclave.cgroups import CgroupLimits
from cape.enclave.sandbox import FunctionSandbox, SandboxLimits
from cape.errors import SandboxError
from tests.unit.enclave.test_sandbox import call_json, make_function, processes_of

MIB = 1 << 20
LIMITS = SandboxLimits(
    memory_bytes=384 * MIB,
    processes=32,
    cpu_cores=0.5,
    call_timeout_s=30.0,
    load_timeout_s=30.0,
    tmp_bytes=16 * MIB,
)

needs_cgroups = pytest.mark.skipif(
    shutil.which("bwrap") is None or cgroups.shared()[0] is None,
    reason=f"needs bubblewrap and writable cgroups ({cgroups.shared()[1]})",
)


@needs_cgroups
def test_forked_children_share_one_memory_limit(tmp_path: Path) -> None:
    # Three children of 150 MiB each: every one fits its own RLIMIT_AS (384 MiB), together
    # they do not fit the function's 384 MiB. Before cgroups all three got their memory.
    directory = make_function(tmp_path, "fork_allocate")
    box = FunctionSandbox.start(directory, limits=LIMITS)
    try:
        uid, group = box.host_uid, box.cgroup
        assert group is not None
        try:
            got = int(box.call(json.dumps({"children": 3, "mib": 150}).encode()))
        except SandboxError as exc:  # the kernel chose the worker itself
            got, reason = 0, exc.reason
        else:
            reason = "returned"
        assert reason in ("returned", "memory")
        assert got < 3
        assert group.oom_kills() >= 1
        assert 0 < group.memory_peak() <= LIMITS.memory_bytes
        lingering = group.pids()
    finally:
        box.close()
    # The children that survived the call were still there; the session's end took them all.
    assert lingering or not box.alive
    assert group.pids() == []
    assert processes_of(uid) == []
    assert not any(Path(d).exists() for d in group._dirs.values())


@needs_cgroups
def test_the_cgroup_holds_the_configured_limits(tmp_path: Path) -> None:
    with FunctionSandbox.start(make_function(tmp_path, "echo_state"), limits=LIMITS) as box:
        group = box.cgroup
        assert group is not None and box.call(b"x") == b"x"
        pids = box.call(b"cwd") and group.pids()
        assert len(pids) >= 2  # bubblewrap and the worker, both inside
        files = {c: group._dirs[c] for c in ("memory", "pids", "cpu")}
        if group.version == 1:
            assert int((files["memory"] / "memory.limit_in_bytes").read_text()) == 384 * MIB
            assert int((files["cpu"] / "cpu.cfs_quota_us").read_text()) == 50_000
        else:
            assert int((files["memory"] / "memory.max").read_text()) == 384 * MIB
            assert (files["cpu"] / "cpu.max").read_text().split() == ["50000", "100000"]
        assert int((files["pids"] / "pids.max").read_text()) == 32
        worker = max(pids)
        assert str(files["memory"].name) in Path(f"/proc/{worker}/cgroup").read_text()


def _fake_v2(root: Path, own: str, *, delegated: bool) -> Path:
    for directory in (root, root / own):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
        (directory / "cgroup.subtree_control").write_text("")
    if delegated:
        (root / own / "cgroup.subtree_control").write_text("cpu memory pids\n")
    proc = root / "self-cgroup"
    proc.write_text(f"0::/{own}\n")
    return proc


def test_v2_groups_nest_under_a_delegated_cgroup(tmp_path: Path) -> None:
    proc = _fake_v2(tmp_path, "system.slice/cape.service", delegated=True)
    found, why = cgroups.detect(tmp_path, proc)
    assert found is not None, why
    parent = tmp_path / "system.slice/cape.service" / f"cape-sandboxes-{os.getpid()}"
    assert (parent / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    group = found.create(CgroupLimits(memory_bytes=1 << 30, processes=64, cpu_cores=1.5))
    directory = parent / "s1"
    assert (directory / "memory.max").read_text() == str(1 << 30)
    assert (directory / "pids.max").read_text() == "64"
    assert (directory / "cpu.max").read_text() == "150000 100000"
    group.add(4242)
    assert (directory / "cgroup.procs").read_text() == "4242"
    (directory / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n")
    assert group.oom_kills() == 2


def test_names_left_by_a_dead_runtime_with_the_same_pid_are_skipped(tmp_path: Path) -> None:
    # A runtime killed before its exit handler leaves cape-sandboxes-<pid>/s1, s2, ... behind;
    # a later process given the same pid must not fail its sessions with "File exists"
    # (issue 16: the throughput benchmark did), nor touch what the dead one left.
    proc = _fake_v2(tmp_path, "system.slice/cape.service", delegated=True)
    parent = tmp_path / "system.slice/cape.service" / f"cape-sandboxes-{os.getpid()}"
    for name in ("s1", "s2"):
        (parent / name).mkdir(parents=True)
        (parent / name / "cgroup.procs").write_text("")
    found, why = cgroups.detect(tmp_path, proc)
    assert found is not None, why
    limits = CgroupLimits(memory_bytes=1 << 30, processes=64, cpu_cores=1.0)
    first, second = found.create(limits), found.create(limits)
    assert (parent / "s3" / "pids.max").read_text() == "64"
    assert (parent / "s4" / "pids.max").read_text() == "64"
    assert first.pids() == second.pids() == []
    assert sorted(p.name for p in parent.iterdir() if p.is_dir()) == ["s1", "s2", "s3", "s4"]
    assert not (parent / "s1" / "pids.max").exists()


def test_v2_without_delegation_uses_the_root(tmp_path: Path) -> None:
    proc = _fake_v2(tmp_path, "user.slice/session-1.scope", delegated=False)
    # The own cgroup holds processes: enabling controllers there fails with EBUSY.
    (tmp_path / "user.slice/session-1.scope/cgroup.subtree_control").unlink()
    (tmp_path / "user.slice/session-1.scope/cgroup.subtree_control").mkdir()
    found, why = cgroups.detect(tmp_path, proc)
    assert found is not None, why
    assert (tmp_path / f"cape-sandboxes-{os.getpid()}").is_dir()


def test_no_controllers_is_reported_not_hidden(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("io\n")
    proc = tmp_path / "self-cgroup"
    proc.write_text("0::/\n")
    found, why = cgroups.detect(tmp_path, proc)
    assert found is None
    assert "memory, pids and cpu" in why


@needs_cgroups
def test_a_cpu_hog_gets_only_its_quota(tmp_path: Path) -> None:
    # Three spinning processes would take both cores from a neighbour; the function's cgroup
    # holds them to 0.5 core together. CPU time is the kernel's own accounting (the children
    # report it) and the throttling is read from the cgroup. Load on the machine only lowers
    # what the hog gets, so the bound cannot fail from noise.
    with FunctionSandbox.start(make_function(tmp_path, "cpu_hog"), limits=LIMITS) as box:
        group = box.cgroup
        assert group is not None
        used = call_json(box, {"children": 3, "seconds": 4})
        stat = (group._dirs["cpu"] / "cpu.stat").read_text().split()
        throttled = int(stat[stat.index("nr_throttled") + 1])
    assert used["children"] == 3
    share = float(str(used["cpu"])) / float(str(used["wall"]))
    assert share <= LIMITS.cpu_cores * 1.3, f"the hog used {share:.2f} cores"
    assert throttled > 0


def test_scratch_is_capped_and_nothing_else_takes_writes(tmp_path: Path) -> None:
    # A disk filler: the two scratch tmpfs stop at their size, and /function (the enclave's
    # own storage, uncapped per function) and the working directory take nothing. Before, the
    # function directory was writable: 3 GiB went past the 256 MiB scratch limit.
    directory = make_function(tmp_path, "fill_scratch")
    cap_mib = 4 * LIMITS.tmp_bytes >> 20
    paths = ["/tmp/fill", "/dev/shm/fill", "/function/fill", "fill"]
    with FunctionSandbox.start(directory, limits=LIMITS) as box:
        outcome = call_json(box, {"paths": paths, "cap_mib": cap_mib})
        peak = box.cgroup.memory_peak() if box.cgroup is not None else 0
    for path in ("/tmp/fill", "/dev/shm/fill"):
        written, error = cast(list[int], outcome[path])
        assert written <= LIMITS.tmp_bytes and error == errno.ENOSPC, (path, outcome[path])
    for path in ("/function/fill", "fill"):
        assert outcome[path] == [0, errno.EROFS], (path, outcome[path])
    assert not (directory / "fill").exists()
    assert peak <= LIMITS.memory_bytes  # the tmpfs pages were counted in the function's memory
