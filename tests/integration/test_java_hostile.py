"""The Java SDK against the hostile server: every case of ``test_hostile_server.py`` replayed.

The server, its scripts and the expectations (exception type and message pattern per case) are
the Python SDK's own (:mod:`tests.integration.hostile`, the tables of
:mod:`tests.integration.test_hostile_server`). The client is the Java SDK, driven through one
JVM (:class:`tests.javasdk.Driver`); a Java exception comes back as its class name and message
and is re-raised as the ``cape.errors`` class it mirrors (``NonceMismatchException`` →
``NonceMismatchError``), so each case checks that Java refuses with the right typed exception.
A Java exception outside the ``cape.errors`` tree (a bug) fails the case.

Skipped without a JDK and Debian's jars, except under CI (see :mod:`tests.javasdk`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

import cape.errors
from cape.crypto.envelope import DECRYPTION_FAILED
from cape.crypto.keys import public_key_der
from cape.crypto.results import SEALED_ERROR_TEXT
from cape.errors import (
    CapeError,
    ChecksumMismatchError,
    DecryptionError,
    FunctionError,
    NonceMismatchError,
    PCRMismatchError,
    RequestRefusedError,
    TransportError,
    VerificationError,
)
from cape.platform.tls import TlsFiles, ensure_tls
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
    echo,
    honest,
)
from tests.integration.test_hostile_server import (
    BAD_DOCUMENT_MESSAGES,
    BAD_DOCUMENTS,
    BAD_RESULT_MESSAGES,
    CHANNEL_ATTACKS,
    CHECKSUMS,
    DECRYPTION_OR_SHORT,
    DEPLOY_REPLIES,
    FAILED,
    FIRST,
    FLOWS,
    GARBAGE,
    HONEST_PINS,
    INPUTS,
    KEYS,
    PCR_PINS,
    RESULTS,
    SEALED_ERRORS,
    SECOND,
    SESSION_KEYS,
    TIMES,
    USER_DATA,
    Outcome,
    _deploy_reply,
    _document_phase,
    _key_document,
    _relay,
    _result_phase,
    _serve_after,
    _shown,
    _text,
    _with_checksum,
    document_script,
    result_script,
    sealed,
)
from tests.javasdk import Driver

#: Generous: the JVM shares two cores with the rest of the machine. A hang still fails.
JAVA_TIMEOUT_S = 60.0
RUN_FUNCTION = "alice/echo"


def _java_errors() -> dict[str, type[CapeError]]:
    """Java exception simple name → the ``cape.errors`` class it mirrors."""
    mapping: dict[str, type[CapeError]] = {"UntrustedRootException": VerificationError}
    for name in cape.errors.__all__:
        cls = getattr(cape.errors, name)
        if isinstance(cls, type) and issubclass(cls, CapeError):
            java = "Pcr" + name[3:] if name.startswith("PCR") else name
            mapping[java.removesuffix("Error") + "Exception"] = cls
    return mapping


JAVA_ERRORS = _java_errors()


def _python_error(error: dict[str, Any]) -> CapeError:
    if error.get("bug") or error["type"] not in JAVA_ERRORS:
        raise AssertionError(f"the Java client failed outside the cape.errors tree: {error}")
    cls = JAVA_ERRORS[error["type"]]
    exc = cls.__new__(cls)
    Exception.__init__(exc, error["message"])
    for field in ("status", "close_code", "index"):
        if field in error:
            setattr(exc, field, error[field])
    return exc


def _replies(got: list[dict[str, str]]) -> list[bytes | FunctionError]:
    return [
        base64.b64decode(r["ok"]) if "ok" in r else FunctionError(r["function_error"]) for r in got
    ]


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def driver() -> Iterator[Driver]:
    process = Driver()
    try:
        yield process
    finally:
        process.close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return ensure_tls(tmp_path_factory.mktemp("tls"), "127.0.0.1")


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.generate()


@pytest.fixture(scope="module")
def other_pki() -> Pki:
    return Pki.generate()


@pytest.fixture(scope="module")
def rsa_key() -> RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def base(tls: TlsFiles, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What every command carries: the CA the client trusts and the pinned root."""
    root = tmp_path_factory.mktemp("root") / "root.pem"
    root.write_bytes(pki.root.public_bytes(serialization.Encoding.PEM))
    return {"ca": str(tls.ca_cert), "root": str(root), "timeout_ms": 20_000}


