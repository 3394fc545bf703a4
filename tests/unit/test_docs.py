"""The documentation (docs/, built by mkdocs): generated references complete, citations real.

The CLI and SDK reference pages are generated at every docs build by
``scripts/gen_reference.py`` (never committed, so they cannot go stale); these tests check
that the generator covers every command and public name, and that every test, file and
module the hand-written pages cite exists. ``scripts/test.sh`` builds the site itself with
``mkdocs build --strict``, which fails on broken links and anchors.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import typer.main

import cape.errors
import cape.sdk.client
import cape.serdio
from cape.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
TEST_CITATION = re.compile(r"^(tests/[\w/]+\.py)(?:::(test_\w+))?$")
TEST_NAME = re.compile(r"^test_\w+$")
MODULE_PATH = re.compile(r"^cape(\.[A-Za-z_]\w*)+$")
CAPE_PACKAGES = {
    "cli", "crypto", "enclave", "errors", "formats", "host", "image", "kms", "platform", "sdk",
    "serdio", "verify", "_internal",
}  # fmt: skip


@cache
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_reference", ROOT / "scripts" / "gen_reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commands(command: Any, path: str) -> Iterator[tuple[str, Any]]:
    yield path, command
    for name, sub in sorted((getattr(command, "commands", None) or {}).items()):
        if not getattr(sub, "hidden", False):
            yield from _commands(sub, f"{path} {name}")


COMMANDS = list(_commands(typer.main.get_command(app), "cape"))


def _section(markdown: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same level."""
    level = heading.split(" ", 1)[0]
    start = markdown.index(f"\n{heading}\n")
    end = markdown.find(f"\n{level} ", start + 1)
    return markdown[start : end if end != -1 else len(markdown)]


def _code_spans(page: Path) -> list[str]:
    """Inline code spans outside fenced blocks."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return CODE_SPAN.findall(text)


@cache
def _tests_in(path: Path) -> frozenset[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return frozenset(
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    )


@cache
def _all_tests() -> frozenset[str]:
    names: set[str] = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        names |= _tests_in(path)
    return frozenset(names)


def test_there_are_pages() -> None:
    assert {p.name for p in PAGES} >= {"index.md", "quickstart.md", "threat-model.md"}
    assert not (DOCS / "reference" / "cli.md").exists(), "generated at build time, not committed"


def test_cli_reference_has_every_command_and_option() -> None:
    markdown = generator().cli_markdown()
    assert len(COMMANDS) > 15
    for path, command in COMMANDS[1:]:
        section = _section(markdown, f"## {path}")
        assert f"\n{path} " in section or f"\n{path}\n" in section, f"no usage line for {path}"
        for param in command.params:
            for flag in param.opts if param.param_type_name == "option" else []:
                assert flag in section, f"{path}: {flag} is not documented"
    for expected in ("cape deploy", "cape run", "cape serve", "cape token create", "cape encrypt"):
        assert f"\n## {expected}\n" in markdown


def test_cli_reference_lists_every_command_in_its_index() -> None:
    markdown = generator().cli_markdown()
    index = _section(markdown, "## Commands")
    for path, _command in COMMANDS[1:]:
        assert f"[{path}](#{path.replace(' ', '-')})" in index


@pytest.mark.parametrize(
    "module", [cape.sdk.client, cape.serdio, cape.errors], ids=lambda m: m.__name__
)
def test_sdk_reference_documents_every_public_name(module: ModuleType) -> None:
    markdown = generator().sdk_markdown()
    section = _section(markdown, f"## {module.__name__}")
    for name in module.__all__:
        assert re.search(rf"^### (class )?{re.escape(name)}$", section, re.MULTILINE), name


def test_sdk_reference_documents_the_methods_of_the_clients() -> None:
    markdown = generator().sdk_markdown()
    for cls in (cape.sdk.client.Cape, cape.sdk.client.AsyncCape):
        for name in vars(cls):
            if not name.startswith("_"):
                assert f"\n#### {cls.__name__}.{name}\n" in markdown


def test_generator_writes_both_pages(tmp_path: Path) -> None:
    assert generator().main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "reference" / "cli.md").read_text().startswith("# CLI reference")
    assert (tmp_path / "reference" / "sdk.md").read_text().startswith("# SDK reference")


def test_docstrings_become_markdown() -> None:
    convert = generator().docstring_markdown
    doc = """Title with ``code`` and :class:`~cape.errors.CapeError`.

    Example::

        x = 1

    Raises:
        ValueError: when
            it must.
    """
    assert convert(doc) == (
        "Title with `code` and `CapeError`.\n\nExample:\n\n```python\nx = 1\n```\n\n"
        "**Raises:**\n\n- `ValueError`: when it must."
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_cited_tests_and_files_exist(page: Path) -> None:
    for span in _code_spans(page):
        if match := TEST_CITATION.match(span):
            path = ROOT / match.group(1)
            assert path.is_file(), f"{page.name}: {span}: no such file"
            if match.group(2):
                assert match.group(2) in _tests_in(path), f"{page.name}: {span}: no such test"
        elif TEST_NAME.match(span):
            assert span in _all_tests(), f"{page.name}: {span}: no such test"
        elif span.startswith(("tests/", "scripts/", "src/")) and " " not in span:
            assert (ROOT / span).exists(), f"{page.name}: {span}: no such path"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_cited_modules_and_names_exist(page: Path) -> None:
    for span in _code_spans(page):
        if not MODULE_PATH.match(span) or span.split(".")[1] not in CAPE_PACKAGES:
            continue
        parts = span.split(".")
        for split in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                target: Any = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            for attribute in parts[split:]:
                assert hasattr(target, attribute), f"{page.name}: {span}: no {attribute}"
                target = getattr(target, attribute)
            break
        else:
            pytest.fail(f"{page.name}: {span} does not import")
