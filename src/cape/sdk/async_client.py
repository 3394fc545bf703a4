"""The SDK's implementation: :class:`AsyncCape`, every network call a coroutine
(:mod:`cape.sdk.client` re-exports it beside :class:`~cape.sdk.client.Cape`, its synchronous
face)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hmac
import os
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from cape import serdio
from cape.crypto import envelope
from cape.crypto.keys import load_rsa_public_key, public_key_der
from cape.errors import CapeError, FormatError, TransportError, VerificationError
from cape.sdk import config as client_config
from cape.sdk import flows
from cape.sdk.bundle import Bundle, build_bundle
from cape.sdk.function_ref import FunctionRef
from cape.sdk.hints import add_hint
from cape.sdk.inputs import (
    PcrPins,
    _function_id,
    _load_token,
    _pcr_pins,
    key_document_user_data,
    normalize_fingerprint,
)
from cape.sdk.records import Attested, CreatedToken, Deployed, FunctionInfo, TokenInfo
from cape.sdk.rest import RestClient
from cape.sdk.session import Session, SessionOptions
from cape.verify.policy import AttestationPolicy
from cape.verify.roots import fingerprint, load_root_certificate, load_root_certificate_file
from cape.verify.verifier import verify_archived_attestation

T = TypeVar("T")


class UntrustedRootError(VerificationError):
    """No attestation root is pinned for this server yet."""


class AsyncCape:
    """A client of one Cape server (async).

    Settings not passed here come from the environment, ``cape config`` and ``cape login``
    (see :mod:`cape.sdk.config`). ``attestation_root`` pins the root certificate documents
    must chain to; without it the root pinned for this server (``cape login --trust-root``
    or :meth:`trust_root`) or the local ``cape serve``'s is used.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        attestation_root: str | os.PathLike[str] | None = None,
        seal_results: bool = True,
    ) -> None:
        self.settings = client_config.resolve(
            url=url,
            ca_file=Path(ca_file) if ca_file is not None else None,
            attestation_root=Path(attestation_root) if attestation_root is not None else None,
            token=token,
        )
        self.seal_results = seal_results
        self._ssl = self.settings.ssl_context()
        self._root: x509.Certificate | None = None
        self._session: Session | None = None
        self.last_attestation: Attested | None = None
        """The facts the most recent function session verified (kept after close)."""

    @property
    def url(self) -> str:
        return self.settings.url

    # -- trust ---------------------------------------------------------------------------

    def root(self) -> x509.Certificate:
        """The pinned attestation root for this server."""
        if self._root is None:
            path = self.settings.attestation_root
            if path is None:
                raise UntrustedRootError(
                    f"no attestation root is pinned for {self.url}: run `cape login "
                    "--trust-root SHA256` with the fingerprint the operator gives you, or "
                    "pass --attestation-root FILE"
                )
            self._root = load_root_certificate_file(path)
        return self._root

    async def _rest(self, call: Callable[[RestClient], T], token: str | None = None) -> T:
        """Run one blocking REST exchange in a worker thread."""

        def run() -> T:
            with RestClient(self.url, self._ssl, token) as rest:
                return call(rest)

        try:
            return await asyncio.to_thread(run)
        except CapeError as exc:
            raise add_hint(exc) from None

    async def input_limit(self) -> int | None:
        """The largest function input the server accepts, in bytes (``GET /v1/runtime``);
        ``None`` when the server does not say (an older server)."""
        answer = await self._rest(lambda rest: rest.request("GET", "/v1/runtime"))
        limit = answer.get("max_input_bytes") if isinstance(answer, dict) else None
        return limit if isinstance(limit, int) and limit > 0 else None

    async def server_root(self) -> x509.Certificate:
        """The root the server offers (NOT trusted: check its fingerprint out of band)."""

        return load_root_certificate(await self._rest(RestClient.attestation_root))

    async def trust_root(self, expected_fingerprint: str) -> x509.Certificate:
        """Fetch the server's root, require its SHA-256 fingerprint, and pin it for this URL."""
        want = normalize_fingerprint(expected_fingerprint)
        cert = await self.server_root()
        got = fingerprint(cert)
        if not hmac.compare_digest(got, want):
            raise VerificationError(
                f"the server's attestation root has fingerprint {got}, not {want}; not pinned"
            )
        from cryptography.hazmat.primitives.serialization import Encoding

        client_config.write_config_file(
            client_config.pinned_root_path(self.url), cert.public_bytes(Encoding.PEM)
        )
        self._root = cert
        return cert

    def _options(self, pcrs: PcrPins | None = None, checksum: str | None = None) -> SessionOptions:
        return SessionOptions(
            root=self.root(),
            ssl_context=self._ssl,
            pcrs=_pcr_pins(pcrs),
            function_checksum=checksum,
            seal_results=self.seal_results,
        )

    def token(self, token: str | os.PathLike[str] | None = None) -> str:
        """A token string from ``token`` (string or file), else the configured login.

        Without either, an unreachable server is reported as such rather than as "not
        logged in" (the login may well exist for it once it is up)."""
        if token is not None:
            return _load_token(token)
        if not self.settings.token:
            with RestClient(self.url, self._ssl) as rest:  # raises "cannot reach …"
                try:
                    rest.request("GET", "/v1/runtime")
                except TransportError as exc:
                    raise add_hint(exc) from None
                except CapeError:
                    pass  # reachable: then the missing login is the problem
        return self.settings.require_token()

    def function(
        self, identifier: str | os.PathLike[str] | FunctionRef, *, checksum: str | None = None
    ) -> FunctionRef:
        """A :class:`FunctionRef` from an id, ``user/name``, a JSON file, or a FunctionRef."""
        if isinstance(identifier, FunctionRef):
            if checksum is None or identifier.checksum == checksum.lower():
                return identifier
            if identifier.checksum is not None:
                raise FormatError("the checksum given conflicts with the FunctionRef's checksum")
            return FunctionRef(identifier.id, identifier.name, checksum)
        if isinstance(identifier, os.PathLike) or (
            identifier.endswith(".json") and Path(identifier).is_file()
        ):
            return FunctionRef.from_json(identifier)
        return FunctionRef.parse(identifier, checksum=checksum)

    # -- accounts --------------------------------------------------------------------------

    async def signup(
        self, username: str, password: str, *, save: bool = True, invite: str | None = None
    ) -> str:
        """Create an account; returns (and by default saves) its login token. ``invite`` is
        the code a server that takes invited signups needs (``cape serve --signup invite``)."""
        return await self._account("signup", username, password, save, invite)

    async def login(self, username: str, password: str, *, save: bool = True) -> str:
        """Log in; returns (and by default saves) the token."""
        return await self._account("login", username, password, save)

    async def _account(
        self, action: str, username: str, password: str, save: bool, invite: str | None = None
    ) -> str:
        result = await self._rest(
            lambda rest: (
                rest.signup(username, password, invite)
                if action == "signup"
                else rest.login(username, password)
            )
        )
        token = result.get("access_token")
        name = result.get("username", username)
        if not isinstance(token, str) or not isinstance(name, str):
            raise FormatError("the server's login answer carries no token")
        if save:
            client_config.save_token(self.url, name, token)
        self.settings = client_config.ClientConfig(
            self.url, self.settings.ca_file, self.settings.attestation_root, token, name
        )
        return token

    # -- keys and encryption ---------------------------------------------------------------

    async def key(
        self,
        *,
        username: str | None = None,
        key_path: str | os.PathLike[str] | None = None,
        pcrs: PcrPins | None = None,
        refresh: bool = False,
    ) -> bytes:
        """A Cape key (DER SubjectPublicKeyInfo): one's own, or ``username``'s.

        Cached in the config directory (or ``key_path``) after an attested fetch; a cached
        key is returned as is unless ``refresh``.
        """
        if username is not None and key_path is not None:
            raise FormatError("give either username or key_path, not both")
        path = Path(key_path) if key_path is not None else client_config.cached_key_path(username)
        if not refresh and path.is_file():
            try:
                der = path.read_bytes()
            except OSError as exc:
                raise FormatError(f"cannot read the cached key {path}: {exc.strerror}") from None
            return public_key_der(load_rsa_public_key(der))
        if key_path is not None and username is None and self.settings.token is None:
            raise FormatError(f"no key at {path}")
        if username is not None:
            public = await self._user_key(username, pcrs)
        else:
            public = await flows.fetch_key(
                self.url, self.token(), self._options(pcrs), owner=self.settings.username
            )
        der = public_key_der(public)
        if key_path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(der)
        else:
            client_config.write_config_file(path, der)
        return der

    async def _user_key(self, username: str, pcrs: PcrPins | None) -> RSAPublicKey:
        username = client_config.check_username(username)  # the server's canonical form
        root = self.root()  # before any network call: no pinned root, no request

        answer = await self._rest(lambda rest: rest.request("GET", f"/v1/user/{username}/key"))
        encoded = answer.get("attestation_document") if isinstance(answer, dict) else None
        if not isinstance(encoded, str):
            raise FormatError("the server's key answer carries no attestation document")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise FormatError("the key document is not valid base64") from None
        # A stored document: verified at its own timestamp (it may be months old).
        document = verify_archived_attestation(
            raw, root=root, policy=AttestationPolicy(pcrs=_pcr_pins(pcrs))
        )
        return flows.key_from_user_data(key_document_user_data(document.user_data), username)

    async def encrypt(
        self,
        input: bytes,
        *,
        username: str | None = None,
        key: bytes | None = None,
        key_path: str | os.PathLike[str] | None = None,
    ) -> bytes:
        """``cape:`` + base64 envelope of ``input`` for one's own key or ``username``'s."""
        der = key if key is not None else await self.key(username=username, key_path=key_path)
        return envelope.encrypt_text_bytes(bytes(input), load_rsa_public_key(der))

    # -- functions ---------------------------------------------------------------------------

    async def connect(
        self,
        function_ref: str | os.PathLike[str] | FunctionRef,
        token: str | os.PathLike[str] | None = None,
        pcrs: PcrPins | None = None,
    ) -> None:
        """Open a verified session with the function's enclave (one at a time)."""
        ref = self.function(function_ref)
        await self.close()
        try:
            self._session = session = await Session.open(
                self.url, ref.path, self.token(token), self._options(pcrs, ref.checksum)
            )
        except CapeError as exc:
            raise add_hint(exc) from None
        checksum = session.user_data.get("func_checksum")
        try:
            checksum_hex = base64.b64decode(checksum, validate=True).hex() if checksum else None
        except (binascii.Error, ValueError, TypeError):
            checksum_hex = None
        document = session.document
        self.last_attestation = Attested(
            root_sha256=fingerprint(self.root()),
            module_id=document.module_id,
            issued_at=document.issued_at.isoformat(),
            pcrs={i: document.pcrs[i].hex() for i in (0, 1, 2) if i in document.pcrs},
            function_checksum=checksum_hex,
        )

    async def invoke(
        self,
        *args: Any,
        serde_hooks: Any = None,
        use_serdio: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Call the connected function. Without serdio, one ``bytes`` argument, bytes back."""
        if self._session is None:
            raise CapeError("not connected: call connect() first")
        hooks = serdio.bundle_hooks(serde_hooks) if serde_hooks is not None else None
        if hooks is not None or use_serdio:
            data = serdio.serialize(*args, encoder=hooks.encoder if hooks else None, **kwargs)
        else:
            if kwargs or len(args) != 1 or not isinstance(args[0], bytes | bytearray):
                raise TypeError("without use_serdio, invoke takes exactly one bytes argument")
            data = bytes(args[0])
        try:
            output = await self._session.invoke(data)
        except CapeError as exc:
            raise add_hint(exc) from None
        if hooks is not None or use_serdio:
            return serdio.deserialize(output, decoder=hooks.decoder if hooks else None)
        return output

    async def run(
        self,
        function_ref: str | os.PathLike[str] | FunctionRef,
        token: str | os.PathLike[str] | None = None,
        *args: Any,
        pcrs: PcrPins | None = None,
        serde_hooks: Any = None,
        use_serdio: bool = False,
        **kwargs: Any,
    ) -> Any:
        """connect + invoke + close (pycape's signature)."""
        await self.connect(function_ref, token, pcrs)
        try:
            return await self.invoke(
                *args, serde_hooks=serde_hooks, use_serdio=use_serdio, **kwargs
            )
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the current function session, if any."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def build(
        self,
        path: str | os.PathLike[str],
        *,
        vendor: bool = True,
        progress: Callable[[str], None] | None = None,
    ) -> Bundle:
        """Zip a function folder deterministically (vendoring requirements.txt)."""
        source = Path(path)
        target = None
        if vendor and source.is_dir() and (source / "requirements.txt").is_file():
            target = await self._rest(RestClient.runtime)
        return await asyncio.to_thread(
            build_bundle, source, vendor=vendor, target=target, progress=progress
        )

    async def deploy(
        self,
        path: str | os.PathLike[str] | Bundle,
        *,
        name: str | None = None,
        public: bool = False,
        token: str | os.PathLike[str] | None = None,
        pcrs: PcrPins | None = None,
        vendor: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> Deployed:
        """Deploy a folder or zip: encrypted to one's own attested key, sent to an enclave."""
        bundle = path if isinstance(path, Bundle) else await self.build(path, vendor=vendor)
        chosen = name or bundle.source.name.split(".", 1)[0]
        token_text = self.token(token)
        if token is None and self.settings.username is not None:
            public_key = load_rsa_public_key(await self.key(pcrs=pcrs))  # the login's, cached
        else:
            public_key = await flows.fetch_key(self.url, token_text, self._options(pcrs))
        done = await flows.deploy(
            self.url,
            token_text,
            self._options(pcrs),
            bundle.data,
            name=chosen,
            public=public,
            key=public_key,
            progress=progress,
        )
        owner = self.settings.username if token is None else None
        full = f"{owner}/{done.name}" if owner and "/" not in done.name else done.name
        return Deployed(done.id, done.checksum, full, bundle.vendored)

    async def test(
        self,
        path: str | os.PathLike[str] | Bundle,
        input: bytes,
        *,
        token: str | os.PathLike[str] | None = None,
        pcrs: PcrPins | None = None,
        vendor: bool = True,
    ) -> bytes:
        """Run a folder or zip once on ``input`` without storing it."""
        bundle = path if isinstance(path, Bundle) else await self.build(path, vendor=vendor)
        try:
            results = await flows.test(
                self.url, self.token(token), self._options(pcrs), bundle.data, [bytes(input)]
            )
        except CapeError as exc:
            raise add_hint(exc) from None
        return results[0]

    # -- management (REST) -------------------------------------------------------------------

    async def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None, token: Any = None
    ) -> Any:
        return await self._rest(lambda rest: rest.request(method, path, body), self.token(token))

    async def functions(
        self, *, limit: int = 50, offset: int = 0, token: str | None = None
    ) -> list[FunctionInfo]:
        """One's deployed functions, newest first."""
        rows = await self._call("GET", f"/v1/functions?limit={limit}&offset={offset}", None, token)
        if not isinstance(rows, list):
            raise FormatError("the server's function list is not a list")
        try:
            return [
                FunctionInfo(
                    str(r["id"]),
                    str(r["name"]),
                    str(r["created_at"]),
                    r.get("checksum"),
                    bool(r.get("public", False)),
                )
                for r in rows
            ]
        except (KeyError, TypeError):
            raise FormatError("the server's function list is malformed") from None

    async def count_functions(self, *, offset: int = 0, token: str | None = None) -> int:
        """How many of one's functions there are from ``offset`` on (pages through them)."""
        count = 0
        while True:
            page = await self.functions(limit=1000, offset=offset + count, token=token)
            count += len(page)
            if len(page) < 1000:
                return count

    async def delete_function(self, function_id: str, *, token: str | None = None) -> None:
        """Delete one of your functions by id (its stored bundle goes with it)."""
        await self._call("DELETE", f"/v1/functions/{_function_id(function_id)}", None, token)

    async def create_token(
        self,
        name: str,
        *,
        description: str = "",
        function: str | None = None,
        expiry: dt.timedelta | None = None,
        token: str | None = None,
    ) -> CreatedToken:
        """A personal access token, optionally scoped to one function and expiring."""
        body: dict[str, Any] = {"name": name, "description": description}
        if function is not None:
            body["function_id"] = _function_id(function)
        if expiry is not None:
            seconds = int(expiry.total_seconds())
            if seconds <= 0:
                raise FormatError("a token expiry must be positive")
            body["expiry"] = seconds
        answer = await self._call("POST", "/v1/token", body, token)
        if not isinstance(answer, dict) or not isinstance(answer.get("token"), str):
            raise FormatError("the server's token answer is malformed")
        return CreatedToken(id=str(answer.get("id")), token=answer["token"])

    async def tokens(self, *, token: str | None = None) -> list[TokenInfo]:
        """Your personal access tokens' metadata (never the tokens themselves)."""
        rows = await self._call("GET", "/v1/tokens", None, token)
        if not isinstance(rows, list):
            raise FormatError("the server's token list is not a list")
        try:
            return [
                TokenInfo(
                    str(r["id"]),
                    str(r["name"]),
                    str(r.get("description") or ""),
                    str(r["created_at"]),
                    r.get("expiry"),
                    r.get("last_used"),
                    r.get("function_id"),
                )
                for r in rows
            ]
        except (KeyError, TypeError):
            raise FormatError("the server's token list is malformed") from None

    async def delete_token(self, token_id: str, *, token: str | None = None) -> None:
        """Delete a token by id; it stops working at once."""
        await self._call("DELETE", f"/v1/token/{token_id}", None, token)
