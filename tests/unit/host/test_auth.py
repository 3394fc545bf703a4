"""Accounts and tokens: argon2id, login rate limits, JWT checks, revocation and scope
(DESIGN.md invariant 4: tokens are scoped; deleted or expired tokens stop working at once)."""

from __future__ import annotations

import base64
import datetime as dt
import errno
import hashlib
import hmac
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import jwt
import pytest
from argon2 import PasswordHasher, Type
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cape.errors import FormatError, KeyFormatError
from cape.host.auth import (
    ACCESS_TOKEN_TTL,
    Accounts,
    IssuedToken,
    LoginRateLimiter,
    Principal,
    TokenIssuer,
    authorize_account,
    authorize_owner,
    authorize_run,
)
from cape.host.errors import (
    AuthError,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    RateLimitedError,
)
from cape.host.ids import is_id, new_id
from cape.host.store.metadata import Function, SqlMetadataStore, User

T0 = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
PASSWORD = "correct horse battery staple"


class Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


class Monotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingHasher(PasswordHasher):
    """A cheap argon2id hasher that records which hashes it verified against."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        self.verified: list[str] = []

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        self.verified.append(hash if isinstance(hash, str) else hash.decode())
        return super().verify(hash, password)


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def mono() -> Monotonic:
    return Monotonic()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "meta.db"


@pytest.fixture
def store(db_path: Path, clock: Clock) -> Iterator[SqlMetadataStore]:
    with SqlMetadataStore(f"sqlite:///{db_path}", clock=clock) as store:
        yield store


@pytest.fixture
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def issuer(signing_key: Ed25519PrivateKey) -> TokenIssuer:
    return TokenIssuer(signing_key)


@pytest.fixture
def hasher() -> CountingHasher:
    return CountingHasher()


@pytest.fixture
def accounts(
    store: SqlMetadataStore,
    issuer: TokenIssuer,
    hasher: CountingHasher,
    clock: Clock,
    mono: Monotonic,
) -> Accounts:
    return Accounts(store, issuer, hasher=hasher, limiter=LoginRateLimiter(clock=mono), clock=clock)


@pytest.fixture
def alice(accounts: Accounts) -> User:
    return accounts.signup("alice", PASSWORD)


@pytest.fixture
def bob(accounts: Accounts) -> User:
    return accounts.signup("bob", PASSWORD)


def _function(
    store: SqlMetadataStore, owner: User, name: str = "app", *, public: bool = False
) -> Function:
    return store.add_function(
        owner_id=owner.id,
        name=name,
        checksum=hashlib.sha256(name.encode()).hexdigest(),
        public=public,
        blob_key=new_id(),
        size=1,
    )


def _principal(accounts: Accounts, issued: IssuedToken) -> Principal:
    return accounts.authenticate(issued.token, now=T0)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())


def _claims(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


# --------------------------------------------------------------------------- passwords


def test_signup_stores_an_argon2id_hash(accounts: Accounts, store: SqlMetadataStore) -> None:
    user = accounts.signup("Alice", PASSWORD)
    assert user.username == "alice"
    assert user.password_hash.startswith("$argon2id$")
    assert PASSWORD not in user.password_hash
    assert store.get_user_by_name("alice") == user


def test_the_default_hasher_is_argon2id_with_library_defaults(store: SqlMetadataStore) -> None:
    accounts = Accounts(store, TokenIssuer(Ed25519PrivateKey.generate()))
    hasher = accounts._hasher
    assert hasher.type is Type.ID
    assert (hasher.time_cost, hasher.memory_cost) == (
        PasswordHasher().time_cost,
        PasswordHasher().memory_cost,
    )


@pytest.mark.parametrize("password", ["", "short", "1234567", "x" * 1025])
def test_signup_refuses_bad_passwords(accounts: Accounts, password: str) -> None:
    with pytest.raises(FormatError, match="8-1024 characters"):
        accounts.signup("alice", password)


def test_signup_accepts_the_password_length_bounds(accounts: Accounts) -> None:
    accounts.signup("short", "x" * 8)
    accounts.signup("long", "x" * 1024)


def test_signup_refuses_taken_and_bad_usernames(accounts: Accounts, alice: User) -> None:
    with pytest.raises(ConflictError):
        accounts.signup("ALICE", PASSWORD)
    with pytest.raises(FormatError, match="invalid username"):
        accounts.signup("alice/../x", PASSWORD)


def test_login_issues_a_recorded_access_token(
    accounts: Accounts, alice: User, store: SqlMetadataStore
) -> None:
    issued = accounts.login("alice", PASSWORD, client="192.0.2.1")
    assert is_id(issued.id)
    assert issued.expires_at == T0 + ACCESS_TOKEN_TTL
    record = store.get_token(issued.id)
    assert record is not None
    assert (record.name, record.kind, record.user_id) == ("login", "access", alice.id)
    assert record.expires_at == T0 + ACCESS_TOKEN_TTL
    principal = _principal(accounts, issued)
    assert principal.user == alice
    assert principal.function_scope is None
    claims = _claims(issued.token)
    assert claims["kind"] == "access"
    assert claims["exp"] == int((T0 + dt.timedelta(hours=12)).timestamp())
    # Access tokens are not listed with the personal access tokens, but can be.
    assert accounts.list_tokens(alice) == []
    assert [t.id for t in accounts.list_tokens(alice, kind=None)] == [issued.id]


def test_login_is_case_insensitive_in_the_username(accounts: Accounts, alice: User) -> None:
    assert _principal(accounts, accounts.login("ALICE", PASSWORD, client="c")).user == alice


def test_wrong_password_is_refused(accounts: Accounts, alice: User) -> None:
    with pytest.raises(AuthError, match="invalid username or password"):
        accounts.login("alice", PASSWORD + "!", client="c")
    with pytest.raises(AuthError, match="invalid username or password"):
        accounts.login("alice", "", client="c")
    with pytest.raises(AuthError, match="invalid username or password"):
        accounts.login("alice", "x" * 1025, client="c")


def test_unknown_user_is_verified_against_a_dummy_hash(
    accounts: Accounts, alice: User, hasher: CountingHasher
) -> None:
    with pytest.raises(AuthError, match="invalid username or password") as unknown:
        accounts.login("nobody", PASSWORD, client="c")
    with pytest.raises(AuthError, match="invalid username or password") as wrong:
        accounts.login("alice", "wrong password", client="c")
    assert str(unknown.value) == str(wrong.value)  # no user enumeration through the message
    dummy, real = hasher.verified
    assert dummy.startswith("$argon2id$")
    assert dummy != alice.password_hash
    assert real == alice.password_hash
    with pytest.raises(AuthError):
        accounts.login("not a valid name!", PASSWORD, client="c")
    assert hasher.verified[-1] == dummy  # malformed names cost the same as well


def test_login_rehashes_when_the_parameters_change(
    store: SqlMetadataStore, issuer: TokenIssuer, alice: User, clock: Clock
) -> None:
    stronger = PasswordHasher(time_cost=2, memory_cost=16, parallelism=1)
    accounts = Accounts(store, issuer, hasher=stronger, clock=clock)
    accounts.login("alice", PASSWORD, client="c")
    user = store.get_user_by_id(alice.id)
    assert user is not None
    assert user.password_hash != alice.password_hash
    assert "t=2" in user.password_hash
    assert not stronger.check_needs_rehash(user.password_hash)
    accounts.login("alice", PASSWORD, client="c")


# --------------------------------------------------------------------------- rate limits


def test_failed_logins_lock_the_account_out_from_that_client_with_backoff(
    accounts: Accounts, alice: User, mono: Monotonic, hasher: CountingHasher
) -> None:
    for _ in range(5):
        with pytest.raises(AuthError, match="invalid") as failed:
            accounts.login("alice", "wrong password", client="c1")
        assert not isinstance(failed.value, RateLimitedError)
    verified = len(hasher.verified)
    # Locked out now from c1, even with the right password; nothing verified.
    with pytest.raises(RateLimitedError) as locked:
        accounts.login("alice", PASSWORD, client="c1")
    assert locked.value.retry_after_s == 1.0
    assert len(hasher.verified) == verified
    # Each further failure doubles the lockout.
    mono.now += 1.0
    with pytest.raises(AuthError, match="invalid"):
        accounts.login("alice", "wrong password", client="c1")
    with pytest.raises(RateLimitedError) as longer:
        accounts.login("alice", PASSWORD, client="c1")
    assert longer.value.retry_after_s == 2.0
    # After the lockout, the right password works and resets the count.
    mono.now += 2.0
    accounts.login("alice", PASSWORD, client="c1")
    for _ in range(4):
        with pytest.raises(AuthError, match="invalid"):
            accounts.login("alice", "wrong password", client="c1")
    accounts.login("alice", PASSWORD, client="c1")


def test_failures_elsewhere_do_not_lock_the_user_out(
    accounts: Accounts, alice: User, mono: Monotonic
) -> None:
    """Finding 6 of issue 18: an attacker at another address guessing at alice's password
    is throttled, while alice at her own address logs in at once, during and after."""
    for _ in range(40):
        with pytest.raises(AuthError):
            accounts.login("alice", "wrong password", client="203.0.113.9")
        mono.now += 0.5
    with pytest.raises(RateLimitedError):
        accounts.login("alice", PASSWORD, client="203.0.113.9")
    accounts.login("alice", PASSWORD, client="198.51.100.7")
    accounts.login("alice", PASSWORD, client="198.51.100.7")


def test_failures_from_one_client_lock_that_client_out(
    accounts: Accounts, alice: User, bob: User
) -> None:
    for i in range(20):  # password spraying: one guess at each of many names
        with pytest.raises(AuthError, match="invalid"):
            accounts.login(f"user{i}", "guess123", client="203.0.113.9")
    with pytest.raises(RateLimitedError):
        accounts.login("alice", PASSWORD, client="203.0.113.9")
    # A success for one's own account does not reset the client's count.
    with pytest.raises(RateLimitedError):
        accounts.login("bob", PASSWORD, client="203.0.113.9")
    accounts.login("alice", PASSWORD, client="198.51.100.7")  # other clients are unaffected


# --------------------------------------------------------------------------- signing key


def test_issuer_key_is_created_private_and_reused(tmp_path: Path) -> None:
    first = TokenIssuer.open(tmp_path)
    key_path = tmp_path / "auth" / "signing.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_path.parent.stat().st_mode) == 0o700
    assert [p.name for p in key_path.parent.iterdir()] == ["signing.key"]
    second = TokenIssuer.open(tmp_path)
    token = first.issue(subject=new_id(), token_id=new_id(), kind="pat", issued_at=T0)
    assert second.verify(token, now=T0).kind == "pat"
    assert TokenIssuer.open(tmp_path / "other").public_key != first.public_key


def test_issuer_reads_a_key_from_a_read_only_secret_mount(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Kubernetes Secret volume (deploy/kubernetes): read-only, each file a symlink into a
    ``..data`` directory, mode 0400. The key is read as it is; nothing is written or chmod'ed."""
    made = TokenIssuer.open(tmp_path / "made")
    mount = tmp_path / "secret" / "auth"
    (mount / "..data").mkdir(parents=True)
    key = (tmp_path / "made" / "auth" / "signing.key").read_bytes()
    (mount / "..data" / "signing.key").write_bytes(key)
    (mount / "..data" / "signing.key").chmod(0o400)
    (mount / "signing.key").symlink_to("..data/signing.key")

    def read_only(self: Path, mode: int, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "chmod", read_only)  # what a read-only mount answers
    mounted = TokenIssuer.open(tmp_path / "secret")
    token = made.issue(subject=new_id(), token_id=new_id(), kind="pat", issued_at=T0)
    assert mounted.verify(token, now=T0).kind == "pat"


