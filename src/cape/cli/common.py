"""What every ``cape`` command shares: its options, error handling and output.

Every client command takes ``-o/--output plain|json``, ``--url``, ``-t/--token``, ``-v``,
``--ca-file`` and ``--attestation-root``; :func:`command` adds them to each command's
signature, so no command can forget one. Results go to stdout, messages to stderr. A failure
is one line ``Error: …`` on stderr with exit status 1 (2 for bad usage); ``-v`` adds the
traceback.
"""

from __future__ import annotations

import enum
import functools
import inspect
import json
import logging
import os
import sys
import traceback
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Final, NoReturn, TypeVar

import typer
from rich.console import Console

from cape.errors import CapeError, FormatError
from cape.sdk.hints import add_hint

__all__ = [
    "Common",
    "OutputFormat",
    "UsageError",
    "command",
    "emit_json",
    "fail",
    "open_input_file",
    "print_table",
    "quiet_stdout",
    "stderr",
    "stdout",
]

# Piped output is not cut at 80 columns: scripts and people copy ids out of tables.
stdout = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)
_state = {"verbose": False}

F = TypeVar("F", bound=Callable[..., Any])


class OutputFormat(enum.StrEnum):
    plain = "plain"
    json = "json"


class UsageError(CapeError):
    """A combination of arguments that cannot work (exit status 2)."""


@dataclass(frozen=True)
class Common:
    """The options every client command takes."""

    output: OutputFormat = OutputFormat.plain
    url: str | None = None
    token: str | None = None
    verbose: bool = False
    ca_file: Path | None = None
    attestation_root: Path | None = None

    @property
    def json(self) -> bool:
        return self.output is OutputFormat.json

    def client(self, *, seal_results: bool = True) -> Any:
        """The SDK client these options describe."""
        from cape.sdk.client import Cape

        return Cape(
            self.url,
            token=self.token,
            ca_file=self.ca_file,
            attestation_root=self.attestation_root,
            seal_results=seal_results,
        )


def set_verbose(verbose: bool) -> None:
    if verbose and not _state["verbose"]:
        _state["verbose"] = True
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(message)s")


def quiet_stdout() -> None:
    """Point stdout at /dev/null after its reader went away, so exiting flushes nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def fail(exc: BaseException) -> NoReturn:
    if isinstance(exc, BrokenPipeError):
        quiet_stdout()
        raise typer.Exit(141)
    if _state["verbose"]:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, CapeError):
        message = add_hint(exc).diagnostics()
    elif isinstance(exc, KeyboardInterrupt):
        message = "interrupted"
    else:
        message = f"unexpected {type(exc).__name__}: {exc} (run with -v for details)"
    stderr.print(f"Error: {' '.join(message.split())}", markup=False)
    raise typer.Exit(
        2 if isinstance(exc, UsageError) else 130 if isinstance(exc, KeyboardInterrupt) else 1
    )


def open_input_file(file: str) -> tuple[BinaryIO, int]:
    """``-f FILE`` opened for reading, with its size; one-line errors for what cannot be read."""
    path = Path(file)
    if path.is_dir():
        raise FormatError(f"cannot read {file}: is a directory")
    try:
        handle = path.open("rb")
        size = os.fstat(handle.fileno()).st_size
    except OSError as exc:
        raise FormatError(f"cannot read {file}: {exc.strerror}") from None
    return handle, size


@dataclass(frozen=True)
class Column:
    """A table column. ``keep`` columns (ids, names: what users copy) are never dropped;
    the others go, lowest ``rank`` first, when the table would not fit the terminal."""

    header: str
    keep: bool = False
    rank: int = 0


def print_table(columns: list[Column], rows: list[list[str]]) -> None:
    """A table on stdout that never truncates a cell: columns that are not ``keep`` are
    dropped until the rest fit the terminal's width, and a cell still too wide folds onto
    the next line (every character stays)."""
    from rich.table import Table

    widths = [
        max([len(column.header), *(len(row[i]) for row in rows)])
        for i, column in enumerate(columns)
    ]
    shown = list(range(len(columns)))
    optional = sorted(
        (i for i, column in enumerate(columns) if not column.keep), key=lambda i: columns[i].rank
    )
    # rich's default box: one border per column plus one, and one space of padding each side.
    while sum(widths[i] + 3 for i in shown) + 1 > stdout.width and optional:
        shown.remove(optional.pop(0))
    table = Table(*(columns[i].header for i in shown))
    for position, i in enumerate(shown):
        table.columns[position].overflow = "fold"
        table.columns[position].no_wrap = columns[i].keep
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    stdout.print(table)


def emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


_OPTIONS: dict[str, tuple[Any, Any]] = {
    "output": (
        Annotated[
            OutputFormat,
            typer.Option("-o", "--output", help="Output format.", case_sensitive=False),
        ],
        OutputFormat.plain,
    ),
    "url": (
        Annotated[
            str | None,
            typer.Option(
                "--url", help="Server URL (default: CAPE_ENCLAVE_HOST, presets, local serve)."
            ),
        ],
        None,
    ),
    "token": (
        Annotated[
            str | None,
            typer.Option("-t", "--token", help="Token (default: CAPE_TOKEN, then your login)."),
        ],
        None,
    ),
    "verbose": (
        Annotated[bool, typer.Option("-v", "--verbose", help="Debug logs and tracebacks.")],
        False,
    ),
    "ca_file": (
        Annotated[
            Path | None,
            typer.Option("--ca-file", help="CA file trusted for TLS (default: CAPE_CA_FILE)."),
        ],
        None,
    ),
    "attestation_root": (
        Annotated[
            Path | None,
            typer.Option(
                "--attestation-root",
                help="Pinned attestation root (default: CAPE_ATTESTATION_ROOT, pinned root).",
            ),
        ],
        None,
    ),
}


#: What a command that makes no request takes (``cape version``, ``logout``, ``config``,
#: ``pcrs``, ``function create``): no server, token or trust options.
OFFLINE_OPTIONS: Final = ("output", "verbose")


def command(
    app: typer.Typer, name: str | None = None, *, own_output: bool = False, offline: bool = False
) -> Callable[[F], F]:
    """Register ``fn(common: Common, …)`` as a command with the shared options added.

    With ``own_output`` the command declares ``-o`` itself (``cape encrypt``, where ``-o``
    also names an output file) and receives it as its own parameter. An ``offline`` command
    makes no request, so it lists only ``-o`` and ``-v``.
    """

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in signature.parameters.values()
            if p.name != "common"
        ]
        keys = [
            key
            for key in _OPTIONS
            if not (own_output and key == "output") and (not offline or key in OFFLINE_OPTIONS)
        ]
        shared = [
            inspect.Parameter(
                key, inspect.Parameter.KEYWORD_ONLY, default=_OPTIONS[key][1],
                annotation=_OPTIONS[key][0],
            )
            for key in keys
        ]  # fmt: skip

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            values = {key: kwargs.pop(key) for key in keys if key in kwargs}
            common = Common(**values)
            set_verbose(common.verbose)
            try:
                return fn(common, **kwargs)
            except typer.Exit:
                raise
            except (Exception, KeyboardInterrupt) as exc:  # every failure is one line
                fail(exc)

        parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + shared
        wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=parameters, return_annotation=None
        )
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        app.command(name)(wrapper)
        return fn

    return decorate
