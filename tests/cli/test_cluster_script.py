"""``scripts/cluster.sh``'s refusals and its answers with no cluster (cheap: nothing starts).
Bringing a cluster up and down is exercised by ``benchmarks/cluster_bench.py`` (smoke run in
CI), which drives the script."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "cluster.sh"


def cluster_sh(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CAPE_CLUSTER_DIR": str(tmp_path / "cluster")}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((), "usage: bash scripts/cluster.sh up"),
        (("start",), "usage: bash scripts/cluster.sh up"),
        (("up", "--nodes", "many"), "--nodes must be 1 to 99"),
        (("up", "--nodes", "0"), "--nodes must be 1 to 99"),
        (("up", "--enclaves", "-1"), "--enclaves must be 1 to 64"),
        (("up", "--replicas", "3"), "unknown option --replicas"),
    ],
)
def test_bad_usage_is_one_error_line(tmp_path: Path, args: tuple[str, ...], needle: str) -> None:
    done = cluster_sh(tmp_path, *args)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0]
    assert not (tmp_path / "cluster").exists()


def test_status_and_down_without_a_cluster(tmp_path: Path) -> None:
    status = cluster_sh(tmp_path, "status")
    assert status.returncode == 1 and "no cluster" in status.stdout
    down = cluster_sh(tmp_path, "down")
    assert down.returncode == 0 and "no cluster" in down.stdout


def test_up_refuses_an_existing_state_directory(tmp_path: Path) -> None:
    (tmp_path / "cluster").mkdir()
    done = cluster_sh(tmp_path, "up", "--nodes", "1")
    assert (
        done.returncode != 0 and "exists: run 'bash scripts/cluster.sh down' first" in done.stderr
    )
