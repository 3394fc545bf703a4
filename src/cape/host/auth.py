"""Accounts and tokens: passwords, login, JWTs, revocation and scope (DESIGN.md invariant 4).

Passwords are hashed with argon2id (``argon2-cffi``'s defaults unless a cheaper
:class:`~argon2.PasswordHasher` is passed, as tests do). Logging in with an unknown username
still verifies a password against a dummy hash, so the answer takes as long either way.

Failed logins are throttled per (account, client address), per address and, with a ceiling
that spares addresses the user has logged in from, per account; signups per address
(:mod:`cape.host.ratelimit`). Who may sign up at all is the server's signup mode
(:mod:`cape.host.signup`: open, invite or closed).

Tokens are JWTs signed by the platform (:class:`~cape.host.tokens.TokenIssuer`, Ed25519
``EdDSA``, the key in ``data_dir/auth/signing.key``; re-exported here). Claims: ``iss``,
``aud: ["cape-api"]``, ``sub`` (user id), ``jti`` (22-character token id), ``iat``,
optional ``exp``, optional ``fn`` (the function a token is scoped to) and ``kind``
(``access`` from login, ``pat`` for personal access tokens).
The server keeps each token's *record* (never the string) and looks ``jti`` up on every use,
so deleting a record revokes its token at once; logins are recorded too (named ``login``), so
logging out works the same way.

:func:`authorize_run`, :func:`authorize_owner` and :func:`authorize_account` decide what an
authenticated :class:`Principal` may do: a token can do only what its owner can, and a
function-scoped token only run its one function. Another user's private function is
answered exactly as a missing one (:class:`NotFoundError` "no such function"), so nobody learns
whether an id or a name exists unless they may use it.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from cape._internal.timefile import utc_now
from cape.errors import FormatError
from cape.host.errors import AuthError, ForbiddenError, NotFoundError, SignupRefusedError
from cape.host.ratelimit import LoginRateLimiter, SignupRateLimiter
from cape.host.signup import (
    BAD_INVITE_TEXT,
    CLOSED_TEXT,
    NEEDS_INVITE_TEXT,
    SignupMode,
    check_invite_code,
    hash_invite_code,
)
from cape.host.store.invites import InviteStore
from cape.host.store.metadata import (
    Function,
    MetadataStore,
    Token,
    User,
    check_token_name,
    check_username,
)
from cape.host.tokens import (
    ALGORITHM,
    AUDIENCE,
    LEEWAY_S,
    TokenClaims,
    TokenIssuer,
)

__all__ = [
    "ACCESS_TOKEN_TTL",
    "ALGORITHM",
    "AUDIENCE",
    "LEEWAY_S",
    "MAX_PASSWORD_CHARS",
    "MIN_PASSWORD_CHARS",
    "NOT_FOUND_TEXT",
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

ACCESS_TOKEN_TTL: Final = dt.timedelta(hours=12)
MAX_TOKEN_LIFETIME: Final = dt.timedelta(days=3650)
LAST_USED_RESOLUTION: Final = dt.timedelta(seconds=60)
"""``last_used`` is written at most this often per token (one write per request would cost an
fsync each on SQLite)."""

MIN_PASSWORD_CHARS: Final = 8
MAX_PASSWORD_CHARS: Final = 1024
NOT_FOUND_TEXT: Final = "no such function"
"""The one answer for a function that does not exist or that the caller may not see."""


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A token as handed to its user, once: the server does not keep ``token``."""

    token: str = field(repr=False)
    id: str
    expires_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts for: the user, the token's record and its function scope."""

    user: User
    token: Token
    function_scope: str | None


# --------------------------------------------------------------------------- accounts


