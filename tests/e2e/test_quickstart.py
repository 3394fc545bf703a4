"""docs/quickstart.md, run as written: every ``bash`` block in order in one shell, then its
Python example, then the stop it describes.

Only what a reader supplies is added: the venv on PATH (step 1 activates it), throwaway data
and config directories, a wait for ``Ready:`` after ``cape serve &``, and the function id the
reader's own ``cape deploy`` printed in place of the example id. The shell runs in a network
namespace of its own, so the quickstart's fixed port 8443 cannot clash with anything else on
the machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import requires_enclaves

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "quickstart.md"
EXAMPLE_ID = "phQnEq67EcFiTW1Xu3bc0h"
EXAMPLE_CHECKSUM = re.compile(r"\b78930de9[0-9a-f]{56}\b")
WAIT_FOR_READY = (
    'for _ in $(seq 600); do [ -f "$CAPE_CONFIG_DIR/serve.json" ] && break; sleep 0.2; done'
)
DEPLOYED = (
    "$(cape list -o json | python -c "
    '\'import json,sys; print(json.load(sys.stdin)["deployments"][-1]["{key}"])\')'
)


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PAGE.read_text(), re.DOTALL)


def script() -> str:
    lines = ["set -euo pipefail"]
    for block in blocks("bash"):
        for line in block.splitlines():
            if line.startswith(("bash scripts/setup.sh", "source .venv/bin/activate")):
                continue  # step 1: the test's venv is on PATH already
            line = line.replace(EXAMPLE_ID, DEPLOYED.format(key="id"))
            line = EXAMPLE_CHECKSUM.sub(DEPLOYED.format(key="checksum"), line)
            lines.append(line)
            if line.split("#", 1)[0].strip() == "cape serve &":
                lines.append(WAIT_FOR_READY)
    lines.append("python quickstart_example.py")
    lines.append("kill %1")  # step 9
    lines.append("wait %1")  # its exit status is the script's
    return "\n".join(lines) + "\n"


@pytest.fixture
def workdir() -> Iterator[Path]:
    """0755 under /tmp: sandboxed functions run as their own user and read their files."""
    path = Path(tempfile.mkdtemp(prefix="cape-quickstart-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@requires_enclaves
def test_the_quickstart_runs_as_written(workdir: Path) -> None:
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 to bring up loopback in a network namespace")
    (python_example,) = blocks("python")[1:]  # the first one shows the scaffold's app.py
    (workdir / "quickstart_example.py").write_text(python_example)
    (workdir / "quickstart.sh").write_text(script())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPE_", "PIP_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        CAPE_DATA_DIR=str(workdir / "data"),
        CAPE_CONFIG_DIR=str(workdir / "config"),
        CAPE_CACHE_DIR=str(workdir / "cache"),
    )
    done = subprocess.run(
        ["unshare", "--net", "bash", "-c", "ip link set lo up && exec bash quickstart.sh"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    shown = done.stdout + done.stderr
    assert done.returncode == 0, shown[-5000:]
    assert "Traceback" not in shown, shown[-5000:]
    for expected in ("hello, try me", "hello, world", "hello, secret", "Ready: https://"):
        assert expected in shown, shown[-5000:]
    assert "b'hello, world'" in done.stdout, done.stdout[-3000:]  # the Python example
