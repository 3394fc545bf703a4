"""The client SDK against a hostile server: it fails closed with a specific CapeError.

Every test runs a real TLS websocket server (:mod:`tests.integration.hostile`) that plays an
enclave with the simulated secure module. The honest baseline proves the server is a correct
peer, so every refusal below is caused by the one deviation under test. Where the deviation
is in the attestation document, the server also proves the client sent nothing after it: no
input, no bundle, no deploy info.

Results (and function errors) in a sealed session travel on the session's result channel
(:mod:`cape.crypto.results`): reply *n* opens only with sequence number *n* under a key that
only this client and the attested enclave can derive. The channel tests below prove that a
host which forges, replays, reorders, drops or injects replies gets a CapeError out of the
client, never wrong data; all it can do is fail a call.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from cape._internal.timefile import utc_now
from cape.crypto import hpke, results
from cape.crypto.envelope import DECRYPTION_FAILED
from cape.crypto.keys import public_key_der
from cape.crypto.results import SEALED_ERROR_TEXT, ResultChannel
from cape.crypto.session_keys import SessionKeys
from cape.errors import (
    BusyError,
    CapeError,
    CertificateExpiredError,
    ChainError,
    ChecksumMismatchError,
    DebugEnclaveError,
    DecryptionError,
    DocumentExpiredError,
    FormatError,
    FunctionError,
    KeyFormatError,
    MalformedEnvelopeError,
    NonceMismatchError,
    PCRMismatchError,
    RequestRefusedError,
    SignatureError,
    TransportError,
    VerificationError,
)
from cape.platform.tls import TlsFiles, ensure_tls
from cape.sdk import flows
from cape.sdk.session import Session, SessionOptions
from cape.verify import verifier
from tests.integration.hostile import (
    FAIL_INPUT,
    FAIL_TEXT,
    FUNCTION_BUNDLE,
    FUNCTION_CHECKSUM,
    KEY_OWNER,
    PCRS,
    Enclave,
    HostileServer,
    Pki,
    Script,
    SessionRecord,
    b64,
    client_ssl_context,
    echo,
    honest,
    session_channel,
)

T = TypeVar("T")
TOKEN = "test-token"
RUN_PATH = "/v1/run/alice/echo"
#: A client call that has not failed or returned by then is a hang (a test failure).
CLIENT_TIMEOUT_S = 4.0
INPUTS = (b"hello", b"", bytes(range(256)) * 4)
FLOWS = ("run", "test", "deploy", "key")


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return ensure_tls(tmp_path_factory.mktemp("tls"), "127.0.0.1")


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.generate()


@pytest.fixture(scope="module")
def other_pki() -> Pki:
    """Another operator's root, with the very same subject name as the pinned one."""
    return Pki.generate()


@pytest.fixture(scope="module")
def rsa_key() -> RSAPrivateKey:
    """The Cape key the key route hands out (2048 bits, the smallest accepted: fast)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def options(tls: TlsFiles, pki: Pki, **overrides: Any) -> SessionOptions:
    return SessionOptions(root=pki.root, ssl_context=client_ssl_context(tls), **overrides)


@dataclass
class Outcome(Generic[T]):
    """What the client returned or raised, and what the server saw."""

    value: T | None
    error: CapeError | None
    sessions: list[SessionRecord]

    @property
    def session(self) -> SessionRecord:
        return self.sessions[-1]

    def refused(self, kind: type[CapeError], match: str) -> CapeError:
        assert self.error is not None, f"the client accepted a hostile server: {self.value!r}"
        assert isinstance(self.error, kind), (
            f"expected {kind.__name__}, got {type(self.error).__name__}: {self.error}"
        )
        assert re.search(match, str(self.error)), f"{match!r} not in {str(self.error)!r}"
        return self.error

    def nothing_after_document(self) -> None:
        """The client sent no frame (JSON or binary) after the last session's document."""
        session = self.session
        assert session.document_sent, "the server never sent a document"
        assert session.after_document == [], (
            f"the client sent {len(session.after_document)} frame(s) after the document"
        )

    def only_the_nonce(self) -> None:
        """The client sent its nonce message and nothing else (no binary frame at all)."""
        assert len(self.session.frames) == 1 and isinstance(self.session.frames[0], str)
        assert self.session.start is not None and "nonce" in self.session.start


async def _attack(
    server: HostileServer, client: Callable[[str], Awaitable[T]], sessions: int
) -> Outcome[T]:
    value: T | None = None
    error: CapeError | None = None
    async with server:
        try:
            value = await asyncio.wait_for(client(server.url), CLIENT_TIMEOUT_S)
        except CapeError as exc:
            error = exc
        records = await server.finished(sessions)
    return Outcome(value, error, records)


def attack(
    server: HostileServer, client: Callable[[str], Awaitable[T]], *, sessions: int = 1
) -> Outcome[T]:
    """Run ``client(url)`` against ``server``; a non-Cape exception or a hang fails the test."""
    return asyncio.run(_attack(server, client, sessions))


def run_client(
    opts: SessionOptions, inputs: Sequence[bytes] = (b"hello",)
) -> Callable[[str], Awaitable[list[bytes]]]:
    async def client(url: str) -> list[bytes]:
        async with await Session.open(url, RUN_PATH, TOKEN, opts) as session:
            return [await session.invoke(data) for data in inputs]

    return client


def flow_client(
    flow: str, opts: SessionOptions, rsa_key: RSAPrivateKey
) -> Callable[[str], Awaitable[object]]:
    """The client side of one session kind, as the CLI drives it."""

    async def client(url: str) -> object:
        if flow == "run":
            return await run_client(opts)(url)
        if flow == "test":
            return await flows.test(url, TOKEN, opts, FUNCTION_BUNDLE, [b"in"])
        if flow == "deploy":
            return await flows.deploy(
                url, TOKEN, opts, FUNCTION_BUNDLE, name="echo", key=rsa_key.public_key()
            )
        assert flow == "key"
        return await flows.fetch_key(url, TOKEN, opts, owner=KEY_OWNER)

    return client


def document_script(make: Callable[[Enclave], bytes], *, then_close: bool = False) -> Script:
    """Read the nonce, send ``make(enclave)`` as the document, then record what follows."""

    async def script(enclave: Enclave) -> None:
        await enclave.read_start()
        await enclave.send_document(make(enclave))
        if then_close:
            await enclave.ws.close()

    return script


def result_script(reply: Callable[[Enclave, bytes], object]) -> Script:
    """An honest document, then ``reply(enclave, input)`` as the message for each input."""

    async def script(enclave: Enclave) -> None:
        await enclave.read_start()
        await enclave.send_document()
        while True:
            data = await enclave.open_frame()
            await enclave.send_message(reply(enclave, data))

    return script


def sealed(ciphertext: bytes) -> dict[str, Any]:
    return {"type": "function_result", "message": b64(ciphertext), "encrypted": True}


# --- the honest baseline --------------------------------------------------------------------

HONEST_PINS: dict[str, dict[str, Any]] = {
    "no-pins": {},
    "pcrs-pinned": {"pcrs": {0: {PCRS[0], os.urandom(48)}, 8: {PCRS[8]}}},
    "checksum-pinned": {"function_checksum": FUNCTION_CHECKSUM},
    "checksum-pinned-uppercase": {"function_checksum": FUNCTION_CHECKSUM.upper()},
    "everything-pinned": {"pcrs": {0: {PCRS[0]}}, "function_checksum": FUNCTION_CHECKSUM},
    "unsealed-results": {"seal_results": False},
}


