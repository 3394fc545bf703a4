"""The Python SDK: ``from cape import Cape``.

:class:`AsyncCape` is the implementation (every network call is a coroutine);
:class:`Cape` offers the same calls synchronously and, like pycape, also from async code: a
call made from a coroutine returns an awaitable instead (plain code in a running event loop,
such as a Jupyter cell, gets the result). For typed async code use ``cape.aio``, the
:class:`AsyncCape` behind a :class:`Cape`.

Every session verifies before anything secret leaves this process (see
:mod:`cape.sdk.session`): the attestation document must chain to the pinned root and carry
this session's nonce, pinned PCRs and checksum, and results are sealed to a response key bound
into the document. Keys fetched by user name must come in a document that names that user.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import os
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Self, TypeVar

from cryptography import x509

from cape.errors import CapeError
from cape.sdk.async_client import AsyncCape, UntrustedRootError
from cape.sdk.bundle import Bundle
from cape.sdk.function_ref import FunctionRef
from cape.sdk.inputs import TOKEN_FILE_MAX as TOKEN_FILE_MAX
from cape.sdk.inputs import PcrPins, normalize_fingerprint
from cape.sdk.inputs import key_document_user_data as key_document_user_data
from cape.sdk.records import Attested, CreatedToken, Deployed, FunctionInfo, TokenInfo

__all__ = [
    "AsyncCape",
    "Attested",
    "Cape",
    "CreatedToken",
    "Deployed",
    "FunctionInfo",
    "FunctionRef",
    "PcrPins",
    "TokenInfo",
    "UntrustedRootError",
    "normalize_fingerprint",
]

T = TypeVar("T")


class _Portal:
    """One background event loop that runs every :class:`Cape`'s coroutines.

    Websocket sessions belong to the loop that opened them, so sync calls and async calls
    (from whatever loop the caller runs) all execute here.
    """

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def loop(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._loop.is_closed():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="cape-sdk", daemon=True)
                thread.start()
                cls._loop = loop
            return cls._loop

    @classmethod
    def call(cls, coro: Coroutine[Any, Any, T]) -> T:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        loop = cls.loop()
        if running is loop:
            coro.close()
            raise CapeError("a Cape method was called from inside its own event loop")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        if running is not None and _called_from_coroutine():
            return asyncio.wrap_future(future)  # type: ignore[return-value]
        # Plain code, even while the thread's loop runs (a Jupyter cell): the call runs on the
        # portal's own loop, so waiting here cannot deadlock.
        return future.result()


def _called_from_coroutine() -> bool:
    """True when the code calling a :class:`Cape` method is itself a coroutine (``async def``
    or a cell with top-level ``await``): pycape's callers ``await`` the result there."""
    frame = sys._getframe(3)  # _called_from_coroutine <- _Portal.call <- Cape.method <- caller
    return bool(frame.f_code.co_flags & inspect.CO_COROUTINE)


