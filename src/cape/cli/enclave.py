"""``cape enclave build|describe``: the enclave image (EIF) a Nitro parent boots.

Release tooling for operators: ``build`` turns nitro-cli's boot blobs and a root filesystem
into a reproducible (optionally signed) image; ``describe`` checks an image (structure, CRC,
signature) and prints the PCRs clients pin.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cape.cli.common import Common, UsageError, command, emit_json, stderr
from cape.errors import FormatError

if TYPE_CHECKING:
    from cape.crypto.eif_signature import ImageSigner, SignerIdentity
    from cape.verify.eif import EifDescription

__all__ = ["app", "describe_lines", "load_signer"]

app = typer.Typer(help="Build and inspect enclave images (EIF).", no_args_is_help=True)


def load_signer(
    key: Path | None, cert: Path | None, *, kms_key: str | None = None
) -> ImageSigner | None:
    """An :class:`~cape.crypto.eif_signature.ImageSigner` from PEM files or an AWS KMS key
    (``kms_key``, with the certificate made for it), or ``None``."""
    from cape.crypto.eif_signature import ImageSigner

    if key is None and cert is None and kms_key is None:
        return None
    if key is not None and kms_key is not None:
        raise UsageError("give --sign-key or --sign-kms-key, not both")
    if cert is None:
        raise UsageError(f"{'--sign-kms-key' if kms_key else '--sign-key'} needs --sign-cert")
    if key is None and kms_key is None:
        raise UsageError("--sign-cert needs --sign-key or --sign-kms-key")
    try:
        cert_pem = cert.read_bytes()
        key_pem = key.read_bytes() if key is not None else b""
    except OSError as exc:
        raise FormatError(f"cannot read {exc.filename}: {exc.strerror}") from None
    if kms_key is not None:
        from cape.image.kms import kms_image_signer

        return kms_image_signer(kms_key, cert_pem)
    return ImageSigner.from_pem(key_pem, cert_pem)


def _signed(description: EifDescription) -> str:
    signer = description.signer
    if signer is None:
        return "no"
    return (
        f"yes, by {signer.subject} (certificate valid {signer.not_before.date().isoformat()} "
        f"to {signer.not_after.date().isoformat()})"
    )


def _warn_validity(signer: SignerIdentity | None) -> None:
    problem = signer.validity_problem() if signer is not None else None
    if problem is not None:
        stderr.print(f"Warning: {problem}; nitro-cli refuses to run this image.", markup=False)


def describe_lines(description: EifDescription) -> list[str]:
    """The plain rendering of an :class:`~cape.verify.eif.EifDescription`."""
    meta = description.metadata
    found = meta.get("BuildMetadata")
    build: dict[str, object] = found if isinstance(found, dict) else {}
    lines = [
        f"Image:      {meta.get('ImageName', '?')} {meta.get('ImageVersion', '?')}",
        f"Built:      {build.get('BuildTime', '?')} by {build.get('BuildTool', '?')} "
        f"{build.get('BuildToolVersion', '')}".rstrip(),
        f"Size:       {description.size} bytes, {'aarch64' if description.arm64 else 'x86_64'}",
        "Sections:   " + ", ".join(f"{s.type.label} ({s.size})" for s in description.sections),
        f"Signed:     {_signed(description)}",
    ]
    lines += [f"PCR{index}:       {value.hex()}" for index, value in description.pcrs.items()]
    return lines


@command(app, "build", own_output=True, offline=True)
def build(
    common: Common,
    blobs: Annotated[
        Path,
        typer.Option("--blobs", help="nitro-cli boot blobs: bzImage|Image, cmdline, init, nsm.ko."),
    ],
    rootfs: Annotated[
        Path,
        typer.Option("--rootfs", help="Root filesystem: a directory or a docker-save/OCI archive."),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="The image file to write.")],
    sign_key: Annotated[
        Path | None, typer.Option("--sign-key", help="PEM EC private key that signs PCR0.")
    ] = None,
    sign_cert: Annotated[
        Path | None, typer.Option("--sign-cert", help="PEM certificate of the signing key (PCR8).")
    ] = None,
    sign_kms_key: Annotated[
        str | None,
        typer.Option(
            "--sign-kms-key",
            help="AWS KMS key (ARN, id or alias) that signs PCR0, with --sign-cert.",
        ),
    ] = None,
    name: Annotated[str, typer.Option("--name", help="Image name (metadata).")] = "cape-runtime",
    version: Annotated[
        str | None, typer.Option("--version", help="Image version (default: cape's).")
    ] = None,
    build_time: Annotated[
        str | None,
        typer.Option(
            "--build-time", help="RFC 3339 build time (default: SOURCE_DATE_EPOCH, 1970)."
        ),
    ] = None,
) -> None:
    """Build a reproducible enclave image; the same inputs give the same bytes."""
    from cape.image.build import build_image

    signer = load_signer(sign_key, sign_cert, kms_key=sign_kms_key)
    result = build_image(
        blobs=blobs,
        rootfs=rootfs,
        output=output,
        signer=signer,
        name=name,
        version=version,
        build_time=build_time,
    )
    stderr.print(f"Wrote {result.path} ({result.size} bytes)", markup=False)
    _warn_validity(result.signer)
    for index, value in result.pcrs.items():
        sys.stdout.write(f"PCR{index}\t{value.hex()}\n")


@command(app, "describe", offline=True)
def describe(
    common: Common,
    image: Annotated[Path, typer.Argument(help="The enclave image file.")],
) -> None:
    """Check an image (structure, CRC, signature) and print its metadata and PCRs."""
    from cape.verify.eif import describe_eif

    description = describe_eif(image)
    _warn_validity(description.signer)
    if common.json:
        emit_json(description.to_json())
    else:
        sys.stdout.write("\n".join(describe_lines(description)) + "\n")
