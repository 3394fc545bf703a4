"""MkDocs hook: the web console's screenshots, taken by its browser test, on the console page.

``tests/e2e/test_console.py::test_console_flow_in_chromium`` saves one screenshot per screen to
``build/console-screenshots/`` (ignored by git: they are generated, and never byte-identical
between runs, so they are not committed). When they are there, :func:`on_files` adds them to the
built site under ``img/console/`` and :func:`on_page_markdown` shows them where
``docs/console.md`` has the marker; without them the page says how to make them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mkdocs.config.defaults import MkDocsConfig
    from mkdocs.structure.files import Files
    from mkdocs.structure.pages import Page

SHOTS_DIR = Path(__file__).resolve().parents[1] / "build" / "console-screenshots"
PAGE = "console.md"
MARKER = "<!-- console-screenshots -->"
#: The screens the browser test saves, in the order of its flow, with their captions.
SHOTS = {
    "login.png": "Log in, with the attestation root's fingerprint",
    "functions.png": "Signed in: the functions and tokens",
    "encrypt.png": "A file encrypted to cape: in the page",
    "run.png": "A run on a file encrypted in the page: the result and the session's attestation",
    "tokens.png": "A function-scoped token, created and then revoked",
}


def _present() -> list[str]:
    return [name for name in SHOTS if (SHOTS_DIR / name).is_file()]


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the screenshots that exist to the site, as ``img/console/NAME``."""
    from mkdocs.structure.files import File

    for name in _present():
        uri = f"img/console/{name}"
        existing = files.get_file_from_path(uri)
        if existing is not None:
            files.remove(existing)
        files.append(File.generated(config, uri, abs_src_path=str(SHOTS_DIR / name)))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Replace the marker on the console page with the screenshots (or how to make them)."""
    if page.file.src_uri != PAGE:
        return markdown
    shots = _present()
    if not shots:
        shown = "*This build has no screenshots: run the browser test, then build the docs again.*"
    else:
        shown = "\n\n".join(f"![{SHOTS[name]}](img/console/{name})" for name in shots)
    return markdown.replace(MARKER, shown)
