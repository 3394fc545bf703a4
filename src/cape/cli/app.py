"""The ``cape`` command line.

Output rules: results go to stdout, messages to stderr. Every failure is one line
``Error: <diagnostics>`` on stderr and exit status 1; bad usage exits 2; ``-v`` adds the
traceback. The CLI parses, calls the SDK and renders; it holds no crypto and decides no trust.
There is deliberately no ``cape decrypt``: only attested enclaves decrypt.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import sys
from pathlib import Path
from typing import Annotated, Any, BinaryIO, NoReturn

import typer

from cape import __version__
from cape.cli import account, admin, enclave, functions, kms
from cape.cli.common import (
    Common,
    OutputFormat,
    UsageError,
    command,
    emit_json,
    fail,
    open_input_file,
    quiet_stdout,
    set_verbose,
    stderr,
    stdout,
)
from cape.errors import CapeError, FormatError
from cape.host.ratelimit import DEFAULT_SIGNUPS_PER_HOUR
from cape.sdk import audit
from cape.sdk import encrypt as encrypt_sdk
from cape.verify.policy import AttestationPolicy, parse_pcr_pin, pcr_allow_list
from cape.verify.roots import describe_root, fingerprint, load_root_certificate_file

__all__ = ["app", "main"]

HELP = """Cape: deploy Python functions into attested enclaves and run them on encrypted data.

There is no `cape decrypt`: only an attested enclave can decrypt `cape:` data."""

app = typer.Typer(
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
attestation_app = typer.Typer(
    help="Inspect and verify attestation documents.", no_args_is_help=True
)
app.add_typer(attestation_app, name="attestation")
app.add_typer(account.app)
app.add_typer(functions.app)
app.add_typer(admin.app, name="admin")
app.add_typer(enclave.app, name="enclave")
app.add_typer(kms.app, name="kms")


def _fail(exc: CapeError) -> NoReturn:
    fail(exc)


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Show tracebacks.")] = False,
) -> None:
    set_verbose(verbose)


@command(app, "version", offline=True)
def version(common: Common) -> None:
    """Print cape's version."""
    if common.json:
        emit_json({"version": __version__})
    else:
        stdout.print(__version__, markup=False)


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


@command(app, "encrypt", own_output=True)
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