def test_issuer_refuses_a_key_others_can_read(tmp_path: Path) -> None:
    TokenIssuer.open(tmp_path)
    (tmp_path / "auth" / "signing.key").chmod(0o644)
    with pytest.raises(RuntimeError, match="chmod 600"):
        TokenIssuer.open(tmp_path)


def test_issuer_refuses_a_key_of_another_type(tmp_path: Path) -> None:
    (tmp_path / "auth").mkdir(mode=0o700)
    path = tmp_path / "auth" / "signing.key"
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, pem)
    os.close(fd)
    with pytest.raises(KeyFormatError, match="Ed25519"):
        TokenIssuer.open(tmp_path)
    path.write_bytes(b"not a key")
    with pytest.raises(KeyFormatError, match="PEM"):
        TokenIssuer.open(tmp_path)


# --------------------------------------------------------------------------- tokens


def test_personal_access_token_claims(accounts: Accounts, alice: User) -> None:
    issued = accounts.create_token(alice, "ci", "pipeline")
    header = jwt.get_unverified_header(issued.token)
    assert header["alg"] == "EdDSA"
    claims = _claims(issued.token)
    assert claims == {
        "iss": "cape",
        "aud": ["cape-api"],
        "sub": alice.id,
        "jti": issued.id,
        "iat": int(T0.timestamp()),
        "kind": "pat",
    }
    assert issued.expires_at is None
    assert issued.token not in repr(issued)


