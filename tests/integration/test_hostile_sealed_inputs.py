"""Sealed inputs (ours, issue 16) against a hostile server: the SDK asks for them in its nonce
message, but seals an input under the session's input key only when the verified document's
``user_data`` confirms ``input_frames: "sealed"``; a confirmation outside the document, or
none, leaves it on HPKE, and a confirmation it cannot honour is a typed CapeError before any
input is sent."""

from __future__ import annotations

from typing import Any

import pytest

from cape.crypto import hpke
from cape.crypto.session_keys import SessionKeys
from cape.errors import DecryptionError, FormatError, VerificationError
from cape.platform.tls import TlsFiles
from cape.sdk import flows
from tests.integration.hostile import FUNCTION_BUNDLE, Enclave, HostileServer, Pki, b64, echo

# the hostile-server suite's fixtures (tls, pki) and helpers
from tests.integration.test_hostile_server import TOKEN, attack, options, run_client
from tests.integration.test_hostile_server import pki as pki
from tests.integration.test_hostile_server import tls as tls

INPUTS = [b"one", b"", b"three" * 300]


def confirming(value: object = "sealed", *, outside: bool = False) -> Any:
    """An enclave whose document confirms ``input_frames: value`` (``outside``: the claim is
    made in the attestation_doc message instead, where a host could forge it), then serves the
    inputs by opening input *n* under the session's input key, or with HPKE if unconfirmed."""

    async def script(enclave: Enclave) -> None:
        start = await enclave.read_start()
        user_data = enclave.honest_user_data()
        if not outside:
            user_data["input_frames"] = value
        raw = enclave.document(user_data=user_data)
        enclave.record.document_index = len(enclave.record.frames)
        enclave.record.documents.append(raw)
        message: dict[str, object] = {"type": "attestation_doc", "message": b64(raw)}
        if outside:
            message["input_frames"] = value
        await enclave.send_message(message)
        sealed = value == "sealed" and not outside
        keys = None
        if sealed:
            if start.get("input_frames") != "sealed" or enclave.response_key is None:
                await enclave.drain()  # the client did not ask: it must send nothing more
                return
            keys = SessionKeys.for_enclave(enclave.key, enclave.response_key, enclave.sealing)
        count = 0
        while True:
            frame = await enclave.recv()
            assert isinstance(frame, bytes)
            if keys is None:
                data = hpke.open(enclave.key, frame)
            else:
                with pytest.raises(DecryptionError):  # not an HPKE frame any more
                    hpke.open(enclave.key, frame)
                data = keys.inputs.open(count, frame)
            count += 1
            enclave.record.opened.append(data)
            if enclave.record.path == "/v1/test" and count == 1:
                continue  # the bundle
            await enclave.send_json(enclave.reply(echo, data))

    return script


def test_the_sdk_asks_and_seals_inputs_once_the_document_confirms(tls: TlsFiles, pki: Pki) -> None:
    outcome = attack(HostileServer(tls, pki, confirming()), run_client(options(tls, pki), INPUTS))
    assert outcome.error is None and outcome.value == [echo(data) for data in INPUTS]
    assert outcome.session.start is not None
    assert outcome.session.start["input_frames"] == "sealed"
    assert outcome.session.opened == INPUTS  # input n opened as number n


def test_a_test_sessions_bundle_is_input_zero(tls: TlsFiles, pki: Pki) -> None:
    async def client(url: str) -> list[bytes]:
        return await flows.test(url, TOKEN, options(tls, pki), FUNCTION_BUNDLE, [b"in"])

    outcome = attack(HostileServer(tls, pki, confirming()), client)
    assert outcome.error is None and outcome.value == [echo(b"in")]
    assert outcome.session.opened == [FUNCTION_BUNDLE, b"in"]


@pytest.mark.parametrize("outside", [False, True], ids=["no-confirmation", "outside-the-doc"])
def test_without_the_documents_confirmation_inputs_stay_hpke(
    tls: TlsFiles, pki: Pki, outside: bool
) -> None:
    """A host that strips the request (the honest document then lacks the field), or claims
    the confirmation in its own message, gets HPKE inputs as today."""
    script = confirming(outside=True) if outside else confirming("hpke")
    outcome = attack(HostileServer(tls, pki, script), run_client(options(tls, pki), INPUTS))
    assert outcome.error is None and outcome.value == [echo(data) for data in INPUTS]
    assert outcome.session.opened == INPUTS


@pytest.mark.parametrize("value", ["SEALED", "v2", 1, None, ["sealed"]])
def test_an_unknown_confirmation_is_refused_before_any_input(
    tls: TlsFiles, pki: Pki, value: object
) -> None:
    outcome = attack(HostileServer(tls, pki, confirming(value)), run_client(options(tls, pki)))
    outcome.refused(FormatError, "unknown input frames")
    outcome.nothing_after_document()


def test_a_confirmation_the_client_did_not_ask_for_is_refused(tls: TlsFiles, pki: Pki) -> None:
    """Without a response key there is no input key: an enclave (or a host feeding it a
    request) claiming sealed inputs gets no input at all."""
    client = run_client(options(tls, pki, seal_results=False))
    outcome = attack(HostileServer(tls, pki, confirming()), client)
    outcome.refused(VerificationError, "sealed inputs, but none were asked for")
    outcome.nothing_after_document()
    assert outcome.session.start is not None and "input_frames" not in outcome.session.start
