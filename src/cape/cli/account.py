"""Account commands: signup, login, logout, key, token …, config, pcrs."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from cape.cli.common import Column, Common, UsageError, command, emit_json, print_table, stderr
from cape.errors import CapeError
from cape.verify.roots import fingerprint

__all__ = ["app", "parse_duration"]

app = typer.Typer()
token_app = typer.Typer(
    help="Create, list and delete personal access tokens.", no_args_is_help=True
)
app.add_typer(token_app, name="token")

_Username = Annotated[str, typer.Option("--username", "-u", help="Account name.")]
_PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from stdin.")
]
_TrustRoot = Annotated[
    str | None,
    typer.Option(
        "--trust-root",
        metavar="SHA256",
        help="Pin the server's attestation root if its SHA-256 fingerprint is this "
        "(get it from the operator: `cape serve` prints it).",
    ),
]
_Pcr = Annotated[
    list[str] | None,
    typer.Option("--pcr", "-p", help="Allowed PCR value I:HEX; repeat to allow several."),
]


def pcr_option(values: list[str] | None) -> dict[int, list[bytes]]:
    from cape.verify.policy import parse_pcr_pin

    pins: dict[int, list[bytes]] = {}
    for text in values or []:
        for part in text.split(","):
            try:
                index, value = parse_pcr_pin(part.strip())
            except CapeError as exc:
                raise UsageError(f"--pcr: {exc.diagnostics()}") from None
            pins.setdefault(index, []).append(value)
    return pins


def _password(password_stdin: bool) -> str:
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = typer.prompt("Password", hide_input=True, err=True)
    else:
        raise UsageError("pass the password on stdin with --password-stdin")
    if not password:
        raise UsageError("no password given")
    return password


def _account(
    common: Common,
    action: str,
    username: str,
    password_stdin: bool,
    trust_root: str | None,
    invite: str | None = None,
) -> None:
    if trust_root is not None:
        from cape.sdk.client import normalize_fingerprint

        try:
            trust_root = normalize_fingerprint(trust_root)
        except CapeError as exc:
            raise UsageError(f"--trust-root: {exc.diagnostics()}") from None
    password = _password(password_stdin)
    cape = common.client()
    if trust_root is not None:
        cert = cape.trust_root(trust_root)
        stderr.print(f"Pinned the attestation root {cert.subject.rfc4514_string()}", markup=False)
    if action == "signup":
        cape.signup(username, password, invite=invite)
    else:
        cape.login(username, password)
    stderr.print(f"Logged in as {username} at {cape.url}", markup=False)
    fp = ""
    try:
        cape.root()
    except CapeError:
        fp = fingerprint(cape.server_root())
        if sys.stdin.isatty() and not password_stdin:
            prompt = (
                f"The attestation root of {cape.url} has SHA-256 fingerprint\n  {fp}\n"
                "Does it match the one your operator published? Pin it"
            )
            if typer.confirm(prompt, default=False, err=True):
                cape.trust_root(fp)
                stderr.print("Pinned.", markup=False)
    try:
        cape.root()
    except CapeError:
        stderr.print(
            f"Note: the attestation root of {cape.url} is not pinned yet; its fingerprint is "
            f"{fp}. Check it with the operator, then run `cape login --trust-root {fp}`.",
            markup=False,
        )
        key_ok = False
    else:
        try:
            cape.key(refresh=True)
            key_ok = True
        except CapeError as exc:
            stderr.print(
                f"Unable to fetch your Cape key ({exc.diagnostics()}); run `cape key` later",
                markup=False,
            )
            key_ok = False
    if common.json:
        emit_json({"username": username, "url": cape.url, "key_cached": key_ok})


@command(app, "signup")
def signup(
    common: Common,
    username: _Username,
    password_stdin: _PasswordStdin = False,
    trust_root: _TrustRoot = None,
    invite: Annotated[
        str | None,
        typer.Option("--invite", help="Invite code, for a server that takes invited signups."),
    ] = None,
) -> None:
    """Create an account and log in (the token is saved in the config directory)."""
    if invite is not None and not invite.strip():
        raise UsageError("--invite is empty: give the code your operator sent you")
    _account(
        common,
        "signup",
        username,
        password_stdin,
        trust_root,
        None if invite is None else invite.strip(),
    )


@command(app, "login")
def login(
    common: Common,
    username: _Username,
    password_stdin: _PasswordStdin = False,
    trust_root: _TrustRoot = None,
) -> None:
    """Log in with a username and password; then fetch and cache your Cape key."""
    _account(common, "login", username, password_stdin, trust_root)


@command(app, "logout", offline=True)
def logout(common: Common) -> None:
    """Forget the saved login and the cached Cape key."""
    from cape.sdk import config as client_config

    removed = client_config.clear_login()
    if common.json:
        emit_json({"removed": [str(p) for p in removed]})
    else:
        stderr.print("Logged out." if removed else "Not logged in.", markup=False)


@command(app, "key")
def key(
    common: Common,
    username: Annotated[
        str | None, typer.Option("--username", "-u", help="Another user's key, by name.")
    ] = None,
    pcr: _Pcr = None,
    refresh: Annotated[
        bool, typer.Option("--refresh", help="Fetch again even if a key is cached.")
    ] = False,
) -> None:
    """Print your Cape key (PEM), fetched from an attested enclave and cached."""
    from cape.crypto.keys import load_rsa_public_key, public_key_pem

    cape = common.client()
    der = cape.key(username=username, pcrs=pcr_option(pcr), refresh=refresh)
    pem = public_key_pem(load_rsa_public_key(der)).decode("ascii")
    if common.json:
        owner = username or cape.aio.settings.username
        emit_json({"username": owner, "pem": pem, "sha256": hashlib.sha256(der).hexdigest()})
    else:
        sys.stdout.write(pem)


_DURATION = re.compile(r"(\d+)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, option: str = "--expiry") -> dt.timedelta:
    """``300s``, ``1h``, ``1h30m``, ``7d`` (Go-style, plus days) → a positive timedelta;
    errors name ``option``."""
    cleaned = text.strip().lower()
    pos, seconds = 0, 0.0
    for match in _DURATION.finditer(cleaned):
        if match.start() != pos:
            break
        seconds += int(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not cleaned or pos != len(cleaned):
        raise UsageError(f"{option} {text!r} is not a duration like 300s, 1h, 1h30m or 7d")
    if seconds < 1:
        raise UsageError(f"{option} must be at least one second")
    return dt.timedelta(seconds=seconds)


@command(token_app, "create")
def token_create(
    common: Common,
    name: Annotated[str, typer.Option("--name", "-n", help="A name for the token.")],
    description: Annotated[str, typer.Option("--description", "-d")] = "",
    function: Annotated[
        str | None, typer.Option("--function", help="Scope the token to this function id.")
    ] = None,
    expiry: Annotated[
        str | None, typer.Option("--expiry", "-e", help="Lifetime, e.g. 300s, 1h, 7d.")
    ] = None,
) -> None:
    """Create a personal access token (printed once; the server keeps only its metadata)."""
    if not name.strip():
        raise UsageError("token names must not be empty")
    lifetime = parse_duration(expiry) if expiry is not None else None
    created = common.client().create_token(
        name, description=description, function=function, expiry=lifetime
    )
    if common.json:
        emit_json({"id": created.id, "token": created.token})
    else:
        sys.stdout.write(created.token + "\n")


@command(token_app, "list")
def token_list(common: Common) -> None:
    """List your tokens."""
    tokens = common.client().tokens()
    if common.json:
        emit_json({"tokens": [t.__dict__ for t in tokens], "count": len(tokens)})
        return
    if not tokens:
        stderr.print("No tokens found. You can create tokens with cape token create", markup=False)
        return
    columns = [
        Column("ID", keep=True),
        Column("Name", keep=True),
        Column("Description", rank=0),
        Column("Function", rank=4),
        Column("Created At", rank=1),
        Column("Last Used", rank=2),
        Column("Expires", rank=3),
    ]
    rows = [
        [t.id, t.name, t.description, t.function_id or "-", t.created_at,
         t.last_used or "Never", t.expires_at or "Never"]
        for t in tokens
    ]  # fmt: skip
    print_table(columns, rows)


@command(token_app, "delete")
def token_delete(common: Common, token_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Delete (revoke at once) a token."""
    common.client().delete_token(token_id)
    if common.json:
        emit_json({"deleted": token_id})
    else:
        stderr.print(f"Deleted token {token_id}", markup=False)