def _parse_time(text: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"--at {text!r} is not an ISO 8601 time (e.g. 2024-09-07T15:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment


def _render_plain(report: audit.AuditReport) -> None:
    rows: list[tuple[str, str]] = [("status", "VALID" if report.valid else "INVALID")]
    if report.checked_at is not None:
        rows.append(("checked at", report.checked_at.isoformat()))
    rows.append(("root", f"{describe_root(report.root)} sha256:{fingerprint(report.root)}"))
    if report.document is not None:
        fields: dict[str, Any] = audit.describe_document(report.document, full=False)
        cert = fields.pop("certificate")
        pcrs = fields.pop("pcrs")
        bundle = fields.pop("cabundle")
        for name, value in fields.items():
            shown = json.dumps(value) if isinstance(value, dict | list) else str(value)
            rows.append((name, "null" if value is None else shown))
        rows.append(
            ("certificate", f"{cert['subject']} ({cert['not_before']} to {cert['not_after']})")
        )
        rows.append(("cabundle", " <- ".join(reversed(bundle))))
        rows.extend((f"PCR{index}", value) for index, value in pcrs.items())
    # Plain lines, never wrapped: scripts grep this output.
    sys.stdout.write("".join(f"{name:<12} {value}\n" for name, value in rows))
    sys.stdout.flush()


@attestation_app.command("verify")
def attestation_verify(
    document: Annotated[str, typer.Argument(help="Document file (raw CBOR or base64), or -.")],
    root: Annotated[
        Path | None,
        typer.Option(
            "--root",
            envvar="CAPE_ATTESTATION_ROOT",
            help="Pinned root certificate (PEM or DER) [env: CAPE_ATTESTATION_ROOT].",
            show_envvar=False,
        ),
    ] = None,
    at: Annotated[
        str | None,
        typer.Option("--at", help="Check as of this ISO time instead of now (audits)."),
    ] = None,
    archived: Annotated[
        bool, typer.Option("--archived", help="Check at the document's own timestamp.")
    ] = False,
    max_age: Annotated[
        float | None,
        typer.Option(
            "--max-age",
            help="Oldest acceptable document age in seconds (default 300; none with --at).",
        ),
    ] = None,
    nonce: Annotated[str | None, typer.Option("--nonce", help="Expected nonce, hex.")] = None,
    pcr: Annotated[
        list[str] | None,
        typer.Option("--pcr", help="Allowed PCR value I:HEX; repeat to allow several."),
    ] = None,
    allow_debug: Annotated[
        bool, typer.Option("--allow-debug", help="Accept debug-mode enclaves (PCR0 zero).")
    ] = False,
    output: Annotated[
        OutputFormat, typer.Option("-o", "--output", help="Output format.")
    ] = OutputFormat.plain,
) -> None:
    """Verify an attestation document: signature, chain to the pinned root, time, nonce, PCRs.

    Prints the decoded fields; exits 0 when valid and 1 with the reason when not.
    """
    try:
        if root is None:
            raise UsageError("no attestation root: pass --root FILE or set CAPE_ATTESTATION_ROOT")
        if archived and at is not None:
            raise UsageError("--archived checks at the document's own time; drop --at")
        root_cert = load_root_certificate_file(root)
        check_time = _parse_time(at) if at is not None else None
        if max_age is not None and max_age < 0:
            raise UsageError("--max-age must not be negative")
        if max_age is not None:
            age: dt.timedelta | None = dt.timedelta(seconds=max_age)
        elif check_time is None and not archived:
            age = AttestationPolicy().max_age
        else:
            age = None
        try:
            expected_nonce = bytes.fromhex(nonce) if nonce is not None else None
        except ValueError:
            raise UsageError("--nonce must be hex") from None
        pins = pcr_allow_list(parse_pcr_pin(p) for p in (pcr or []))
        policy = AttestationPolicy(
            nonce=expected_nonce, pcrs=pins, max_age=age, allow_debug=allow_debug
        )
        if document == "-":
            data = sys.stdin.buffer.read()
        else:
            try:
                data = Path(document).read_bytes()
            except OSError as exc:
                raise FormatError(f"cannot read {document}: {exc.strerror}") from None
        report = audit.audit_document(
            data, root=root_cert, at=check_time, archived=archived, policy=policy
        )
        if output is OutputFormat.json:
            stdout.print_json(json.dumps(report.to_json()))
        else:
            _render_plain(report)
        if report.error is not None:
            raise report.error
    except CapeError as exc:
        _fail(exc)


@app.command()
def serve(
    ctx: typer.Context,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            metavar="FILE",
            help="A node's settings in TOML (docs: Running a cluster); CAPE_* variables and "
            "the flags given here override it.",
        ),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            metavar="URL",
            help="Metadata database: sqlite:///PATH (default: in the data directory) or "
            "postgresql+psycopg://USER:PASSWORD@HOST/DB.",
        ),
    ] = None,
    blob_store: Annotated[
        str | None,
        typer.Option(
            "--blob-store",
            metavar="URL",
            help="Bundle store: a directory (default: in the data directory) or "
            "s3://BUCKET[/PREFIX].",
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Where the platform keeps its state (default $CAPE_DATA_DIR or "
            "~/.local/share/cape).",
        ),
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="Port (0 picks a free one).")
    ] = 8443,
    enclaves: Annotated[
        int, typer.Option("--enclaves", min=1, max=64, help="Enclave processes to run.")
    ] = 2,
    idle_timeout: Annotated[
        float,
        typer.Option("--idle-timeout", min=60, help="Seconds before an idle session is closed."),
    ] = 120.0,
    sandbox_uids: Annotated[
        str,
        typer.Option(
            "--sandbox-uids",
            metavar="START-END",
            help="Host uids for sandboxes; must lie outside every range in /etc/passwd, "
            "/etc/group, /etc/subuid, /etc/subgid and /etc/login.defs (checked at start).",
        ),
    ] = "2000000000-2000049999",
    max_input_mib: Annotated[
        int,
        typer.Option("--max-input-mib", min=1, max=1024, help="Largest function input, in MiB."),
    ] = 64,
    no_run: Annotated[
        bool,
        typer.Option(
            "--no-run",
            help="Start even where user code cannot be sandboxed (no bubblewrap or user "
            "namespaces): keys and deploys only, every run is refused.",
        ),
    ] = False,
    limit: Annotated[
        list[str] | None,
        typer.Option(
            "--limit",
            metavar="NAME=VALUE",
            help="Change a server limit, e.g. sessions_per_user=8 (repeatable; every name and "
            "default is in docs/limits.md).",
        ),
    ] = None,
    signup: Annotated[
        str,
        typer.Option(
            "--signup",
            metavar="open|invite|closed",
            help="Who may sign up: anyone, holders of a `cape admin invite` code, or nobody.",
        ),
    ] = "open",
    signup_rate: Annotated[
        int,
        typer.Option(
            "--signup-rate", min=0, help="Signups per hour from one client address (0: no limit)."
        ),
    ] = DEFAULT_SIGNUPS_PER_HOUR,
    forwarded_allow_ips: Annotated[
        str,
        typer.Option(
            "--forwarded-allow-ips",
            metavar="IPS",
            help="Trust X-Forwarded-For only from these proxies (comma-separated addresses or "
            "networks, * for any); default none.",
        ),
    ] = "",
) -> None:
    """Run the whole platform on this machine: HTTPS/WSS API, key service, enclaves.

    Simulated mode: no hardware guarantee. Prints `Ready: https://HOST:PORT` once it accepts
    connections and records the URL and CA for this user's `cape` commands. Refuses to start
    where user code cannot be sandboxed (see --no-run) and when another `cape serve` uses the
    data directory. Stop it with Ctrl-C or SIGTERM (to it or its whole process group);
    sessions in progress finish first.
    """
    from cape.host.signup import SignupMode
    from cape.platform.config import load_settings
    from cape.platform.serve import ServeConfig, default_data_dir
    from cape.platform.serve import serve as run_server

    try:
        if signup not in SignupMode.__members__:
            raise UsageError(f"--signup must be open, invite or closed, not {signup[:40]!r}")
        given = {  # flag name -> setting name: only what the command line set overrides
            "data_dir": "data_dir",
            "host": "host",
            "port": "port",
            "enclaves": "enclaves",
            "idle_timeout": "idle_timeout_s",
            "signup": "signup",
            "signup_rate": "signup_rate",
            "forwarded_allow_ips": "trusted_proxies",
            "database_url": "database_url",
            "blob_store": "blob_store",
            "sandbox_uids": "sandbox_uids",
            "max_input_mib": "max_input_bytes",
            "no_run": "run_functions",
            "limit": "limits",
        }
        flags = {
            setting: ("--" + flag.replace("_", "-"), ctx.params[flag])
            for flag, setting in given.items()
            if getattr(ctx.get_parameter_source(flag), "name", "") == "COMMANDLINE"
        }
        if "data_dir" in flags:
            flags["data_dir"] = ("--data-dir", str(flags["data_dir"][1]))
        if "max_input_bytes" in flags:
            flags["max_input_bytes"] = ("--max-input-mib", max_input_mib << 20)
        if "run_functions" in flags:
            flags["run_functions"] = ("--no-run", not no_run)
        settings = load_settings(config_file, flags=flags)
        settings.setdefault("data_dir", default_data_dir())
        config = ServeConfig(**settings)
        run_server(config)
    except CapeError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(CapeError(f"cannot serve: {exc.strerror or exc}"))


