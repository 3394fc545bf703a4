"""Sealing (ours, issue 16) against a hostile server: the SDK asks for ``"sealing":
"aes-256-gcm"`` in its nonce message and goes on only when the verified document's
``user_data`` confirms exactly that, else under v1. A host that strips the request gets a v1
session (as sound); one that claims the confirmation outside the document gets nothing opened,
and one that makes the enclave confirm a suite the client did not ask for gets a typed CapeError
before anything secret is sent; a result sealed under the same session's v1 key does not open."""

from __future__ import annotations

from typing import Any

import pytest

from cape.crypto.session_keys import CHACHA20_POLY1305
from cape.errors import DecryptionError, FormatError, VerificationError
from cape.platform.tls import TlsFiles
from tests.integration.hostile import Enclave, HostileServer, Pki, b64, echo, session_channel

# the hostile-server suite's fixtures (tls, pki, rsa_key) and helpers
from tests.integration.test_hostile_server import (
    attack,
    options,
    result_script,
    run_client,
    sealed,
)
from tests.integration.test_hostile_server import pki as pki
from tests.integration.test_hostile_server import rsa_key as rsa_key
from tests.integration.test_hostile_server import tls as tls

UNSET = object()


def confirming(value: object = UNSET, *, outside: object = UNSET) -> Any:
    """An honest enclave, except that its document's ``user_data.sealing`` is ``value``
    (removed for None; honest when UNSET), and its attestation_doc message carries
    ``sealing: outside`` when given (where a host could forge it)."""

    async def script(enclave: Enclave) -> None:
        await enclave.read_start()
        user_data = enclave.honest_user_data()
        if value is None:
            user_data.pop("sealing", None)
        elif value is not UNSET:
            user_data["sealing"] = value
        raw = enclave.document(user_data=user_data)
        enclave.record.document_index = len(enclave.record.frames)
        enclave.record.documents.append(raw)
        message: dict[str, object] = {"type": "attestation_doc", "message": b64(raw)}
        if outside is not UNSET:
            message["sealing"] = outside
        await enclave.send_message(message)
        await enclave.serve_inputs()

    return script


def stripped(enclave: Enclave) -> None:
    """What the enclave does for a host that dropped the request: v1, nothing confirmed."""
    enclave.sealing = CHACHA20_POLY1305
    assert enclave.response_key is not None
    enclave.channel = session_channel(enclave.key, enclave.response_key)


def stripping() -> Any:
    async def script(enclave: Enclave) -> None:
        await enclave.read_start()
        stripped(enclave)
        await enclave.send_document()
        await enclave.serve_inputs()

    return script


def test_the_sdk_asks_and_the_confirmed_session_runs_under_aes(tls: TlsFiles, pki: Pki) -> None:
    outcome = attack(HostileServer(tls, pki, confirming()), run_client(options(tls, pki)))
    assert outcome.error is None and outcome.value == [echo(b"hello")]
    assert outcome.session.start is not None
    assert outcome.session.start["sealing"] == "aes-256-gcm"


def test_a_stripped_request_falls_back_to_v1(tls: TlsFiles, pki: Pki) -> None:
    """The host dropped ``sealing`` on its way to the enclave (or the server predates it): an
    honest v1 document, and the session runs under the v1 keys, which still seal everything."""
    outcome = attack(HostileServer(tls, pki, stripping()), run_client(options(tls, pki)))
    assert outcome.error is None and outcome.value == [echo(b"hello")]
    assert outcome.session.start is not None
    assert outcome.session.start["sealing"] == "aes-256-gcm"


def test_a_confirmation_outside_the_document_opens_nothing(tls: TlsFiles, pki: Pki) -> None:
    """The enclave sealed under AES but its document does not say so; a host's claim beside
    the document is not read: the client takes the document's (v1) keys, and nothing opens."""
    script = confirming(None, outside="aes-256-gcm")
    outcome = attack(HostileServer(tls, pki, script), run_client(options(tls, pki)))
    outcome.refused(DecryptionError, "^decryption failed: ")
    assert outcome.value is None


@pytest.mark.parametrize(
    "value", ["chacha20-poly1305", "AES-256-GCM", "aes-128-gcm", 1, ["aes-256-gcm"], {}]
)
def test_an_unknown_sealing_is_refused_before_any_input(
    tls: TlsFiles, pki: Pki, value: object
) -> None:
    outcome = attack(HostileServer(tls, pki, confirming(value)), run_client(options(tls, pki)))
    outcome.refused(FormatError, "unknown sealing")
    outcome.nothing_after_document()


def test_a_sealing_the_client_did_not_ask_for_is_refused(tls: TlsFiles, pki: Pki) -> None:
    """Without a response key there are no sealed channels: a document claiming a suite (a
    host feeding the enclave a request the client never made) gets no input at all."""
    script = confirming("aes-256-gcm")
    outcome = attack(
        HostileServer(tls, pki, script), run_client(options(tls, pki, seal_results=False))
    )
    outcome.refused(VerificationError, "attests a sealing, but none was asked for")
    outcome.nothing_after_document()
    assert outcome.session.start is not None and "sealing" not in outcome.session.start


def test_a_result_under_the_sessions_v1_key_does_not_open(tls: TlsFiles, pki: Pki) -> None:
    """Same agreement, same sequence number, same aad: only the suite differs."""

    def v1_result(enclave: Enclave, data: bytes) -> dict[str, Any]:
        assert enclave.response_key is not None
        v1 = session_channel(enclave.key, enclave.response_key, CHACHA20_POLY1305)
        return sealed(v1.seal(enclave.next_sequence(), echo(data)))

    outcome = attack(
        HostileServer(tls, pki, result_script(v1_result)), run_client(options(tls, pki))
    )
    outcome.refused(DecryptionError, "^decryption failed: ")
    assert outcome.value is None
