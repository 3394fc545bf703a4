"""Accounts and tokens: passwords, login, JWTs, revocation and scope (DESIGN.md invariant 4).

Passwords are hashed with argon2id (``argon2-cffi``'s defaults unless a cheaper
:class:`~argon2.PasswordHasher` is passed, as tests do). Logging in with an unknown username
still verifies a password against a dummy hash, so the answer takes as long either way.

Failed logins are rate-limited per username and per client address
(:class:`LoginRateLimiter`): after a few failures each further one locks that key out for a
doubling time, up to a cap. The limiter is in memory: it resets when the server restarts and
is per process (a scaled-out deployment would move it to a shared store).

Tokens are JWTs signed by the platform (:class:`TokenIssuer`, Ed25519 ``EdDSA``, the key in
``data_dir/auth/signing.key``). Claims: ``iss``, ``aud: ["cape-api"]``, ``sub`` (user id),
``jti`` (22-character token id), ``iat``, optional ``exp``, optional ``fn`` (the function a
token is scoped to) and ``kind`` (``access`` from login, ``pat`` for personal access tokens).
The server keeps each token's *record* (never the string) and looks ``jti`` up on every use,
so deleting a record revokes its token at once; logins are recorded too (named ``login``), so
logging out works the same way.

:func:`authorize_run`, :func:`authorize_owner` and :func:`authorize_account` decide what an
authenticated :class:`Principal` may do: a token can do only what its owner can, and a
function-scoped token only run its one function.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Final

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from cape._internal.timefile import fsync_dir, utc_now
from cape.errors import FormatError, KeyFormatError
from cape.host.errors import AuthError, ForbiddenError, NotFoundError, RateLimitedError
from cape.host.ids import is_id, new_id
from cape.host.store.metadata import (
    TOKEN_KINDS,
    Function,
    MetadataStore,
    Token,
    User,
    check_token_name,
    check_username,
)

__all__ = [
    "ACCESS_TOKEN_TTL",
    "ALGORITHM",
    "AUDIENCE",
    "LEEWAY_S",
    "MAX_PASSWORD_CHARS",
    "MIN_PASSWORD_CHARS",
    "Accounts",
    "IssuedToken",
    "LoginRateLimiter",
    "Principal",
    "TokenClaims",
    "TokenIssuer",
    "authorize_account",
    "authorize_owner",
    "authorize_run",
]

ALGORITHM: Final = "EdDSA"
"""The only JWT algorithm we sign with or accept (no ``none``, no HMAC)."""

AUDIENCE: Final = "cape-api"
DEFAULT_ISSUER: Final = "cape"
LEEWAY_S: Final = 30
"""Clock skew tolerated on ``exp``, ``nbf`` and ``iat``."""

ACCESS_TOKEN_TTL: Final = dt.timedelta(hours=12)
MAX_TOKEN_LIFETIME: Final = dt.timedelta(days=3650)
LAST_USED_RESOLUTION: Final = dt.timedelta(seconds=60)
"""``last_used`` is written at most this often per token (one write per request would cost an
fsync each on SQLite)."""

MIN_PASSWORD_CHARS: Final = 8
MAX_PASSWORD_CHARS: Final = 1024
MAX_TOKEN_CHARS: Final = 8192
"""Longer bearer strings are refused before parsing (ours are about 400 characters)."""

SIGNING_KEY_PATH: Final = Path("auth") / "signing.key"
"""Where :meth:`TokenIssuer.open` keeps the signing key, relative to the data directory."""

_REQUIRED_CLAIMS: Final = ["iss", "aud", "sub", "jti", "iat", "kind"]


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A token as handed to its user, once: the server does not keep ``token``."""

    token: str = field(repr=False)
    id: str
    expires_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """The verified claims of one of our JWTs."""

    subject: str
    token_id: str
    kind: str
    issued_at: int
    expires_at: int | None
    function_id: str | None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts for: the user, the token's record and its function scope."""

    user: User
    token: Token
    function_scope: str | None


# --------------------------------------------------------------------------- signing


