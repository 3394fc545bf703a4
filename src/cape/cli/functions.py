"""Function commands: deploy, run, test, list, delete, function create."""

from __future__ import annotations

import base64
import datetime as dt
import importlib.metadata
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from cape.cli.account import pcr_option
from cape.cli.common import (
    Column,
    Common,
    UsageError,
    command,
    emit_json,
    open_input_file,
    print_table,
    stderr,
)
from cape.errors import FormatError

__all__ = ["app", "read_input"]

app = typer.Typer()
function_app = typer.Typer(help="Create function folders.", no_args_is_help=True)
app.add_typer(function_app, name="function")

_Pcr = Annotated[
    list[str] | None,
    typer.Option("--pcr", "-p", help="Allowed PCR value I:HEX; repeat to allow several."),
]
_Input = Annotated[str | None, typer.Argument(metavar="INPUT", help="Input text (UTF-8).")]
_File = Annotated[
    str | None, typer.Option("-f", "--file", help="Read the input from FILE, or - for stdin.")
]
_NoVendor = Annotated[
    bool, typer.Option("--no-vendor", help="Do not install requirements.txt into the bundle.")
]
PROGRESS_MIN_BYTES = 8 << 20


def read_input(data: str | None, file: str | None) -> bytes:
    """The input from exactly one of: the argument, ``-f FILE``, ``-f -`` (stdin)."""
    if data is not None and file is not None:
        raise UsageError("give the input either as an argument or with -f, not both")
    if data is not None:
        return data.encode("utf-8")
    if file is None:
        raise UsageError("no input: give INPUT, -f FILE, or -f - for stdin")
    if file == "-":
        return sys.stdin.buffer.read()
    handle, _ = open_input_file(file)
    with handle:
        return handle.read()


@contextmanager
def upload_progress(what: str) -> Iterator[Callable[[int, int], None] | None]:
    """A transfer bar on stderr for big uploads, shown only on a terminal."""
    if not stderr.is_terminal:
        yield None
        return
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=stderr,
        transient=True,
    ) as bar:
        task = bar.add_task(what, total=None)

        def update(sent: int, total: int) -> None:
            if total >= PROGRESS_MIN_BYTES:
                bar.update(task, completed=sent, total=total)

        yield update


def _source(path: Path) -> Path:
    if not path.exists():
        raise FormatError(f"{path} does not exist")
    if not path.is_dir() and path.suffix.lower() != ".zip":
        raise FormatError(f"{path} is neither a folder nor a .zip file")
    return path


@command(app, "deploy")
def deploy(
    common: Common,
    path: Annotated[Path, typer.Argument(metavar="DIR|ZIP", help="Function folder or zip.")],
    name: Annotated[
        str | None, typer.Option("--name", "-n", help="Function name (default: folder name).")
    ] = None,
    public: Annotated[bool, typer.Option("--public", help="Anyone logged in may run it.")] = False,
    pcr: _Pcr = None,
    no_vendor: _NoVendor = False,
) -> None:
    """Deploy a function: zip it (vendoring requirements.txt), attest, upload encrypted."""
    cape = common.client()
    bundle = cape.build(
        _source(path),
        vendor=not no_vendor,
        progress=(lambda line: stderr.print(line, markup=False)) if common.verbose else None,
    )
    if bundle.vendored:
        stderr.print(f"Vendored: {', '.join(bundle.vendored)}", markup=False)
    with upload_progress("Uploading") as progress:
        done = cape.deploy(
            bundle, name=name, public=public, pcrs=pcr_option(pcr), progress=progress
        )
    if common.json:
        emit_json(
            {
                "id": done.id,
                "name": done.name,
                "checksum": done.checksum,
                "public": public,
                "vendored": list(done.vendored),
            }
        )
    else:
        sys.stdout.write(
            f"Function ID       ➜  {done.id}\n"
            f"Function Checksum ➜  {done.checksum}\n"
            f"Function Name     ➜  {done.name}\n"
        )


def _render_output(common: Common, output: bytes, newline: bool, attested: Any = None) -> None:
    """Plain: the output bytes. JSON: the output, and what the session verified (run)."""
    if common.json:
        try:
            text: str | None = output.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        result: dict[str, Any] = {
            "output": text,
            "output_base64": base64.b64encode(output).decode(),
        }
        if attested is not None:
            result["attestation"] = attested.to_json()
        emit_json(result)
        return
    sys.stdout.buffer.write(output + (b"\n" if newline and _wants_newline(output) else b""))
    sys.stdout.flush()


def _wants_newline(output: bytes) -> bool:
    """``cape run`` ends text on a terminal with a newline, so the prompt starts on its own
    line; into a file or pipe, or when the result is not UTF-8 text, the bytes are exact."""
    if not sys.stdout.isatty() or output.endswith(b"\n"):
        return False
    try:
        output.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@command(app, "run")