@pytest.mark.parametrize("pins", HONEST_PINS.values(), ids=HONEST_PINS.keys())
def test_honest_run_session_succeeds(tls: TlsFiles, pki: Pki, pins: dict[str, Any]) -> None:
    outcome = attack(HostileServer(tls, pki), run_client(options(tls, pki, **pins), INPUTS))
    assert outcome.error is None
    assert outcome.value == [echo(data) for data in INPUTS]
    session = outcome.session
    assert session.opened == list(INPUTS)
    assert session.start is not None
    assert len(base64.b64decode(session.start["nonce"])) == 16
    assert ("response_key" in session.start) is pins.get("seal_results", True)
    # Inputs travel only sealed: one binary frame each, none of them the plaintext.
    assert len(session.binary_frames) == len(INPUTS)
    assert all(
        data not in frame for frame, data in zip(session.binary_frames, INPUTS, strict=True) if data
    )


def test_honest_flows_succeed(tls: TlsFiles, pki: Pki, rsa_key: RSAPrivateKey) -> None:
    opts = options(tls, pki)
    server = HostileServer(tls, pki, rsa_key=rsa_key)

    async def client(url: str) -> tuple[RSAPublicKey, flows.Deployed, list[bytes]]:
        key = await flows.fetch_key(url, TOKEN, opts, owner=KEY_OWNER)
        deployed = await flows.deploy(url, TOKEN, opts, FUNCTION_BUNDLE, name="echo", key=key)
        outputs = await flows.test(url, TOKEN, opts, FUNCTION_BUNDLE, list(INPUTS))
        return key, deployed, outputs

    outcome = attack(server, client, sessions=3)
    assert outcome.error is None and outcome.value is not None
    key, deployed, outputs = outcome.value
    assert public_key_der(key) == public_key_der(rsa_key)
    assert deployed == flows.Deployed(id="A" * 22, checksum=FUNCTION_CHECKSUM, name="echo")
    assert outputs == [echo(data) for data in INPUTS]
    key_session, deploy_session, test_session = outcome.sessions
    assert [s.path for s in outcome.sessions] == ["/v1/key", "/v1/deploy", "/v1/test"]
    assert key_session.after_document == []
    assert deploy_session.opened == [FUNCTION_BUNDLE]
    assert test_session.opened == [FUNCTION_BUNDLE, *INPUTS]


# --- 1, 2, 4: documents that must stop every flow before it sends anything --------------------


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def _other_key_hash(enclave: Enclave) -> bytes:
    user_data = enclave.honest_user_data()
    other = hpke.generate_keypair().public_bytes
    user_data["response_key_sha256"] = b64(hashlib.sha256(other).digest())
    return enclave.document(user_data=user_data)


def _unhashed_key(enclave: Enclave) -> bytes:
    assert enclave.response_key is not None
    user_data = enclave.honest_user_data()
    user_data["response_key_sha256"] = b64(enclave.response_key)
    return enclave.document(user_data=user_data)


def _binding(value: object) -> Callable[[Enclave, Pki], bytes]:
    """A document whose response_key_sha256 is ``value`` (``None``: left out)."""

    def make(enclave: Enclave, _: Pki) -> bytes:
        user_data = enclave.honest_user_data()
        del user_data["response_key_sha256"]
        if value is not None:
            user_data["response_key_sha256"] = value
        return enclave.document(user_data=user_data)

    return make


NOT_BOUND = "did not bind this session's response key"


BAD_DOCUMENTS: dict[str, tuple[Callable[[Enclave, Pki], bytes], type[CapeError], str]] = {
    "other-root": (
        lambda e, other: e.document(module=other.module()),
        ChainError,
        "does not lead to the pinned root",
    ),
    "tampered-signature": (
        lambda e, _: _flip_last_byte(e.document()),
        SignatureError,
        "signature does not verify",
    ),
    "no-nonce": (lambda e, _: e.document(nonce=None), NonceMismatchError, "expected nonce"),
    "other-nonce": (lambda e, _: e.document(nonce=os.urandom(16)), NonceMismatchError, "nonce"),
    "nonce-prefix": (
        lambda e, _: e.document(nonce=(e.nonce or b"")[:15]),
        NonceMismatchError,
        "nonce",
    ),
    "binds-another-key": (lambda e, _: _other_key_hash(e), VerificationError, NOT_BOUND),
    "binds-the-key-unhashed": (lambda e, _: _unhashed_key(e), VerificationError, NOT_BOUND),
    # A valid, signed document without the binding fails verification (it is not malformed).
    "binding-missing": (_binding(None), VerificationError, NOT_BOUND),
    "no-user-data": (lambda e, _: e.document(user_data=None), VerificationError, NOT_BOUND),
    "empty-user-data": (lambda e, _: e.document(user_data={}), VerificationError, NOT_BOUND),
    "binding-not-a-string": (_binding(42), FormatError, "response key binding is missing"),
    "binding-not-base64": (_binding("%%%"), FormatError, "response key binding is not valid"),
    # Sealed results need the attested session key, so every flow (key and deploy too) needs it.
    "no-session-key": (
        lambda e, _: e.document(public_key=None),
        VerificationError,
        "carries no session key",
    ),
}


@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("bad", BAD_DOCUMENTS.keys())
def test_bad_document_stops_every_flow_before_it_sends(
    tls: TlsFiles, pki: Pki, other_pki: Pki, rsa_key: RSAPrivateKey, bad: str, flow: str
) -> None:
    make, kind, match = BAD_DOCUMENTS[bad]
    server = HostileServer(tls, pki, document_script(lambda e: make(e, other_pki)), rsa_key=rsa_key)
    outcome = attack(server, flow_client(flow, options(tls, pki), rsa_key))
    outcome.refused(kind, match)
    outcome.nothing_after_document()
    assert outcome.session.binary_frames == []
    assert outcome.session.close_code == 1000  # the client closed cleanly


def test_unsealed_session_does_not_need_the_binding(tls: TlsFiles, pki: Pki) -> None:
    """seal_results=False sends no response key, so nothing is bound (and nothing is asked)."""
    server = HostileServer(tls, pki, _serve_after(lambda e: e.document(user_data=None)))
    outcome = attack(server, run_client(options(tls, pki, seal_results=False)))
    assert outcome.value == [echo(b"hello")]
    assert outcome.session.start is not None and "response_key" not in outcome.session.start


@pytest.mark.parametrize("flow", ["run", "deploy"])
@pytest.mark.parametrize("replay", ["whole-document", "previous-nonce"])
def test_document_from_an_earlier_session_is_refused(
    tls: TlsFiles, pki: Pki, rsa_key: RSAPrivateKey, replay: str, flow: str
) -> None:
    earlier: list[Enclave] = []

    async def script(enclave: Enclave) -> None:
        if not earlier:
            earlier.append(enclave)
            await honest(enclave)
            return
        await enclave.read_start()
        first = earlier[0]
        if replay == "whole-document":
            await enclave.send_document(first.record.documents[0])
        else:  # a fresh, correctly signed document, but for the previous nonce
            await enclave.send_document(enclave.document(nonce=first.nonce))

    opts = options(tls, pki)

    async def client(url: str) -> object:
        assert await run_client(opts)(url) == [echo(b"hello")]  # the honest session works
        return await flow_client(flow, opts, rsa_key)(url)

    outcome = attack(HostileServer(tls, pki, script, rsa_key=rsa_key), client, sessions=2)
    outcome.refused(NonceMismatchError, "does not carry the expected nonce")
    outcome.nothing_after_document()
    first, second = outcome.sessions
    assert first.start is not None and second.start is not None
    assert first.start["nonce"] != second.start["nonce"]
    assert first.start["response_key"] != second.start["response_key"]


# --- 3: function checksum -------------------------------------------------------------------


def _with_checksum(value: object) -> Callable[[Enclave], bytes]:
    def make(enclave: Enclave) -> bytes:
        return enclave.document(user_data={**enclave.honest_user_data(), "func_checksum": value})

    return make


