"""The ``cape`` command line.

Output rules: results go to stdout, messages to stderr. Every failure is one line
``Error: <diagnostics>`` on stderr and exit status 1; bad usage exits 2; ``-v`` adds the
traceback. The CLI parses, calls the SDK and renders; it holds no crypto and decides no trust.
There is deliberately no ``cape decrypt``: only attested enclaves decrypt.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from cape import __version__
from cape.cli import account, admin, enclave, functions, kms, nitro
from cape.cli.attestation import attestation_app
from cape.cli.attestation import attestation_verify as attestation_verify
from cape.cli.common import (
    Common,
    UsageError,
    command,
    emit_json,
    fail,
    quiet_stdout,
    set_verbose,
    stderr,
    stdout,
)
from cape.cli.encrypt import encrypt as encrypt
from cape.errors import CapeError
from cape.host.ratelimit import DEFAULT_SIGNUPS_PER_HOUR

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
app.add_typer(attestation_app, name="attestation")
app.add_typer(account.app)
app.add_typer(functions.app)
app.add_typer(admin.app, name="admin")
app.add_typer(enclave.app, name="enclave")
app.add_typer(kms.app, name="kms")
app.add_typer(nitro.app)  # cape doctor


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


# `cape encrypt` lives in cli/encrypt.py; registered here, so it stays second in `cape -h`.
command(app, "encrypt", own_output=True)(encrypt)


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
            "s3://BUCKET\\[/PREFIX].",
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
    enclave_mode: Annotated[
        str,
        typer.Option(
            "--enclave",
            metavar="simulated|nitro",
            help="simulated (this machine) or nitro (AWS Nitro Enclaves from --eif on an EC2 "
            "parent instance, calling AWS KMS themselves; docs/deploy-aws.md).",
        ),
    ] = "simulated",
    eif: Annotated[Path | None, typer.Option("--eif", help="Nitro: the enclave image.")] = None,
    enclave_cpus: Annotated[int, typer.Option("--enclave-cpus", min=1, help="Nitro: vCPUs.")] = 2,
    enclave_memory: Annotated[
        int, typer.Option("--enclave-memory", min=64, help="Nitro: memory per enclave, MiB.")
    ] = 2048,
    aws: Annotated[
        list[str] | None,
        typer.Option(
            "--aws",
            metavar="KEY=VALUE",
            help="Nitro: root=FILE (AWS_NitroEnclaves_Root-G1.pem), region, account, "
            "admin-role-arn, enclave-role-arn; repeat the option for each.",
        ),
    ] = None,
) -> None:
    """Run the whole platform on this machine: HTTPS/WSS API, key service, enclaves.

    Simulated mode: no hardware guarantee. Prints `Ready: https://HOST:PORT` once it accepts
    connections and records the URL and CA for this user's `cape` commands. Refuses to start
    where user code cannot be sandboxed (see --no-run) and when another `cape serve` uses the
    data directory. Stop it with Ctrl-C or SIGTERM (to it or its whole process group);
    sessions in progress finish first.
    """
    from cape.cli.nitro import nitro_options
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
        nitro_given = any(  # the command line wins over a config file's [nitro] table
            getattr(ctx.get_parameter_source(flag), "name", "") == "COMMANDLINE"
            for flag in ("enclave_mode", "eif", "aws")
        )
        if nitro_given:
            config.nitro = nitro_options(enclave_mode, eif, enclave_cpus, enclave_memory, aws or [])
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
