"""The JavaScript SDK (js/) against a live ``cape serve``: every call from Node, with plain
and ``cape:`` inputs, and cross-language checks both ways (docs/javascript.md)."""

from __future__ import annotations

from pathlib import Path

from cape.crypto import envelope
from cape.sdk.bundle import build_bundle
from cape.sdk.flows import fetch_key
from cape.verify.roots import fingerprint
from tests.e2e.js import require_built_sdk, run_node_tests
from tests.e2e.server import ServeProcess, User, run

ECHO = (
    "def cape_handler(x):\n"
    "    if x == b'please fail':\n"
    "        raise ValueError('asked to fail (secret detail 7f3a)')\n"
    "    return b'echo:' + x\n"
)
#: What the JS SDK encrypts and runs; must come back, and never travel in the clear.
CANARY = "js-canary-5b1e0c"


def _env(server: ServeProcess, owner: User, other: User, tmp: Path) -> dict[str, str]:
    root_pem = server.data_dir / "attestation" / "root.pem"
    deployed = run(owner.deploy(ECHO, name="echo"))
    key = run(fetch_key(server.url, owner.token, server.options()))
    python_ciphertext = envelope.encrypt_text(b"from python " + CANARY.encode(), key)
    (tmp / "app").mkdir()
    (tmp / "app" / "app.py").write_text(ECHO)
    (tmp / "app" / "data.txt").write_text("a second file\n" * 50)
    (tmp / "app" / "sub").mkdir()
    (tmp / "app" / "sub" / "z\u00e9.txt").write_text("a non-ASCII name")
    (tmp / "app" / "sub" / "zeros.bin").write_bytes(bytes(300_000))  # stored: ratio over 200
    app_checksum = build_bundle(tmp / "app", vendor=False).checksum
    return {
        "NODE_EXTRA_CA_CERTS": str(server.ca_file),
        "CAPE_URL": server.url,
        "CAPE_ROOT_PEM_FILE": str(root_pem),
        "CAPE_ROOT_SHA256": fingerprint(server.root),
        "CAPE_USERNAME": owner.username,
        "CAPE_TOKEN": owner.token,
        "CAPE_OTHER_USERNAME": other.username,
        "CAPE_OTHER_TOKEN": other.token,
        "CAPE_FUNCTION_ID": deployed.id,
        "CAPE_FUNCTION_CHECKSUM": deployed.checksum,
        "CAPE_PY_CIPHERTEXT": python_ciphertext,
        "CAPE_CANARY": CANARY,
        "CAPE_APP_DIR": str(tmp / "app"),
        "CAPE_APP_CHECKSUM": app_checksum,
        "CAPE_OUT_DIR": str(tmp),
    }


def test_node_sdk_against_a_live_server(server: ServeProcess, tmp_path: Path) -> None:
    require_built_sdk()
    owner = User.signup(server, "jsowner")
    other = User.signup(server, "jsother")
    env = _env(server, owner, other, tmp_path)
    run_node_tests(["test/live.test.mjs"], env, expect_pass=LIVE_TESTS)

    # What Node left behind for Python: a ciphertext for the owner, which a Python session
    # runs through the Python-deployed function (JS encrypt → Python run).
    js_ciphertext = (tmp_path / "js-ciphertext.txt").read_bytes()
    assert js_ciphertext.startswith(b"cape:")
    out = run(owner.run(env["CAPE_FUNCTION_ID"], js_ciphertext))
    assert out == b"echo:from node " + CANARY.encode()
    # And the function Node deployed, run from Python with its checksum pinned.
    node_deployed = (tmp_path / "js-deployed.txt").read_text().split()
    out = run(owner.run(node_deployed[0], b"hi", function_checksum=node_deployed[1]))
    assert out == b"echo:hi"


#: How many tests js/test/live.test.mjs defines (all must pass; none may skip).
LIVE_TESTS = 12