CHECKSUMS: dict[str, tuple[object, type[CapeError], str]] = {
    "other-function": (
        b64(hashlib.sha256(b"another function").digest()),
        ChecksumMismatchError,
        "function checksum does not match",
    ),
    "hex-instead-of-base64": (FUNCTION_CHECKSUM, ChecksumMismatchError, "does not match"),
    "truncated": (
        b64(hashlib.sha256(FUNCTION_BUNDLE).digest()[:16]),
        ChecksumMismatchError,
        "does not match",
    ),
    "not-base64": ("%%%", FormatError, "function checksum is not valid base64"),
    "not-a-string": (42, FormatError, "function checksum is missing"),
}


@pytest.mark.parametrize("case", CHECKSUMS.keys())
def test_wrong_function_checksum_is_refused(tls: TlsFiles, pki: Pki, case: str) -> None:
    value, kind, match = CHECKSUMS[case]
    server = HostileServer(tls, pki, document_script(_with_checksum(value)))
    outcome = attack(server, run_client(options(tls, pki, function_checksum=FUNCTION_CHECKSUM)))
    error = outcome.refused(kind, match)
    if isinstance(error, ChecksumMismatchError):
        assert FUNCTION_CHECKSUM in str(error)  # names what the caller pinned
    outcome.nothing_after_document()


def test_unpinned_checksum_is_not_checked(tls: TlsFiles, pki: Pki) -> None:
    """Without a pin the client does not care what the document claims (no false refusals)."""
    server = HostileServer(tls, pki, _serve_after(_with_checksum("%%%")))
    outcome = attack(server, run_client(options(tls, pki)))
    assert outcome.value == [echo(b"hello")]


def _serve_after(make: Callable[[Enclave], bytes]) -> Script:
    async def script(enclave: Enclave) -> None:
        await enclave.read_start()
        await enclave.send_document(make(enclave))
        await enclave.serve_inputs()

    return script


def test_missing_pinned_checksum_is_a_checksum_mismatch(tls: TlsFiles, pki: Pki) -> None:
    def make(enclave: Enclave) -> bytes:
        user_data = enclave.honest_user_data()
        del user_data["func_checksum"]
        return enclave.document(user_data=user_data)

    server = HostileServer(tls, pki, document_script(make))
    outcome = attack(server, run_client(options(tls, pki, function_checksum=FUNCTION_CHECKSUM)))
    outcome.nothing_after_document()
    outcome.refused(ChecksumMismatchError, "attests no function checksum, but one was pinned")


# --- 5, 6: results that are not sealed on this session's result channel ---------------------


@pytest.mark.parametrize("encrypted", ["missing", False, None, "true", 1], ids=repr)
def test_plaintext_result_is_refused_when_sealing_was_bound(
    tls: TlsFiles, pki: Pki, encrypted: object
) -> None:
    secret = b"the plaintext result " + os.urandom(8).hex().encode()

    def reply(enclave: Enclave, data: bytes) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "function_result", "message": b64(secret)}
        if encrypted != "missing":
            message["encrypted"] = encrypted
        return message

    outcome = attack(HostileServer(tls, pki, result_script(reply)), run_client(options(tls, pki)))
    error = outcome.refused(VerificationError, "unsealed although sealing was bound")
    assert outcome.value is None
    assert secret.decode() not in error.diagnostics()
    assert outcome.session.opened == [b"hello"]


def _host_channel(enclave: Enclave) -> ResultChannel:
    """A channel the host can derive: its own X25519 key with the client's response key."""
    assert enclave.response_key is not None
    return session_channel(hpke.generate_keypair(), enclave.response_key, enclave.sealing)


def _host_channel_claiming_the_attested_key(enclave: Enclave) -> ResultChannel:
    """The host's own key, but the attested session key named in the HKDF info."""
    assert enclave.response_key is not None
    private = x25519.X25519PrivateKey.generate()
    return SessionKeys.derive(
        private,
        enclave.response_key,
        session_public=enclave.key.public_bytes,
        response_public=enclave.response_key,
        sealing=enclave.sealing,
    ).results


DECRYPTION_OR_SHORT = "^decryption failed: |^a sealed reply is shorter than its tag$"
RESULTS: dict[str, tuple[Callable[[Enclave, bytes], bytes], type[CapeError]]] = {
    # The old construction: HPKE to the response key, which the host knows (it could forge).
    "hpke-to-the-response-key": (
        lambda e, d: hpke.seal(e.response_key or b"", echo(d)),
        DecryptionError,
    ),
    "hpke-to-the-enclave-key": (
        lambda e, d: hpke.seal(e.key.public_bytes, echo(d)),
        DecryptionError,
    ),
    "hpke-to-a-stranger": (
        lambda e, d: hpke.seal(hpke.generate_keypair().public_bytes, echo(d)),
        DecryptionError,
    ),
    "host-derived-channel": (lambda e, d: _host_channel(e).seal(0, echo(d)), DecryptionError),
    "host-channel-claiming-the-attested-key": (
        lambda e, d: _host_channel_claiming_the_attested_key(e).seal(0, echo(d)),
        DecryptionError,
    ),
    "next-sequence-number": (lambda e, d: e.seal(echo(d), sequence=1), DecryptionError),
    "sealed-as-an-error": (lambda e, d: e.seal(echo(d), kind=results.ERROR), DecryptionError),
    "tampered-tag": (lambda e, d: _flip_last_byte(e.seal(echo(d))), DecryptionError),
    "tampered-ciphertext": (lambda e, d: _flip_first_byte(e.seal(echo(d))), DecryptionError),
    "only-the-tag": (lambda e, d: e.seal(echo(d))[-16:], DecryptionError),
    "shorter-than-the-tag": (lambda e, d: e.seal(echo(d))[:15], MalformedEnvelopeError),
    "empty": (lambda e, d: b"", MalformedEnvelopeError),
    "plaintext-flagged-encrypted": (lambda e, d: echo(d) * 8, DecryptionError),
}


def _flip_first_byte(data: bytes) -> bytes:
    return bytes([data[0] ^ 1]) + data[1:]


@pytest.mark.parametrize("case", RESULTS.keys())
def test_result_not_sealed_on_this_sessions_channel_is_refused(
    tls: TlsFiles, pki: Pki, case: str
) -> None:
    make, kind = RESULTS[case]
    script = result_script(lambda e, d: sealed(make(e, d)))
    outcome = attack(HostileServer(tls, pki, script), run_client(options(tls, pki)))
    error = outcome.refused(kind, DECRYPTION_OR_SHORT)
    assert isinstance(error, DecryptionError)
    if kind is DecryptionError:
        assert str(error) == DECRYPTION_FAILED  # one message: not an oracle
    assert outcome.value is None
    assert outcome.session.opened == [b"hello"]


def test_result_forged_without_the_attested_key_is_refused(tls: TlsFiles, pki: Pki) -> None:
    """The host seals its own result to the response key (it travels in the clear), never
    touching the input: the old HPKE construction, which the result channel closes."""

    async def script(enclave: Enclave) -> None:
        await enclave.read_start()
        await enclave.send_document()
        await enclave.recv()  # the input: never opened, the attested key is not used
        assert enclave.response_key is not None
        forged = hpke.seal(enclave.response_key, b"forged by the host")
        await enclave.send_message(sealed(forged))

    outcome = attack(HostileServer(tls, pki, script), run_client(options(tls, pki)))
    error = outcome.refused(DecryptionError, "^decryption failed: ")
    assert str(error) == DECRYPTION_FAILED
    assert outcome.value is None
    assert outcome.session.opened == []


# --- the attested session key ---------------------------------------------------------------

#: (document public_key, the refusal when sealing (at attestation), the refusal when not (at
#: the first input)). Sealing derives the result channel from the session key, so a sealed
#: session refuses an unusable key before it sends anything.
SESSION_KEYS: dict[
    str, tuple[bytes | None, tuple[type[CapeError], str], tuple[type[CapeError], str]]
] = {
    "absent": (
        None,
        (VerificationError, "^the attestation document carries no session key$"),
        (VerificationError, "^the attestation document carries no session key$"),
    ),
    "31-bytes": (
        os.urandom(31),
        (KeyFormatError, "^the session or response key is not an X25519 public key$"),
        (KeyFormatError, "32 bytes, not 31"),
    ),
    "low-order-point": (
        bytes(32),
        (KeyFormatError, "^unusable X25519 key for sealed results$"),
        (KeyFormatError, "unusable"),
    ),
    "rsa-der": (
        b"\x30" * 300,
        (KeyFormatError, "^the session or response key is not an X25519 public key$"),
        (KeyFormatError, "32 bytes, not 300"),
    ),
}