class Cape:
    """The synchronous face of :class:`AsyncCape` (same arguments, same methods).

    ``with Cape() as cape: cape.run("user/fn", None, b"input")``. Called from a coroutine
    (``async def``, or a notebook cell using top-level ``await``) each network method returns
    an awaitable (pycape's behaviour); called from plain code it returns the result, also while
    an event loop runs in the thread (a Jupyter cell). ``cape.aio`` is the typed async client.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        attestation_root: str | os.PathLike[str] | None = None,
        seal_results: bool = True,
        verbose: bool = False,
    ) -> None:
        self.aio = AsyncCape(
            url,
            token=token,
            ca_file=ca_file,
            attestation_root=attestation_root,
            seal_results=seal_results,
        )
        self.verbose = verbose

    @property
    def url(self) -> str:
        return self.aio.url

    def function(
        self, identifier: str | os.PathLike[str] | FunctionRef, *, checksum: str | None = None
    ) -> FunctionRef:
        return self.aio.function(identifier, checksum=checksum)

    def token(self, token: str | os.PathLike[str] | None = None) -> str:
        return self.aio.token(token)

    def root(self) -> x509.Certificate:
        return self.aio.root()

    def server_root(self) -> x509.Certificate:
        return _Portal.call(self.aio.server_root())

    def input_limit(self) -> int | None:
        return _Portal.call(self.aio.input_limit())

    def trust_root(self, expected_fingerprint: str) -> x509.Certificate:
        return _Portal.call(self.aio.trust_root(expected_fingerprint))

    def signup(
        self, username: str, password: str, *, save: bool = True, invite: str | None = None
    ) -> str:
        return _Portal.call(self.aio.signup(username, password, save=save, invite=invite))

    def login(self, username: str, password: str, *, save: bool = True) -> str:
        return _Portal.call(self.aio.login(username, password, save=save))

    def key(
        self,
        *,
        username: str | None = None,
        key_path: str | os.PathLike[str] | None = None,
        pcrs: PcrPins | None = None,
        refresh: bool = False,
    ) -> bytes:
        return _Portal.call(
            self.aio.key(username=username, key_path=key_path, pcrs=pcrs, refresh=refresh)
        )

    def encrypt(
        self,
        input: bytes,
        *,
        username: str | None = None,
        key: bytes | None = None,
        key_path: str | os.PathLike[str] | None = None,
    ) -> bytes:
        return _Portal.call(self.aio.encrypt(input, username=username, key=key, key_path=key_path))

    def connect(
        self,
        function_ref: str | os.PathLike[str] | FunctionRef,
        token: str | os.PathLike[str] | None = None,
        pcrs: PcrPins | None = None,
    ) -> None:
        return _Portal.call(self.aio.connect(function_ref, token, pcrs))

    def invoke(
        self, *args: Any, serde_hooks: Any = None, use_serdio: bool = False, **kwargs: Any
    ) -> Any:
        return _Portal.call(
            self.aio.invoke(*args, serde_hooks=serde_hooks, use_serdio=use_serdio, **kwargs)
        )

    def run(
        self,
        function_ref: str | os.PathLike[str] | FunctionRef,
        token: str | os.PathLike[str] | None = None,
        *args: Any,
        pcrs: PcrPins | None = None,
        serde_hooks: Any = None,
        use_serdio: bool = False,
        **kwargs: Any,
    ) -> Any:
        return _Portal.call(
            self.aio.run(
                function_ref,
                token,
                *args,
                pcrs=pcrs,
                serde_hooks=serde_hooks,
                use_serdio=use_serdio,
                **kwargs,
            )
        )

    def close(self) -> None:
        return _Portal.call(self.aio.close())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def build(
        self,
        path: str | os.PathLike[str],
        *,
        vendor: bool = True,
        progress: Callable[[str], None] | None = None,
    ) -> Bundle:
        return _Portal.call(self.aio.build(path, vendor=vendor, progress=progress))

    def deploy(
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
        return _Portal.call(
            self.aio.deploy(
                path,
                name=name,
                public=public,
                token=token,
                pcrs=pcrs,
                vendor=vendor,
                progress=progress,
            )
        )

    def test(
        self,
        path: str | os.PathLike[str] | Bundle,
        input: bytes,
        *,
        token: str | os.PathLike[str] | None = None,
        pcrs: PcrPins | None = None,
        vendor: bool = True,
    ) -> bytes:
        return _Portal.call(self.aio.test(path, input, token=token, pcrs=pcrs, vendor=vendor))

    def functions(
        self, *, limit: int = 50, offset: int = 0, token: str | None = None
    ) -> list[FunctionInfo]:
        return _Portal.call(self.aio.functions(limit=limit, offset=offset, token=token))

    def count_functions(self, *, offset: int = 0, token: str | None = None) -> int:
        return _Portal.call(self.aio.count_functions(offset=offset, token=token))

    def delete_function(self, function_id: str, *, token: str | None = None) -> None:
        return _Portal.call(self.aio.delete_function(function_id, token=token))

    def create_token(
        self,
        name: str,
        *,
        description: str = "",
        function: str | None = None,
        expiry: dt.timedelta | None = None,
        token: str | None = None,
    ) -> CreatedToken:
        return _Portal.call(
            self.aio.create_token(
                name, description=description, function=function, expiry=expiry, token=token
            )
        )

    def tokens(self, *, token: str | None = None) -> list[TokenInfo]:
        return _Portal.call(self.aio.tokens(token=token))

    def delete_token(self, token_id: str, *, token: str | None = None) -> None:
        return _Portal.call(self.aio.delete_token(token_id, token=token))