def test_scoped_and_expiring_token_claims(
    accounts: Accounts, alice: User, store: SqlMetadataStore
) -> None:
    fn = _function(store, alice)
    issued = accounts.create_token(alice, "one", function_id=fn.id, expiry=dt.timedelta(days=1))
    claims = _claims(issued.token)
    assert claims["fn"] == fn.id
    assert claims["exp"] == int(T0.timestamp()) + 86400
    assert issued.expires_at == T0 + dt.timedelta(days=1)


def test_token_lifecycle_create_list_delete(
    accounts: Accounts, alice: User, db_path: Path, clock: Clock
) -> None:
    first = accounts.create_token(alice, "ci", "pipeline")
    clock.now = T0 + dt.timedelta(seconds=1)
    second = accounts.create_token(alice, "laptop")
    listed = accounts.list_tokens(alice)
    assert [(t.id, t.name, t.description) for t in listed] == [
        (first.id, "ci", "pipeline"),
        (second.id, "laptop", ""),
    ]
    assert all(not hasattr(t, "token") for t in listed)
    # The server keeps metadata only: no trace of the token strings in the database files.
    stored = b"".join(p.read_bytes() for p in db_path.parent.glob("meta.db*"))
    for issued in (first, second):
        for part in issued.token.encode().split(b"."):
            assert part not in stored
    assert _principal(accounts, first).token.id == first.id
    accounts.delete_token(alice, first.id)
    with pytest.raises(AuthError, match="token has been revoked"):
        _principal(accounts, first)
    assert _principal(accounts, second).token.id == second.id
    assert [t.id for t in accounts.list_tokens(alice)] == [second.id]
    with pytest.raises(NotFoundError):
        accounts.delete_token(alice, first.id)