def cli_root() -> Any:
    """The click command tree typer builds from :data:`app`, with flags shown as flags: no
    ``<bool>`` type beside ``--verbose`` and the like in ``-h`` (and the CLI reference)."""
    import typer.main

    root = typer.main.get_command(app)

    def flag(param: Any) -> Any:
        if param is not None and getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        return param

    def fix(command: Any) -> None:
        for param in command.params:
            flag(param)
        help_option = command.get_help_option
        command.get_help_option = lambda ctx: flag(help_option(ctx))
        for sub in getattr(command, "commands", {}).values():
            fix(sub)

    fix(root)
    help_flags = {"help_option_names": ["-h", "--help"]}
    root.context_settings = {**help_flags, **(root.context_settings or {})}
    return root


def main() -> None:
    """Console-script entry point.

    Commands turn every failure into one ``Error: …`` line and exit 1 (see
    :mod:`cape.cli.common`); bad usage is one ``Error: …`` line too, with exit status 2. A
    reader that goes away (``cape key | head -1``) ends the command quietly.
    """
    try:
        code = cli_root().main(prog_name="cape", standalone_mode=False)
    except BrokenPipeError:
        quiet_stdout()
        sys.exit(141)  # 128 + SIGPIPE, as a shell reports a command killed by it
    except Exception as exc:
        show = getattr(exc, "format_message", None)
        exit_code = getattr(exc, "exit_code", None)
        if not callable(show) or not isinstance(exit_code, int):
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":  # `cape token`: typer showed the help
            sys.exit(2)
        command = " ".join(sys.argv[1:2]) or "COMMAND"
        text = " ".join(str(show()).split()).replace("Value error, ", "")
        stderr.print(f"Error: {text} (see `cape {command} -h`)", markup=False)
        sys.exit(exit_code)
    sys.exit(code if isinstance(code, int) else 0)
