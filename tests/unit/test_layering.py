"""The package layout is the trust-domain map: imports flow one way (STYLE.md).

cli → sdk → verify → crypto → formats; host imports only formats; enclave and kms may use
formats, crypto and verify; only the platform composition root wires domains together. This
test reads every module's imports and fails on any edge that points the wrong way.

``cape.serdio`` is a standalone leaf every domain may use: users copy it into deployed functions
as ``cape_serdio.py``, so it imports only the standard library and msgpack, nothing from cape.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import cape

PACKAGE = Path(cape.__file__).resolve().parent

SHARED = {"cape", "cape.errors", "cape._internal", "cape.serdio"}
# Standalone modules: importable from every domain, themselves importing no cape module and no
# third-party module except these.
STANDALONE: dict[str, set[str]] = {"serdio.py": {"msgpack"}}
ALLOWED: dict[str, set[str]] = {
    "formats": {"formats"},
    "crypto": {"crypto", "formats"},
    "verify": {"verify", "crypto", "formats"},
    "sdk": {"sdk", "verify", "crypto", "formats"},
    # cli imports platform only inside `cape serve`, which starts the whole platform, `cape pcrs`
    # and the operator commands `cape kms …` (on the server's own data directory); host for
    # `cape admin` (an operator tool on the data directory, cli/admin.py) and the serve flags'
    # defaults; image for `cape enclave build`. Client commands reach the server only via sdk.
    "cli": {"cli", "sdk", "verify", "crypto", "formats", "host", "platform", "image"},
    "host": {"host", "formats"},
    "kms": {"kms", "verify", "crypto", "formats"},
    "enclave": {"enclave", "verify", "crypto", "formats"},
    # Build-time tooling (EIF builder): turns files into an image; holds no runtime trust.
    "image": {"image", "crypto", "formats"},
    "_internal": set(),
    "platform": {"platform", "host", "kms", "enclave", "sdk", "verify", "crypto", "formats"},
}


def _domain(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "cape" else None


def _cape_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cape"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("cape"):
                found.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: use absolute imports (relative import found)")
    return found


def test_imports_flow_one_way() -> None:
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if len(rel.parts) < 2:
            continue  # top-level modules (errors.py, __init__, __main__) are shared
        domain = rel.parts[0]
        if domain not in ALLOWED:
            violations.append(f"{rel}: unknown trust domain {domain!r}; add it to this test")
            continue
        for imported in _cape_imports(path):
            target = _domain(imported)
            if imported in SHARED or target in (None, "errors", "_internal", "serdio"):
                continue
            if target not in ALLOWED[domain]:
                violations.append(f"{rel} imports {imported} ({domain} → {target})")
    assert not violations, "\n".join(violations)


def _top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module, f"{path}: relative import"
            found.add(node.module.split(".")[0])
    return found


def test_standalone_modules_import_only_stdlib_and_their_allowed_packages() -> None:
    for name, allowed in STANDALONE.items():
        path = PACKAGE / name
        assert path.is_file(), f"standalone module {name} is missing"
        assert not _cape_imports(path), f"{name} must not import cape modules"
        stray = _top_level_imports(path) - allowed - set(sys.stdlib_module_names) - {"__future__"}
        assert not stray, f"{name} may import only the standard library and {allowed}: {stray}"


def test_layering_test_sees_the_package() -> None:
    # Guards against the walk silently finding nothing (which would make the test vacuous).
    domains = {p.relative_to(PACKAGE).parts[0] for p in PACKAGE.rglob("*.py")}
    assert {"formats", "crypto", "verify", "cli"} <= domains