def test_a_user_cannot_delete_another_users_token(
    accounts: Accounts, alice: User, bob: User
) -> None:
    issued = accounts.create_token(alice, "ci")
    with pytest.raises(NotFoundError):
        accounts.delete_token(bob, issued.id)
    assert _principal(accounts, issued).user == alice


def test_logout_revokes_the_access_token(accounts: Accounts, alice: User) -> None:
    issued = accounts.login("alice", PASSWORD, client="c")
    accounts.logout(_principal(accounts, issued))
    with pytest.raises(AuthError, match="revoked"):
        _principal(accounts, issued)


def test_expired_tokens_are_refused_after_the_leeway(accounts: Accounts, alice: User) -> None:
    issued = accounts.create_token(alice, "short", expiry=dt.timedelta(hours=1))
    accounts.authenticate(issued.token, now=T0 + dt.timedelta(hours=1, seconds=29))
    with pytest.raises(AuthError, match="token is expired"):
        accounts.authenticate(issued.token, now=T0 + dt.timedelta(hours=1, seconds=31))


def test_access_tokens_expire_after_twelve_hours(accounts: Accounts, alice: User) -> None:
    issued = accounts.login("alice", PASSWORD, client="c")
    accounts.authenticate(issued.token, now=T0 + dt.timedelta(hours=11, minutes=59))
    with pytest.raises(AuthError, match="token is expired"):
        accounts.authenticate(issued.token, now=T0 + dt.timedelta(hours=12, minutes=1))


def test_tokens_without_expiry_do_not_expire(accounts: Accounts, alice: User) -> None:
    issued = accounts.create_token(alice, "forever")
    assert accounts.authenticate(issued.token, now=T0 + dt.timedelta(days=3000)).user == alice