@command(app, "config", offline=True)
def config(
    common: Common,
    key_name: Annotated[str | None, typer.Argument(metavar="KEY")] = None,
    value: Annotated[str | None, typer.Argument(metavar="VALUE")] = None,
    unset: Annotated[bool, typer.Option("--unset", help="Remove KEY from the presets.")] = False,
) -> None:
    """Show the settings, or set one in presets.json (`cape config url https://…`)."""
    from cape.sdk import config as client_config

    if key_name is None:
        if unset or value is not None:
            raise UsageError("give the KEY to set or unset")
        _show_config(common)
        return
    if unset == (value is not None):
        raise UsageError("give a VALUE to set, or --unset to remove")
    if key_name not in client_config.PRESETS:
        known = ", ".join(client_config.PRESETS)
        raise UsageError(f"unknown setting {key_name!r} (known: {known})")
    if value is not None and key_name == "url" and not value.startswith("https://"):
        raise UsageError("the url must start with https://")
    path = client_config.write_presets({key_name: value})
    if common.json:
        emit_json({"key": key_name, "value": value, "file": str(path)})
    else:
        stderr.print(f"{'Unset' if value is None else 'Set'} {key_name} in {path}", markup=False)


def _show_config(common: Common) -> None:
    """The settings commands would use now, where each comes from, and the saved login."""
    from cape.sdk import config as client_config

    settings = client_config.effective()
    presets = client_config.read_presets()
    login = client_config.saved_login()
    url = settings["url"].value
    login_here = url is not None and client_config.login_matches(
        login, url, client_config.read_serve_record()
    )
    account = {
        "username": login.get("username"),
        "url": login.get("url"),
        "valid_for_url": bool(login.get("access_token")) and login_here,
    }
    if common.json:
        emit_json(
            {
                "config_dir": str(client_config.config_dir()),
                "settings": {
                    name: {"value": setting.value, "source": setting.source}
                    for name, setting in settings.items()
                },
                "presets": presets,
                "login": account if login.get("access_token") else None,
            }
        )
        return
    lines = [f"Config directory: {client_config.config_dir()}", "Settings in effect:"]
    for name, setting in settings.items():
        shown = setting.value if setting.value is not None else "(unset)"
        lines.append(f"  {name:<17} {shown}")
        lines.append(f"  {'':<17} from {setting.source}; {client_config.PRESETS[name]}")
    if login.get("access_token"):
        state = "" if account["valid_for_url"] else " (not for the URL in effect)"
        lines.append(f"Logged in as {login.get('username')} at {login.get('url')}{state}")
    else:
        lines.append("Not logged in.")
    lines.append("Set a preset with `cape config KEY VALUE`, remove it with `--unset`.")
    sys.stdout.write("\n".join(lines) + "\n")


@command(app, "pcrs", offline=True)
def pcrs(
    common: Common,
    eif: Annotated[
        Path | None, typer.Option("--eif", help="Print this enclave image's PCRs instead.")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            envvar="CAPE_DATA_DIR",
            help="A cape serve data directory: add PCR8 of its image-signing key.",
        ),
    ] = None,
) -> None:
    """The PCRs a client should pin for the enclave runtime this installation would start.

    Simulated measurements (SHA-384 over the interpreter and the runtime's code); with
    `--data-dir` (or CAPE_DATA_DIR), also PCR8 of that `cape serve`'s image-signing key; with
    `--eif`, an image's PCR0/1/2 (and PCR8 when signed). Pin them as `--pcr 0:HEX` (one
    build) or `--pcr 8:HEX` (any build of that signer) on `cape run`/`deploy`/`key`.
    """
    if eif is not None:
        from cape.verify.eif import describe_eif

        found = describe_eif(eif).pcrs
    else:
        from cape.platform.local import runtime_pcrs

        found = runtime_pcrs(data_dir)
    values = {f"PCR{index}": value.hex() for index, value in found.items()}
    if common.json:
        emit_json(values)
    else:
        sys.stdout.write("".join(f"{name}\t{value}\n" for name, value in values.items()))
