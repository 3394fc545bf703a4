"""Generate the reference pages of the documentation from the code itself.

- ``reference/cli.md``: every command of ``cape`` (the typer app ``cape.cli.app.app``, walked as
  the click command tree typer builds): usage, help text, arguments and options.
- ``reference/sdk.md``: signatures (:mod:`inspect`) and docstrings of the SDK
  (``cape.sdk.client``, ``cape.sdk.function_ref``, ``cape.sdk.bundle.Bundle``), of
  ``cape.serdio`` and of the error tree in ``cape.errors``.

The pages are never written into ``docs/`` nor committed: ``mkdocs.yml`` loads this file as a
hook, and :func:`on_files` adds both pages, generated in memory, to every ``mkdocs build`` and
``mkdocs serve``. So the reference cannot drift from the code and a change to a command's help
needs no regeneration step. To read them without MkDocs::

    .venv/bin/python scripts/gen_reference.py            # writes build/reference/*.md
    .venv/bin/python scripts/gen_reference.py --out DIR
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import importlib
import inspect
import re
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mkdocs.config.defaults import MkDocsConfig
    from mkdocs.structure.files import Files

ROOT = Path(__file__).resolve().parents[1]
CLI_PAGE = "reference/cli.md"
SDK_PAGE = "reference/sdk.md"
GENERATED_NOTE = (
    "*Generated from the code by `scripts/gen_reference.py` at every docs build; do not edit.*"
)


def _import_cape() -> None:
    """Make ``import cape`` work from a checkout even where cape is not installed."""
    try:
        importlib.import_module("cape")
    except ImportError:
        sys.path.insert(0, str(ROOT / "src"))


# --------------------------------------------------------------------------- docstrings

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`(~?)([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")
_SECTION = re.compile(
    r"^(Args|Arguments|Parameters|Returns|Raises|Yields|Attributes|Example|Examples):\s*$"
)
_TABLE_RULE = re.compile(r"^=+( +=+)+\s*$")
_ITEM = re.compile(r"^(\*{0,2}[A-Za-z_][\w.]*)(?: \([^)]*\))?: ")


def _inline(text: str) -> str:
    """reST inline markup → Markdown: ``code`` and :role:`target` become code spans."""

    def role(match: re.Match[str]) -> str:
        tilde, target = match.groups()
        return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"

    return _LITERAL.sub(r"`\1`", _ROLE.sub(role, text))


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def docstring_markdown(doc: str | None) -> str:
    """A docstring (reST/Google style, as this code base writes them) as Markdown.

    Handles ``::`` literal blocks (fenced as Python), simple reST tables (fenced as text),
    Google-style sections (a bold title and a list) and inline literals and roles.
    """
    if not doc:
        return ""
    lines = _inline(inspect.cleandoc(doc)).splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if _TABLE_RULE.match(line):
            block = [line]
            rules = 1
            i += 1
            while i < len(lines) and rules < 3:
                block.append(lines[i])
                rules += bool(_TABLE_RULE.match(lines[i]))
                i += 1
            out += ["", "```text", *block, "```", ""]
            continue
        section = _SECTION.match(line)
        if section and i + 1 < len(lines) and _indent_of(lines[i + 1]) > 0:
            title = section.group(1)
            out += ["", f"**{title}:**", ""]
            i += 1
            base = _indent_of(lines[i])
            entries: list[str] = []
            while i < len(lines) and (not lines[i].strip() or _indent_of(lines[i]) >= base):
                text = lines[i].strip()
                item = _ITEM.match(text) if title not in ("Returns", "Yields") else None
                if item and _indent_of(lines[i]) == base:
                    entries.append(f"`{item.group(1)}`{text[item.end(1) :]}")
                elif entries and text:
                    entries[-1] += f" {text}"
                elif text:
                    entries.append(text)
                i += 1
            if title in ("Returns", "Yields"):
                out.append(" ".join(entries))
            else:
                out += [f"- {entry}" for entry in entries]
            out.append("")
            continue
        if line.rstrip().endswith("::"):
            stripped = line.rstrip()
            lead = stripped[:-2].rstrip()
            if lead:
                out.append(lead if stripped[:-2].endswith(" ") else lead + ":")
            i += 1
            while i < len(lines) and not lines[i].strip():
                i += 1
            block = []
            while i < len(lines) and (not lines[i].strip() or _indent_of(lines[i]) > 0):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            out += ["", "```python", textwrap.dedent("\n".join(block)), "```", ""]
            continue
        out.append(line.rstrip())
        i += 1
    return re.sub(r"\n{3,}", "\n\n", _escape_emphasis(out)).strip()


def _escape_emphasis(lines: list[str]) -> str:
    """Escape ``2**63``-style powers outside code, where Markdown would see bold text."""
    fenced = False
    result = []
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            parts = line.split("`")
            parts[::2] = [re.sub(r"(?<=\w)\*\*(?=\w)", r"\\*\\*", p) for p in parts[::2]]
            line = "`".join(parts)
        result.append(line)
    return "\n".join(result)


# --------------------------------------------------------------------------- CLI reference


def _walk(command: Any, parent: Any, name: str) -> Iterator[tuple[Any, Any]]:
    """(command, context) for ``command`` and, depth first, every subcommand, in name order."""
    context = command.context_class(
        command, info_name=name, parent=parent, **(command.context_settings or {})
    )
    yield command, context
    subcommands: dict[str, Any] = getattr(command, "commands", {}) or {}
    for sub_name in sorted(subcommands):
        sub = subcommands[sub_name]
        if not getattr(sub, "hidden", False):
            yield from _walk(sub, context, sub_name)


def cli_commands() -> list[tuple[str, Any, Any]]:
    """Every visible ``cape`` command as ``(path, command, context)``, ``cape`` first."""
    _import_cape()
    from cape.cli.app import cli_root

    root = cli_root()
    return [(ctx.command_path, cmd, ctx) for cmd, ctx in _walk(root, None, "cape")]


def _slug(path: str) -> str:
    return path.replace(" ", "-")


def _help_records(command: Any, context: Any) -> list[tuple[str, Any, tuple[str, str]]]:
    """``(kind, param, (names, help))`` for each argument and option but ``--help``."""
    records = []
    help_option = command.get_help_option(context)
    for param in command.get_params(context):
        if param is help_option or getattr(param, "hidden", False):
            continue
        record = param.get_help_record(context)
        if record is None:  # a click argument without typer's help record
            record = (param.make_metavar(context), "")
        kind = "argument" if param.param_type_name == "argument" else "option"
        records.append((kind, param, (record[0], " ".join(record[1].split()))))
    return records


def _common_options() -> dict[str, Any]:
    _import_cape()
    from cape.cli.common import Common

    return {field.name: None for field in dataclasses.fields(Common)}


def cli_markdown() -> str:
    """The CLI reference page."""
    commands = cli_commands()
    common_names = _common_options()
    # The shared options as every client command declares them (taken from `cape list`).
    canonical: dict[str, tuple[str, str]] = {}
    for path, command, context in commands:
        if path == "cape list":
            for _kind, param, record in _help_records(command, context):
                if param.name in common_names:
                    canonical[param.name] = record
    root_path, root, root_context = commands[0]
    lines = [
        "# CLI reference",
        "",
        GENERATED_NOTE,
        "",
        docstring_markdown(root.help),
        "",
        "```text",
        f"{root_path} {' '.join(root.collect_usage_pieces(root_context))}",
        "```",
        "",
    ]
    for _kind, _param, (names, text) in _help_records(root, root_context):
        lines.append(f"- `{names}`: {text}")
    lines += [
        "",
        "Every command also takes `-h`/`--help`.",
        "",
    ]
    _import_cape()
    import cape.cli.app

    output_rules = docstring_markdown(cape.cli.app.__doc__).split("\n\n", 1)[-1]
    lines += [output_rules, "", "## Commands", ""]
    for path, command, _context in commands[1:]:
        summary = (command.help or "").strip().split("\n\n", 1)[0]
        summary = " ".join(summary.split())
        lines.append(f"- [{path}](#{_slug(path)}): {_inline(summary)}")
    lines += ["", "## Common options", ""]
    lines.append(
        "The client commands share these options; each command below says which of them it takes."
    )
    lines.append("")
    for name in common_names:
        if name in canonical:
            names, text = canonical[name]
            lines.append(f"- `{names}`: {text}")
    lines.append("")
    for path, command, context in commands[1:]:
        lines += [f"## {path}", ""]
        if command.help:
            lines += [docstring_markdown(command.help), ""]
        pieces = " ".join(command.collect_usage_pieces(context))
        lines += ["```text", f"{path} {pieces}".rstrip(), "```", ""]
        subcommands = getattr(command, "commands", None)
        if subcommands:
            lines.append("Subcommands:")
            lines.append("")
            for sub in sorted(subcommands):
                lines.append(f"- [{path} {sub}](#{_slug(f'{path} {sub}')})")
            lines.append("")
        own: list[tuple[str, tuple[str, str]]] = []
        shared: list[str] = []
        for kind, param, record in _help_records(command, context):
            if param.name in canonical and canonical[param.name] == record:
                shared.append(record[0].split(" <", 1)[0])
            else:
                own.append((kind, record))
        arguments = [record for kind, record in own if kind == "argument"]
        options = [record for kind, record in own if kind == "option"]
        if arguments:
            lines += ["Arguments:", ""]
            lines += [f"- `{names}`: {text}".rstrip(": ") for names, text in arguments]
            lines.append("")
        if options:
            lines += ["Options:", ""]
            lines += [f"- `{names}`: {text}".rstrip(": ") for names, text in options]
            lines.append("")
        if shared:
            listed = ", ".join(f"`{names}`" for names in shared)
            lines += [f"[Common options](#common-options): {listed}.", ""]
    lines += json_shapes_markdown()
    return "\n".join(lines).rstrip() + "\n"


def json_shapes_markdown() -> list[str]:
    """The ``-o json`` section: each command's object, and the objects inside them."""
    _import_cape()
    from cape.cli.shapes import OBJECTS, SHAPES

    lines = [
        "## JSON output",
        "",
        "With `-o json` every command prints one JSON document, an object with exactly these "
        "keys (a command with two forms prints one of them). Objects inside them have one shape "
        "wherever they appear.",
        "",
        "| Command | Keys |",
        "| --- | --- |",
    ]
    for path, forms in SHAPES.items():
        for shape in forms:
            keys = "; ".join(f"`{key}` ({meaning})" for key, meaning in shape.items())
            lines.append(f"| `{path}` | {keys} |")
    lines.append("")
    for name, shape in OBJECTS.items():
        lines += [f"{name}:", ""]
        lines += [f"- `{key}`: {meaning}" for key, meaning in shape.items()]
        lines.append("")
    return lines