def test_tokens_issued_in_the_future_are_refused(accounts: Accounts, alice: User) -> None:
    issued = accounts.create_token(alice, "x")
    with pytest.raises(AuthError, match="future"):
        accounts.authenticate(issued.token, now=T0 - dt.timedelta(minutes=5))


@pytest.mark.parametrize(
    "expiry", [dt.timedelta(0), dt.timedelta(seconds=-1), dt.timedelta(days=3651)]
)
def test_bad_expiries_are_refused(accounts: Accounts, alice: User, expiry: dt.timedelta) -> None:
    with pytest.raises(FormatError, match="expiry"):
        accounts.create_token(alice, "x", expiry=expiry)


def test_bad_token_names_are_refused(accounts: Accounts, alice: User) -> None:
    with pytest.raises(FormatError):
        accounts.create_token(alice, "")
    with pytest.raises(FormatError):
        accounts.create_token(alice, "x", "d" * 1025)


def test_last_used_is_recorded(accounts: Accounts, alice: User, store: SqlMetadataStore) -> None:
    issued = accounts.create_token(alice, "ci")
    record = store.get_token(issued.id)
    assert record is not None
    assert record.last_used is None
    used = T0 + dt.timedelta(minutes=5)
    assert accounts.authenticate(issued.token, now=used).token.last_used == used
    record = store.get_token(issued.id)
    assert record is not None
    assert record.last_used == used
    # Written at most once a minute per token...
    accounts.authenticate(issued.token, now=used + dt.timedelta(seconds=30))
    record = store.get_token(issued.id)
    assert record is not None
    assert record.last_used == used
    # ...and then again.
    later = used + dt.timedelta(minutes=2)
    accounts.authenticate(issued.token, now=later)
    record = store.get_token(issued.id)
    assert record is not None
    assert record.last_used == later


# --------------------------------------------------------------------------- forged tokens


def test_a_tampered_token_is_refused(accounts: Accounts, alice: User, bob: User) -> None:
    issued = accounts.create_token(alice, "ci")
    header, payload, signature = issued.token.split(".")
    claims = _claims(issued.token) | {"sub": bob.id}
    forged_payload = _b64(json.dumps(claims).encode())
    with pytest.raises(AuthError, match="bad signature"):
        accounts.authenticate(f"{header}.{forged_payload}.{signature}", now=T0)
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    with pytest.raises(AuthError, match="bad signature"):
        accounts.authenticate(f"{header}.{payload}.{flipped}", now=T0)


def test_a_token_signed_by_another_key_is_refused(accounts: Accounts, alice: User) -> None:
    issued = accounts.create_token(alice, "ci")
    stranger = TokenIssuer(Ed25519PrivateKey.generate())
    forged = stranger.issue(subject=alice.id, token_id=issued.id, kind="pat", issued_at=T0)
    with pytest.raises(AuthError, match="bad signature"):
        accounts.authenticate(forged, now=T0)


def test_alg_none_is_refused(accounts: Accounts, alice: User) -> None:
    issued = accounts.create_token(alice, "ci")
    unsigned = _unsigned({"alg": "none", "typ": "JWT"}, _claims(issued.token))
    for token in (unsigned + ".", unsigned + "." + issued.token.split(".")[2]):
        with pytest.raises(AuthError, match="invalid token"):
            accounts.authenticate(token, now=T0)


@pytest.mark.parametrize("encoding", ["raw", "pem", "der"])
def test_hmac_with_the_public_key_as_secret_is_refused(
    accounts: Accounts, alice: User, issuer: TokenIssuer, encoding: str
) -> None:
    issued = accounts.create_token(alice, "ci")
    public = issuer.public_key
    secret = {
        "raw": lambda: public.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        ),
        "pem": lambda: public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "der": lambda: public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    }[encoding]()
    signing_input = _unsigned({"alg": "HS256", "typ": "JWT"}, _claims(issued.token))
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    with pytest.raises(AuthError, match="algorithm is not accepted"):
        accounts.authenticate(f"{signing_input}.{_b64(mac)}", now=T0)


