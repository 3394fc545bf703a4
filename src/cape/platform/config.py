"""A node's configuration file (``cape serve --config cape.toml``), environment and flags.

Every setting has one name, used three ways, later ones winning:

1. the TOML file: ``name = value`` at the top level (see ``docs/cluster.md``);
2. the environment: ``CAPE_`` + the name in capitals (``CAPE_DATABASE_URL``); a list is
   comma-separated there;
3. the command line flags ``cape serve`` was given explicitly.

Without any of them a node is the embedded single machine: SQLite and a blob directory in the
data directory, the local TLS CA, the built-in key service. An unknown name, a value of the
wrong type or an invalid value is one :class:`~cape.errors.FormatError` naming the setting and
where it came from, before anything starts.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cape.errors import FormatError
from cape.host.signup import SignupMode
from cape.host.store.backends import check_database_url
from cape.platform.limits import ServerLimits, parse_limits

__all__ = ["ENV_PREFIX", "SETTINGS", "Setting", "load_settings"]

ENV_PREFIX: Final = "CAPE_"


def _int(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"an integer from {low} to {high}")
        return value

    return check


def _float(low: float) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"a number of at least {low}") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
            raise ValueError(f"a number of at least {low}")
        return float(value)

    return check


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value or not value.isprintable():
        raise ValueError("a non-empty string")
    return value


def _path(value: Any) -> Path:
    return Path(_text(value)).expanduser()


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(" or ".join(choices))
        return str(value)

    return check


def _bool(value: Any) -> bool:
    if isinstance(value, str) and value.strip().lower() in {"true", "false", "1", "0"}:
        return value.strip().lower() in {"true", "1"}
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def _signup(value: Any) -> SignupMode:
    return SignupMode(_choice(*SignupMode.__members__)(value))


def _list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError("a list of strings")
    return tuple(value)


def _proxies(value: Any) -> tuple[str, ...]:
    from cape.platform.serve import parse_forwarded_allow_ips

    try:
        return parse_forwarded_allow_ips(",".join(_list(value)))
    except FormatError as exc:
        raise ValueError(str(exc).removeprefix("--forwarded-allow-ips: ")) from None


def _limits(value: Any) -> ServerLimits:
    try:
        return parse_limits(_list(value))
    except FormatError as exc:
        raise ValueError(f"NAME=VALUE server limits: {exc}") from None


def _database_url(value: Any) -> str:
    try:
        return check_database_url(_text(value))
    except FormatError as exc:
        raise ValueError(str(exc).removeprefix("database_url: ")) from None


def _blob_store(value: Any) -> str:
    text = _text(value)
    if "://" in text and not text.startswith(("s3://", "file://")):
        raise ValueError("a directory, file://PATH or s3://BUCKET[/PREFIX]")
    return text


def _key_service_url(value: Any) -> str:
    from cape.kms.client import check_key_service_url

    try:
        return check_key_service_url(_text(value))
    except FormatError as exc:
        raise ValueError(str(exc).removeprefix("the key service URL must be ")) from None


def _pin(value: Any) -> str:
    from cape.kms.client import parse_pin

    try:
        return parse_pin(_text(value))
    except FormatError:
        raise ValueError("sha256: and 64 hex digits (cape kms serve prints it)") from None


_NITRO_KEYS: Final = {
    "eif": "eif",
    "aws_root": "aws_root",
    "region": "region",
    "account_id": "account_id",
    "admin_role_arn": "admin_role_arn",
    "enclave_role_arn": "enclave_role_arn",
    "cpu_count": "cpu_count",
    "memory_mib": "memory_mib",
}


def _nitro(value: Any) -> Any:
    """A ``[nitro]`` table: ``cape serve --enclave nitro``'s options (docs/deploy-aws.md)."""
    from cape.platform.nitro import NitroOptions

    if not isinstance(value, dict):
        raise ValueError("a [nitro] table (it cannot come from the environment)")
    unknown = sorted(set(value) - set(_NITRO_KEYS))
    missing = sorted(set(_NITRO_KEYS) - {"cpu_count", "memory_mib"} - set(value))
    if unknown or missing:
        raise ValueError(
            f"a table of {', '.join(_NITRO_KEYS)}"
            + (f"; unknown {', '.join(unknown)}" if unknown else "")
            + (f"; missing {', '.join(missing)}" if missing else "")
        )
    return NitroOptions(
        eif=_path(value["eif"]),
        aws_root=_path(value["aws_root"]),
        region=_text(value["region"]),
        account_id=_text(value["account_id"]),
        admin_role_arn=_text(value["admin_role_arn"]),
        enclave_role_arn=_text(value["enclave_role_arn"]),
        cpu_count=_int(1, 256)(value.get("cpu_count", 2)),
        memory_mib=_int(64, 1 << 24)(value.get("memory_mib", 2048)),
    )


@dataclass(frozen=True)
class Setting:
    """One setting: the :class:`~cape.platform.serve.ServeConfig` field it fills, its check."""

    field: str
    check: Callable[[Any], Any]
    help: str


