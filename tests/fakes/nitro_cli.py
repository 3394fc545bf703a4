"""A fake ``nitro-cli`` for tests: records its arguments and runs the real runtime locally.

Installed on ``PATH`` as ``nitro-cli`` by :func:`install` (a small shell wrapper). State lives
in ``$FAKE_NITRO_STATE``: ``calls.jsonl`` (one JSON argument list per call) and
``enclaves.json`` (the running "enclaves": id, CID, process id).

The "EIF" is a JSON stand-in, ``{"argv": [...], "env": {...}, "measurements": {"PCR0": hex,
...}}`` (``describe-eif`` answers the measurements): the command and environment the image
would run, with ``{cid}`` replaced by the enclave's CID (the runtime connects its channel to
``CAPE_CHANNEL=unix:<dir>/<cid>.sock`` instead of ``vsock:3:5000``). ``run-enclave`` starts
it as a local process, in its own session; ``describe-enclaves`` lists those still alive;
``terminate-enclave`` stops one.

Failure injection: ``$FAKE_NITRO_FAIL`` = ``<subcommand>:<message>`` makes that subcommand
print ``message`` to stderr and exit 1, as nitro-cli does with its ``[ Ennn ]`` errors.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest

STATE_ENV = "FAKE_NITRO_STATE"
FAIL_ENV = "FAKE_NITRO_FAIL"


def install(bin_dir: Path, python: str = sys.executable) -> Path:
    """Write ``bin_dir/nitro-cli`` running this module with ``python``; returns its path."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "nitro-cli"
    wrapper.write_text(f'#!/bin/sh\nexec "{python}" "{Path(__file__).resolve()}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def install_on_path(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Install the fake first on ``PATH`` (in ``tmp/bin``) with a fresh state directory
    (``tmp/nitro``) and no failure injected, for this test; returns the state directory."""
    state = tmp / "nitro"
    state.mkdir()
    install(tmp / "bin")
    monkeypatch.setenv("PATH", f"{tmp / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv(STATE_ENV, str(state))
    monkeypatch.delenv(FAIL_ENV, raising=False)
    return state


def _state() -> Path:
    return Path(os.environ[STATE_ENV])


def _load() -> list[dict[str, Any]]:
    path = _state() / "enclaves.json"
    return json.loads(path.read_text()) if path.exists() else []


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialise read-modify-write of ``enclaves.json``: the launcher runs several nitro-cli
    processes at once (N enclaves start together), and an unlocked update loses entries."""
    with (_state() / "enclaves.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _save(enclaves: list[dict[str, Any]]) -> None:
    path = _state() / "enclaves.json"
    path.with_suffix(f".{os.getpid()}.tmp").write_text(json.dumps(enclaves))
    path.with_suffix(f".{os.getpid()}.tmp").replace(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _option(args: list[str], name: str) -> str:
    index = args.index(name)
    return args[index + 1]


def _describe(entry: dict[str, Any], state: str = "RUNNING") -> dict[str, Any]:
    return {
        "EnclaveName": "cape",
        "EnclaveID": entry["id"],
        "ProcessID": entry["pid"],
        "EnclaveCID": entry["cid"],
        "NumberOfCPUs": entry["cpus"],
        "CPUIDs": [1, 3],
        "MemoryMiB": entry["memory"],
        "State": state,
        "Flags": "NONE",
    }


def run_enclave(args: list[str]) -> dict[str, Any]:
    cid = int(_option(args, "--enclave-cid"))
    image = json.loads(Path(_option(args, "--eif-path")).read_text())
    argv = [part.replace("{cid}", str(cid)) for part in image["argv"]]
    env = {**os.environ}
    env.update({k: v.replace("{cid}", str(cid)) for k, v in image.get("env", {}).items()})
    with (_state() / f"enclave-{cid}.log").open("ab") as log:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
            start_new_session=True,
        )  # fmt: skip
    entry = {
        "id": f"i-0fake{cid:08d}-enc{process.pid:016x}",
        "cid": cid,
        "pid": process.pid,
        "cpus": int(_option(args, "--cpu-count")),
        "memory": int(_option(args, "--memory")),
    }
    with _locked():
        _save([*(e for e in _load() if e["cid"] != cid), entry])
    return _describe(entry)


def describe_enclaves() -> list[dict[str, Any]]:
    return [_describe(e) for e in _load() if _alive(e["pid"])]


def terminate_enclave(args: list[str]) -> dict[str, Any]:
    enclave_id = _option(args, "--enclave-id")
    enclaves = _load()
    match = [e for e in enclaves if e["id"] == enclave_id]
    if not match:
        print(f"[ E37 ] Enclave not found. No enclave with ID {enclave_id}", file=sys.stderr)
        sys.exit(1)
    pid = match[0]["pid"]
    if _alive(pid):
        os.killpg(pid, signal.SIGTERM)
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.05)
        else:
            os.killpg(pid, signal.SIGKILL)
    with _locked():
        _save([e for e in _load() if e["id"] != enclave_id])
    return {"EnclaveName": "cape", "EnclaveID": enclave_id, "Terminated": True}


def describe_eif(args: list[str]) -> dict[str, Any]:
    image = json.loads(Path(_option(args, "--eif-path")).read_text())
    return {"Measurements": {"HashAlgorithm": "Sha384 { ... }", **image["measurements"]}}


def main(args: list[str]) -> int:
    state = _state()
    with (state / "calls.jsonl").open("a") as calls:
        calls.write(json.dumps(args) + "\n")
    command = args[0] if args else ""
    fail = os.environ.get(FAIL_ENV, "")
    if fail.partition(":")[0] == command:
        print(fail.partition(":")[2], file=sys.stderr)
        return 1
    if command == "--version":
        print("Nitro CLI 1.4.2 (tests/fakes/nitro_cli.py)")
        return 0
    if command == "run-enclave":
        answer: object = run_enclave(args)
    elif command == "describe-enclaves":
        answer = describe_enclaves()
    elif command == "describe-eif":
        answer = describe_eif(args)
    elif command == "terminate-enclave":
        answer = terminate_enclave(args)
    else:
        print(f"[ E00 ] unsupported subcommand {command!r} in the fake", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=4))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
