"""Run the JavaScript SDK's Node tests (``js/test``) from pytest, with what they need passed
through the environment; the SDK must have been built (``npm ci && npm run build`` in js/)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

JS_DIR = Path(__file__).resolve().parents[2] / "js"
NODE_TIMEOUT_S = 600.0


def require_built_sdk() -> str:
    """The ``node`` executable. Without Node or the built SDK the test skips, unless
    ``CAPE_REQUIRE_JS=1`` (scripts/test.sh sets it after building js/): then it fails."""
    node = shutil.which("node")
    built = (JS_DIR / "dist" / "index.js").is_file()
    if node is None or not built:
        why = "Node.js is not installed" if node is None else "js/ is not built"
        if os.environ.get("CAPE_REQUIRE_JS") == "1":
            pytest.fail(f"{why}, but CAPE_REQUIRE_JS=1 (cd js && npm ci && npm run build)")
        pytest.skip(f"{why} (cd js && npm ci && npm run build)")
    assert node is not None
    return node


def run_node_tests(files: list[str], env: dict[str, str], expect_pass: int) -> str:
    """``node --test FILES``; fails unless exactly ``expect_pass`` tests pass and none fail or
    skip (so a test that silently skipped, or a file that defines none, cannot pass here)."""
    node = require_built_sdk()
    result = subprocess.run(
        [node, "--test", "--test-reporter=tap", *files],
        cwd=JS_DIR,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_S,
        check=False,
    )
    output = result.stdout + result.stderr
    counts = {
        name: int(value)
        for name, value in re.findall(r"^# (pass|fail|skipped|todo) (\d+)$", output, re.M)
    }
    assert result.returncode == 0, output[-8000:]
    assert counts.get("fail") == 0 and counts.get("skipped", 0) == 0, output[-8000:]
    assert counts.get("pass") == expect_pass, f"{counts}\n{output[-8000:]}"
    return output
