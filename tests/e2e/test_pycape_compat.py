"""The published client, pycape 3.1.1 with serdio 3.1.1, works unmodified against `cape serve`.

pycape runs in its own virtualenv (``.venv-pycape``, made by ``scripts/setup.sh test``) through
``tests/e2e/pycape_driver.py``; its only configuration is our attestation root
(``cape._root_cert``) and our TLS CA in ``SSL_CERT_FILE`` / ``REQUESTS_CA_BUNDLE``. Functions
are deployed with our SDK. Without ``.venv-pycape`` the test is skipped, except under CI.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from cape.sdk.flows import Deployed, deploy, fetch_key
from tests.e2e.server import ServeProcess, User, run, zip_app

ROOT = Path(__file__).resolve().parents[2]
PYCAPE_PYTHON = ROOT / ".venv-pycape" / "bin" / "python"
DRIVER = Path(__file__).with_name("pycape_driver.py")
DRIVER_TIMEOUT_S = 600

ECHO = "def cape_handler(data):\n    return data\n"
COUNTER = (  # module-level state lives for one session
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
SERDIO = """\
import msgpack
import serdio


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y


def encode(value):
    return {"__point__": [value.x, value.y]} if isinstance(value, Point) else value


def decode(value):
    return Point(*value["__point__"]) if "__point__" in value else value


@serdio.lift_io(encoder_hook=encode, decoder_hook=decode)
def combine(x, y, b):
    if isinstance(x, Point):
        return Point(x.x * b + y.x, x.y * b + y.y)
    if isinstance(x, str):
        return x * y + b
    kinds = (type(x).__name__, type(y).__name__, type(b).__name__)
    return {"value": x * y + b, "kinds": kinds, "msgpack": msgpack.Packer.__module__}


cape_handler = combine.as_cape_handler()
"""


def _pycape_python() -> Path:
    if not PYCAPE_PYTHON.exists():
        message = f"{PYCAPE_PYTHON} is missing: run `bash scripts/setup.sh test`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return PYCAPE_PYTHON


def _vendored_serdio(python: Path) -> dict[str, bytes]:
    """serdio and its one dependency, msgpack, as Python sources for the bundle's root.

    The sandbox sees no site-packages, so a function brings its own. msgpack's C extension
    is left out: it is built for the client's interpreter, and msgpack falls back to its own
    pure-Python implementation (``msgpack.fallback``) when the extension is absent.
    """
    found = subprocess.run(
        [python, "-c", "import msgpack, serdio; print(serdio.__file__); print(msgpack.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    extra: dict[str, bytes] = {}
    for init in map(Path, found):
        for source in sorted(init.parent.glob("*.py")):
            if not source.name.endswith("_test.py") and source.name != "_test_utils.py":
                extra[f"{init.parent.name}/{source.name}"] = source.read_bytes()
    assert {"serdio/serde.py", "msgpack/fallback.py"} <= extra.keys()
    return extra


def _deploy(user: User, source: str, name: str, extra: dict[str, bytes] | None = None) -> Deployed:
    server = user.server

    async def flow() -> Deployed:
        key = await fetch_key(server.url, user.token, server.options())
        bundle = zip_app(source, extra)
        return await deploy(server.url, user.token, server.options(), bundle, name=name, key=key)

    return run(flow())


def _function(deployed: Deployed) -> dict[str, str]:
    return {"id": deployed.id, "checksum": deployed.checksum, "name": deployed.name}


def _value(result: dict[str, Any]) -> Any:
    assert result["ok"], result
    return ast.literal_eval(result["value"])


def _error(result: dict[str, Any]) -> tuple[str, str]:
    assert not result["ok"], result
    return result["type"], result["message"]


def _calls(result: dict[str, Any]) -> list[Any]:
    """A session step's invokes: values, or ``(type, message)`` for the ones that raised."""
    return [_value(call) if call["ok"] else _error(call) for call in _value(result)]