def test_an_unknown_jti_is_refused(accounts: Accounts, alice: User, issuer: TokenIssuer) -> None:
    forged = issuer.issue(subject=alice.id, token_id=new_id(), kind="pat", issued_at=T0)
    with pytest.raises(AuthError, match="token has been revoked"):
        accounts.authenticate(forged, now=T0)


def test_claims_that_disagree_with_the_record_are_refused(
    accounts: Accounts, alice: User, bob: User, issuer: TokenIssuer, store: SqlMetadataStore
) -> None:
    issued = accounts.create_token(alice, "ci")
    fn = _function(store, alice)
    for token in (
        issuer.issue(subject=bob.id, token_id=issued.id, kind="pat", issued_at=T0),
        issuer.issue(subject=alice.id, token_id=issued.id, kind="access", issued_at=T0),
        issuer.issue(
            subject=alice.id, token_id=issued.id, kind="pat", issued_at=T0, function_id=fn.id
        ),
    ):
        with pytest.raises(AuthError, match="does not match its record"):
            accounts.authenticate(token, now=T0)


def test_wrong_audience_issuer_or_claims_are_refused(
    accounts: Accounts, alice: User, signing_key: Ed25519PrivateKey
) -> None:
    issued = accounts.create_token(alice, "ci")
    good = _claims(issued.token)
    cases: list[tuple[dict[str, Any], str]] = [
        (good | {"aud": ["other-api"]}, "audience"),
        (good | {"iss": "someone-else"}, "issuer"),
        ({k: v for k, v in good.items() if k != "jti"}, "claim is missing"),
        ({k: v for k, v in good.items() if k != "aud"}, "claim is missing"),
        ({k: v for k, v in good.items() if k != "kind"}, "claim is missing"),
        (good | {"kind": "admin"}, "unknown kind"),
        (good | {"sub": "../admin"}, "malformed sub"),
        (good | {"fn": "*"}, "malformed fn"),
        (good | {"exp": "never"}, "invalid token"),
        (good | {"nbf": int(T0.timestamp()) + 3600}, "not valid yet"),
    ]
    for claims, message in cases:
        token = jwt.encode(claims, signing_key, algorithm="EdDSA")
        with pytest.raises(AuthError, match=message):
            accounts.authenticate(token, now=T0)


@pytest.mark.parametrize(
    "token",
    ["", "garbage", "a.b.c", "a.b", "..", "x" * 9000, "é.é.é", None, b"bytes"],
)
def test_malformed_tokens_are_refused(accounts: Accounts, token: Any) -> None:
    with pytest.raises(AuthError, match="invalid token"):
        accounts.authenticate(token, now=T0)


# --------------------------------------------------------------------------- authorization


def test_owner_runs_private_others_only_public(
    accounts: Accounts, alice: User, bob: User, store: SqlMetadataStore
) -> None:
    private = _function(store, alice, "private")
    public = _function(store, alice, "public", public=True)
    mine = _principal(accounts, accounts.create_token(alice, "a"))
    theirs = _principal(accounts, accounts.create_token(bob, "b"))
    authorize_run(mine, private)
    authorize_run(mine, public)
    authorize_run(theirs, public)
    with pytest.raises(NotFoundError, match=r"^no such function$") as hidden:
        authorize_run(theirs, private)
    assert not isinstance(hidden.value, ForbiddenError)


def test_others_private_functions_look_missing_to_every_kind_of_token(
    accounts: Accounts, alice: User, bob: User, store: SqlMetadataStore
) -> None:
    """Finding 9 of issue 18: the answer for another user's private function is the answer
    for a missing one, whatever the token (a scoped one too) and whatever the action."""
    private = _function(store, alice, "private")
    bobs_own = _function(store, bob, "mine")
    unscoped = _principal(accounts, accounts.create_token(bob, "b"))
    scoped = _principal(accounts, accounts.create_token(bob, "s", function_id=bobs_own.id))
    for principal in (unscoped, scoped):
        with pytest.raises(NotFoundError, match=r"^no such function$"):
            authorize_run(principal, private)
    with pytest.raises(NotFoundError, match=r"^no such function$"):
        authorize_owner(unscoped, private)
    with pytest.raises(NotFoundError, match=r"^no such function$"):
        accounts.create_token(bob, "x", function_id=private.id)


