"""The JSON every ``cape`` command prints with ``-o json``: one document, one shape per command.

:data:`SHAPES` maps each command to the keys of the object it prints (some commands have two
forms, e.g. ``cape config`` showing or setting); :data:`OBJECTS` gives the keys of the objects
that appear inside them, so a function or a token looks the same wherever it is printed.
``scripts/gen_reference.py`` renders both into the CLI reference, and
``tests/e2e/test_cli_consistency.py`` runs every command and checks its output against them.
Values are described as ``type: meaning``.
"""

from __future__ import annotations

from typing import Final

__all__ = ["OBJECTS", "SHAPES"]

Shape = dict[str, str]

OBJECTS: Final[dict[str, Shape]] = {
    "Function": {
        "id": "string: the function id (22 characters)",
        "name": "string: the function's name (`cape list`: without the owner)",
        "checksum": "string or null: hex SHA-256 of the bundle the enclave measured",
        "public": "bool: anyone logged in may run it",
        "created_at": "string: RFC 3339 time",
    },
    "Token": {
        "id": "string: the token id (for `cape token delete`)",
        "name": "string",
        "description": "string",
        "function_id": "string or null: the function the token is scoped to",
        "created_at": "string: RFC 3339 time",
        "expires_at": "string or null: RFC 3339 time",
        "last_used": "string or null: RFC 3339 time",
    },
    "KeyLogEntry": {
        "at": "string: RFC 3339 time",
        "actor": "string",
        "action": "string",
        "owner": "string: the key's owner",
        "key_id": "string",
        "old_policy": "string: the key policy before, as JSON",
        "new_policy": "string: the key policy after, as JSON",
        "reason": "string",
    },
    "Invite": {
        "id": "string: the invite id (for `cape admin invite revoke`; never the code)",
        "state": "string: unused, used or expired (a revoked invite is gone)",
        "note": "string",
        "created_at": "string: RFC 3339 time",
        "expires_at": "string: RFC 3339 time",
        "used_at": "string or null: RFC 3339 time",
        "used_by": "string or null: the account that signed up with it",
    },
}

_LOGIN: Final[Shape] = {
    "username": "string",
    "url": "string: the server logged in to",
    "key_cached": "bool: your Cape key was fetched (attested) and cached",
}
_OUTPUT: Final[Shape] = {
    "output": "string or null: the result as UTF-8 text (null when it is not text)",
    "output_base64": "string: the exact result bytes, base64",
}

SHAPES: Final[dict[str, tuple[Shape, ...]]] = {
    "cape version": ({"version": "string"},),
    "cape signup": (_LOGIN,),
    "cape login": (_LOGIN,),
    "cape logout": ({"removed": "list of strings: the files removed"},),
    "cape key": (
        {"username": "string or null", "pem": "string: the key, PEM", "sha256": "string: hex"},
    ),
    "cape token create": ({"id": "string", "token": "string: shown once"},),
    "cape token list": ({"tokens": "list of Token", "count": "int: how many tokens"},),
    "cape token delete": ({"deleted": "string: the token id"},),
    "cape config": (
        {
            "config_dir": "string",
            "settings": "object: url, ca_file, attestation_root, each {value, source}",
            "presets": "object: what presets.json sets",
            "login": "object or null: {username, url, valid_for_url}",
        },
        {"key": "string", "value": "string or null (--unset)", "file": "string"},
    ),
    "cape pcrs": (
        {"PCR0": "string: hex", "PCR1": "string: hex", "PCR2": "string: hex"},
        {
            "PCR0": "string: hex",
            "PCR1": "string: hex",
            "PCR2": "string: hex",
            "PCR8": "string: hex (--data-dir with an image-signing key, or a signed --eif)",
        },
    ),
    "cape deploy": (
        {
            "id": "string",
            "name": "string: owner/name",
            "checksum": "string",
            "public": "bool",
            "vendored": "list of strings: requirements installed into the bundle",
        },
    ),
    "cape run": ({**_OUTPUT, "attestation": "object: what the session verified"},),
    "cape test": (_OUTPUT,),
    "cape list": (
        {"deployments": "list of Function", "count": "int: all your functions, not the page"},
    ),
    "cape delete": ({"deleted": "string: the function id"},),
    "cape function create": ({"path": "string", "files": "list of strings"},),
    "cape encrypt": ({"ciphertext": "string: the text form", "form": "string: text"},),
    "cape admin invite create": (
        {
            "invites": "list of Invite",
            "codes": "list of strings: each invite's code, in the same order (shown only now)",
        },
    ),
    "cape admin invite list": ({"invites": "list of Invite", "count": "int: how many invites"},),
    "cape enclave describe": (
        {
            "pcrs": "object: PCR index (string) to hex",
            "sections": "list of objects: {type, size}",
            "metadata": "object: the image's metadata section",
            "signed": "bool",
        },
        {
            "pcrs": "object: PCR index (string) to hex",
            "sections": "list of objects: {type, size}",
            "metadata": "object: the image's metadata section",
            "signed": "bool",
            "signer": "object: {subject, not_before, not_after, certificate_valid_now}",
        },
    ),
    "cape kms rebind": (
        {
            "policy": "object: the new key policy",
            "kind": "string: signer or measurement",
            "signer": "string: the signing certificate's subject",
            "moved": "list of strings: the owners whose keys moved",
        },
    ),
    "cape kms policy": (
        {
            "Version": "string: AWS's policy language version",
            "Id": "string",
            "Statement": "list of objects: AWS KMS key policy statements",
        },
    ),
    "cape kms log": ({"entries": "list of KeyLogEntry", "count": "int: how many entries"},),
    "cape attestation verify": (
        {
            "valid": "bool",
            "error": "string or null",
            "error_type": "string or null",
            "checked_at": "string or null",
            "root": "object: {subject, sha256}",
            "document": "object or null: the decoded document",
        },
    ),
}