def test_pycape_3_1_1_against_cape_serve(server: ServeProcess, tmp_path: Path) -> None:
    python = _pycape_python()
    owner, other = User.signup(server, "pycape"), User.signup(server, "other")
    echo = _deploy(owner, ECHO, "echo")
    counter = _deploy(owner, COUNTER, "counter")
    failing = _deploy(owner, FAILING, "failing")
    lifted = _deploy(owner, SERDIO, "serdio", _vendored_serdio(python))

    # What our own verifying SDK sees, to hold pycape's answers against.
    async def reference() -> tuple[bytes, bytes, dict[int, bytes]]:
        keys = [await fetch_key(server.url, u.token, server.options()) for u in (owner, other)]
        session = await owner.session(echo.id)
        try:
            pcrs = dict(session.document.pcrs)
        finally:
            await session.close()
        owner_der, other_der = (
            key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            for key in keys
        )
        return owner_der, other_der, pcrs

    owner_key, other_key, pcrs = run(reference())

    home, workdir = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    workdir.mkdir()
    args = {
        "url": server.url,
        "token": owner.token,
        "username": owner.username,
        "other_username": other.username,
        "root_pem": str(server.data_dir / "attestation" / "root.pem"),
        "workdir": str(workdir),
        "pcrs": {str(index): pcrs[index].hex() for index in (0, 1, 2)},
        "echo": _function(echo),
        "counter": _function(counter),
        "failing": _function(failing),
        "serdio": _function(lifted),
    }
    env = {  # nothing inherited: no CAPE_DEV_DISABLE_SSL, no real HOME or config
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "SSL_CERT_FILE": str(server.ca_file),
        "REQUESTS_CA_BUNDLE": str(server.ca_file),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    started = time.monotonic()
    completed = subprocess.run(
        [python, DRIVER],
        input=json.dumps(args),
        capture_output=True,
        text=True,
        env=env,
        cwd=workdir,
        timeout=DRIVER_TIMEOUT_S,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert completed.returncode == 0, completed.stderr[-5000:]
    results: dict[str, dict[str, Any]] = json.loads(completed.stdout)
    print(f"pycape driver: {len(results)} steps in {elapsed:.1f} s")

    # Cape.key(username=…): GET /v1/user/<name>/key, the stored document verified at its
    # leaf's notBefore against our root; the same key our SDK gets; cached under $HOME.
    # With pcrs pinned to what our SDK verified it is accepted; a wrong pin is refused.
    key_sha = hashlib.sha256(owner_key).hexdigest()
    kind, message = _error(results["key_pcr_wrong"])
    assert kind == "builtins.Exception"
    assert message == f"PCR 0 {pcrs[0].hex()} does not match {['00' * 48]}"
    assert _value(results["key"]) == key_sha
    cache = home / ".config" / "cape" / "encryption_keys"
    assert (cache / owner.username / "capekey.pub.der").read_bytes() == owner_key
    assert _value(results["key_from_cache"]) == key_sha
    assert _value(results["key_pcr_pinned"]) == hashlib.sha256(other_key).hexdigest()
    assert (cache / other.username / "capekey.pub.der").read_bytes() == other_key

    # Cape.encrypt made a `cape:` input that the enclave decrypted with the owner's key
    # before the handler saw it; data encrypted for someone else does not decrypt there.
    assert _value(results["encrypted_input"]) == b"top secret"
    kind, message = _error(results["encrypted_for_other_user"])
    assert kind == "builtins.Exception" and message, message
    assert "not yours" not in message

    # Cape.run by id, by user/name, and awaited inside an event loop.
    assert _value(results["run_by_id"]) == b"hello"
    assert _value(results["run_by_name"]) == b"by name"
    assert _value(results["run_async"]) == b"awaited"

    # function_checksum: user_data.func_checksum matches the deploy's checksum; a wrong one
    # is refused by pycape before any input is sent.
    assert _value(results["checksum_by_id"]) == b"checked"
    assert _value(results["checksum_by_name"]) == b"named"
    assert _value(results["checksum_from_json"]) == b"from json"
    kind, message = _error(results["checksum_wrong"])
    assert kind == "builtins.RuntimeError"
    assert message == (
        f"Returned checksum did not match provided, got: {echo.checksum}, want: {'00' * 32}."
    )

    # pcrs: PCR0-2 pinned to what our SDK verified; one allowed value among several; a wrong
    # pin refuses the session.
    assert _value(results["pcr_pinned"]) == b"pinned"
    assert _value(results["pcr_one_of_several"]) == b"either"
    kind, message = _error(results["pcr_wrong"])
    assert kind == "builtins.Exception"
    assert message == f"PCR 0 {pcrs[0].hex()} does not match {['00' * 48]}"

    # connect + several invokes + close: one session, one enclave state; a new session
    # starts fresh; function_context does the same and closes by itself.
    assert _calls(results["session_invokes"]) == [b"1:a", b"2:b", b"3:c"]
    assert _calls(results["session_fresh_state"]) == [b"1:d"]
    assert _value(results["function_context"]) == [b"1:x", b"2:y"]

    # A function that raises: pycape raises the error frame's text; the session goes on.
    raised = ("builtins.Exception", "function raised ValueError: boom")
    assert _error(results["function_error_run"]) == raised
    assert _calls(results["function_error_session"]) == [b"ok:a", raised, b"ok:b"]

    # A bad token is refused at the websocket upgrade.
    kind, message = _error(results["bad_token"])
    assert kind == "websockets.exceptions.InvalidStatus" and "HTTP 401" in message

    # serdio: positional and keyword arguments, custom types through hooks, a checksum-pinned
    # function, an arity error from serdio inside the enclave, and a session mixing them all.
    kinds = ("int", "float", "float")
    implementation = "msgpack.fallback"
    assert _value(results["serdio_positional"]) == {
        "value": 10.0,
        "kinds": kinds,
        "msgpack": implementation,
    }
    assert _value(results["serdio_keyword"]) == {
        "value": 8.0,
        "kinds": kinds,
        "msgpack": implementation,
    }
    assert _value(results["serdio_checksum"])["value"] == 2
    assert _value(results["serdio_hooks"]) == {"Point": (5, 8)}
    kind, message = _error(results["serdio_arity_error"])
    assert kind == "builtins.Exception"
    assert message.startswith("function raised ValueError: The number of inputs 2 ")
    session = _calls(results["serdio_session"])
    assert session[0]["value"] == 5 and session[0]["kinds"] == ("int", "int", "int")
    assert session[1:] == [{"Point": (3.0, 5)}, "aaa"]
