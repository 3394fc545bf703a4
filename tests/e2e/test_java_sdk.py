"""The Java SDK's JUnit tests against a live ``cape serve``, with cross-language checks.

The server (``server`` fixture) is real: TLS, websockets, subprocess enclaves. Functions are
deployed with the Python SDK; a Python ciphertext goes to Java, which must run it, and Java's
ciphertext comes back here, where the Python SDK must run it. Everything the JUnit tests need
travels in ``CAPE_TEST_*`` environment variables. Every JUnit test must pass and none may be
skipped (aborted): under this wrapper the live tests are the point.

Skipped without a JDK and Debian's jars, except under CI (see :mod:`tests.javasdk`).
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from cape.crypto import envelope
from cape.crypto.keys import public_key_der
from cape.errors import FunctionError
from cape.sdk.flows import fetch_key
from tests.e2e.server import ServeProcess, User, run
from tests.javasdk import classpath, junit
from tests.samples import SAMPLES_DIR

ECHO = "def cape_handler(data):\n    return data\n"
COUNTER = (
    "calls = 0\n"
    "def cape_handler(data):\n"
    "    global calls\n"
    "    calls += 1\n"
    "    return str(calls).encode() + b':' + data\n"
)
FAILING = (
    "def cape_handler(data):\n"
    "    if data == b'boom':\n"
    "        raise ValueError('boom')\n"
    "    return b'ok:' + data\n"
)
PY_PLAINTEXT = "encrypted in python"
#: At least this many JUnit tests (the live class alone has 19): a launcher that found
#: nothing, or lost a class, fails here.
MIN_TESTS = 45


def _count(output: str, what: str) -> int:
    match = re.search(rf"\[\s*(\d+) tests {what}\s*\]", output)
    assert match is not None, f"no '{what}' count in the JUnit summary:\n{output[-3000:]}"
    return int(match.group(1))


def test_java_sdk_against_a_live_server(server: ServeProcess, tmp_path: Path) -> None:
    classpath()  # builds java/ (or skips without a JDK, outside CI)
    owner = User.signup(server, "java")
    other = User.signup(server, "tenant")
    echo = run(owner.deploy(ECHO, name="echo"))
    run(owner.deploy(COUNTER, name="counter"))
    run(owner.deploy(FAILING, name="failing"))
    key = run(fetch_key(server.url, owner.token, server.options()))
    python_ciphertext = envelope.encrypt_text(PY_PLAINTEXT.encode(), key)
    root = tmp_path / "root.pem"
    root.write_bytes((server.data_dir / "attestation" / "root.pem").read_bytes())
    env = {
        "CAPE_TEST_URL": server.url,
        "CAPE_TEST_CA": str(server.ca_file),
        "CAPE_TEST_ROOT": str(root),
        "CAPE_TEST_OTHER_ROOT": str(root),
        "CAPE_TEST_USER": owner.username,
        "CAPE_TEST_TOKEN": owner.token,
        "CAPE_TEST_OTHER_USER": other.username,
        "CAPE_TEST_OTHER_TOKEN": other.token,
        "CAPE_TEST_ECHO_ID": echo.id,
        "CAPE_TEST_ECHO_CHECKSUM": echo.checksum,
        "CAPE_TEST_KEY_DER": base64.b64encode(public_key_der(key)).decode(),
        "CAPE_TEST_PY_CIPHERTEXT": python_ciphertext,
        "CAPE_TEST_PY_PLAINTEXT": PY_PLAINTEXT,
        "CAPE_TEST_OUT": str(tmp_path),
    }
    samples = SAMPLES_DIR.is_dir()
    if samples:
        env["CAPE_NITRO_SAMPLES"] = str(SAMPLES_DIR)
    done = junit(env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert _count(output, "failed") == 0, output[-6000:]
    assert _count(output, "successful") >= MIN_TESTS, output[-6000:]
    if samples:
        assert _count(output, "aborted") == 0, output[-6000:]
    assert "LiveServerTest" in output and "✘" not in output

    # Java's ciphertext runs through the Python SDK, in the function the Python SDK deployed.
    java_ciphertext = (tmp_path / "java-ciphertext.txt").read_bytes()
    assert java_ciphertext.startswith(b"cape:")
    assert run(owner.run(f"{owner.username}/echo", java_ciphertext)) == b"encrypted in java"
    # ... and it opens with the owner's key only: not in another tenant's function.
    other_echo = run(other.deploy(ECHO, name="echo"))
    with pytest.raises(FunctionError):
        run(other.run(other_echo.id, java_ciphertext))