@pytest.mark.parametrize("seal", [True, False], ids=["sealed", "unsealed"])
@pytest.mark.parametrize("case", SESSION_KEYS.keys())
def test_unusable_session_key_sends_no_input(
    tls: TlsFiles, pki: Pki, case: str, seal: bool
) -> None:
    public_key, when_sealed, when_unsealed = SESSION_KEYS[case]
    kind, match = when_sealed if seal else when_unsealed
    server = HostileServer(tls, pki, document_script(lambda e: e.document(public_key=public_key)))
    outcome = attack(server, run_client(options(tls, pki, seal_results=seal)))
    outcome.refused(kind, match)
    outcome.nothing_after_document()


@pytest.mark.parametrize("seal", [True, False], ids=["sealed", "unsealed"])
def test_test_flow_refuses_a_document_without_session_key(
    tls: TlsFiles, pki: Pki, rsa_key: RSAPrivateKey, seal: bool
) -> None:
    """Sealed: refused at attestation. Unsealed: Session.send_sealed (the bundle) refuses."""
    server = HostileServer(tls, pki, document_script(lambda e: e.document(public_key=None)))
    outcome = attack(server, flow_client("test", options(tls, pki, seal_results=seal), rsa_key))
    outcome.refused(VerificationError, "^the attestation document carries no session key$")
    outcome.nothing_after_document()


# --- the result channel: replies forged, replayed, reordered, dropped or injected -----------

Reply = bytes | FunctionError
FIRST, SECOND = b"first input", b"second input"
FAILED = f"FunctionError: {FAIL_TEXT}"
FAKE_TEXT = "no enclave available, try again"
FAKE_ERROR = {"error": FAKE_TEXT}
FAKED = f"FunctionError: {FAKE_TEXT}"


def recording_client(
    opts: SessionOptions, inputs: Sequence[bytes], got: list[Reply], *, pipelined: bool = False
) -> Callable[[str], Awaitable[list[Reply]]]:
    """Send ``inputs`` (all of them first if ``pipelined``) and append each reply to ``got``
    as it arrives: an output, or the FunctionError of a failed call. Any other CapeError ends
    the session, so ``got`` shows what the client accepted before it refused."""

    async def client(url: str) -> list[Reply]:
        async with await Session.open(url, RUN_PATH, TOKEN, opts) as session:
            if pipelined:
                for data in inputs:
                    await session.send_sealed(data)
            for data in inputs:
                if not pipelined:
                    await session.send_sealed(data)
                try:
                    got.append(await session.receive_result())
                except FunctionError as exc:
                    got.append(exc)
        return got

    return client


def _shown(replies: Sequence[Reply]) -> list[bytes | str]:
    """Replies made comparable: outputs as they are, failed calls as 'FunctionError: text'."""
    return [r if isinstance(r, bytes) else f"{type(r).__name__}: {r}" for r in replies]


@pytest.mark.parametrize("pipelined", [False, True], ids=["one-by-one", "pipelined"])
@pytest.mark.parametrize("seal", [True, False], ids=["sealed", "unsealed"])
def test_honest_function_errors_take_their_place_in_the_sequence(
    tls: TlsFiles, pki: Pki, seal: bool, pipelined: bool
) -> None:
    inputs = [FIRST, FAIL_INPUT, SECOND, FAIL_INPUT, b"last"]
    got: list[Reply] = []
    opts = options(tls, pki, seal_results=seal)
    outcome = attack(
        HostileServer(tls, pki), recording_client(opts, inputs, got, pipelined=pipelined)
    )
    assert outcome.error is None
    assert _shown(got) == [echo(FIRST), FAILED, echo(SECOND), FAILED, echo(b"last")]
    sent = outcome.session.sent[1:]  # after the document: one reply per input
    assert len(sent) == len(inputs)
    errors = [json.loads(frame) for frame in sent if "error" in json.loads(frame)]
    if seal:  # the host relays only the generic text; the details are sealed to the client
        assert all(FAIL_TEXT not in frame for frame in sent)
        assert [set(e) for e in errors] == [{"error", "sealed"}] * 2
        assert all(e["error"] == SEALED_ERROR_TEXT for e in errors)
    else:
        assert errors == [{"error": FAIL_TEXT}] * 2


async def _answer(enclave: Enclave) -> dict[str, Any]:
    """Read the next input and make the honest reply frame (it takes its sequence number)."""
    return enclave.reply(echo, await enclave.open_frame())


def _relay(body: Callable[[Enclave], Awaitable[None]]) -> Script:
    """An honest document, then ``body``: the host relaying (or not) the enclave's replies."""

    async def script(enclave: Enclave) -> None:
        await enclave.read_start()
        await enclave.send_document()
        await body(enclave)

    return script


async def _replay_first(e: Enclave) -> None:
    first = await _answer(e)
    await e.send_json(first)
    await _answer(e)
    await e.send_json(first)  # reply 0 again, as the reply to input 1


async def _duplicate_first(e: Enclave) -> None:
    first = await _answer(e)
    await e.send_json(first)
    await e.send_json(first)  # waits in the socket for input 1


async def _swap(e: Enclave) -> None:
    first, second = await _answer(e), await _answer(e)
    await e.send_json(second)
    await e.send_json(first)


async def _drop_first(e: Enclave) -> None:
    await _answer(e)
    await e.send_json(await _answer(e))


async def _fake_error_before_the_reply(e: Enclave) -> None:
    first = await _answer(e)
    await e.send_json(FAKE_ERROR)
    await e.send_json(first)  # waits in the socket for input 1


async def _fake_error_then_withheld_reply(e: Enclave) -> None:
    first = await _answer(e)
    await e.send_json(FAKE_ERROR)
    await _answer(e)
    await e.send_json(first)  # the withheld reply 0, as the reply to input 1


async def _fake_error_instead_of_the_reply(e: Enclave) -> None:
    await _answer(e)
    await e.send_json(FAKE_ERROR)
    await e.send_json(await _answer(e))


async def _error_as_a_result(e: Enclave) -> None:
    error = await _answer(e)
    await e.send_message(sealed(base64.b64decode(error["sealed"])))


async def _result_as_an_error(e: Enclave) -> None:
    result = await _answer(e)
    await e.send_json({"error": SEALED_ERROR_TEXT, "sealed": result["message"]["message"]})


#: body, inputs, pipelined, what the client accepted, how it then refused (None: it did not).
CHANNEL_ATTACKS: dict[
    str,
    tuple[Callable[[Enclave], Awaitable[None]], list[bytes], bool, list[bytes | str], bool],
] = {
    "replay-reply-0-as-reply-1": (_replay_first, [FIRST, SECOND], False, [echo(FIRST)], True),
    "duplicate-reply-0": (_duplicate_first, [FIRST, SECOND], False, [echo(FIRST)], True),
    "replay-error-0-as-reply-1": (
        _replay_first,
        [FAIL_INPUT, SECOND],
        False,
        [FAILED],
        True,
    ),
    "swap-replies": (_swap, [FIRST, SECOND], True, [], True),
    "swap-error-and-result": (_swap, [FAIL_INPUT, SECOND], True, [], True),
    "drop-reply-0": (_drop_first, [FIRST, SECOND], True, [], True),
    "fake-error-then-the-real-reply": (
        _fake_error_before_the_reply,
        [FIRST, SECOND],
        False,
        [FAKED],
        True,
    ),
    "fake-error-then-the-withheld-reply": (
        _fake_error_then_withheld_reply,
        [FIRST, SECOND],
        False,
        [FAKED],
        True,
    ),
    "sealed-error-as-a-result": (_error_as_a_result, [FAIL_INPUT], False, [], True),
    "sealed-result-as-an-error": (_result_as_an_error, [FIRST], False, [], True),
    # Not an attack the channel can stop: the host can always fail a call. It cannot make the
    # next call's reply wrong, though: both sides agree reply 0 is spent.
    "fake-error-instead-of-the-reply": (
        _fake_error_instead_of_the_reply,
        [FIRST, SECOND],
        False,
        [FAKED, echo(SECOND)],
        False,
    ),
}


