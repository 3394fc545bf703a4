"""The web console at /console/: its headers, the shipped assets against a fresh build, and
the whole flow in headless Chromium (js/test/console.browser.test.mjs) with the canary check."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from cape.host.console import SECURITY_HEADERS
from cape.verify.roots import fingerprint
from tests.e2e.js import JS_DIR, require_built_sdk, run_node_tests
from tests.e2e.server import ServeProcess, User, run

SHIPPED = Path(__file__).resolve().parents[2] / "src" / "cape" / "host" / "console" / "static"
ECHO = "def cape_handler(x):\n    return b'echo:' + x\n"
CANARY = "console-canary-9c41d2"
PASSWORD = "correct horse battery"  # what tests.e2e.server.User.signup sets
CHROMIUM = os.environ.get("CAPE_CHROMIUM", "/usr/bin/chromium")
BROWSER_TESTS = 11
#: Where the browser test leaves its screenshots (docs/console.md describes them).
SCREENSHOTS = Path(__file__).resolve().parents[2] / "build" / "console-screenshots"
#: The screens it saves: the ones scripts/console_screenshots.py (SHOTS) puts on that page.
SCREENS = {"login.png", "functions.png", "encrypt.png", "run.png", "tokens.png"}


def test_shipped_console_equals_a_fresh_build(tmp_path: Path) -> None:
    node = require_built_sdk()
    subprocess.run(
        [node, "scripts/build-browser.mjs"],
        cwd=JS_DIR,
        env={**os.environ, "CAPE_CONSOLE_OUT": str(tmp_path)},
        check=True,
        capture_output=True,
        timeout=300,
    )
    fresh = sorted(p.name for p in tmp_path.iterdir())
    assert (
        fresh
        == sorted(p.name for p in SHIPPED.iterdir())
        == [
            "console.css",
            "console.js",
            "index.html",
        ]
    )
    for name in fresh:
        assert (tmp_path / name).read_bytes() == (SHIPPED / name).read_bytes(), (
            f"{name} differs from a fresh build: run `npm run build` in js/ and commit"
        )


def test_console_is_served_with_strict_headers(server: ServeProcess) -> None:
    with httpx.Client(verify=server.ssl_context()) as client:
        page = client.get(f"{server.url}/console/")
        assert page.status_code == 200
        assert '<script type="module" src="console.js">' in page.text
        for name, value in SECURITY_HEADERS.items():
            assert page.headers[name] == value
        assert "set-cookie" not in page.headers
        script = client.get(f"{server.url}/console/console.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
        assert client.get(f"{server.url}/console").headers["location"] == "/console/"
        for path in ("/console/app.py", "/console/..%2f..%2fpyproject.toml", "/console/static"):
            refused = client.get(f"{server.url}{path}")
            assert refused.status_code == 404, path
            assert "cape_handler" not in refused.text and "[project]" not in refused.text


def test_console_flow_in_chromium(server: ServeProcess, tmp_path: Path) -> None:
    require_built_sdk()
    if not (JS_DIR / "node_modules" / "playwright-core").is_dir() or shutil.which(CHROMIUM) is None:
        if os.environ.get("CAPE_REQUIRE_JS") == "1":
            pytest.fail(f"the browser test needs playwright-core (npm ci in js/) and {CHROMIUM}")
        pytest.skip(f"needs playwright-core and {CHROMIUM}")
    user = User.signup(server, "console")
    deployed = run(user.deploy(ECHO, name="echo"))
    run(user.deploy(ECHO, name="doomed"))
    other = User.signup(server, "consoleother")
    other_echo = run(other.deploy(ECHO, name="echo"))
    env = {
        "CAPE_URL": server.url,
        "CAPE_ROOT_SHA256": fingerprint(server.root),
        "CAPE_USERNAME": user.username,
        "CAPE_PASSWORD": PASSWORD,
        "CAPE_FUNCTION_ID": deployed.id,
        "CAPE_FUNCTION_CHECKSUM": deployed.checksum,
        "CAPE_CANARY": CANARY,
        "CAPE_CHROMIUM": CHROMIUM,
        "CAPE_SCREENSHOT_DIR": str(SCREENSHOTS),
        "CAPE_OTHER_USERNAME": other.username,
        "CAPE_OUT_DIR": str(tmp_path),
    }
    run_node_tests(["test/console.browser.test.mjs"], env, expect_pass=BROWSER_TESTS)
    assert {p.name for p in SCREENSHOTS.glob("*.png")} >= SCREENS
    # What the page encrypted for the other user opens in their function, run with their token.
    for_other = (tmp_path / "for-other.txt").read_bytes()
    assert run(other.run(other_echo.id, for_other)) == b"echo:for another " + CANARY.encode()
