"""``cape encrypt``: envelope-encrypt data for an attested enclave (text or streaming form)."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import typer

from cape.cli import functions
from cape.cli.common import Common, UsageError, emit_json, open_input_file, stderr
from cape.errors import CapeError
from cape.sdk import encrypt as encrypt_sdk


def _read_input(data: str | None, file: str | None) -> tuple[BinaryIO, int | None]:
    if data is not None and file is not None:
        raise UsageError("give the input either as an argument or with -f, not both")
    if data is not None:
        if not data:
            raise UsageError("the input argument is empty")
        raw = data.encode("utf-8")
        return io.BytesIO(raw), len(raw)
    if file is None or file == "-":
        if file is None and sys.stdin.isatty():
            raise UsageError("nothing to encrypt: give INPUT, -f FILE, or pipe data to stdin")
        return sys.stdin.buffer, None
    return open_input_file(file)


def encrypt(
    common: Common,
    data: Annotated[
        str | None, typer.Argument(metavar="INPUT", help="Text to encrypt (UTF-8).")
    ] = None,
    file: Annotated[
        str | None, typer.Option("-f", "--file", help="Read the input from FILE, or - for stdin.")
    ] = None,
    username: Annotated[
        str | None,
        typer.Option("--username", "-u", help="Encrypt for this user (attested key by name)."),
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option("--key", "-k", help="RSA public key file (DER or PEM) to encrypt for."),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "-o",
            "--output",
            metavar="OUT|plain|json",
            help="Write the ciphertext to file OUT; `plain` or `json` choose the output "
            "format instead (a file named so: ./json).",
        ),
    ] = None,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream",
            help="Use the streaming form (automatic when the text form would not fit the "
            "server's input limit).",
        ),
    ] = False,
) -> None:
    """Envelope-encrypt data so that only an attested enclave can read it.

    Prints Cape's text form, `cape:` + base64 (RSA-OAEP-wrapped AES-256-GCM), for your own
    Cape key (cached by `cape key`/`cape login`), another user's (--username) or a key file.
    The text form is a third larger than the input: when it would not fit the server's input
    limit (learnt from the server; 64 MiB without one), or with --stream, the binary
    streaming form `cape-stream-v1:` is written instead. There is no client-side decrypt:
    only attested enclaves decrypt.
    """
    as_json = output is not None and output.lower() == "json"
    if output is not None and output.lower() in _NOT_FORMATS:
        raise UsageError(
            f"-o {output}: the output formats are plain and json (to write a file of that "
            f"name, use -o ./{output})"
        )
    out_path = None if output is None or output.lower() in ("json", "plain") else Path(output)
    if key is not None and username is not None:
        raise UsageError("give either --key or --username, not both")
    if key is not None:
        public_key = encrypt_sdk.load_encryption_key(key)
    else:
        from cape.crypto.keys import load_rsa_public_key

        public_key = load_rsa_public_key(common.client().key(username=username))
    limit = _input_limit(common)
    source, size = _read_input(data, file)
    with source:
        threshold = encrypt_sdk.largest_text_input(limit, public_key)
        streaming = stream or (size is not None and size > threshold)
        reader = _with_progress(source, size)
        if out_path is not None:
            with encrypt_sdk.atomic_output(out_path) as sink:
                result = encrypt_sdk.encrypt_stream_to(
                    reader,
                    sink,
                    public_key,
                    force_stream=streaming,
                    size_hint=size,
                    text_limit=limit,
                )
            form = "streaming" if result.streaming else "text"
            stderr.print(
                f"Encrypted ({form} form, {result.bytes_written} bytes) to {out_path}",
                markup=False,
            )
            _warn_over_limit(result.bytes_written, limit)
            return
        if as_json:
            if streaming:
                raise UsageError(
                    "this input needs the streaming form, which is binary: write it with -o FILE"
                )
            buffer = io.BytesIO()
            result = encrypt_sdk.encrypt_stream_to(
                reader, buffer, public_key, size_hint=size, text_limit=limit
            )
            if result.streaming:
                raise UsageError(
                    "this input needs the streaming form, which is binary: write it with -o FILE"
                )
            emit_json({"ciphertext": buffer.getvalue().decode("ascii").strip(), "form": "text"})
            return
        if streaming and sys.stdout.isatty():
            raise UsageError(
                "the streaming form is binary: write it with -o FILE or redirect stdout"
            )
        result = encrypt_sdk.encrypt_stream_to(
            reader,
            sys.stdout.buffer,
            public_key,
            force_stream=streaming,
            size_hint=size,
            text_limit=limit,
        )
        sys.stdout.flush()
        _warn_over_limit(result.bytes_written, limit)


#: Words users try as ``-o`` formats; ``cape encrypt -o`` refuses them rather than writing a
#: file of that name.
_NOT_FORMATS = frozenset({"yaml", "yml", "text", "txt", "table", "csv", "toml", "raw"})


def _input_limit(common: Common) -> int:
    """The server's input limit (``GET /v1/runtime``), or the default when there is no server
    to ask (``--key`` offline) or it does not say."""
    try:
        limit = common.client().input_limit()
    except CapeError:
        return encrypt_sdk.DEFAULT_INPUT_LIMIT_BYTES
    return limit if limit is not None else encrypt_sdk.DEFAULT_INPUT_LIMIT_BYTES


def _warn_over_limit(written: int, limit: int) -> None:
    if written > limit:
        stderr.print(
            f"Note: this ciphertext is {written} bytes, over the server's input limit of "
            f"{limit} bytes, so `cape run` cannot send it; the operator can raise the limit "
            "(`cape serve --max-input-mib N`).",
            markup=False,
        )


class _Counting:
    """Reads from ``source`` and advances a progress bar."""

    def __init__(self, source: BinaryIO, advance: Any) -> None:
        self._source = source
        self._advance = advance

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self._advance(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        n = self._source.readinto(buffer)  # type: ignore[attr-defined]
        self._advance(n or 0)
        return int(n or 0)


def _with_progress(source: BinaryIO, size: int | None) -> BinaryIO:
    if size is None or size < functions.PROGRESS_MIN_BYTES or not stderr.is_terminal:
        return source
    from rich.progress import Progress

    bar = Progress(console=stderr, transient=True)
    task = bar.add_task("Encrypting", total=size)
    bar.start()

    def advance(n: int) -> None:
        bar.advance(task, n)
        if bar.tasks[0].completed >= size:
            bar.stop()

    return _Counting(source, advance)  # type: ignore[return-value]