# --- the client side ------------------------------------------------------------------------


def java(
    driver: Driver, base: dict[str, Any], flow: str = "run", **fields: Any
) -> Callable[[str], Awaitable[Any]]:
    """The Java client as ``attack`` wants it: ``client(url)`` returns or raises a CapeError."""

    async def client(url: str) -> Any:
        command = {**base, "url": url, "flow": flow, **fields}
        outcome = await asyncio.to_thread(driver.call, command)
        if "error" in outcome:
            raise _python_error(outcome["error"])
        return outcome["value"]

    return client


def _fields(pins: dict[str, Any]) -> dict[str, Any]:
    """The Python SessionOptions overrides of the tables as driver fields."""
    fields: dict[str, Any] = {}
    if "seal_results" in pins:
        fields["seal"] = pins["seal_results"]
    if "function_checksum" in pins:
        fields["checksum"] = pins["function_checksum"]
    if "pcrs" in pins:
        fields["pcrs"] = {str(i): [v.hex() for v in values] for i, values in pins["pcrs"].items()}
    return fields


def _b64s(inputs: Sequence[bytes]) -> list[str]:
    return [base64.b64encode(data).decode() for data in inputs]


def flow_client(
    driver: Driver, base: dict[str, Any], flow: str, rsa_key: RSAPrivateKey, **fields: Any
) -> Callable[[str], Awaitable[Any]]:
    extra: dict[str, Any] = {}
    if flow in ("test", "deploy"):
        extra["bundle"] = base64.b64encode(FUNCTION_BUNDLE).decode()
    if flow == "deploy":
        extra["key_der"] = base64.b64encode(public_key_der(rsa_key.public_key())).decode()
    if flow == "key":
        extra["owner"] = KEY_OWNER
    return java(driver, base, flow, **extra, **fields)


def recording(
    driver: Driver,
    base: dict[str, Any],
    inputs: Sequence[bytes],
    got: list[bytes | FunctionError],
    *,
    pipelined: bool = False,
    **fields: Any,
) -> Callable[[str], Awaitable[Any]]:
    """Session-level: send ``inputs`` (all first if ``pipelined``), append each reply to
    ``got`` as the Java client accepted it (an output, or the FunctionError of a failed call)."""

    async def client(url: str) -> Any:
        command = {**base, "url": url, "flow": "record", "inputs": _b64s(inputs)}
        command.update(pipelined=pipelined, **fields)
        outcome = await asyncio.to_thread(driver.call, command)
        got.extend(_replies(outcome["got"]))
        if "error" in outcome:
            raise _python_error(outcome["error"])
        return got

    return client


async def _attack(
    server: HostileServer, client: Callable[[str], Awaitable[Any]], sessions: int
) -> Outcome[Any]:
    value: Any = None
    error: CapeError | None = None
    async with server:
        try:
            value = await asyncio.wait_for(client(server.url), JAVA_TIMEOUT_S)
        except CapeError as exc:
            error = exc
        records = await server.finished(sessions, timeout_s=30.0)
    return Outcome(value, error, records)


def attack(
    server: HostileServer, client: Callable[[str], Awaitable[Any]], *, sessions: int = 1
) -> Outcome[Any]:
    return asyncio.run(_attack(server, client, sessions))


def _decoded(values: Any) -> list[bytes]:
    """The driver's base64 outputs (a refusal or ``None`` fails the comparison that follows)."""
    assert isinstance(values, list), f"the Java client returned {values!r}"
    return [base64.b64decode(v) for v in values]


# --- the honest baseline --------------------------------------------------------------------