class Accounts:
    """Signup, login and tokens over a :class:`MetadataStore` and a :class:`TokenIssuer`.

    ``signup_mode`` says who may sign up; ``invites`` (required for
    :attr:`SignupMode.invite`) is where invite codes are redeemed. ``clock`` gives the time
    for issuing (``created_at``, ``iat``, ``exp``) and for invite expiry; checks take ``now``
    explicitly.
    """

    def __init__(
        self,
        store: MetadataStore,
        issuer: TokenIssuer,
        *,
        hasher: PasswordHasher | None = None,
        limiter: LoginRateLimiter | None = None,
        signup_limiter: SignupRateLimiter | None = None,
        signup_mode: SignupMode = SignupMode.open,
        invites: InviteStore | None = None,
        clock: Callable[[], dt.datetime] = utc_now,
        access_token_ttl: dt.timedelta = ACCESS_TOKEN_TTL,
    ) -> None:
        if signup_mode is SignupMode.invite and invites is None:
            raise ValueError("invite-only signup needs an invite store")
        self._store = store
        self._issuer = issuer
        self._hasher = hasher if hasher is not None else PasswordHasher()
        self._limiter = limiter if limiter is not None else LoginRateLimiter()
        self._signup_limiter = (
            signup_limiter if signup_limiter is not None else (SignupRateLimiter())
        )
        self.signup_mode = SignupMode(signup_mode)
        self._invites = invites
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

    def signup(
        self, username: str, password: str, *, client: str = "local", invite: str | None = None
    ) -> User:
        """Create an account, if the signup mode allows it.

        ``client`` is the caller's address, for rate limiting. ``invite`` is the code an
        invite-only server needs (ignored by an open one).

        Raises:
            SignupRefusedError: signups are closed, or invite-only and ``invite`` is missing
                or not an unused, unexpired code.
            RateLimitedError: too many signups from ``client`` lately.
            FormatError: bad username, or a password not of 8-1024 characters.
            ConflictError: the username is taken (names compare case-insensitively); an
                invite stays unused.
        """
        mode = self.signup_mode
        if mode is SignupMode.closed:
            raise SignupRefusedError(CLOSED_TEXT)
        self._signup_limiter.attempt(client)
        name = check_username(username)
        if not isinstance(password, str) or not (
            MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS
        ):
            raise FormatError(
                f"a password must have {MIN_PASSWORD_CHARS}-{MAX_PASSWORD_CHARS} characters"
            )
        if mode is SignupMode.open:
            return self._store.create_user(name, self._hasher.hash(password))
        if invite is None:
            raise SignupRefusedError(NEEDS_INVITE_TEXT)
        code_hash = hash_invite_code(check_invite_code(invite))
        assert self._invites is not None  # the constructor makes sure
        user = self._invites.redeem(
            code_hash=code_hash,
            username=name,
            password_hash=self._hasher.hash(password),
            now=self._clock(),
        )
        if user is None:
            raise SignupRefusedError(BAD_INVITE_TEXT)
        return user

    def login(self, username: str, password: str, *, client: str) -> IssuedToken:
        """Check the password and issue an access token (expires after the access TTL).

        ``client`` is the caller's address, for rate limiting.

        Raises:
            RateLimitedError: too many recent failures for this username from this client,
                for this client, or for this username from clients it never logged in from.
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
            NotFoundError: ``function_id`` names no function, or another user's private one.
            ForbiddenError: the function is another user's public one.
        """
        name, description = check_token_name(name, description)
        if expiry is not None and (
            not isinstance(expiry, dt.timedelta)
            or not dt.timedelta(0) < expiry <= MAX_TOKEN_LIFETIME
        ):
            raise FormatError(f"a token expiry must be positive and at most {MAX_TOKEN_LIFETIME}")
        if function_id is not None:
            function = self._store.get_function(function_id)
            if function is None or not _visible(function, user):
                raise NotFoundError(NOT_FOUND_TEXT)
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
        principal = self.check(token, now=now)
        return self.touch(principal, now) if self.touch_due(principal, now) else principal

    def check(
        self, token: str, *, now: dt.datetime, reads: MetadataStore | None = None
    ) -> Principal:
        """:meth:`authenticate` without its one write (``last_used``): every check, with the
        record and the user read from ``reads`` (default: the store; a session's start reads
        on the event loop, :mod:`cape.host.store.loop_reads`). The caller then writes
        ``last_used`` when :meth:`touch_due` says so (:meth:`touch`)."""
        store = self._store if reads is None else reads
        claims = self._issuer.verify(token, now=now)
        record = store.get_token(claims.token_id)
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
        user = store.get_user_by_id(record.user_id)
        if user is None:
            raise AuthError("token has been revoked")
        return Principal(user=user, token=record, function_scope=record.function_id)

    @staticmethod
    def touch_due(principal: Principal, now: dt.datetime) -> bool:
        """Whether the token's ``last_used`` is older than :data:`LAST_USED_RESOLUTION`."""
        last_used = principal.token.last_used
        return last_used is None or now - last_used >= LAST_USED_RESOLUTION

    def touch(self, principal: Principal, now: dt.datetime) -> Principal:
        """Record ``now`` as the token's ``last_used`` (a write: never on the event loop)."""
        self._store.touch_token(principal.token.id, now)
        return replace(principal, token=replace(principal.token, last_used=now))


# --------------------------------------------------------------------------- authorization


def _visible(function: Function, user: User) -> bool:
    """Whether ``user`` may know that ``function`` exists: public ones, or their own."""
    return function.public or function.owner_id == user.id


def authorize_run(principal: Principal, function: Function) -> None:
    """Allow running (or reading) ``function``: public ones for anyone, private ones for their
    owner, and a function-scoped token only its own function.

    Raises:
        NotFoundError: a private function of another user, answered exactly as a missing one
            (:data:`NOT_FOUND_TEXT`), before any other check, so no token learns it exists.
        ForbiddenError: a function-scoped token and another function it may see.
    """
    if not _visible(function, principal.user):
        raise NotFoundError(NOT_FOUND_TEXT)
    if principal.function_scope is not None and principal.function_scope != function.id:
        raise ForbiddenError("this token may run only the function it is scoped to")


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
        ForbiddenError: a function-scoped token, or another user's public function.
        NotFoundError: another user's private function (as if missing).
    """
    authorize_account(principal)
    if not _visible(function, principal.user):
        raise NotFoundError(NOT_FOUND_TEXT)
    if function.owner_id != principal.user.id:
        raise ForbiddenError("only the function's owner may do this")