def run(
    common: Common,
    function: Annotated[str, typer.Argument(metavar="ID|USER/NAME")],
    data: _Input = None,
    file: _File = None,
    function_checksum: Annotated[
        str | None,
        typer.Option("--function-checksum", help="Refuse unless the enclave runs this code."),
    ] = None,
    pcr: _Pcr = None,
) -> None:
    """Run a deployed function on one input (sealed to the attested enclave)."""
    payload = read_input(data, file)
    cape = common.client()
    try:
        ref = cape.function(function, checksum=function_checksum)
    except FormatError as exc:
        raise UsageError(exc.diagnostics()) from None
    output: bytes = cape.run(ref, None, payload, pcrs=pcr_option(pcr))
    attested = cape.aio.last_attestation
    _render_output(common, output, newline=True, attested=attested)


@command(app, "test")
def try_function(
    common: Common,
    path: Annotated[Path, typer.Argument(metavar="DIR|ZIP")],
    data: _Input = None,
    file: _File = None,
    pcr: _Pcr = None,
    no_vendor: _NoVendor = False,
) -> None:
    """Run a function folder once on an input, without deploying it."""
    payload = read_input(data, file)
    output: bytes = common.client().test(
        _source(path), payload, pcrs=pcr_option(pcr), vendor=not no_vendor
    )
    _render_output(common, output, newline=False)


@command(app, "list")
def list_functions(
    common: Common,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 50,
    offset: Annotated[int, typer.Option("--offset", min=0)] = 0,
) -> None:
    """List your deployed functions."""
    cape = common.client()
    functions = cape.functions(limit=limit, offset=offset)
    if common.json:
        total = offset + len(functions)
        if len(functions) == limit:  # a full page: count the rest
            total += cape.count_functions(offset=offset + limit)
        emit_json({"deployments": [f.__dict__ for f in functions], "count": total})
        return
    if not functions:
        stderr.print("No functions deployed.", markup=False)
        return
    columns = [
        Column("#", rank=1),
        Column("Name", keep=True),
        Column("ID", keep=True),
        Column("Checksum", rank=0),
        Column("Public", rank=2),
        Column("Created At", rank=3),
    ]
    rows = [
        [str(number), f.name, f.id, f.checksum or "", "yes" if f.public else "no",
         _when(f.created_at)]
        for number, f in enumerate(functions, start=offset + 1)
    ]  # fmt: skip
    print_table(columns, rows)


def _when(stamp: str) -> str:
    """An RFC 3339 time as Cape's CLI showed it, in local time ("Jan 02 2006 15:04")."""
    try:
        moment = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return stamp
    return moment.astimezone().strftime("%b %d %Y %H:%M")


@command(app, "delete")
def delete(common: Common, function_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Delete a deployed function."""
    common.client().delete_function(function_id)
    if common.json:
        emit_json({"deleted": function_id})
    else:
        stderr.print(f"Success! Function {function_id} deleted.", markup=False)


ECHO_APP = '''"""A Cape function: the enclave calls cape_handler with the decrypted input bytes."""


def cape_handler(input: bytes) -> bytes:
    text = input.decode("utf-8")
    return f"hello, {text}".encode("utf-8")
'''

SERDIO_APP = '''"""A Cape function taking Python values via serdio.

Call it with `cape.run(fn, None, 3, 4, use_serdio=True)`.
"""

from cape_serdio import lift_io


@lift_io(as_handler=True)
def cape_handler(x: float, y: float) -> float:
    return (x**2 + y**2) ** 0.5
'''


_REQUIREMENTS_NOTE = (
    "# Dependencies listed here are vendored into the bundle by `cape deploy`; pin exact\n"
    "# versions (name==version) so that every build measures the same code.\n"
)


@command(function_app, "create", offline=True)
def function_create(
    common: Common,
    name: Annotated[str, typer.Argument(help="Folder to create.")],
    location: Annotated[Path, typer.Option("--location", "-l", help="Where to create it.")] = Path(
        "."
    ),
    use_serdio: Annotated[
        bool, typer.Option("--serdio", help="Take Python values via serdio (adds cape_serdio.py).")
    ] = False,
) -> None:
    """Create a function folder: app.py with a cape_handler, and requirements.txt."""
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"{name!r} is not a folder name")
    target = location / name
    if target.exists():
        raise FormatError(f"{target} already exists")
    files: dict[str, str] = {
        "app.py": SERDIO_APP if use_serdio else ECHO_APP,
        "requirements.txt": _REQUIREMENTS_NOTE
        + (f"msgpack=={importlib.metadata.version('msgpack')}\n" if use_serdio else ""),
    }
    if use_serdio:
        from cape import serdio

        files["cape_serdio.py"] = Path(serdio.__file__).read_text()
    try:
        target.mkdir(parents=True)
        for file_name, text in files.items():
            (target / file_name).write_text(text)
    except OSError as exc:
        raise FormatError(f"cannot create {target}: {exc.strerror}") from None
    if common.json:
        emit_json({"path": str(target), "files": sorted(files)})
    else:
        stderr.print(f"Created {target} ({', '.join(sorted(files))})", markup=False)
