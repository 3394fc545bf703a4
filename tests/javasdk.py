"""Build and drive the Java SDK (``java/``) from pytest.

:func:`classpath` compiles it once per test session with ``java/build.sh`` (javac and Debian's
jars; nothing is downloaded). Without a JDK or the jars the calling test is skipped, except
under CI, where their absence is a setup bug (``scripts/setup.sh`` installs them).
:class:`Driver` keeps one JVM running ``cape.sdk.Driver``: one JSON command per line in, one
JSON outcome per line out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
JAVA = ROOT / "java"
JARS = Path(os.environ.get("CAPE_JAVA_JARS", "/usr/share/java"))
RUNTIME_JARS = ("bcprov.jar", "gson.jar")
JUNIT = JARS / "junit-platform-console-standalone.jar"
BUILD_TIMEOUT_S = 600
_built: list[str] = []
_lock = threading.Lock()


def _require_java() -> None:
    missing = [
        what
        for what, ok in (
            ("javac", shutil.which("javac") is not None),
            ("java", shutil.which("java") is not None),
            *((str(JARS / jar), (JARS / jar).is_file()) for jar in (*RUNTIME_JARS, JUNIT.name)),
        )
        if not ok
    ]
    if missing:
        message = f"the Java SDK needs {', '.join(missing)}: run `bash scripts/setup.sh test`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def classpath() -> str:
    """Build ``java/`` once (main and test classes); the classpath to run them."""
    _require_java()
    with _lock:
        if not _built:
            done = subprocess.run(
                ["bash", str(JAVA / "build.sh")],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
                check=False,
            )
            assert done.returncode == 0, f"java/build.sh failed:\n{done.stdout}\n{done.stderr}"
            parts = [JAVA / "build" / "classes", JAVA / "build" / "test-classes"]
            parts += [JARS / jar for jar in RUNTIME_JARS]
            _built.append(os.pathsep.join(map(str, parts)))
    return _built[0]


def junit(
    env: dict[str, str], *selectors: str, timeout_s: float = 900
) -> subprocess.CompletedProcess[str]:
    """Run JUnit tests (all, or ``--select-class …`` selectors) with ``env`` added."""
    command = [
        "java",
        "-jar",
        str(JUNIT),
        "--disable-banner",
        "--disable-ansi-colors",
        "--details=tree",
        "--fail-if-no-tests",
        "-cp",
        classpath(),
        *(selectors or ("--scan-classpath", str(JAVA / "build" / "test-classes"))),
    ]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **env},
        cwd=JAVA,
        check=False,
    )


class Driver:
    """One ``cape.sdk.Driver`` JVM; :meth:`call` is thread-safe (one command at a time)."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            ["java", "-cp", classpath(), "cape.sdk.Driver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._lock = threading.Lock()

    def call(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self._process.stdin is not None and self._process.stdout is not None
        with self._lock:
            self._process.stdin.write(json.dumps(command) + "\n")
            self._process.stdin.flush()
            line = self._process.stdout.readline()
        assert line, f"the Java driver exited ({self._process.poll()})"
        outcome: dict[str, Any] = json.loads(line)
        return outcome

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()
