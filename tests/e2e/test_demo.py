"""README's first command, exactly as written, does the product's main job and cleans up."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import requires_enclaves

ROOT = Path(__file__).resolve().parents[2]
LIMIT_S = 300


def first_readme_command() -> str:
    """The first line of the first ```bash block in README.md."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.DOTALL)
    assert block is not None, "README.md has no bash block"
    line = block.group(1).splitlines()[0]
    return line.split("#", 1)[0].strip()


def _processes_mentioning(marker: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


@pytest.fixture
def demo_tmp() -> Iterator[Path]:
    """A TMPDIR of our own for the demo's throwaway directory. Under /tmp and 0755 (not
    pytest's 0700 tree): sandboxed functions run as their own user and must reach their
    files there."""
    path = Path(tempfile.mkdtemp(prefix="cape-demo-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@requires_enclaves
def test_the_first_readme_command_runs_the_demo(demo_tmp: Path) -> None:
    tmp_path = demo_tmp
    command = first_readme_command()
    assert command == "bash scripts/demo.sh"
    wheelhouse = ROOT / ".wheelhouse"
    wheels = ("onnxruntime", "pillow")
    if not all(any(wheelhouse.glob(f"{w}-*.whl")) for w in wheels) and not os.environ.get("CI"):
        pytest.skip("no .wheelhouse with onnxruntime and Pillow (setup.sh test fills it)")
    if not (ROOT / "examples" / "imagenet" / "model.onnx").exists() and not os.environ.get("CI"):
        pytest.skip("no exported examples/imagenet/model.onnx (setup.sh exports it, once)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPE_", "PIP_"))}
    env["TMPDIR"] = str(tmp_path)  # the demo's throwaway directory lands here
    user_cache = tmp_path / "user-cache"  # where vendored wheels would be cached per user
    env["XDG_CACHE_HOME"] = str(user_cache)
    start = time.monotonic()
    done = subprocess.run(
        command,
        shell=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=LIMIT_S,
        check=False,
    )
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = done.stdout
    assert elapsed < LIMIT_S
    for step in ("== 1.", "== 2.", "== 3.", "== 4.", "== 5.", "== 6.", "== 7.", "== Done"):
        assert step in out, out
    assert "SIMULATED" in out and re.search(r"Ready: https://127\.0\.0\.1:\d+", out)
    assert re.search(r"Function ID +➜  [A-Za-z0-9]{22}", out)
    assert re.search(r"cape:[A-Za-z0-9+/=]{40,}… \(\d+ bytes of cape: ciphertext\)", out)
    # The photo (Chelsea the cat) classified twice, in plain and from its ciphertext: five
    # classes with percentages each, the same both times, a cat first.
    blocks = re.findall(r"Top-5 classes \(([^)]*)\):\n((?: {4}.+\n){5})", out)
    assert [why for why, _ in blocks] == [
        "plain input, sealed to the attested enclave",
        "decrypted and classified in the enclave only",
    ], out
    assert blocks[0][1] == blocks[1][1], out
    top = re.findall(r"^ {4}(\S.*?)\s+(\d+\.\d\d)%$", blocks[0][1], re.MULTILINE)
    assert len(top) == 5, out
    assert top[0][0] in {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}, out
    percentages = [float(p) for _, p in top]
    assert percentages == sorted(percentages, reverse=True) and sum(percentages) <= 100.01
    assert len(re.findall(r"root fingerprint +sha256:[0-9a-f]{64}", out)) == 2
    assert len(re.findall(r"PCR0 +[0-9a-f]{96}", out)) == 2
    assert len(re.findall(r"function checksum +[0-9a-f]{64}", out)) == 2
    assert "stopped cleanly" in out
    # Nothing left behind: no server or enclave process, no throwaway directory.
    assert not _processes_mentioning(str(tmp_path)), _processes_mentioning(str(tmp_path))
    assert not list(tmp_path.glob("cape-demo.*"))
    assert not (user_cache / "cape").exists(), list(user_cache.rglob("*"))[:10]
