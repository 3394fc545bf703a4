"""Operator commands: ``cape admin invite create|list|revoke``.

They work on a server's data directory (``--data-dir``, default as ``cape serve``'s), not over
the API: whoever can read that directory runs the server, so no account or token is involved.
A running ``cape serve`` sees new and revoked invites at once (they live in its metadata
database). An invite code is printed once, on stdout, and stored only as a hash.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cape._internal.timefile import utc_now
from cape.cli.account import parse_duration
from cape.cli.common import (
    Column,
    OutputFormat,
    UsageError,
    emit_json,
    fail,
    print_table,
    stderr,
    stdout,
)
from cape.errors import CapeError
from cape.host.signup import DEFAULT_INVITE_TTL, Invites

if TYPE_CHECKING:  # SQLAlchemy and the store load only when an admin command runs
    from cape.host.store.invites import Invite

__all__ = ["app"]

app = typer.Typer(
    help="Operator commands on a server's data directory (run them where `cape serve` runs).",
    no_args_is_help=True,
)
invite_app = typer.Typer(
    help="Invite codes for `cape serve --signup invite`: single-use and expiring.",
    no_args_is_help=True,
)
app.add_typer(invite_app, name="invite")

METADATA_FILE = "metadata.sqlite3"

_DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="The server's data directory (default $CAPE_DATA_DIR or ~/.local/share/cape).",
    ),
]
_Output = Annotated[
    OutputFormat, typer.Option("-o", "--output", help="Output format.", case_sensitive=False)
]


@contextlib.contextmanager
def _invites(data_dir: Path | None) -> Iterator[Invites]:
    """The invites of the server whose data directory is ``data_dir`` (which must exist)."""
    from cape.host.store.invites import InviteStore
    from cape.host.store.metadata import SqlMetadataStore
    from cape.platform.serve import default_data_dir

    directory = data_dir or default_data_dir()
    database = directory / METADATA_FILE
    if not database.is_file():
        raise CapeError(
            f"{directory} is not a Cape data directory (no {METADATA_FILE}); "
            "pass the --data-dir that `cape serve` uses"
        )
    with SqlMetadataStore(f"sqlite:///{database}") as store:
        yield Invites(InviteStore(store))


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """Every failure as one ``Error:`` line (the client commands get this from ``command``)."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except CapeError as exc:
        fail(exc)
    except OSError as exc:
        fail(CapeError(f"cannot use the data directory: {exc.strerror or exc}"))
    except SQLAlchemyError as exc:
        fail(CapeError(f"cannot use the metadata database: {type(exc).__name__}"))


def _invite_json(invite: Invite, state: str) -> dict[str, object]:
    return {
        "id": invite.id,
        "state": state,
        "note": invite.note,
        "created_at": invite.created_at.isoformat(),
        "expires_at": invite.expires_at.isoformat(),
        "used_at": None if invite.used_at is None else invite.used_at.isoformat(),
        "used_by": invite.used_by,
    }


def _when(moment: object) -> str:
    return "" if moment is None else f"{moment:%Y-%m-%d %H:%M}Z"


@invite_app.command("create")
def invite_create(
    data_dir: _DataDir = None,
    expires_in: Annotated[
        str, typer.Option("--expires-in", "-e", help="Lifetime, e.g. 1h, 7d (at most 366d).")
    ] = f"{DEFAULT_INVITE_TTL.days}d",
    note: Annotated[
        str, typer.Option("--note", "-n", help="Who it is for (shown by `list`).")
    ] = "",
    count: Annotated[int, typer.Option("--count", min=1, max=100, help="How many.")] = 1,
    output: _Output = OutputFormat.plain,
) -> None:
    """Make invite codes: each lets one account sign up, once, before it expires.

    Prints one code a line on stdout (shown only now: the server keeps a hash). Give a code to
    its user: `cape signup -u NAME --invite CODE`.
    """
    with _one_line_errors():
        ttl = parse_duration(expires_in, "--expires-in")
        with _invites(data_dir) as invites:
            now = utc_now()
            created = [invites.create(now=now, ttl=ttl, note=note) for _ in range(count)]
        if output is OutputFormat.json:
            emit_json(
                {
                    "invites": [_invite_json(c.invite, "unused") for c in created],
                    "codes": [c.code for c in created],
                }
            )
            return
        for item in created:
            stdout.print(item.code, markup=False)
        stderr.print(
            f"Created {count} invite(s), valid until {_when(created[0].invite.expires_at)}; "
            "each works once. The codes are not shown again.",
            markup=False,
        )


@invite_app.command("list")
def invite_list(data_dir: _DataDir = None, output: _Output = OutputFormat.plain) -> None:
    """List invites (never their codes): state, expiry, who used them."""
    with _one_line_errors():
        with _invites(data_dir) as invites:
            listed = invites.list()
        now = utc_now()
        if output is OutputFormat.json:
            invites_json = [_invite_json(i, i.state(now=now)) for i in listed]
            emit_json({"invites": invites_json, "count": len(invites_json)})
            return
        if not listed:
            stderr.print("No invites.", markup=False)
            return
        columns = [
            Column("ID", keep=True),
            Column("State", keep=True),
            Column("Created", rank=0),
            Column("Expires", rank=2),
            Column("Used By", rank=3),
            Column("Note", rank=1),
        ]
        rows = [
            [
                invite.id,
                invite.state(now=now),
                _when(invite.created_at),
                _when(invite.expires_at),
                invite.used_by or ("(deleted account)" if invite.used_at else ""),
                invite.note,
            ]
            for invite in listed
        ]
        print_table(columns, rows)


@invite_app.command("revoke")
def invite_revoke(
    invite_id: Annotated[str, typer.Argument(metavar="ID", help="The invite's id (from list).")],
    data_dir: _DataDir = None,
) -> None:
    """Revoke an invite: its code stops working at once."""
    with _one_line_errors():
        if not invite_id.strip():
            raise UsageError("give the id of the invite to revoke (see `cape admin invite list`)")
        with _invites(data_dir) as invites:
            invites.revoke(invite_id.strip())
        stderr.print(f"Revoked invite {invite_id.strip()}", markup=False)
