"""The worker's settings travel as ``name=value`` arguments (no JSON: the worker does not
import ``json``, issue 16); anything malformed ends the worker before it runs a function."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cape.enclave import worker
from cape.enclave.sandbox import FunctionSandbox
from cape.enclave.worker import EXIT_SETUP, parse_settings, settings_args

CONFIG = {
    "root": "/function",
    "guest_dir": "/cape-worker/guest",
    "limits": {
        "memory_bytes": 1 << 30,
        "cpu_seconds": 60,
        "processes": 64,
        "open_files": 256,
        "file_size_bytes": 1 << 28,
    },
    "max_input_bytes": 1 << 20,
    "max_output_bytes": 2 << 20,
    "services": None,
}


def test_settings_round_trip_with_and_without_services() -> None:
    assert parse_settings(settings_args(CONFIG)) == CONFIG
    services = {"fd": 5, "max_request_bytes": 10, "max_response_bytes": 20}
    assert parse_settings(settings_args({**CONFIG, "services": services})) == {
        **CONFIG,
        "services": services,
    }


@pytest.mark.parametrize(
    "change",
    [
        lambda args: args[:-1],  # one missing
        lambda args: [*args, args[0]],  # one twice
        lambda args: [*args, "unknown=1"],
        lambda args: [*args, "no-equals-sign"],
        lambda args: [a.replace("=60", "=sixty") for a in args],  # not a number
        lambda args: [*args, "services_fd=5"],  # services half given
    ],
)
def test_malformed_settings_end_the_worker(change: object) -> None:
    args = change(settings_args(CONFIG))  # type: ignore[operator]
    code = f"import sys; sys.path.insert(0, {str(worker.__file__.rpartition('/')[0])!r})\n"
    code += f"import worker; worker.parse_settings({args!r}); print('parsed')"
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, timeout=60)
    assert done.returncode == EXIT_SETUP, done
    assert b"parsed" not in done.stdout


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")
def test_the_worker_loads_no_costly_module_before_app_py(tmp_path: Path) -> None:
    """Each session pays the worker's imports (issue 16): json, socket, typing and the like
    cost 4-9 ms of CPU each, mostly through re and enum, before app.py is even read."""
    (tmp_path / "app.py").write_text(
        "import sys\nBEFORE = sorted(sys.modules)\n\n"
        "def cape_handler(data):\n    return ' '.join(BEFORE)\n"
    )
    tmp_path.chmod(0o755)
    with FunctionSandbox.start(tmp_path) as box:
        loaded = set(box.call(b"").decode().split())
    assert "cape_encrypt" in loaded  # the helper is loaded before app.py
    costly = {"json", "socket", "typing", "importlib.util", "threading", "contextlib", "re"}
    assert loaded & (costly | {"enum", "selectors", "collections"}) == set()