SETTINGS: Final[Mapping[str, Setting]] = {
    "data_dir": Setting("data_dir", _path, "the node's own state (TLS, keys unless shared)"),
    "node_name": Setting("node_name", _text, "this node's name in logs and metrics"),
    "host": Setting("host", _text, "the address to listen on"),
    "port": Setting("port", _int(0, 65535), "the port (0: a free one)"),
    "enclaves": Setting("enclaves", _int(1, 64), "enclave processes to run"),
    "idle_timeout_s": Setting("idle_timeout_s", _float(60), "seconds before idle sessions end"),
    "max_input_bytes": Setting("max_input_bytes", _int(1, 1 << 40), "largest run input"),
    "limits": Setting("limits", _limits, "server limits as NAME=VALUE (docs/limits.md)"),
    "signup": Setting("signup", _signup, "open, invite or closed"),
    "signup_rate": Setting("signups_per_hour", _int(0, 1 << 31), "signups per hour per address"),
    "trusted_proxies": Setting("forwarded_allow_ips", _proxies, "trusted X-Forwarded-For sources"),
    "database_url": Setting("database_url", _database_url, "sqlite:///… or postgresql+psycopg://…"),
    "blob_store": Setting("blob_store", _blob_store, "a directory or s3://BUCKET[/PREFIX]"),
    "blob_endpoint_url": Setting("blob_endpoint_url", _text, "an S3-compatible store's URL"),
    "tls_cert": Setting("tls_cert", _path, "the operator's certificate chain (PEM)"),
    "tls_key": Setting("tls_key", _path, "its private key (PEM)"),
    "attestation_dir": Setting("attestation_dir", _path, "the simulated attestation root"),
    "kms_dir": Setting("kms_dir", _path, "the built-in key service's database and master key"),
    "auth_dir": Setting("auth_dir", _path, "the token signing key's directory"),
    "image_signing_dir": Setting("image_signing_dir", _path, "the runtime image-signing key"),
    "key_service_url": Setting(
        "key_service_url", _key_service_url, "the network key service (cape kms serve)"
    ),
    "key_service_pin": Setting("key_service_pin", _pin, "its certificate pin, sha256:HEX"),
    "key_service_token_file": Setting(
        "key_service_token_file", _path, "the file holding the shared node token"
    ),
    "log_format": Setting("log_format", _choice("text", "json"), "text or json lines"),
    "sandbox_uids": Setting("sandbox_uids", _text, "uids for sandboxed functions (FIRST-LAST)"),
    "sandbox_start": Setting(
        "sandbox_start", _choice("auto", "bubblewrap"), "auto (zygote where possible) or bubblewrap"
    ),
    "run_functions": Setting("run_functions", _bool, "false: serve but run no functions"),
    "nitro": Setting("nitro", _nitro, "a [nitro] table: run on AWS Nitro Enclaves"),
}


def _apply(
    out: dict[str, Any],
    name: str,
    value: Any,
    origin: str,
    settings: Mapping[str, Setting] = SETTINGS,
) -> None:
    setting = settings.get(name)
    if setting is None:
        raise FormatError(
            f"{origin}: unknown setting {name[:60]!r} (known: {', '.join(sorted(settings))})"
        )
    try:
        out[setting.field] = setting.check(value)
    except ValueError as exc:
        raise FormatError(f"{origin}: {name} must be {exc}") from None


def load_settings(
    path: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, tuple[str, Any]] | None = None,
    settings: Mapping[str, Setting] = SETTINGS,
    env_prefix: str = ENV_PREFIX,
) -> dict[str, Any]:
    """The :class:`~cape.platform.serve.ServeConfig` fields that the file, the environment and
    the flags set (keyed by field name; the rest keep their defaults).

    ``flags`` maps setting names to ``(flag, value)`` as the command line gave them.
    ``settings`` and ``env_prefix`` name another command's settings (``cape kms serve``'s,
    :mod:`cape.platform.kms_serve`).

    Raises:
        FormatError: an unreadable file, bad TOML, an unknown setting or an invalid value;
            or a TLS certificate without its key (or the reverse).
    """
    out: dict[str, Any] = {}
    if path is not None:
        try:
            document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise FormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise FormatError(f"{path}: not valid TOML: {exc}") from None
        for name, value in document.items():
            if isinstance(value, dict) and not (name == "nitro" and name in settings):
                raise FormatError(f"{path}: [{name[:60]}]: settings are top-level names")
            _apply(out, name, value, str(path), settings)
    environ = os.environ if env is None else env
    for name in settings:
        variable = env_prefix + name.upper()
        if variable in environ:
            _apply(out, name, environ[variable], variable, settings)
    for name, (flag, value) in (flags or {}).items():
        _apply(out, name, value, flag, settings)
    if ("tls_cert" in out) != ("tls_key" in out):
        raise FormatError("tls_cert and tls_key go together: set both or neither")
    if settings is SETTINGS:
        _check_key_service(out)
    return out


_KEY_SERVICE: Final = ("key_service_url", "key_service_pin", "key_service_token_file")


def _check_key_service(out: Mapping[str, Any]) -> None:
    """A network key service needs its URL, pin and token; it replaces the built-in key
    service and attestation root, so their directories cannot be set beside it."""
    given = [name for name in _KEY_SERVICE if name in out]
    if given and len(given) != len(_KEY_SERVICE):
        missing = ", ".join(name for name in _KEY_SERVICE if name not in out)
        raise FormatError(
            f"{', '.join(given)} set without {missing}: a node reaching cape kms serve needs "
            "key_service_url, key_service_pin and key_service_token_file"
        )
    if given:
        local = ("kms_dir", "attestation_dir", "image_signing_dir")
        clash = [name for name in local if name in out]
        if clash:
            raise FormatError(
                f"{', '.join(clash)} cannot be set with key_service_url: the key service "
                "(cape kms serve) keeps the keys, the attestation root and the runtime signer"
            )