@pytest.mark.parametrize("pins", HONEST_PINS.values(), ids=HONEST_PINS.keys())
def test_java_honest_run_session_succeeds(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki, pins: dict[str, Any]
) -> None:
    client = java(driver, base, inputs=_b64s(INPUTS), **_fields(pins))
    outcome = attack(HostileServer(tls, pki), client)
    assert outcome.error is None
    assert _decoded(outcome.value) == [echo(data) for data in INPUTS]
    session = outcome.session
    assert session.opened == list(INPUTS)
    assert session.start is not None
    assert len(base64.b64decode(session.start["nonce"])) == 16
    assert ("response_key" in session.start) is pins.get("seal_results", True)
    assert len(session.binary_frames) == len(INPUTS)
    assert all(
        data not in frame for frame, data in zip(session.binary_frames, INPUTS, strict=True) if data
    )
    assert session.close_code == 1000


def test_java_honest_flows_succeed(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki, rsa_key: RSAPrivateKey
) -> None:
    server = HostileServer(tls, pki, rsa_key=rsa_key)

    async def client(url: str) -> list[Any]:
        return [
            await flow_client(driver, base, flow, rsa_key)(url)
            for flow in ("key", "deploy", "test")
        ]

    outcome = attack(server, client, sessions=3)
    assert outcome.error is None and outcome.value is not None
    key, deployed, outputs = outcome.value
    assert base64.b64decode(key) == public_key_der(rsa_key)
    assert deployed == {"id": "A" * 22, "checksum": FUNCTION_CHECKSUM, "name": "echo"}
    assert _decoded(outputs) == [echo(b"in")]
    key_session, deploy_session, test_session = outcome.sessions
    assert [s.path for s in outcome.sessions] == ["/v1/key", "/v1/deploy", "/v1/test"]
    assert key_session.after_document == []
    assert deploy_session.opened == [FUNCTION_BUNDLE]
    assert test_session.opened == [FUNCTION_BUNDLE, b"in"]


# --- documents that must stop every flow before it sends anything ---------------------------


@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("bad", BAD_DOCUMENTS.keys())
def test_java_bad_document_stops_every_flow_before_it_sends(
    driver: Driver,
    base: dict[str, Any],
    tls: TlsFiles,
    pki: Pki,
    other_pki: Pki,
    rsa_key: RSAPrivateKey,
    bad: str,
    flow: str,
) -> None:
    make, kind, match = BAD_DOCUMENTS[bad]
    server = HostileServer(tls, pki, document_script(lambda e: make(e, other_pki)), rsa_key=rsa_key)
    outcome = attack(server, flow_client(driver, base, flow, rsa_key))
    outcome.refused(kind, match)
    outcome.nothing_after_document()
    assert outcome.session.binary_frames == []
    assert outcome.session.close_code == 1000


def test_java_unsealed_session_does_not_need_the_binding(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki
) -> None:
    server = HostileServer(tls, pki, _serve_after(lambda e: e.document(user_data=None)))
    outcome = attack(server, java(driver, base, seal=False))
    assert _decoded(outcome.value) == [echo(b"hello")]
    assert outcome.session.start is not None and "response_key" not in outcome.session.start