@pytest.mark.parametrize("case", CHANNEL_ATTACKS.keys())
def test_reply_out_of_sequence_never_returns_wrong_data(tls: TlsFiles, pki: Pki, case: str) -> None:
    body, inputs, pipelined, accepted, refused = CHANNEL_ATTACKS[case]
    got: list[Reply] = []
    client = recording_client(options(tls, pki), inputs, got, pipelined=pipelined)
    outcome = attack(HostileServer(tls, pki, _relay(body)), client)
    assert _shown(got) == accepted
    if refused:
        error = outcome.refused(DecryptionError, "^decryption failed: ")
        assert str(error) == DECRYPTION_FAILED
        assert outcome.value is None
    else:
        assert outcome.error is None
    opened = outcome.session.opened
    assert opened == inputs[: len(opened)]  # the enclave saw the client's inputs, in order


def test_reply_from_another_session_is_refused(tls: TlsFiles, pki: Pki) -> None:
    """Same input, same sequence number, same kind: only the session's channel differs."""
    first_replies: list[dict[str, Any]] = []

    async def body(enclave: Enclave) -> None:
        reply = await _answer(enclave)
        if not first_replies:
            first_replies.append(reply)
        await enclave.send_json(first_replies[0])
        await enclave.serve_inputs()

    opts = options(tls, pki)
    got: list[Reply] = []

    async def client(url: str) -> list[Reply]:
        assert await run_client(opts)(url) == [echo(b"hello")]  # the first session is honest
        return await recording_client(opts, [b"hello"], got)(url)

    outcome = attack(HostileServer(tls, pki, _relay(body)), client, sessions=2)
    error = outcome.refused(DecryptionError, "^decryption failed: ")
    assert str(error) == DECRYPTION_FAILED
    assert got == []
    first, second = outcome.sessions
    assert first.opened == second.opened == [b"hello"]
    assert first.sent[1] == second.sent[1]  # the very reply the first session's client accepted


ErrorFrame = dict[str, Any]
S = f"FunctionError: {SEALED_ERROR_TEXT}"


def _sealed_field(
    make: Callable[[Enclave, bytes], object],
) -> Callable[[Enclave, ErrorFrame], ErrorFrame]:
    """Replace the error frame's ``sealed`` with ``make(enclave, honest sealed bytes)``."""
    return lambda e, f: {**f, "sealed": make(e, base64.b64decode(f["sealed"]))}


#: How the host rewrites the honest sealed error frame for input 0 (FAIL_INPUT); input 1 is
#: then answered honestly. (rewrite, what the client accepted, how it refused (None: did not),
#: message).
SEALED_ERRORS: dict[
    str,
    tuple[
        Callable[[Enclave, ErrorFrame], ErrorFrame],
        list[bytes | str],
        type[CapeError] | None,
        str,
    ],
] = {
    "honest": (lambda e, f: f, [FAILED, echo(SECOND)], None, ""),
    # The visible text is the host's to say; the client reports the sealed one.
    "visible-text-replaced": (
        lambda e, f: {**f, "error": "the function timed out"},
        [FAILED, echo(SECOND)],
        None,
        "",
    ),
    # Stripping the details loses them (the host can always fail a call), but the reply was
    # still reply 0: the session stays in sequence.
    "sealed-missing": (lambda e, f: {"error": f["error"]}, [S, echo(SECOND)], None, ""),
    "sealed-null": (lambda e, f: {**f, "sealed": None}, [S, echo(SECOND)], None, ""),
    "sealed-not-a-string": (lambda e, f: {**f, "sealed": 42}, [S, echo(SECOND)], None, ""),
    "sealed-tampered": (
        _sealed_field(lambda e, s: b64(_flip_last_byte(s))),
        [],
        DecryptionError,
        "^decryption failed: ",
    ),
    "sealed-truncated": (
        _sealed_field(lambda e, s: b64(s[:15])),
        [],
        MalformedEnvelopeError,
        "^a sealed reply is shorter than its tag$",
    ),
    "sealed-empty": (
        _sealed_field(lambda e, s: ""),
        [],
        MalformedEnvelopeError,
        "^a sealed reply is shorter than its tag$",
    ),
    "sealed-not-base64": (
        _sealed_field(lambda e, s: "%%"),
        [],
        FormatError,
        "^the sealed error is not valid base64$",
    ),
    "sealed-hpke-to-the-response-key": (
        _sealed_field(lambda e, s: b64(hpke.seal(e.response_key or b"", b"made up by the host"))),
        [],
        DecryptionError,
        "^decryption failed: ",
    ),
    "sealed-by-a-host-channel": (
        _sealed_field(lambda e, s: b64(_host_channel(e).seal(0, b"x", kind=results.ERROR))),
        [],
        DecryptionError,
        "^decryption failed: ",
    ),
    "sealed-as-a-result": (
        _sealed_field(lambda e, s: b64(e.seal(FAIL_TEXT.encode(), sequence=0))),
        [],
        DecryptionError,
        "^decryption failed: ",
    ),
    "sealed-with-the-next-number": (
        _sealed_field(lambda e, s: b64(e.seal(FAIL_TEXT.encode(), sequence=1, kind=results.ERROR))),
        [],
        DecryptionError,
        "^decryption failed: ",
    ),
    # A falsy "error" is no error frame: then it is not a result message either.
    "visible-text-empty": (lambda e, f: {**f, "error": ""}, [], FormatError, r'\{"message"'),
}


@pytest.mark.parametrize("case", SEALED_ERRORS.keys())
def test_sealed_function_error_opens_only_as_sent(tls: TlsFiles, pki: Pki, case: str) -> None:
    rewrite, accepted, kind, match = SEALED_ERRORS[case]

    async def body(enclave: Enclave) -> None:
        error = await _answer(enclave)
        assert set(error) == {"error", "sealed"} and error["error"] == SEALED_ERROR_TEXT
        await enclave.send_json(rewrite(enclave, error))
        await enclave.serve_inputs()

    got: list[Reply] = []
    client = recording_client(options(tls, pki), [FAIL_INPUT, SECOND], got)
    outcome = attack(HostileServer(tls, pki, _relay(body)), client)
    assert _shown(got) == accepted
    if kind is None:
        assert outcome.error is None
    else:
        error = outcome.refused(kind, match)
        assert FAIL_TEXT not in error.diagnostics()
        if kind is DecryptionError:
            assert str(error) == DECRYPTION_FAILED


# --- 7: PCRs and debug enclaves -------------------------------------------------------------

OTHER_BUILD = {i: hashlib.sha384(b"other build %d" % i).digest() for i in range(16)}
PCR_PINS: dict[str, tuple[dict[int, set[bytes]], dict[int, bytes] | None, str]] = {
    "pcr0-other-value": ({0: {os.urandom(48)}}, None, "PCR0 is "),
    "pcr8-other-value": ({0: {PCRS[0]}, 8: {os.urandom(48), os.urandom(48)}}, None, "PCR8 is "),
    "pcr-absent": ({20: {bytes(48)}}, None, "PCR20 is absent"),
    "other-build": ({0: {PCRS[0]}}, OTHER_BUILD, "PCR0 is " + OTHER_BUILD[0].hex()),
}