def _load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """Load the signing key, creating it (0600, atomically, directory 0700) if absent."""
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    if not path.exists():
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

    @classmethod
    def open(cls, data_dir: Path, *, issuer: str = DEFAULT_ISSUER) -> TokenIssuer:
        """The issuer whose key is ``data_dir/auth/signing.key``, created on first use."""
        return cls(_load_or_create_key(Path(data_dir) / SIGNING_KEY_PATH), issuer)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._public_key

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
        at = now.timestamp()
        if expires_at is not None and at > expires_at + LEEWAY_S:
            raise AuthError("token is expired")
        if issued_at > at + LEEWAY_S:
            raise AuthError("invalid token: issued in the future")
        if not_before is not None and not_before > at + LEEWAY_S:
            raise AuthError("token is not valid yet")
        return TokenClaims(
            subject=str(subject),
            token_id=str(token_id),
            kind=str(kind),
            issued_at=issued_at,
            expires_at=expires_at,
            function_id=None if function_id is None else str(function_id),
        )


# --------------------------------------------------------------------------- rate limiting


@dataclass(slots=True)
class _Failures:
    count: int = 0
    last_failure: float = 0.0
    locked_until: float = 0.0


class _Backoff:
    """Failure counts per key with exponential lockouts (callers hold the lock)."""

    def __init__(
        self,
        *,
        max_failures: int,
        base_lockout_s: float,
        max_lockout_s: float,
        forget_after_s: float,
        max_entries: int,
    ) -> None:
        self.max_failures = max_failures
        self.base_lockout_s = base_lockout_s
        self.max_lockout_s = max_lockout_s
        self.forget_after_s = forget_after_s
        self.max_entries = max_entries
        self.entries: collections.OrderedDict[str, _Failures] = collections.OrderedDict()

    def retry_after(self, key: str, now: float) -> float:
        entry = self.entries.get(key)
        if entry is None:
            return 0.0
        if now - entry.last_failure >= self.forget_after_s and now >= entry.locked_until:
            del self.entries[key]
            return 0.0
        return max(0.0, entry.locked_until - now)

    def failure(self, key: str, now: float) -> None:
        self.retry_after(key, now)  # forgets a stale entry
        entry = self.entries.setdefault(key, _Failures())
        self.entries.move_to_end(key)
        entry.count += 1
        entry.last_failure = now
        if entry.count >= self.max_failures:
            doublings = min(entry.count - self.max_failures, 62)
            lockout = min(self.base_lockout_s * 2.0**doublings, self.max_lockout_s)
            entry.locked_until = now + lockout
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)  # the key that failed least recently

    def reset(self, key: str) -> None:
        self.entries.pop(key, None)


