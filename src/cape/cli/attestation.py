"""``cape attestation verify``: check an attestation document against a pinned root, offline."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cape.cli.common import OutputFormat, UsageError, fail, stdout
from cape.errors import CapeError, FormatError
from cape.sdk import audit
from cape.verify.policy import AttestationPolicy, parse_pcr_pin, pcr_allow_list
from cape.verify.roots import describe_root, fingerprint, load_root_certificate_file

attestation_app = typer.Typer(
    help="Inspect and verify attestation documents.", no_args_is_help=True
)


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
        fail(exc)