@pytest.mark.parametrize("case", PCR_PINS.keys())
def test_pcr_outside_the_allow_list_is_refused(tls: TlsFiles, pki: Pki, case: str) -> None:
    pins, server_pcrs, match = PCR_PINS[case]
    script = document_script(lambda e: e.document(module=pki.module(pcrs=server_pcrs)))
    outcome = attack(HostileServer(tls, pki, script), run_client(options(tls, pki, pcrs=pins)))
    error = outcome.refused(PCRMismatchError, match)
    assert isinstance(error, PCRMismatchError)
    outcome.nothing_after_document()


@pytest.mark.parametrize(
    "pins", [{}, {0: {bytes(48)}}, {3: {PCRS[3]}}], ids=["no-pins", "pcr0-zero-pinned", "pcr3"]
)
def test_debug_enclave_is_refused(tls: TlsFiles, pki: Pki, pins: dict[int, set[bytes]]) -> None:
    script = document_script(lambda e: e.document(module=pki.module(debug=True)))
    outcome = attack(HostileServer(tls, pki, script), run_client(options(tls, pki, pcrs=pins)))
    outcome.refused(DebugEnclaveError, "debug-mode enclave")
    outcome.nothing_after_document()


# --- 8: document age ------------------------------------------------------------------------


def _shifted(delta: dt.timedelta) -> Callable[[], dt.datetime]:
    return lambda: utc_now() + delta


TIMES: dict[str, tuple[dt.timedelta, dt.timedelta, type[CapeError], str]] = {
    # (server module clock shift, client clock shift, error, message)
    "issued-10-minutes-ago": (
        dt.timedelta(minutes=-10),
        dt.timedelta(0),
        DocumentExpiredError,
        "more than 300 s before",
    ),
    "client-clock-6-minutes-ahead": (
        dt.timedelta(0),
        dt.timedelta(minutes=6),
        DocumentExpiredError,
        "more than 300 s before",
    ),
    "client-clock-beyond-leaf": (
        dt.timedelta(0),
        dt.timedelta(hours=4),
        CertificateExpiredError,
        "document certificate is valid from",
    ),
    "issued-in-the-future": (
        dt.timedelta(minutes=10),
        dt.timedelta(0),
        CertificateExpiredError,
        "document certificate is valid from",
    ),
}


@pytest.mark.parametrize("case", TIMES.keys())
def test_stale_or_future_document_is_refused(tls: TlsFiles, pki: Pki, case: str) -> None:
    server_shift, client_shift, kind, match = TIMES[case]
    module = pki.module(clock=_shifted(server_shift))
    script = document_script(lambda e: e.document(module=module))
    opts = options(tls, pki, clock=_shifted(client_shift))
    outcome = attack(HostileServer(tls, pki, script), run_client(opts))
    outcome.refused(kind, match)
    outcome.nothing_after_document()


# --- 9: protocol garbage, at the document and at the result ---------------------------------

Action = Callable[[Enclave], Awaitable[None]]


def _text(frame: str) -> Action:
    async def action(enclave: Enclave) -> None:
        await enclave.ws.send(frame)

    return action


def _json(value: object) -> Action:
    return _text(json.dumps(value))


def _message(message: object) -> Action:
    return _json({"message": message})


async def _binary(enclave: Enclave) -> None:
    await enclave.ws.send(b"\x84\x00binary instead of text")


async def _invalid_utf8(enclave: Enclave) -> None:
    await enclave.ws.send(b'{"message": "\xff\xfe"}', text=True)


async def _close_normally(enclave: Enclave) -> None:
    await enclave.ws.close()


async def _close_with_reason(enclave: Enclave) -> None:
    await enclave.ws.close(1011, "enclave crashed")


async def _close_busy(enclave: Enclave) -> None:
    await enclave.ws.close(1013, "the enclave is busy")


async def _drop_tcp(enclave: Enclave) -> None:
    enclave.ws.transport.abort()


#: Frame-level garbage: the same refusal wherever the client waits for a server frame.
GARBAGE: dict[str, tuple[Action, type[CapeError], str]] = {
    "non-json-text": (_text("this is not json"), FormatError, "not JSON"),
    "empty-text": (_text(""), FormatError, "not JSON"),
    "binary-frame": (_binary, FormatError, "expected a text frame"),
    "json-array": (_json([1, 2]), FormatError, "not a JSON object"),
    "json-null": (_json(None), FormatError, "not a JSON object"),
    "json-string": (_json("message"), FormatError, "not a JSON object"),
    "message-not-a-dict": (_message("not a dict"), FormatError, r'expected \{"message"'),
    "message-list": (_message([{"type": "attestation_doc"}]), FormatError, r'\{"message"'),
    "message-null": (_message(None), FormatError, r'\{"message"'),
    "message-missing": (_json({"type": "attestation_doc"}), FormatError, r'\{"message"'),
    "error-frame": (_json({"error": "no enclave available"}), FunctionError, "no enclave"),
    "error-object": (_json({"error": {"code": 7}}), FunctionError, "code"),
    "invalid-utf8-text": (_invalid_utf8, TransportError, "closed"),
    "close-1000": (_close_normally, TransportError, "closed the session"),
    "close-1011-reason": (_close_with_reason, TransportError, "enclave crashed"),
    "tcp-dropped": (_drop_tcp, TransportError, "closed the session"),
}


#: "Try again later" wherever the client waits for a server frame: a BusyError (our Python SDK;
#: the Java and JavaScript SDKs do not map it yet). ``"busy"`` must be exactly true, and a
#: retry hint counts only as a sane whole number of seconds.
BUSY: dict[str, tuple[Action, type[CapeError], str]] = {
    "busy-frame": (
        _json({"error": "queue full", "busy": True, "retry_after": 2}),
        BusyError,
        r"^queue full; try again in 2 s$",
    ),
    "busy-not-true": (_json({"error": "queue full", "busy": "yes"}), FunctionError, "^queue"),
    "busy-float-hint": (
        _json({"error": "queue full", "busy": True, "retry_after": 1e300}),
        BusyError,
        "queue full$",
    ),
    "busy-bool-hint": (
        _json({"error": "queue full", "busy": True, "retry_after": True}),
        BusyError,
        "queue full$",
    ),
    "close-1013": (_close_busy, BusyError, r"try again later\): the enclave is busy$"),
}


def _document_phase(action: Action) -> Script:
    async def script(enclave: Enclave) -> None:
        await enclave.read_start()
        await action(enclave)

    return script


def _result_phase(action: Action) -> Script:
    async def script(enclave: Enclave) -> None:
        await enclave.read_start()
        await enclave.send_document()
        await enclave.open_frame()
        await action(enclave)

    return script


@pytest.mark.parametrize("case", [*GARBAGE.keys(), *BUSY.keys()])
def test_garbage_instead_of_the_document_is_a_cape_error(
    tls: TlsFiles, pki: Pki, case: str
) -> None:
    action, kind, match = GARBAGE.get(case) or BUSY[case]
    outcome = attack(
        HostileServer(tls, pki, _document_phase(action)), run_client(options(tls, pki))
    )
    outcome.refused(kind, match)
    outcome.only_the_nonce()


@pytest.mark.parametrize("case", [*GARBAGE.keys(), *BUSY.keys()])
def test_garbage_instead_of_the_result_is_a_cape_error(tls: TlsFiles, pki: Pki, case: str) -> None:
    action, kind, match = GARBAGE.get(case) or BUSY[case]
    outcome = attack(HostileServer(tls, pki, _result_phase(action)), run_client(options(tls, pki)))
    outcome.refused(kind, match)
    assert outcome.value is None


def _doc(value: object, type_: object = "attestation_doc") -> Action:
    return _message({"type": type_, "message": value})


async def _truncated_document(enclave: Enclave) -> None:
    await _doc(b64(enclave.document()[:-10]))(enclave)


async def _document_as_result(enclave: Enclave) -> None:
    await _doc(b64(enclave.document()), "function_result")(enclave)


