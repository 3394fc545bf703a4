"""Drive the published client, pycape 3.1.1 (with serdio 3.1.1), against a ``cape serve``.

This script runs in ``.venv-pycape`` (see ``scripts/setup.sh``), never in our own venv, and
imports nothing of ours: pycape is used exactly as published, the only change being its
attestation root (``cape._root_cert``, reference §4.4). TLS trust comes from the environment
(``SSL_CERT_FILE`` for websockets, ``REQUESTS_CA_BUNDLE`` for requests).

Input: one JSON object on stdin (see :class:`Args`). Output: one JSON object on stdout mapping
each step to ``{"ok": true, "value": repr(result)}`` or ``{"ok": false, "type": "module.Class",
"message": str(exc)}``. Steps never stop the run; ``tests/e2e/test_pycape_compat.py`` asserts.
``repr`` keeps the Python types apart (bytes, tuple, float, complex) and reads back with
``ast.literal_eval``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import pathlib
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypedDict

from pycape import Cape

WRONG_PCR = "00" * 48
WRONG_CHECKSUM = "00" * 32


class FunctionArgs(TypedDict):
    id: str
    checksum: str
    name: str


class Args(TypedDict):
    url: str
    token: str
    username: str
    other_username: str
    root_pem: str
    workdir: str
    pcrs: dict[str, str]  # index → lower-case hex, from a document our own SDK verified
    echo: FunctionArgs
    counter: FunctionArgs
    failing: FunctionArgs
    serdio: FunctionArgs


@dataclasses.dataclass
class Point:
    """A user-defined type that only crosses the wire through serdio hooks."""

    x: float
    y: float


def encode_point(value: Any) -> Any:
    if isinstance(value, Point):
        return {"__point__": [value.x, value.y]}
    return value


def decode_point(value: Any) -> Any:
    if isinstance(value, dict) and "__point__" in value:
        return Point(*value["__point__"])
    return value


def outcome(step: Callable[[], Any]) -> dict[str, Any]:
    try:
        value = step()
    except Exception as exc:
        kind = type(exc)
        return {
            "ok": False,
            "type": f"{kind.__module__}.{kind.__qualname__}",
            "message": str(exc),
            "traceback": traceback.format_exc(limit=-3),
        }
    if isinstance(value, Point):
        value = {"Point": (value.x, value.y)}
    return {"ok": True, "value": repr(value)}


def steps(args: Args) -> dict[str, Callable[[], Any]]:
    cape = Cape(url=args["url"])
    cape._root_cert = pathlib.Path(args["root_pem"]).read_bytes()
    token = args["token"]
    user, workdir = args["username"], pathlib.Path(args["workdir"])
    echo, counter, failing, fn = args["echo"], args["counter"], args["failing"], args["serdio"]
    pins = {index: [value] for index, value in args["pcrs"].items()}

    def key(username: str, pcrs: dict[str, list[str]] | None = None) -> Callable[[], str]:
        def fetch() -> str:  # verified, then cached under $HOME/.config/cape/encryption_keys
            der: bytes = cape.key(username=username, pcrs=pcrs)
            return hashlib.sha256(der).hexdigest()

        return fetch

    def encrypted_run() -> Any:
        ciphertext: bytes = cape.encrypt(b"top secret", username=user)
        assert ciphertext.startswith(b"cape:")
        return cape.run(echo["id"], token, ciphertext)

    def encrypted_for_other_user() -> Any:
        ciphertext: bytes = cape.encrypt(b"not yours", username=args["other_username"])
        return cape.run(echo["id"], token, ciphertext)

    def function_json() -> Any:
        path = workdir / "function.json"
        path.write_text(
            json.dumps({"function_id": echo["id"], "function_checksum": echo["checksum"]})
        )
        return cape.run(cape.function(path), token, b"from json")

    def session(ref: str, *calls: tuple[tuple[Any, ...], dict[str, Any]]) -> list[Any]:
        """connect, several invokes (errors recorded, the session goes on), close."""
        cape.connect(ref, token)
        try:
            return [outcome(functools.partial(cape.invoke, *a, **k)) for a, k in calls]
        finally:
            cape.close()

    def context(ref: str, inputs: list[bytes]) -> list[Any]:
        with cape.function_context(ref, token):
            return [cape.invoke(data) for data in inputs]

    async def run_async() -> Any:
        # Inside a running event loop pycape's methods are awaitables (synchronicity).
        return await cape.run(f"{user}/{echo['name']}", token, b"awaited")

    def serdio_run(*values: Any, **kwargs: Any) -> Callable[[], Any]:
        return lambda: cape.run(fn["id"], token, *values, **kwargs)

    hooks = (encode_point, decode_point)
    return {
        # Each user's key is fetched once, then read from pycape's cache; so the refused
        # fetch comes first, and the pinned one is for the other user.
        "key_pcr_wrong": key(user, {"0": [WRONG_PCR]}),
        "key": key(user),
        "key_from_cache": key(user),
        "key_pcr_pinned": key(args["other_username"], pins),
        "encrypted_input": encrypted_run,
        "encrypted_for_other_user": encrypted_for_other_user,
        "run_by_id": lambda: cape.run(echo["id"], token, b"hello"),
        "run_by_name": lambda: cape.run(f"{user}/{echo['name']}", token, b"by name"),
        "run_async": lambda: asyncio.run(run_async()),
        "checksum_by_id": lambda: cape.run(
            cape.function(echo["id"], checksum=echo["checksum"]), token, b"checked"
        ),
        "checksum_by_name": lambda: cape.run(
            cape.function(f"{user}/{echo['name']}", checksum=echo["checksum"]), token, b"named"
        ),
        "checksum_from_json": function_json,
        "checksum_wrong": lambda: cape.run(
            cape.function(echo["id"], checksum=WRONG_CHECKSUM), token, b"never"
        ),
        "pcr_pinned": lambda: cape.run(echo["id"], token, b"pinned", pcrs=pins),
        "pcr_one_of_several": lambda: cape.run(
            echo["id"], token, b"either", pcrs={"0": [WRONG_PCR, args["pcrs"]["0"]]}
        ),
        "pcr_wrong": lambda: cape.run(echo["id"], token, b"never", pcrs={"0": [WRONG_PCR]}),
        "session_invokes": lambda: session(
            counter["id"], ((b"a",), {}), ((b"b",), {}), ((b"c",), {})
        ),
        "session_fresh_state": lambda: session(counter["id"], ((b"d",), {})),
        "function_context": lambda: context(f"{user}/{counter['name']}", [b"x", b"y"]),
        "function_error_run": lambda: cape.run(failing["id"], token, b"boom"),
        "function_error_session": lambda: session(
            failing["id"], ((b"a",), {}), ((b"boom",), {}), ((b"b",), {})
        ),
        "bad_token": lambda: cape.run(echo["id"], "not-a-token", b"never"),
        "serdio_positional": serdio_run(2, 3.0, 4.0, use_serdio=True),
        "serdio_keyword": serdio_run(2, 3.0, b=2.0, use_serdio=True),
        "serdio_checksum": lambda: cape.run(
            cape.function(fn["id"], checksum=fn["checksum"]), token, 1, 1, 1, use_serdio=True
        ),
        # pycape 3.1.1 checks for "a single bytes input" before serde_hooks switch serdio on,
        # so several arguments with hooks need use_serdio=True as well.
        "serdio_hooks": serdio_run(
            Point(1, 2), Point(3, 4), b=2, serde_hooks=hooks, use_serdio=True
        ),
        "serdio_arity_error": serdio_run(1, 2, use_serdio=True),
        "serdio_session": lambda: session(
            f"{user}/{fn['name']}",
            ((1, 2), {"b": 3, "use_serdio": True}),
            ((Point(0.5, 1), Point(1, 1)), {"b": 4, "serde_hooks": hooks, "use_serdio": True}),
            (("a", 3, ""), {"use_serdio": True}),  # str * int + str, in the enclave
        ),
    }


def main() -> None:
    args: Args = json.load(sys.stdin)
    results = {name: outcome(step) for name, step in steps(args).items()}
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