def test_only_the_owner_may_delete(
    accounts: Accounts, alice: User, bob: User, store: SqlMetadataStore
) -> None:
    public = _function(store, alice, "public", public=True)
    authorize_owner(_principal(accounts, accounts.create_token(alice, "a")), public)
    with pytest.raises(ForbiddenError, match="owner"):
        authorize_owner(_principal(accounts, accounts.create_token(bob, "b")), public)


def test_a_function_scoped_token_runs_only_its_function(
    accounts: Accounts, alice: User, bob: User, store: SqlMetadataStore
) -> None:
    fn = _function(store, alice, "app")
    other = _function(store, alice, "other")
    public_of_bob = _function(store, bob, "bobs", public=True)
    scoped = _principal(accounts, accounts.create_token(alice, "one", function_id=fn.id))
    assert scoped.function_scope == fn.id
    authorize_run(scoped, fn)
    for refused in (other, public_of_bob):
        with pytest.raises(ForbiddenError, match="scoped"):
            authorize_run(scoped, refused)
    with pytest.raises(ForbiddenError, match="function-scoped"):
        authorize_account(scoped)
    with pytest.raises(ForbiddenError, match="function-scoped"):
        authorize_owner(scoped, fn)
    authorize_account(_principal(accounts, accounts.create_token(alice, "all")))


def test_tokens_scope_only_to_ones_own_existing_functions(
    accounts: Accounts, alice: User, bob: User, store: SqlMetadataStore
) -> None:
    bobs = _function(store, bob, "bobs", public=True)
    with pytest.raises(ForbiddenError, match="your own"):
        accounts.create_token(alice, "x", function_id=bobs.id)
    with pytest.raises(NotFoundError):
        accounts.create_token(alice, "x", function_id=new_id())
    assert accounts.list_tokens(alice) == []


def test_deleting_a_function_revokes_its_scoped_tokens(
    accounts: Accounts, alice: User, store: SqlMetadataStore
) -> None:
    fn = _function(store, alice)
    scoped = accounts.create_token(alice, "one", function_id=fn.id)
    store.delete_function(fn.id)
    with pytest.raises(AuthError, match="revoked"):
        _principal(accounts, scoped)


def test_a_token_is_verified_once_but_its_times_and_record_are_checked_at_every_use(
    accounts: Accounts,
    alice: User,
    bob: User,
    issuer: TokenIssuer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decoded: list[str] = []
    decode = jwt.decode

    def counting_decode(token: str, *args: Any, **kwargs: Any) -> Any:
        decoded.append(token)
        return decode(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting_decode)
    ours = accounts.create_token(alice, "ci", expiry=dt.timedelta(hours=1))
    theirs = accounts.create_token(bob, "ci")
    for _ in range(3):  # each tenant's string maps to its own principal, verified once
        assert accounts.authenticate(ours.token, now=T0).user == alice
        assert accounts.authenticate(theirs.token, now=T0).user == bob
    assert decoded == [ours.token, theirs.token]
    # Times are checked at every use, the signature is not re-done.
    with pytest.raises(AuthError, match="token is expired"):
        accounts.authenticate(ours.token, now=T0 + dt.timedelta(hours=1, seconds=31))
    with pytest.raises(AuthError, match="future"):
        accounts.authenticate(ours.token, now=T0 - dt.timedelta(minutes=5))
    # The record is read at every use: deleting it revokes the remembered string at once.
    accounts.delete_token(bob, theirs.id)
    with pytest.raises(AuthError, match="revoked"):
        accounts.authenticate(theirs.token, now=T0)
    assert decoded == [ours.token, theirs.token]
    # A failure is not remembered, and another key never accepts what this one verified.
    header, payload, signature = ours.token.split(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    for _ in range(2):
        with pytest.raises(AuthError, match="bad signature"):
            accounts.authenticate(f"{header}.{payload}.{flipped}", now=T0)
    assert decoded[2:] == [f"{header}.{payload}.{flipped}"] * 2
    with pytest.raises(AuthError, match="bad signature"):
        TokenIssuer(Ed25519PrivateKey.generate()).verify(ours.token, now=T0)