BAD_DOCUMENT_MESSAGES: dict[str, tuple[Action, str]] = {
    "bad-base64": (_doc("***not base64***"), "attestation document is not valid base64"),
    "unpadded-base64": (_doc("QUI"), "not valid base64"),
    "urlsafe-base64": (_doc("-_-_"), "not valid base64"),
    "document-missing": (_message({"type": "attestation_doc"}), "attestation document is missing"),
    "document-not-a-string": (_doc(12345), "attestation document is missing"),
    "document-empty": (_doc(""), "not valid CBOR"),
    "random-bytes": (_doc(b64(os.urandom(200))), ""),
    "json-as-document": (_doc(b64(b'{"nonce": "x"}')), ""),
    "truncated-document": (_truncated_document, ""),
    "wrong-type": (_document_as_result, "expected an attestation document, got 'function_result'"),
    "type-not-a-string": (_doc("", ["attestation_doc"]), "expected an attestation document"),
}


@pytest.mark.parametrize("case", BAD_DOCUMENT_MESSAGES.keys())
def test_malformed_document_message_is_a_format_error(tls: TlsFiles, pki: Pki, case: str) -> None:
    action, match = BAD_DOCUMENT_MESSAGES[case]
    outcome = attack(
        HostileServer(tls, pki, _document_phase(action)), run_client(options(tls, pki))
    )
    outcome.refused(FormatError, match)
    outcome.only_the_nonce()


BAD_RESULT_MESSAGES: dict[str, tuple[Action, type[CapeError], str]] = {
    "bad-base64": (
        _message({"type": "function_result", "message": "%%", "encrypted": True}),
        FormatError,
        "function result is not valid base64",
    ),
    "result-missing": (
        _message({"type": "function_result", "encrypted": True}),
        FormatError,
        "function result is missing",
    ),
    "type-missing": (_message({"message": "AAAA"}), FormatError, "expected a function result"),
    "another-document": (
        _doc("AAAA"),
        FormatError,
        "expected a function result, got 'attestation_doc'",
    ),
    "function-error": (
        _json({"error": "function raised ValueError: boom"}),
        FunctionError,
        "ValueError: boom",
    ),
}


@pytest.mark.parametrize("case", BAD_RESULT_MESSAGES.keys())
def test_malformed_result_message_is_a_cape_error(tls: TlsFiles, pki: Pki, case: str) -> None:
    action, kind, match = BAD_RESULT_MESSAGES[case]
    outcome = attack(HostileServer(tls, pki, _result_phase(action)), run_client(options(tls, pki)))
    outcome.refused(kind, match)
    assert outcome.value is None


@pytest.mark.parametrize("phase", ["document", "result"])
def test_deeply_nested_json_frame_is_a_format_error(tls: TlsFiles, pki: Pki, phase: str) -> None:
    action = _text("[" * 100_000)
    script = _document_phase(action) if phase == "document" else _result_phase(action)
    outcome = attack(HostileServer(tls, pki, script), run_client(options(tls, pki)))
    outcome.refused(FormatError, "^the server sent a frame that is not JSON$")


def test_silent_server_can_be_abandoned_and_gets_nothing(tls: TlsFiles, pki: Pki) -> None:
    """The SDK has no receive timeout of its own: a server that never answers the nonce holds
    Session.open until the caller gives up. Cancelling must close the connection cleanly."""

    async def silent(enclave: Enclave) -> None:
        await enclave.read_start()
        await enclave.ws.wait_closed()

    async def client(url: str) -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(Session.open(url, RUN_PATH, TOKEN, options(tls, pki)), 0.5)

    outcome = attack(HostileServer(tls, pki, silent), client)
    outcome.only_the_nonce()
    assert outcome.session.close_code == 1000


# --- 10: user_data that is not a JSON object ------------------------------------------------

USER_DATA: dict[str, tuple[bytes, str]] = {
    "not-json": (b"func_checksum=abc", "user_data is not JSON"),
    "not-utf8": (b"\xff\xfe\xfd\x00garbage", "user_data is not JSON"),
    "empty": (b"", "user_data is not JSON"),
    "truncated-json": (b'{"response_key_sha256": "', "user_data is not JSON"),
    "array": (b'["response_key_sha256"]', "not a JSON object"),
    "string": (b'"response_key_sha256"', "not a JSON object"),
    "number": (b"42", "not a JSON object"),
    "null": (b"null", "not a JSON object"),
}


@pytest.mark.parametrize("case", USER_DATA.keys())
def test_user_data_that_is_not_a_json_object_is_a_format_error(
    tls: TlsFiles, pki: Pki, case: str
) -> None:
    user_data, match = USER_DATA[case]
    server = HostileServer(tls, pki, document_script(lambda e: e.document(user_data=user_data)))
    outcome = attack(server, run_client(options(tls, pki)))
    outcome.refused(FormatError, match)
    outcome.nothing_after_document()


def test_deeply_nested_user_data_is_a_format_error(tls: TlsFiles, pki: Pki) -> None:
    server = HostileServer(tls, pki, document_script(lambda e: e.document(user_data=b"[" * 1024)))
    outcome = attack(server, run_client(options(tls, pki)))
    outcome.refused(FormatError, "^the document's user_data is not JSON$")
    outcome.nothing_after_document()


# --- 11: the key flow -----------------------------------------------------------------------


