"""``cape kms serve|rebind|policy|log``: the key service and its operator commands.

``serve`` runs the key service of a cluster as its own HTTPS service (``cape kms serve
--config kms.toml``; docs/cluster.md). ``rebind`` acts on a data directory on this machine
holding a key service: a ``cape serve`` data directory, or ``cape kms serve``'s on the
key-service machine (stop nothing: the running service sees the change at its next key
request); ``policy`` prints an AWS KMS key policy; ``log`` shows the audit trail rebinds leave.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from cape.cli.common import Common, UsageError, command, emit_json, fail, stderr
from cape.errors import CapeError

__all__ = ["app"]

app = typer.Typer(
    help="The key service: serve it to a cluster, operator commands (release policies).",
    no_args_is_help=True,
)

_DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        metavar="URL",
        envvar="CAPE_KMS_DATABASE_URL",
        help="The key database when cape kms serve keeps it elsewhere (its database_url).",
    ),
]

_DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="The key service's data directory: cape serve's, or cape kms serve's on the "
        "key-service machine (default: CAPE_DATA_DIR, ~/.local/share/cape).",
    ),
]


@app.command("serve")
def serve(
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            metavar="FILE",
            help="Settings in TOML (listen, data_dir, database_url, tls_cert, tls_key, "
            "node_token_file); CAPE_KMS_* variables and the flags given here override it.",
        ),
    ] = None,
    listen: Annotated[
        str | None,
        typer.Option(
            "--listen", metavar="HOST:PORT", help="Where to serve HTTPS (127.0.0.1:7443)."
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Master key, attestation root, runtime signer, default key database "
            "(default: ~/.local/share/cape/kms-service).",
        ),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            metavar="URL",
            help="The key database: sqlite:///PATH or postgresql+psycopg://… (default: SQLite "
            "in the data directory).",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option("--tls-cert", help="The operator's certificate (default: self-signed)."),
    ] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="Its private key.")] = None,
    node_token_file: Annotated[
        Path | None,
        typer.Option("--node-token-file", help="File holding the secret nodes present."),
    ] = None,
) -> None:
    """Serve the key service to a cluster's nodes over HTTPS (pinned; node token required).

    Holds the master key, every user's Cape key, the cluster's attestation root and the
    simulated runtime's signer; nodes hold none of them. Prints the certificate pin nodes
    configure (key_service_pin) and `Ready: https://HOST:PORT`. Simulated mode: no hardware
    guarantee. Stop it with Ctrl-C or SIGTERM.
    """
    from cape.platform.kms_serve import load_kms_config, serve_kms

    given = {
        "listen": ("--listen", listen),
        "data_dir": ("--data-dir", None if data_dir is None else str(data_dir)),
        "database_url": ("--database-url", database_url),
        "tls_cert": ("--tls-cert", None if tls_cert is None else str(tls_cert)),
        "tls_key": ("--tls-key", None if tls_key is None else str(tls_key)),
        "node_token_file": (
            "--node-token-file",
            None if node_token_file is None else str(node_token_file),
        ),
    }
    flags = {name: value for name, value in given.items() if value[1] is not None}
    try:
        serve_kms(load_kms_config(config_file, flags=flags))
    except CapeError as exc:
        fail(exc)
    except OSError as exc:
        fail(CapeError(f"cannot serve: {exc.strerror or exc}"))


def _data_dir(value: Path | None) -> Path:
    from cape.platform.serve import default_data_dir

    return value if value is not None else default_data_dir()


def _pcr(text: str, what: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise UsageError(f"{what} must be hex") from None
    if len(value) != 48:
        raise UsageError(f"{what} must be 48 bytes (96 hex digits), got {len(value)}")
    return value


@command(app, "rebind", offline=True)
def rebind(
    common: Common,
    to: Annotated[
        str, typer.Option("--to", help="New policy kind: signer (PCR8) or measurement (PCR0-2).")
    ] = "signer",
    eif: Annotated[
        Path | None,
        typer.Option(
            "--eif", help="The new, signed runtime image (default: the installed runtime)."
        ),
    ] = None,
    cert: Annotated[
        Path | None,
        typer.Option(
            "--cert", help="Expected signing certificate (default: the data directory's)."
        ),
    ] = None,
    role: Annotated[
        str | None, typer.Option("--role", help="Parent role ARN to pin as PCR3 (signer policies).")
    ] = None,
    owner: Annotated[
        list[str] | None, typer.Option("--owner", help="Only this owner's key; repeatable.")
    ] = None,
    include_signer_keys: Annotated[
        bool,
        typer.Option("--include-signer-keys", help="Also move keys already bound to a signer."),
    ] = False,
    reason: Annotated[
        str, typer.Option("--reason", help="Why (kept in the audit log).")
    ] = "cape kms rebind",
    data_dir: _DataDir = None,
    database_url: _DatabaseUrl = None,
) -> None:
    """Move keys to a signer policy or a new measurement, once the new runtime is proven signed."""
    from cape.platform.operator import KINDS, rebind_keys

    if to not in KINDS:
        raise UsageError(f"--to must be one of {', '.join(KINDS)}")
    report = rebind_keys(
        _data_dir(data_dir),
        to=to,
        eif=eif,
        expected_cert=cert,
        role_arn=role,
        owners=owner,
        include_signer_keys=include_signer_keys,
        reason=reason,
        database_url=database_url,
    )
    if common.json:
        emit_json(
            {
                "policy": report.policy.to_json(),
                "kind": report.policy.kind,
                "signer": report.signer.subject,
                "moved": [key.owner for key in report.moved],
            }
        )
        return
    stderr.print(
        f"Moved {len(report.moved)} key(s) to a {report.policy.kind} policy "
        f"(signer {report.signer.subject}).",
        markup=False,
    )
    sys.stdout.write("".join(f"{key.owner}\n" for key in report.moved))


@command(app, "policy", offline=True)
def policy(
    common: Common,
    aws: Annotated[
        bool, typer.Option("--aws", help="Print an AWS KMS key policy (the only format).")
    ] = False,
    pcr8: Annotated[
        str | None, typer.Option("--pcr8", help="PCR8 of the image signer (hex).")
    ] = None,
    role: Annotated[
        str | None, typer.Option("--role", help="Parent instances' role ARN (pins PCR3).")
    ] = None,
    account: Annotated[str | None, typer.Option("--account", help="AWS account id.")] = None,
    admin_role: Annotated[
        str | None, typer.Option("--admin-role", help="Role that manages the key (no decrypt).")
    ] = None,
) -> None:
    """Print the AWS KMS key policy that releases keys only to images of one signer."""
    from cape.platform.operator import aws_signer_policy

    if not aws:
        raise UsageError("only --aws policies can be printed")
    if pcr8 is None:
        raise UsageError("--pcr8 is required (`cape enclave describe IMAGE` prints it)")
    emit_json(
        aws_signer_policy(
            _pcr(pcr8, "--pcr8"), account_id=account, role_arn=role, admin_role_arn=admin_role
        )
    )


@command(app, "log", offline=True)
def log(common: Common, data_dir: _DataDir = None, database_url: _DatabaseUrl = None) -> None:
    """The key service's audit log of operator actions (rebinds)."""
    from cape.platform.operator import key_log

    entries = key_log(_data_dir(data_dir), database_url=database_url)
    if common.json:
        listed = [
            {
                "at": e.at.isoformat(),
                "actor": e.actor,
                "action": e.action,
                "owner": e.owner,
                "key_id": e.key_id,
                "old_policy": e.old_policy,
                "new_policy": e.new_policy,
                "reason": e.reason,
            }
            for e in entries
        ]
        emit_json({"entries": listed, "count": len(listed)})
        return
    for e in entries:
        sys.stdout.write(f"{e.at.isoformat()}\t{e.actor}\t{e.action}\t{e.owner}\t{e.reason}\n")