class LoginRateLimiter:
    """Failed-login lockouts per username and per client address, in memory.

    After ``max_failures_per_user`` failures for one username (``max_failures_per_client``
    for one client address) each further failure locks that key for ``base_lockout_s``,
    doubling per failure up to ``max_lockout_s``. A key is forgotten ``forget_after_s`` after
    its last failure once its lockout is over.

    A successful login resets its username's count but not its client's: otherwise an attacker
    could log into an account of their own between guesses at others' passwords. The state is
    lost on restart and bounded to ``max_entries`` keys per kind (oldest dropped first).
    ``clock`` is monotonic seconds (a seam for tests).
    """

    def __init__(
        self,
        *,
        max_failures_per_user: int = 5,
        max_failures_per_client: int = 20,
        base_lockout_s: float = 1.0,
        max_lockout_s: float = 900.0,
        forget_after_s: float = 3600.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        def backoff(max_failures: int) -> _Backoff:
            return _Backoff(
                max_failures=max_failures,
                base_lockout_s=base_lockout_s,
                max_lockout_s=max_lockout_s,
                forget_after_s=forget_after_s,
                max_entries=max_entries,
            )

        self._users = backoff(max_failures_per_user)
        self._clients = backoff(max_failures_per_client)
        self._clock = clock
        self._lock = threading.Lock()

    def check(self, username: str, client: str) -> None:
        """Raise :class:`RateLimitedError` if either key is locked out."""
        with self._lock:
            now = self._clock()
            wait = max(
                self._users.retry_after(username, now), self._clients.retry_after(client, now)
            )
        if wait > 0:
            seconds = math.ceil(wait)
            raise RateLimitedError(
                f"too many failed logins; try again in {seconds} s", retry_after_s=float(seconds)
            )

    def failure(self, username: str, client: str) -> None:
        with self._lock:
            now = self._clock()
            self._users.failure(username, now)
            self._clients.failure(client, now)

    def success(self, username: str, client: str) -> None:
        """Reset the username's count (not the client's: see the class docstring)."""
        with self._lock:
            self._users.reset(username)


# --------------------------------------------------------------------------- accounts


class Accounts:
    """Signup, login and tokens over a :class:`MetadataStore` and a :class:`TokenIssuer`.

    ``clock`` gives the time for issuing (``created_at``, ``iat``, ``exp``); checks take
    ``now`` explicitly.
    """

    def __init__(
        self,
        store: MetadataStore,
        issuer: TokenIssuer,
        *,
        hasher: PasswordHasher | None = None,
        limiter: LoginRateLimiter | None = None,
        clock: Callable[[], dt.datetime] = utc_now,
        access_token_ttl: dt.timedelta = ACCESS_TOKEN_TTL,
    ) -> None:
        self._store = store
        self._issuer = issuer
        self._hasher = hasher if hasher is not None else PasswordHasher()
        self._limiter = limiter if limiter is not None else LoginRateLimiter()
        self._clock = clock
        self._access_token_ttl = access_token_ttl

    @cached_property
    def _dummy_hash(self) -> str:
        """A hash nobody knows the password of, for timing-equal logins of unknown users."""
        return self._hasher.hash(os.urandom(32).hex())

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    # accounts ---------------------------------------------------------------

    def signup(self, username: str, password: str) -> User:
        """Create an account.

        Raises:
            FormatError: bad username, or a password not of 8-1024 characters.
            ConflictError: the username is taken (names compare case-insensitively).
        """
        name = check_username(username)
        if not isinstance(password, str) or not (
            MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS
        ):
            raise FormatError(
                f"a password must have {MIN_PASSWORD_CHARS}-{MAX_PASSWORD_CHARS} characters"
            )
        return self._store.create_user(name, self._hasher.hash(password))

    def login(self, username: str, password: str, *, client: str) -> IssuedToken:
        """Check the password and issue an access token (expires after the access TTL).

        ``client`` is the caller's address, for rate limiting.

        Raises:
            RateLimitedError: too many recent failures for this username or client.
            AuthError: wrong username or password (one message for both).
        """
        key = username.lower()[:64] if isinstance(username, str) else ""
        self._limiter.check(key, client)
        user = self._store.get_user_by_name(username) if isinstance(username, str) else None
        ok = False
        if isinstance(password, str) and 0 < len(password) <= MAX_PASSWORD_CHARS:
            verified = self._verify(
                user.password_hash if user is not None else self._dummy_hash, password
            )
            ok = verified and user is not None
        if not ok or user is None:
            self._limiter.failure(key, client)
            raise AuthError("invalid username or password")
        self._limiter.success(key, client)
        if self._hasher.check_needs_rehash(user.password_hash):
            self._store.set_password_hash(user.id, self._hasher.hash(password))
        now = self._clock()
        return self._issue(
            user,
            kind="access",
            name="login",
            description="",
            function_id=None,
            now=now,
            expires_at=now + self._access_token_ttl,
        )

    def logout(self, principal: Principal) -> None:
        """Revoke the token the principal authenticated with."""
        self._store.delete_token(principal.token.id, principal.user.id)

    # tokens -----------------------------------------------------------------

    def create_token(
        self,
        user: User,
        name: str,
        description: str = "",
        function_id: str | None = None,
        expiry: dt.timedelta | None = None,
    ) -> IssuedToken:
        """Issue a personal access token, optionally scoped to one of the user's functions
        and optionally expiring after ``expiry``.

        Raises:
            FormatError: bad name, description or expiry.
            NotFoundError: ``function_id`` names no function.
            ForbiddenError: the function belongs to someone else.
        """
        name, description = check_token_name(name, description)
        if expiry is not None and (
            not isinstance(expiry, dt.timedelta)
            or not dt.timedelta(0) < expiry <= MAX_TOKEN_LIFETIME
        ):
            raise FormatError(f"a token expiry must be positive and at most {MAX_TOKEN_LIFETIME}")
        if function_id is not None:
            function = self._store.get_function(function_id)
            if function is None:
                raise NotFoundError("no such function")
            if function.owner_id != user.id:
                raise ForbiddenError("a token can be scoped only to one of your own functions")
        now = self._clock()
        return self._issue(
            user,
            kind="pat",
            name=name,
            description=description,
            function_id=function_id,
            now=now,
            expires_at=None if expiry is None else now + expiry,
        )

    def _issue(
        self,
        user: User,
        *,
        kind: str,
        name: str,
        description: str,
        function_id: str | None,
        now: dt.datetime,
        expires_at: dt.datetime | None,
    ) -> IssuedToken:
        if expires_at is not None:  # whole seconds, as in the `exp` claim
            expires_at = dt.datetime.fromtimestamp(int(expires_at.timestamp()), dt.UTC)
        record = self._store.add_token(
            user_id=user.id,
            kind=kind,
            name=name,
            description=description,
            function_id=function_id,
            expires_at=expires_at,
        )
        token = self._issuer.issue(
            subject=user.id,
            token_id=record.id,
            kind=kind,
            issued_at=now,
            expires_at=expires_at,
            function_id=function_id,
        )
        return IssuedToken(token=token, id=record.id, expires_at=expires_at)

    def list_tokens(self, user: User, *, kind: str | None = "pat") -> list[Token]:
        """The user's token records (personal access tokens unless ``kind`` says otherwise)."""
        return self._store.list_tokens(user.id, kind=kind)

    def delete_token(self, user: User, token_id: str) -> None:
        """Revoke one of the user's tokens. Raises NotFoundError if they have no such token."""
        if not self._store.delete_token(token_id, user.id):
            raise NotFoundError("no such token")

    def authenticate(self, token: str, *, now: dt.datetime) -> Principal:
        """The principal a bearer token stands for, checked at ``now``.

        Verifies the JWT (:meth:`TokenIssuer.verify`), then its record: a deleted record means
        a revoked token; the record must agree with the claims. Updates ``last_used``.

        Raises:
            AuthError: bad, expired ("token is expired") or revoked token.
        """
        claims = self._issuer.verify(token, now=now)
        record = self._store.get_token(claims.token_id)
        if record is None:
            raise AuthError("token has been revoked")
        if (
            record.user_id != claims.subject
            or record.function_id != claims.function_id
            or record.kind != claims.kind
        ):
            raise AuthError("invalid token: it does not match its record")
        if record.expires_at is not None and now > record.expires_at + dt.timedelta(
            seconds=LEEWAY_S
        ):
            raise AuthError("token is expired")
        user = self._store.get_user_by_id(record.user_id)
        if user is None:
            raise AuthError("token has been revoked")
        if record.last_used is None or now - record.last_used >= LAST_USED_RESOLUTION:
            self._store.touch_token(record.id, now)
            record = replace(record, last_used=now)
        return Principal(user=user, token=record, function_scope=record.function_id)


# --------------------------------------------------------------------------- authorization


def authorize_run(principal: Principal, function: Function) -> None:
    """Allow running ``function``: public ones for anyone, private ones for their owner, and
    a function-scoped token only its own function.

    Raises:
        ForbiddenError: otherwise.
    """
    if principal.function_scope is not None and principal.function_scope != function.id:
        raise ForbiddenError("this token may run only the function it is scoped to")
    if not function.public and function.owner_id != principal.user.id:
        raise ForbiddenError("this function is private to its owner")


def authorize_account(principal: Principal) -> None:
    """Allow account actions (deploy, list, manage tokens): not with a function-scoped token.

    Raises:
        ForbiddenError: the token is scoped to a function.
    """
    if principal.function_scope is not None:
        raise ForbiddenError("a function-scoped token can only run its function")


def authorize_owner(principal: Principal, function: Function) -> None:
    """Allow owner actions on ``function`` (delete): its owner, with an unscoped token.

    Raises:
        ForbiddenError: otherwise.
    """
    authorize_account(principal)
    if function.owner_id != principal.user.id:
        raise ForbiddenError("only the function's owner may do this")