# --------------------------------------------------------------------------- SDK reference


def _annotation(value: Any) -> str:
    if value is inspect.Parameter.empty:
        return ""
    if isinstance(value, str):
        return value
    return inspect.formatannotation(value)


def _default(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, Path):
        return f"Path({str(value)!r})"
    return repr(value)


def signature_text(obj: Callable[..., Any], *, name: str, skip_self: bool = False) -> str:
    """``name(a: int, *, b: str = 'x') -> bool``, annotations as written in the source."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return f"{name}(...)"
    parts: list[str] = []
    star_done = False
    positional_only = False
    parameters = list(signature.parameters.values())
    if skip_self and parameters and parameters[0].name in ("self", "cls"):
        parameters = parameters[1:]
    for param in parameters:
        kind = param.kind
        if kind is param.POSITIONAL_ONLY:
            positional_only = True
        elif positional_only:
            parts.append("/")
            positional_only = False
        if kind is param.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        text = param.name
        if kind is param.VAR_POSITIONAL:
            text, star_done = f"*{param.name}", True
        elif kind is param.VAR_KEYWORD:
            text = f"**{param.name}"
        annotation = _annotation(param.annotation)
        if annotation:
            text += f": {annotation}"
        if param.default is not param.empty:
            text += f" = {_default(param.default)}" if annotation else f"={_default(param.default)}"
        parts.append(text)
    if positional_only:
        parts.append("/")
    result = _annotation(signature.return_annotation)
    arrow = f" -> {result}" if result and result != "None" else ""
    return f"{name}({', '.join(parts)}){arrow}"


def _attribute_docs(source_of: Any) -> dict[str, str]:
    """Docstrings of assignments (``x = 1`` then a string, or ``#:`` comments above it)."""
    try:
        source = inspect.getsource(source_of)
    except (OSError, TypeError):
        return {}
    tree = ast.parse(textwrap.dedent(source))
    body = tree.body
    if len(body) == 1 and isinstance(body[0], ast.ClassDef):
        body = body[0].body
    lines = textwrap.dedent(source).splitlines()
    docs: dict[str, str] = {}
    for index, node in enumerate(body):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        elif isinstance(node, ast.AnnAssign):
            target = node.target
        else:
            continue
        if not isinstance(target, ast.Name):
            continue
        following = body[index + 1] if index + 1 < len(body) else None
        if (
            isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[target.id] = following.value.value
            continue
        comments: list[str] = []
        row = node.lineno - 2
        while row >= 0 and lines[row].strip().startswith("#:"):
            comments.insert(0, lines[row].strip()[2:].strip())
            row -= 1
        if comments:
            docs[target.id] = " ".join(comments)
    return docs


def _members(cls: type) -> list[tuple[str, Any]]:
    """Public methods and properties defined by ``cls`` itself, in source order."""
    members = []
    for name, value in vars(cls).items():
        if name.startswith("_") and name != "__init__":
            continue
        if isinstance(value, property | classmethod | staticmethod) or inspect.isfunction(value):
            members.append((name, value))
    return members


def _class_markdown(cls: type, *, level: int, fallback: type | None = None) -> list[str]:
    """A class: heading with its constructor, docstring, fields, then its members.

    ``fallback`` lends its docstrings to members that have none (``Cape`` mirrors
    ``AsyncCape``, whose methods carry the documentation).
    """
    heading = "#" * level
    bases = [b.__name__ for b in cls.__bases__ if b is not object]
    init = vars(cls).get("__init__")  # dataclasses define theirs in the class too
    title = signature_text(init, name=cls.__name__, skip_self=True) if init else cls.__name__
    out = [f"{heading} class {cls.__name__}", "", "```python", f"class {title}", "```", ""]
    if bases:
        out += ["Bases: " + ", ".join(f"`{b}`" for b in bases), ""]
    class_doc = cls.__doc__ or ""
    if dataclasses.is_dataclass(cls) and class_doc.startswith(f"{cls.__name__}("):
        class_doc = ""  # the signature dataclasses write when a class has no docstring
    out += [docstring_markdown(class_doc), ""]
    if dataclasses.is_dataclass(cls):
        docs = _attribute_docs(cls)
        out += ["Fields:", ""]
        for field in dataclasses.fields(cls):
            annotation = _annotation(field.type)
            text = f"- `{field.name}: {annotation}`"
            if field.name in docs:
                text += f": {_inline(' '.join(docs[field.name].split()))}"
            out.append(text)
        out.append("")
    for name, member in _members(cls):
        if name == "__init__":
            continue
        doc: str | None
        if isinstance(member, property):
            doc = member.fget.__doc__ if member.fget else None
            returns = ""
            if member.fget is not None:
                returns = _annotation(inspect.signature(member.fget).return_annotation)
            out += [f"{heading}# {cls.__name__}.{name}", ""]
            out += ["```python", f"{name}: {returns}" if returns else name, "```", ""]
        else:
            function = member.__func__ if isinstance(member, classmethod | staticmethod) else member
            prefix = "async " if inspect.iscoroutinefunction(function) else ""
            prefix += "classmethod " if isinstance(member, classmethod) else ""
            prefix += "staticmethod " if isinstance(member, staticmethod) else ""
            skip = not isinstance(member, staticmethod)
            out += [f"{heading}# {cls.__name__}.{name}", ""]
            sig = signature_text(function, name=name, skip_self=skip)
            out += ["```python", f"{prefix}{sig}", "```", ""]
            doc = function.__doc__
        if not doc and fallback is not None:
            borrowed = getattr(fallback, name, None)
            if borrowed is not None and getattr(borrowed, "__doc__", None):
                anchor = f"{fallback.__name__}{name}".lower()
                link = f"[{fallback.__name__}.{name}](#{anchor})"
                doc = f"{inspect.cleandoc(borrowed.__doc__)}\n\n*Documented at {link}.*"
        if doc:
            out += [docstring_markdown(doc), ""]
    return out


def _function_markdown(function: Callable[..., Any], name: str, *, level: int) -> list[str]:
    prefix = "async " if inspect.iscoroutinefunction(function) else ""
    out = [f"{'#' * level} {name}", "", "```python"]
    out += [f"{prefix}{signature_text(function, name=name)}", "```", ""]
    out += [docstring_markdown(function.__doc__), ""]
    return out


def _module_members(
    module: types.ModuleType,
    names: list[str],
    *,
    level: int,
    parts: tuple[types.ModuleType, ...] = (),
) -> list[str]:
    """``names`` of ``module``; ``parts`` are the modules it re-exports them from (documented
    as if written in ``module``)."""
    docs: dict[str, str] = {}
    for source in (*parts, module):
        docs |= _attribute_docs(source)
    homes = {source.__name__ for source in (module, *parts)}
    out: list[str] = []
    for name in names:
        value = getattr(module, name)
        if inspect.isclass(value) and getattr(value, "__module__", "") in homes:
            out += _class_markdown(value, level=level)
        elif inspect.isfunction(value):
            out += _function_markdown(value, name, level=level)
        else:
            out += [f"{'#' * level} {name}", ""]
            alias = _alias_source(module, name)
            if alias is not None:
                shown = alias
            elif isinstance(value, frozenset):
                shown = f"{name} = frozenset({sorted(value)!r})"
            else:
                shown = f"{name} = {value!r}"
            out += ["```python", shown, "```", ""]
            if name in docs:
                out += [_inline(" ".join(docs[name].split())), ""]
    return out


def _alias_source(module: types.ModuleType, name: str) -> str | None:
    """``Name: TypeAlias = <source>`` as written, for type aliases."""
    tree = ast.parse(inspect.getsource(module))
    for node in tree.body:
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == name
            and node.value is not None
            and "TypeAlias" in ast.unparse(node.annotation)
        ):
            return f"{name} = {ast.unparse(node.value)}"
    return None


def _error_tree(module: types.ModuleType) -> list[str]:
    """The exception classes of ``module`` as a nested list, each with its first sentence."""
    classes = [
        value
        for name in module.__all__
        if inspect.isclass(value := getattr(module, name)) and issubclass(value, BaseException)
    ]
    children: dict[type, list[type]] = {}
    roots: list[type] = []
    for cls in classes:
        parents = [b for b in cls.__bases__ if b in classes]
        if parents:
            children.setdefault(parents[0], []).append(cls)
        else:
            roots.append(cls)
    out: list[str] = []

    def visit(cls: type, depth: int) -> None:
        also = [b.__name__ for b in cls.__bases__ if b in classes][1:]
        note = f" (also a {', '.join(also)})" if also else ""
        summary = (inspect.getdoc(cls) or "").split("\n\n", 1)[0]
        summary = _inline(" ".join(summary.split()))
        anchor = f"class-{cls.__name__.lower()}"
        out.append(f"{'    ' * depth}- [{cls.__name__}](#{anchor}){note}: {summary}")
        for child in children.get(cls, []):
            visit(child, depth + 1)

    for cls in roots:
        visit(cls, 0)
    return out


def sdk_markdown() -> str:
    """The SDK reference page."""
    _import_cape()
    import cape
    import cape.errors
    import cape.sdk.async_client
    import cape.sdk.bundle
    import cape.sdk.client
    import cape.sdk.function_ref
    import cape.sdk.inputs
    import cape.sdk.records
    import cape.serdio

    client = cape.sdk.client
    lines = ["# SDK reference", "", GENERATED_NOTE, ""]
    lines += [docstring_markdown(cape.__doc__), ""]
    lines += ["## cape.sdk.client", "", docstring_markdown(client.__doc__), ""]
    lines += _class_markdown(client.Cape, level=3, fallback=client.AsyncCape)
    lines += _class_markdown(client.AsyncCape, level=3)
    lines += _class_markdown(cape.sdk.function_ref.FunctionRef, level=3)
    for name in client.__all__:
        if name in ("Cape", "AsyncCape", "FunctionRef"):
            continue
        parts = (cape.sdk.async_client, cape.sdk.inputs, cape.sdk.records)
        lines += _module_members(client, [name], level=3, parts=parts)
    lines += _class_markdown(cape.sdk.bundle.Bundle, level=3)
    lines += ["## cape.serdio", "", docstring_markdown(cape.serdio.__doc__), ""]
    lines += _module_members(cape.serdio, list(cape.serdio.__all__), level=3)
    lines += ["## cape.errors", "", docstring_markdown(cape.errors.__doc__), ""]
    lines += [*_error_tree(cape.errors), ""]
    lines += _module_members(cape.errors, list(cape.errors.__all__), level=3)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


# --------------------------------------------------------------------------- outputs

PAGES: dict[str, Callable[[], str]] = {CLI_PAGE: cli_markdown, SDK_PAGE: sdk_markdown}


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """MkDocs hook: add the generated pages to the build (they replace any file so named)."""
    from mkdocs.structure.files import File

    for src_uri, render in PAGES.items():
        existing = files.get_file_from_path(src_uri)
        if existing is not None:
            files.remove(existing)
        files.append(File.generated(config, src_uri, content=render()))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "build", help="directory to write reference/*.md under"
    )
    args = parser.parse_args(argv)
    for src_uri, render in PAGES.items():
        target = args.out / src_uri
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render())
        print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