@pytest.mark.parametrize("flow", ["run", "deploy"])
@pytest.mark.parametrize("replay", ["whole-document", "previous-nonce"])
def test_java_document_from_an_earlier_session_is_refused(
    driver: Driver,
    base: dict[str, Any],
    tls: TlsFiles,
    pki: Pki,
    rsa_key: RSAPrivateKey,
    replay: str,
    flow: str,
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
        else:
            await enclave.send_document(enclave.document(nonce=first.nonce))

    async def client(url: str) -> object:
        assert _decoded(await java(driver, base)(url)) == [echo(b"hello")]
        return await flow_client(driver, base, flow, rsa_key)(url)

    outcome = attack(HostileServer(tls, pki, script, rsa_key=rsa_key), client, sessions=2)
    outcome.refused(NonceMismatchError, "does not carry the expected nonce")
    outcome.nothing_after_document()
    first, second = outcome.sessions
    assert first.start is not None and second.start is not None
    assert first.start["nonce"] != second.start["nonce"]
    assert first.start["response_key"] != second.start["response_key"]


# --- function checksum ----------------------------------------------------------------------


@pytest.mark.parametrize("case", CHECKSUMS.keys())
def test_java_wrong_function_checksum_is_refused(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki, case: str
) -> None:
    value, kind, match = CHECKSUMS[case]
    server = HostileServer(tls, pki, document_script(_with_checksum(value)))
    outcome = attack(server, java(driver, base, checksum=FUNCTION_CHECKSUM))
    error = outcome.refused(kind, match)
    if isinstance(error, ChecksumMismatchError):
        assert FUNCTION_CHECKSUM in str(error)
    outcome.nothing_after_document()


def test_java_unpinned_checksum_is_not_checked(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki
) -> None:
    server = HostileServer(tls, pki, _serve_after(_with_checksum("%%%")))
    outcome = attack(server, java(driver, base))
    assert _decoded(outcome.value) == [echo(b"hello")]


def test_java_missing_pinned_checksum_is_a_checksum_mismatch(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki
) -> None:
    def make(enclave: Enclave) -> bytes:
        user_data = enclave.honest_user_data()
        del user_data["func_checksum"]
        return enclave.document(user_data=user_data)

    outcome = attack(
        HostileServer(tls, pki, document_script(make)),
        java(driver, base, checksum=FUNCTION_CHECKSUM),
    )
    outcome.nothing_after_document()
    outcome.refused(ChecksumMismatchError, "attests no function checksum, but one was pinned")


# --- results that are not sealed on this session's channel ----------------------------------


@pytest.mark.parametrize("encrypted", ["missing", False, None, "true", 1], ids=repr)
def test_java_plaintext_result_is_refused_when_sealing_was_bound(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki, encrypted: object
) -> None:
    secret = b"the plaintext result " + os.urandom(8).hex().encode()

    def reply(enclave: Enclave, data: bytes) -> dict[str, Any]:
        message: dict[str, Any] = {
            "type": "function_result",
            "message": base64.b64encode(secret).decode(),
        }
        if encrypted != "missing":
            message["encrypted"] = encrypted
        return message

    outcome = attack(HostileServer(tls, pki, result_script(reply)), java(driver, base))
    error = outcome.refused(VerificationError, "unsealed although sealing was bound")
    assert secret.decode() not in str(error)
    assert outcome.session.opened == [b"hello"]


@pytest.mark.parametrize("case", RESULTS.keys())
def test_java_result_not_sealed_on_this_sessions_channel_is_refused(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki, case: str
) -> None:
    make, kind = RESULTS[case]
    script = result_script(lambda e, d: sealed(make(e, d)))
    outcome = attack(HostileServer(tls, pki, script), java(driver, base))
    error = outcome.refused(kind, DECRYPTION_OR_SHORT)
    if kind is DecryptionError:
        assert str(error) == DECRYPTION_FAILED
    assert outcome.value is None
    assert outcome.session.opened == [b"hello"]


# --- the attested session key ---------------------------------------------------------------


@pytest.mark.parametrize("seal", [True, False], ids=["sealed", "unsealed"])
@pytest.mark.parametrize("case", SESSION_KEYS.keys())
def test_java_unusable_session_key_sends_no_input(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki, case: str, seal: bool
) -> None:
    public_key, when_sealed, when_unsealed = SESSION_KEYS[case]
    kind, match = when_sealed if seal else when_unsealed
    server = HostileServer(tls, pki, document_script(lambda e: e.document(public_key=public_key)))
    outcome = attack(server, java(driver, base, seal=seal))
    outcome.refused(kind, match)
    outcome.nothing_after_document()


@pytest.mark.parametrize("seal", [True, False], ids=["sealed", "unsealed"])
def test_java_test_flow_refuses_a_document_without_session_key(
    driver: Driver,
    base: dict[str, Any],
    tls: TlsFiles,
    pki: Pki,
    rsa_key: RSAPrivateKey,
    seal: bool,
) -> None:
    server = HostileServer(tls, pki, document_script(lambda e: e.document(public_key=None)))
    outcome = attack(server, flow_client(driver, base, "test", rsa_key, seal=seal))
    outcome.refused(VerificationError, "^the attestation document carries no session key$")
    outcome.nothing_after_document()


# --- the result channel: replies forged, replayed, reordered, dropped or injected -----------


@pytest.mark.parametrize("pipelined", [False, True], ids=["one-by-one", "pipelined"])
@pytest.mark.parametrize("seal", [True, False], ids=["sealed", "unsealed"])
def test_java_honest_function_errors_take_their_place_in_the_sequence(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki, seal: bool, pipelined: bool
) -> None:
    inputs = [FIRST, FAIL_INPUT, SECOND, FAIL_INPUT, b"last"]
    got: list[bytes | FunctionError] = []
    client = recording(driver, base, inputs, got, pipelined=pipelined, seal=seal)
    outcome = attack(HostileServer(tls, pki), client)
    assert outcome.error is None
    assert _shown(got) == [echo(FIRST), FAILED, echo(SECOND), FAILED, echo(b"last")]
    sent = outcome.session.sent[1:]
    errors = [json.loads(frame) for frame in sent if "error" in json.loads(frame)]
    if seal:
        assert all(FAIL_TEXT not in frame for frame in sent)
        assert all(e["error"] == SEALED_ERROR_TEXT for e in errors)


@pytest.mark.parametrize("case", CHANNEL_ATTACKS.keys())
def test_java_reply_out_of_sequence_never_returns_wrong_data(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki, case: str
) -> None:
    body, inputs, pipelined, accepted, refused = CHANNEL_ATTACKS[case]
    got: list[bytes | FunctionError] = []
    outcome = attack(
        HostileServer(tls, pki, _relay(body)),
        recording(driver, base, inputs, got, pipelined=pipelined),
    )
    assert _shown(got) == accepted
    if refused:
        error = outcome.refused(DecryptionError, "^decryption failed: ")
        assert str(error) == DECRYPTION_FAILED
    else:
        assert outcome.error is None
    opened = outcome.session.opened
    assert opened == inputs[: len(opened)]


@pytest.mark.parametrize("case", SEALED_ERRORS.keys())
def test_java_sealed_function_error_opens_only_as_sent(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki, case: str
) -> None:
    rewrite, accepted, kind, match = SEALED_ERRORS[case]

    async def body(enclave: Enclave) -> None:
        error = enclave.reply(echo, await enclave.open_frame())
        await enclave.send_json(rewrite(enclave, error))
        await enclave.serve_inputs()

    got: list[bytes | FunctionError] = []
    outcome = attack(
        HostileServer(tls, pki, _relay(body)), recording(driver, base, [FAIL_INPUT, SECOND], got)
    )
    assert _shown(got) == accepted
    if kind is None:
        assert outcome.error is None
    else:
        error = outcome.refused(kind, match)
        assert FAIL_TEXT not in str(error)


# --- PCRs, debug enclaves, document age -----------------------------------------------------


@pytest.mark.parametrize("case", PCR_PINS.keys())
def test_java_pcr_outside_the_allow_list_is_refused(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki, case: str
) -> None:
    pins, server_pcrs, match = PCR_PINS[case]
    script = document_script(lambda e: e.document(module=pki.module(pcrs=server_pcrs)))
    outcome = attack(HostileServer(tls, pki, script), java(driver, base, **_fields({"pcrs": pins})))
    error = outcome.refused(PCRMismatchError, match)
    assert getattr(error, "index", None) == int(match[3:].split(" ")[0])
    outcome.nothing_after_document()


@pytest.mark.parametrize(
    "pins", [{}, {0: {bytes(48)}}, {3: {PCRS[3]}}], ids=["no-pins", "pcr0-zero-pinned", "pcr3"]
)
def test_java_debug_enclave_is_refused(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki, pins: dict[int, set[bytes]]
) -> None:
    from cape.errors import DebugEnclaveError

    script = document_script(lambda e: e.document(module=pki.module(debug=True)))
    outcome = attack(HostileServer(tls, pki, script), java(driver, base, **_fields({"pcrs": pins})))
    outcome.refused(DebugEnclaveError, "debug-mode enclave")
    outcome.nothing_after_document()


@pytest.mark.parametrize("case", TIMES.keys())
def test_java_stale_or_future_document_is_refused(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki, case: str
) -> None:
    from tests.integration.test_hostile_server import _shifted

    server_shift, client_shift, kind, match = TIMES[case]
    module = pki.module(clock=_shifted(server_shift))
    script = document_script(lambda e: e.document(module=module))
    client = java(driver, base, clock_shift_s=int(client_shift.total_seconds()))
    outcome = attack(HostileServer(tls, pki, script), client)
    outcome.refused(kind, match)
    outcome.nothing_after_document()


# --- protocol garbage -----------------------------------------------------------------------


@pytest.mark.parametrize("case", GARBAGE.keys())
def test_java_garbage_instead_of_the_document_is_a_cape_error(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki, case: str
) -> None:
    action, kind, match = GARBAGE[case]
    outcome = attack(HostileServer(tls, pki, _document_phase(action)), java(driver, base))
    outcome.refused(kind, match)
    outcome.only_the_nonce()


@pytest.mark.parametrize("case", GARBAGE.keys())
def test_java_garbage_instead_of_the_result_is_a_cape_error(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki, case: str
) -> None:
    action, kind, match = GARBAGE[case]
    outcome = attack(HostileServer(tls, pki, _result_phase(action)), java(driver, base))
    outcome.refused(kind, match)
    assert outcome.value is None


@pytest.mark.parametrize("case", BAD_DOCUMENT_MESSAGES.keys())
def test_java_malformed_document_message_is_a_format_error(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki, case: str
) -> None:
    from cape.errors import FormatError

    action, match = BAD_DOCUMENT_MESSAGES[case]
    outcome = attack(HostileServer(tls, pki, _document_phase(action)), java(driver, base))
    outcome.refused(FormatError, match)
    outcome.only_the_nonce()


@pytest.mark.parametrize("case", BAD_RESULT_MESSAGES.keys())
def test_java_malformed_result_message_is_a_cape_error(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki, case: str
) -> None:
    action, kind, match = BAD_RESULT_MESSAGES[case]
    outcome = attack(HostileServer(tls, pki, _result_phase(action)), java(driver, base))
    outcome.refused(kind, match)
    assert outcome.value is None


@pytest.mark.parametrize("phase", ["document", "result"])
def test_java_deeply_nested_json_frame_is_a_format_error(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki, phase: str
) -> None:
    from cape.errors import FormatError

    action = _text("[" * 100_000)
    script = _document_phase(action) if phase == "document" else _result_phase(action)
    outcome = attack(HostileServer(tls, pki, script), java(driver, base))
    outcome.refused(FormatError, "^the server sent a frame that is not JSON$")


def test_java_silent_server_times_out_and_gets_nothing(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki
) -> None:
    """Unlike Python's, the Java client has a receive timeout (Builder.timeout): it gives up
    on a server that never answers the nonce and closes cleanly."""

    async def silent(enclave: Enclave) -> None:
        await enclave.read_start()
        await enclave.ws.wait_closed()

    outcome = attack(HostileServer(tls, pki, silent), java(driver, {**base, "timeout_ms": 1500}))
    outcome.refused(TransportError, "did not answer within")
    outcome.only_the_nonce()
    assert outcome.session.close_code == 1000


# --- user_data, the key flow, the deploy reply ----------------------------------------------


@pytest.mark.parametrize("case", USER_DATA.keys())
def test_java_user_data_that_is_not_a_json_object_is_a_format_error(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki, case: str
) -> None:
    from cape.errors import FormatError

    user_data, match = USER_DATA[case]
    server = HostileServer(tls, pki, document_script(lambda e: e.document(user_data=user_data)))
    outcome = attack(server, java(driver, base))
    outcome.refused(FormatError, match)
    outcome.nothing_after_document()


def test_java_deeply_nested_user_data_is_a_format_error(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki
) -> None:
    from cape.errors import FormatError

    server = HostileServer(tls, pki, document_script(lambda e: e.document(user_data=b"[" * 1024)))
    outcome = attack(server, java(driver, base))
    outcome.refused(FormatError, "^the document's user_data is not JSON$")
    outcome.nothing_after_document()


@pytest.mark.parametrize("case", KEYS.keys())
def test_java_key_document_without_a_usable_rsa_key_is_refused(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki, rsa_key: RSAPrivateKey, case: str
) -> None:
    make, kind, match = KEYS[case]
    script = document_script(_key_document(make), then_close=True)
    outcome = attack(
        HostileServer(tls, pki, script, rsa_key=rsa_key), flow_client(driver, base, "key", rsa_key)
    )
    outcome.refused(kind, match)
    outcome.nothing_after_document()


@pytest.mark.parametrize(
    ("owner", "match"),
    [("mallory", "is for 'mallory', not 'alice'"), (None, "is for None"), (["alice"], "not")],
    ids=["other-owner", "owner-missing", "owner-not-a-string"],
)
def test_java_key_document_for_another_owner_is_refused(
    driver: Driver,
    base: dict[str, Any],
    tls: TlsFiles,
    pki: Pki,
    rsa_key: RSAPrivateKey,
    owner: object,
    match: str,
) -> None:
    script = document_script(_key_document(lambda e: owner, "owner"), then_close=True)
    server = HostileServer(tls, pki, script, rsa_key=rsa_key)
    outcome = attack(server, flow_client(driver, base, "key", rsa_key))
    outcome.refused(VerificationError, match)
    outcome.nothing_after_document()


@pytest.mark.parametrize("case", DEPLOY_REPLIES.keys())
def test_java_bad_deploy_reply_is_refused(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki, rsa_key: RSAPrivateKey, case: str
) -> None:
    reply, kind, match = DEPLOY_REPLIES[case]
    server = HostileServer(tls, pki, _deploy_reply(reply), rsa_key=rsa_key)
    outcome = attack(server, flow_client(driver, base, "deploy", rsa_key))
    outcome.refused(kind, match)


def test_java_deploy_error_reply_is_a_function_error(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki, rsa_key: RSAPrivateKey
) -> None:
    async def script(enclave: Enclave) -> None:
        await enclave.read_start()
        await enclave.send_document()
        await enclave.recv_message()
        await enclave.ws.send(json.dumps({"error": "bundle exceeds the limit"}))
        await enclave.ws.close()

    server = HostileServer(tls, pki, script, rsa_key=rsa_key)
    outcome = attack(server, flow_client(driver, base, "deploy", rsa_key))
    outcome.refused(FunctionError, "bundle exceeds the limit")


# --- transport: TLS, subprotocol, refusals --------------------------------------------------


def test_java_server_with_an_untrusted_tls_certificate_is_refused(
    driver: Driver, base: dict[str, Any], pki: Pki, tmp_path: Path
) -> None:
    impostor = ensure_tls(tmp_path / "impostor", "127.0.0.1")
    outcome = attack(HostileServer(impostor, pki), java(driver, base), sessions=0)
    outcome.refused(TransportError, "cannot reach the Cape server")
    assert outcome.sessions == []


def test_java_plain_http_is_refused_before_connecting(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki
) -> None:
    from cape.errors import FormatError

    async def client(url: str) -> Any:
        return await java(driver, base)(url.replace("https://", "http://"))

    outcome = attack(HostileServer(tls, pki), client, sessions=0)
    outcome.refused(FormatError, "must use https://, not http://")
    assert outcome.sessions == []


def test_java_server_selecting_another_subprotocol_is_refused(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki
) -> None:
    server = HostileServer(tls, pki, subprotocol="not-cape")
    outcome = attack(server, java(driver, base), sessions=0)
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
def test_java_refused_upgrade_is_a_request_refused_error(
    driver: Driver,
    base: dict[str, Any],
    tls: TlsFiles,
    pki: Pki,
    status: int,
    body: str,
    match: str,
) -> None:
    server = HostileServer(tls, pki, refuse=(status, body))
    outcome = attack(server, java(driver, base), sessions=0)
    error = outcome.refused(RequestRefusedError, match)
    assert isinstance(error, RequestRefusedError) and error.status == status


def test_java_refusal_with_deeply_nested_body_is_a_request_refused_error(
    driver: Driver, base: dict[str, Any], tls: TlsFiles, pki: Pki
) -> None:
    server = HostileServer(tls, pki, refuse=(401, "[" * 100_000))
    outcome = attack(server, java(driver, base), sessions=0)
    error = outcome.refused(
        RequestRefusedError, r"^the server refused the session \(401\): no reason given$"
    )
    assert isinstance(error, RequestRefusedError) and error.status == 401