def _ec_key_der() -> bytes:
    return (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _small_rsa_der() -> bytes:
    return public_key_der(rsa.generate_private_key(public_exponent=65537, key_size=1024))


KEYS: dict[str, tuple[Callable[[Enclave], object], type[CapeError], str]] = {
    "ec-key": (lambda e: b64(_ec_key_der()), KeyFormatError, "expected an RSA public key"),
    "rsa-1024": (lambda e: b64(_small_rsa_der()), KeyFormatError, "at least 2048 bits"),
    "x25519-raw": (lambda e: b64(e.key.public_bytes), KeyFormatError, "not a valid DER"),
    "random-bytes": (lambda e: b64(os.urandom(300)), KeyFormatError, "not a valid DER"),
    "empty": (lambda e: "", KeyFormatError, "not a valid DER"),
    "pem-of-ec-key": (
        lambda e: b64(
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ),
        KeyFormatError,
        "expected an RSA public key",
    ),
    "not-base64": (lambda e: "not base64!", FormatError, "key document is not valid base64"),
    "missing": (lambda e: None, FormatError, "carries no key"),
    "not-a-string": (lambda e: {"n": 65537}, FormatError, "carries no key"),
}


def _key_document(
    make: Callable[[Enclave], object], field: str = "key"
) -> Callable[[Enclave], bytes]:
    """A key document whose user_data ``field`` is ``make(enclave)`` (``None``: left out)."""

    def document(enclave: Enclave) -> bytes:
        user_data = enclave.honest_user_data()
        value = make(enclave)
        if value is None:
            del user_data[field]
        else:
            user_data[field] = value
        return enclave.document(user_data=user_data)

    return document


@pytest.mark.parametrize("case", KEYS.keys())
def test_key_document_without_a_usable_rsa_key_is_refused(
    tls: TlsFiles, pki: Pki, rsa_key: RSAPrivateKey, case: str
) -> None:
    make, kind, match = KEYS[case]
    script = document_script(_key_document(make), then_close=True)
    outcome = attack(
        HostileServer(tls, pki, script, rsa_key=rsa_key),
        flow_client("key", options(tls, pki), rsa_key),
    )
    outcome.refused(kind, match)
    outcome.nothing_after_document()


@pytest.mark.parametrize(
    ("owner", "match"),
    [("mallory", "is for 'mallory', not 'alice'"), (None, "is for None"), (["alice"], "not")],
    ids=["other-owner", "owner-missing", "owner-not-a-string"],
)
def test_key_document_for_another_owner_is_refused(
    tls: TlsFiles, pki: Pki, rsa_key: RSAPrivateKey, owner: object, match: str
) -> None:
    script = document_script(_key_document(lambda e: owner, "owner"), then_close=True)
    server = HostileServer(tls, pki, script, rsa_key=rsa_key)
    outcome = attack(server, flow_client("key", options(tls, pki), rsa_key))
    outcome.refused(VerificationError, match)
    outcome.nothing_after_document()


# --- the deploy reply -----------------------------------------------------------------------


def _deploy_reply(reply: Callable[[dict[str, Any]], object]) -> Script:
    """An honest deploy whose reply to the bundle is ``reply(honest_reply)``."""

    async def script(enclave: Enclave) -> None:
        await enclave.read_start()
        await enclave.send_document()
        info = await enclave.recv_message()
        size = 0
        while size < int(info["bundle_size"]):
            size += len(await enclave.recv())
        honest_reply = {"id": "A" * 22, "checksum": FUNCTION_CHECKSUM, "name": "echo"}
        await enclave.send_message(reply(honest_reply))
        await enclave.ws.close()

    return script


DEPLOY_REPLIES: dict[str, tuple[Callable[[dict[str, Any]], object], type[CapeError], str]] = {
    "other-checksum": (
        lambda r: {**r, "checksum": hashlib.sha256(b"other").hexdigest()},
        FormatError,
        "but the bundle's is " + FUNCTION_CHECKSUM,
    ),
    "checksum-missing": (
        lambda r: {"id": r["id"], "name": r["name"]},
        FormatError,
        "reports checksum None",
    ),
    "not-a-dict": (lambda r: "deployed", FormatError, r'\{"message"'),
    "id-missing": (
        lambda r: {"checksum": r["checksum"]},
        FormatError,
        "^the deploy reply carries no function id$",
    ),
    "id-not-a-string": (
        lambda r: {**r, "id": 7},
        FormatError,
        "^the deploy reply carries no function id$",
    ),
}


@pytest.mark.parametrize("case", DEPLOY_REPLIES.keys())
def test_bad_deploy_reply_is_refused(
    tls: TlsFiles, pki: Pki, rsa_key: RSAPrivateKey, case: str
) -> None:
    reply, kind, match = DEPLOY_REPLIES[case]
    server = HostileServer(tls, pki, _deploy_reply(reply), rsa_key=rsa_key)
    outcome = attack(server, flow_client("deploy", options(tls, pki), rsa_key))
    outcome.refused(kind, match)


def test_deploy_error_reply_is_a_function_error(
    tls: TlsFiles, pki: Pki, rsa_key: RSAPrivateKey
) -> None:
    async def script(enclave: Enclave) -> None:
        await enclave.read_start()
        await enclave.send_document()
        await enclave.recv_message()
        await enclave.ws.send(json.dumps({"error": "bundle exceeds the limit"}))
        await enclave.ws.close()

    server = HostileServer(tls, pki, script, rsa_key=rsa_key)
    outcome = attack(server, flow_client("deploy", options(tls, pki), rsa_key))
    outcome.refused(FunctionError, "bundle exceeds the limit")


# --- transport: TLS, subprotocol, refusals --------------------------------------------------


def test_server_with_an_untrusted_tls_certificate_is_refused(
    tls: TlsFiles, pki: Pki, tmp_path: Path
) -> None:
    impostor = ensure_tls(tmp_path / "impostor", "127.0.0.1")
    outcome = attack(HostileServer(impostor, pki), run_client(options(tls, pki)), sessions=0)
    outcome.refused(TransportError, "cannot reach the Cape server")
    assert outcome.sessions == []


def test_plain_http_is_refused_before_connecting(tls: TlsFiles, pki: Pki) -> None:
    async def client(url: str) -> object:
        return await Session.open(
            url.replace("https://", "http://"), RUN_PATH, TOKEN, options(tls, pki)
        )

    outcome = attack(HostileServer(tls, pki), client, sessions=0)
    outcome.refused(FormatError, "must use https://, not http://")
    assert outcome.sessions == []


def test_server_selecting_another_subprotocol_is_refused(tls: TlsFiles, pki: Pki) -> None:
    server = HostileServer(tls, pki, subprotocol="not-cape")
    outcome = attack(server, run_client(options(tls, pki)), sessions=0)
    outcome.refused(TransportError, "cannot reach the Cape server")


@pytest.mark.parametrize(
    ("status", "body", "match"),
    [
        (401, '{"error": "token is expired"}', r"\(401\): token is expired; log in again"),
        (403, '{"message": "forbidden"}', r"\(403\): forbidden"),
        (500, "<html>not json</html>", r"\(500\): no reason given"),
        (401, '["error"]', r"\(401\): no reason given"),
    ],
)
def test_refused_upgrade_is_a_request_refused_error(
    tls: TlsFiles, pki: Pki, status: int, body: str, match: str
) -> None:
    server = HostileServer(tls, pki, refuse=(status, body))
    outcome = attack(server, run_client(options(tls, pki)), sessions=0)
    error = outcome.refused(RequestRefusedError, match)
    assert isinstance(error, RequestRefusedError) and error.status == status


@pytest.mark.parametrize(
    ("status", "retry_after", "match", "seconds"),
    [
        (503, "3", r"\(503\): the server is full; try again in 3 s$", 3.0),
        (429, "7", r"\(429\): the server is full; try again in 7 s$", 7.0),
        (503, None, r"\(503\): the server is full$", None),
        (429, "99999999999", r"\(429\): the server is full$", None),  # no absurd hint
        (503, "-1", r"\(503\): the server is full$", None),
        (503, "Wed, 21 Oct 2015 07:28:00 GMT", r"\(503\): the server is full$", None),
    ],
)
def test_busy_upgrade_refusal_is_a_busy_error_with_its_hint(
    tls: TlsFiles, pki: Pki, status: int, retry_after: str | None, match: str, seconds: float | None
) -> None:
    server = HostileServer(
        tls, pki, refuse=(status, '{"error": "the server is full"}'), retry_after=retry_after
    )
    outcome = attack(server, run_client(options(tls, pki)), sessions=0)
    error = outcome.refused(BusyError, "^the server refused the session " + match)
    assert isinstance(error, BusyError) and error.retry_after_s == seconds


def test_refusal_with_deeply_nested_body_is_a_request_refused_error(
    tls: TlsFiles, pki: Pki
) -> None:
    server = HostileServer(tls, pki, refuse=(401, "[" * 100_000))
    outcome = attack(server, run_client(options(tls, pki)), sessions=0)
    error = outcome.refused(
        RequestRefusedError, r"^the server refused the session \(401\): no reason given$"
    )
    assert isinstance(error, RequestRefusedError) and error.status == 401


def test_later_sessions_to_one_enclave_verify_its_chain_once(
    tls: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fresh PKI: no earlier test has verified this chain in this process.
    fresh = Pki.generate()
    chains: list[int] = []
    verify_chain = verifier._verify_chain

    def counting(*args: Any) -> None:
        chains.append(1)
        verify_chain(*args)

    monkeypatch.setattr(verifier, "_verify_chain", counting)
    enclave_module = fresh.module()  # one enclave: its documents share one certificate chain

    async def same_enclave(enclave: Enclave) -> None:
        await enclave.read_start()
        await enclave.send_document(enclave.document(module=enclave_module))
        await enclave.serve_inputs()

    for _ in range(2):
        server = HostileServer(tls, fresh, same_enclave)
        outcome = attack(server, run_client(options(tls, fresh), INPUTS))
        assert outcome.error is None
        assert outcome.value == [echo(data) for data in INPUTS]
    assert len(chains) == 1
    # The document itself is checked every time: a stale one on that chain is refused.
    module = fresh.module(clock=_shifted(dt.timedelta(minutes=-10)))
    script = document_script(lambda e: e.document(module=module))
    outcome = attack(HostileServer(tls, fresh, script), run_client(options(tls, fresh)))
    outcome.refused(DocumentExpiredError, "more than 300 s before")
