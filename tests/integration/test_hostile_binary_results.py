"""Binary result frames (ours, issue 16) against a hostile server: the SDK reads a binary
frame as a result only after the server confirmed that form, checks its tag byte, and opens a
sealed result on the session's channel exactly as it opens a text one; anything else is a
typed CapeError, never wrong data."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cape.crypto import results
from cape.errors import CapeError, DecryptionError, FormatError, VerificationError
from cape.platform.tls import TlsFiles
from tests.integration.hostile import Enclave, HostileServer, Pki, Script, b64, echo

# the hostile-server suite's fixtures (tls, pki) and helpers
from tests.integration.test_hostile_server import attack, options, run_client
from tests.integration.test_hostile_server import pki as pki
from tests.integration.test_hostile_server import tls as tls


async def _confirm_binary(enclave: Enclave) -> None:
    """The honest document, with the server's confirmation of binary result frames."""
    raw = enclave.document()
    enclave.record.document_index = len(enclave.record.frames)
    enclave.record.documents.append(raw)
    message = {"type": "attestation_doc", "message": b64(raw), "result_frames": "binary"}
    await enclave.send_message(message)


def binary_script(reply: Callable[[Enclave, bytes], bytes]) -> Script:
    """Confirm binary results, then answer each input with the binary frame ``reply`` makes."""

    async def script(enclave: Enclave) -> None:
        start = await enclave.read_start()
        assert start.get("result_frames") == "binary"  # the SDK asks for the form
        await _confirm_binary(enclave)
        while True:
            data = await enclave.open_frame()
            await enclave.ws.send(reply(enclave, data))

    return script


def _sealed_frame(enclave: Enclave, data: bytes) -> bytes:
    return b"\x01" + enclave.seal(echo(data))


def _flip_last_byte(frame: bytes) -> bytes:
    return frame[:-1] + bytes([frame[-1] ^ 1])


def test_honest_binary_results_are_opened(tls: TlsFiles, pki: Pki) -> None:
    server = HostileServer(tls, pki, binary_script(_sealed_frame))
    outcome = attack(server, run_client(options(tls, pki), [b"one", b"two", b"three"]))
    assert outcome.error is None
    assert outcome.value == [echo(b"one"), echo(b"two"), echo(b"three")]


def test_plain_binary_results_in_an_unsealed_session(tls: TlsFiles, pki: Pki) -> None:
    server = HostileServer(tls, pki, binary_script(lambda e, d: b"\x00" + echo(d)))
    outcome = attack(server, run_client(options(tls, pki, seal_results=False), [b"a", b"b"]))
    assert outcome.error is None and outcome.value == [echo(b"a"), echo(b"b")]


BAD_FRAMES: dict[str, tuple[Callable[[Enclave, bytes], bytes], type[CapeError], str]] = {
    "plain-tag-when-sealing-was-bound": (
        lambda e, d: b"\x00" + echo(d),
        VerificationError,
        "unsealed although sealing was bound",
    ),
    "empty-frame": (lambda e, d: b"", FormatError, "binary frame that is not a result"),
    "unknown-tag": (
        lambda e, d: b"\x02" + e.seal(echo(d)),
        FormatError,
        "binary frame that is not a result",
    ),
    "json-as-binary": (
        lambda e, d: b'{"message": {}}',
        FormatError,
        "binary frame that is not a result",
    ),
    "next-sequence-number": (
        lambda e, d: b"\x01" + e.seal(echo(d), sequence=1),
        DecryptionError,
        "decryption failed",
    ),
    "sealed-as-an-error": (
        lambda e, d: b"\x01" + e.seal(echo(d), kind=results.ERROR),
        DecryptionError,
        "decryption failed",
    ),
    "tampered": (
        lambda e, d: _flip_last_byte(_sealed_frame(e, d)),
        DecryptionError,
        "decryption failed",
    ),
    "tag-only": (lambda e, d: b"\x01", CapeError, "shorter than its tag"),
}


@pytest.mark.parametrize("case", BAD_FRAMES.keys())
def test_bad_binary_result_frames_are_typed_errors(tls: TlsFiles, pki: Pki, case: str) -> None:
    make, kind, match = BAD_FRAMES[case]
    outcome = attack(HostileServer(tls, pki, binary_script(make)), run_client(options(tls, pki)))
    outcome.refused(kind, match)
    assert outcome.value is None


def test_a_sealed_tag_in_an_unsealed_session_is_refused(tls: TlsFiles, pki: Pki) -> None:
    server = HostileServer(tls, pki, binary_script(lambda e, d: b"\x01" + echo(d)))
    outcome = attack(server, run_client(options(tls, pki, seal_results=False)))
    outcome.refused(FormatError, "sealed result to a session without one")


def test_binary_frame_without_the_servers_confirmation_is_refused(tls: TlsFiles, pki: Pki) -> None:
    """A server that did not confirm the form may not send it: Cape's text form is expected."""

    async def script(enclave: Enclave) -> None:
        await enclave.read_start()
        await enclave.send_document()  # no "result_frames" confirmation
        data = await enclave.open_frame()
        await enclave.ws.send(_sealed_frame(enclave, data))

    outcome = attack(HostileServer(tls, pki, script), run_client(options(tls, pki)))
    outcome.refused(FormatError, "expected a text frame")
