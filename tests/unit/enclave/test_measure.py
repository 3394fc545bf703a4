"""Simulated-enclave PCRs: deterministic SHA-384 measurements that move with the code.

Measurements of a changed tree are taken on a copy of the package in a temporary directory,
never on the working tree (other work edits it concurrently).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sysconfig
from pathlib import Path

import pytest

import cape
from cape.enclave.measure import (
    RuntimeMeasurement,
    extend,
    measure_runtime,
    simulated_pcrs,
)

ZERO = bytes(48)
PACKAGE = Path(cape.__file__).resolve().parent
LINE = re.compile(r"[^\t\n/][^\t\n]*\t[0-9a-f]{96}")


@pytest.fixture
def package(tmp_path: Path) -> Path:
    copy = tmp_path / "one" / "cape"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


@pytest.fixture
def interpreter(tmp_path: Path) -> Path:
    path = tmp_path / "bin" / "python3"
    path.parent.mkdir()
    path.write_bytes(b"\x7fELF not really an interpreter")
    return path


def _measure(package: Path, interpreter: Path) -> RuntimeMeasurement:
    return measure_runtime(package, interpreter=interpreter)


def test_measurement_is_deterministic(package: Path, interpreter: Path) -> None:
    assert _measure(package, interpreter) == _measure(package, interpreter)
    assert measure_runtime() == measure_runtime()


def test_measurement_does_not_depend_on_where_the_package_lives(
    package: Path, interpreter: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "two" / "deeper" / "cape"
    shutil.copytree(package, elsewhere)
    assert _measure(package, interpreter) == _measure(elsewhere, interpreter)


def test_one_changed_byte_changes_pcr2_and_pcr0(package: Path, interpreter: Path) -> None:
    before = _measure(package, interpreter)
    target = package / "formats" / "cose.py"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    after = _measure(package, interpreter)
    assert after.pcr2 != before.pcr2
    assert after.pcr0 != before.pcr0
    assert after.pcr1 == before.pcr1
    changed = set(after.runtime_manifest.splitlines()) ^ set(before.runtime_manifest.splitlines())
    assert {line.split(b"\t")[0] for line in changed} == {b"cape/formats/cose.py"}


@pytest.mark.parametrize(
    "relative",
    ["errors.py", "verify/verifier.py", "enclave/secure_module/simulated.py", "__init__.py"],
)
def test_every_runtime_file_is_measured(package: Path, interpreter: Path, relative: str) -> None:
    before = _measure(package, interpreter)
    with (package / relative).open("ab") as handle:
        handle.write(b"\n")
    assert _measure(package, interpreter).pcr2 != before.pcr2


def test_new_runtime_module_changes_pcr2(package: Path, interpreter: Path) -> None:
    before = _measure(package, interpreter)
    (package / "formats" / "extra.py").write_text("X = 1\n")
    assert _measure(package, interpreter).pcr2 != before.pcr2


@pytest.mark.parametrize(
    "relative",
    [
        "cli/added.py",  # not part of the enclave runtime
        "host_helpers.py",  # a top-level module the enclave does not run
        "formats/__pycache__/cose.cpython-311.py",
        "formats/notes.txt",
    ],
)
def test_files_outside_the_runtime_do_not_count(
    package: Path, interpreter: Path, relative: str
) -> None:
    before = _measure(package, interpreter)
    path = package / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("ignored = True\n")
    assert _measure(package, interpreter) == before


def test_interpreter_change_moves_pcr1_and_pcr0(package: Path, interpreter: Path) -> None:
    before = _measure(package, interpreter)
    interpreter.write_bytes(b"\x7fELF another build")
    after = _measure(package, interpreter)
    assert after.pcr1 != before.pcr1
    assert after.pcr0 != before.pcr0
    assert after.pcr2 == before.pcr2


def test_pcrs_follow_the_documented_formulas(package: Path, interpreter: Path) -> None:
    m = _measure(package, interpreter)
    interp = hashlib.sha384(m.interpreter_manifest).digest()
    runtime = hashlib.sha384(m.runtime_manifest).digest()
    assert m.pcr1 == hashlib.sha384(ZERO + interp).digest()
    assert m.pcr2 == hashlib.sha384(ZERO + runtime).digest()
    assert m.pcr0 == extend(extend(ZERO, interp), runtime)
    assert m.pcr0 != ZERO


def test_manifests_are_sorted_relative_and_well_formed(
    package: Path, interpreter: Path, tmp_path: Path
) -> None:
    m = _measure(package, interpreter)
    for manifest in (m.interpreter_manifest, m.runtime_manifest):
        text = manifest.decode()
        assert text.endswith("\n")
        lines = text.splitlines()
        assert lines == sorted(lines)
        assert all(LINE.fullmatch(line) for line in lines), lines
        assert str(tmp_path) not in text
    names = [line.split(b"\t")[0].decode() for line in m.runtime_manifest.splitlines()]
    assert "cape/__init__.py" in names
    assert "cape/errors.py" in names
    assert "cape/formats/cose.py" in names
    assert "dist/cryptography/RECORD" in names
    assert "dist/cbor2/RECORD" in names
    assert not any(name.startswith(("cape/cli/", "cape/sdk/")) for name in names)


def test_interpreter_manifest_describes_the_running_interpreter(interpreter: Path) -> None:
    text = measure_runtime(PACKAGE, interpreter=interpreter).interpreter_manifest.decode()
    names = [line.split("\t")[0] for line in text.splitlines()]
    assert "interpreter/python3" in names
    assert "sys.version" in names
    assert "sys.implementation.cache_tag" in names
    libpython = Path(str(sysconfig.get_config_var("LIBDIR") or "")) / str(
        sysconfig.get_config_var("LDLIBRARY") or ""
    )
    shared = bool(sysconfig.get_config_var("Py_ENABLE_SHARED")) and libpython.is_file()
    assert (f"lib/{libpython.name}" in names) == shared


def test_default_measurement_uses_the_real_interpreter() -> None:
    text = measure_runtime().interpreter_manifest.decode()
    assert re.search(r"^interpreter/python[0-9.]*\t", text, re.MULTILINE)


def test_simulated_pcrs_shape_and_pcr4_formula(package: Path, interpreter: Path) -> None:
    m = _measure(package, interpreter)
    pcrs = simulated_pcrs(m, instance_id="i-0a22e5c5f24d22174")
    assert sorted(pcrs) == list(range(16))
    assert all(len(value) == 48 for value in pcrs.values())
    assert (pcrs[0], pcrs[1], pcrs[2]) == (m.pcr0, m.pcr1, m.pcr2)
    assert pcrs[4] == hashlib.sha384(ZERO + b"i-0a22e5c5f24d22174").digest()
    assert pcrs[3] == pcrs[8] == ZERO
    assert all(pcrs[i] == ZERO for i in (*range(5, 16), 3))


def test_pcr4_matches_the_real_aws_sample_value() -> None:
    # blocky prod (shared/nitro-samples/README.md): PCR4 starts 45706d7b and ends c96b44.
    pcr4 = simulated_pcrs(measure_runtime(), instance_id="i-0a22e5c5f24d22174")[4].hex()
    assert pcr4.startswith("45706d7b")
    assert pcr4.endswith("c96b44")


def test_simulated_pcrs_refuse_non_ascii_instance_ids() -> None:
    with pytest.raises(ValueError, match="ASCII"):
        simulated_pcrs(measure_runtime(), instance_id="i-é")


def test_measure_refuses_a_directory_that_is_not_a_package(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a Python package"):
        measure_runtime(tmp_path)
