"""The platform's JWTs: signing, verification and the signing key (Ed25519 ``EdDSA``).

:class:`TokenIssuer` signs and verifies; the key lives in ``data_dir/auth/signing.key``
(0600, created on first use). Claims: ``iss``, ``aud: ["cape-api"]``, ``sub`` (user id),
``jti`` (token id), ``iat``, optional ``exp``, optional ``fn`` (function scope) and ``kind``.
What a verified token may do is :mod:`cape.host.auth`'s business (records, revocation, scope).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cape._internal.timefile import fsync_dir
from cape.errors import KeyFormatError
from cape.host.errors import AuthError
from cape.host.ids import is_id, new_id
from cape.host.store.metadata import TOKEN_KINDS

__all__ = [
    "ALGORITHM",
    "AUDIENCE",
    "DEFAULT_ISSUER",
    "LEEWAY_S",
    "MAX_TOKEN_CHARS",
    "SIGNING_KEY_PATH",
    "TokenClaims",
    "TokenIssuer",
]

ALGORITHM: Final = "EdDSA"
"""The only JWT algorithm we sign with or accept (no ``none``, no HMAC)."""

AUDIENCE: Final = "cape-api"
DEFAULT_ISSUER: Final = "cape"
LEEWAY_S: Final = 30
"""Clock skew tolerated on ``exp``, ``nbf`` and ``iat``."""

MAX_TOKEN_CHARS: Final = 8192
"""Longer bearer strings are refused before parsing (ours are about 400 characters)."""

SIGNING_KEY_PATH: Final = Path("auth") / "signing.key"
"""Where :meth:`TokenIssuer.open` keeps the signing key, relative to the data directory."""

_REQUIRED_CLAIMS: Final = ["iss", "aud", "sub", "jti", "iat", "kind"]

VERIFIED_TOKENS: Final = 4096
"""Token strings whose signature and claims' shapes one :class:`TokenIssuer` remembers as
checked (least recently used first out): a client opening session after session presents the
same string, and its Ed25519 verification was ≈60 % of authenticating it. Only strings that
verified are kept; times are checked at every use."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """The verified claims of one of our JWTs."""

    subject: str
    token_id: str
    kind: str
    issued_at: int
    expires_at: int | None
    function_id: str | None


# --------------------------------------------------------------------------- signing


def _load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """Load the signing key, creating it (0600, atomically, directory 0700) if absent. An
    existing key is only read, so it may be on a read-only mount (a Kubernetes Secret)."""
    directory = path.parent
    if not path.exists():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        temp = directory / f".{path.name}.{new_id()}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
                out.flush()
                os.fsync(out.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(temp, path)  # never replaces a key another process just made
        finally:
            temp.unlink()
        fsync_dir(directory)
    mode = path.stat().st_mode
    if mode & 0o077:
        raise RuntimeError(
            f"the token signing key {path} is accessible to other users "
            f"(mode {mode & 0o777:o}); run: chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as exc:
        raise KeyFormatError(f"the token signing key {path} is not a PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFormatError(f"the token signing key {path} is not an Ed25519 key")
    return key


def _int_claim(payload: dict[str, Any], name: str) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise AuthError(f"invalid token: the {name} claim is not an integer")
    return value


# PyJWT's exceptions, most specific first, to messages that are safe to show.
_JWT_ERRORS: Final[tuple[tuple[type[jwt.PyJWTError], str], ...]] = (
    (jwt.InvalidAlgorithmError, "invalid token: its algorithm is not accepted"),
    (jwt.InvalidSignatureError, "invalid token: bad signature"),
    (jwt.InvalidAudienceError, "invalid token: it is for another audience"),
    (jwt.InvalidIssuerError, "invalid token: it is from another issuer"),
    (jwt.MissingRequiredClaimError, "invalid token: a required claim is missing"),
    (jwt.DecodeError, "invalid token: malformed"),
)


class TokenIssuer:
    """Signs and verifies the platform's JWTs with one Ed25519 key."""

    def __init__(self, private_key: Ed25519PrivateKey, issuer: str = DEFAULT_ISSUER) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError("the token signing key must be an Ed25519 private key")
        self._private_key = private_key
        self._public_key = private_key.public_key()
        self.issuer = issuer
        # Per issuer (one key): a string verified under this key stays verified. Failures
        # raise and are not kept. lru_cache is thread-safe (verify runs in worker threads).
        self._checked = functools.lru_cache(maxsize=VERIFIED_TOKENS)(self._check)

    @classmethod
    def open(cls, data_dir: Path, *, issuer: str = DEFAULT_ISSUER) -> TokenIssuer:
        """The issuer whose key is ``data_dir/auth/signing.key``, created on first use."""
        return cls(_load_or_create_key(Path(data_dir) / SIGNING_KEY_PATH), issuer)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._public_key

    def derive_secret(self, purpose: bytes) -> bytes:
        """32 bytes for ``purpose``, derived from the signing key (HKDF-SHA256): a secret every
        node sharing the key shares, without another file (the throttle table's pepper)."""
        raw = self._private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(raw)

    def issue(
        self,
        *,
        subject: str,
        token_id: str,
        kind: str,
        issued_at: dt.datetime,
        expires_at: dt.datetime | None = None,
        function_id: str | None = None,
    ) -> str:
        """A signed JWT with our claims (``exp`` and ``fn`` only when given)."""
        if kind not in TOKEN_KINDS:
            raise ValueError(f"unknown token kind {kind!r}")
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": [AUDIENCE],
            "sub": subject,
            "jti": token_id,
            "iat": int(issued_at.timestamp()),
            "kind": kind,
        }
        if expires_at is not None:
            claims["exp"] = int(expires_at.timestamp())
        if function_id is not None:
            claims["fn"] = function_id
        return jwt.encode(claims, self._private_key, algorithm=ALGORITHM, headers={"typ": "JWT"})

    def verify(self, token: str, *, now: dt.datetime) -> TokenClaims:
        """Check the signature (EdDSA only), ``aud``, ``iss``, ``exp``/``nbf``/``iat`` at
        ``now`` (with :data:`LEEWAY_S`) and the claims' shapes.

        Raises:
            AuthError: anything wrong; an expired token's message contains
                "token is expired" (the Go CLI turns that into a re-login hint).
        """
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_CHARS:
            raise AuthError("invalid token: malformed")
        claims, not_before = self._checked(token)
        at = now.timestamp()
        if claims.expires_at is not None and at > claims.expires_at + LEEWAY_S:
            raise AuthError("token is expired")
        if claims.issued_at > at + LEEWAY_S:
            raise AuthError("invalid token: issued in the future")
        if not_before is not None and not_before > at + LEEWAY_S:
            raise AuthError("token is not valid yet")
        return claims

    def _check(self, token: str) -> tuple[TokenClaims, int | None]:
        """The signature and the claims' shapes (not times): the claims and ``nbf``."""
        try:
            payload = jwt.decode(
                token,
                self._public_key,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=self.issuer,
                # Times are checked below against the caller's `now` (PyJWT reads the clock).
                options={
                    "require": list(_REQUIRED_CLAIMS),
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError as exc:
            for error_class, message in _JWT_ERRORS:
                if isinstance(exc, error_class):
                    raise AuthError(message) from None
            raise AuthError("invalid token") from None
        subject, token_id = payload.get("sub"), payload.get("jti")
        kind, function_id = payload.get("kind"), payload.get("fn")
        if not is_id(subject) or not is_id(token_id):
            raise AuthError("invalid token: malformed sub or jti claim")
        if kind not in TOKEN_KINDS:
            raise AuthError("invalid token: unknown kind")
        if function_id is not None and not is_id(function_id):
            raise AuthError("invalid token: malformed fn claim")
        issued_at = _int_claim(payload, "iat")
        expires_at = _int_claim(payload, "exp")
        not_before = _int_claim(payload, "nbf")
        if issued_at is None:
            raise AuthError("invalid token: a required claim is missing")
        claims = TokenClaims(
            subject=str(subject),
            token_id=str(token_id),
            kind=str(kind),
            issued_at=issued_at,
            expires_at=expires_at,
            function_id=None if function_id is None else str(function_id),
        )
        return claims, not_before
