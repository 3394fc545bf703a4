"""The hostile-server corpus of test_hostile_server.py, replayed against the JavaScript SDK.

One :class:`HostileServer` serves every case: the JS client sends the case's id as its token
(the second websocket subprotocol), and the server runs that case's script. The cases and
what each must give (error class and message, the replies accepted before refusing) go to
``js/test/hostile.test.mjs`` as JSON; afterwards the server's records prove that a client which
refused a document sent nothing after it. The corpus tables are imported, not copied, so a
case added there is replayed here.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from cape.crypto.keys import public_key_der
from cape.enclave.secure_module.simulated import SimulatedSecureModule
from cape.errors import (
    CapeError,
    ChecksumMismatchError,
    DebugEnclaveError,
    DecryptionError,
    NonceMismatchError,
    PCRMismatchError,
    VerificationError,
)
from cape.platform.tls import TlsFiles, ensure_tls
from tests.e2e.js import require_built_sdk, run_node_tests
from tests.integration import test_hostile_server as corpus
from tests.integration.hostile import (
    FAIL_INPUT,
    FAIL_TEXT,
    FUNCTION_BUNDLE,
    FUNCTION_CHECKSUM,
    KEY_OWNER,
    PCRS,
    SUBPROTOCOL,
    Enclave,
    HostileServer,
    Pki,
    Script,
    SessionRecord,
    b64,
    echo,
    honest,
)


@dataclass
class Case:
    id: str
    script: Script
    client: str = "run"
    expect: type[CapeError] | None = None
    match: str = ""
    inputs: Sequence[bytes] = (b"hello",)
    pipelined: bool = False
    accepted: list[bytes | str] | None = None
    pcrs: dict[int, set[bytes]] = field(default_factory=dict)
    checksum: str | None = None
    clock_shift_ms: int = 0
    username: str | None = None
    nothing_after_document: bool = False
    secret: str | None = None

    def to_json(self, rsa_key: RSAPrivateKey) -> dict[str, Any]:
        def shown(reply: bytes | str) -> dict[str, str]:
            if isinstance(reply, bytes):
                return {"out": base64.b64encode(reply).decode()}
            return {"error": reply}

        return {
            "id": self.id,
            "client": self.client,
            "expectError": None if self.expect is None else self.expect.__name__,
            "match": self.match,
            "inputs": [base64.b64encode(data).decode() for data in self.inputs],
            "pipelined": self.pipelined,
            "accepted": None if self.accepted is None else [shown(r) for r in self.accepted],
            "firstValue": [shown(echo(b"hello"))] if self.client == "run-twice" else None,
            "pcrs": {str(i): sorted(v.hex() for v in values) for i, values in self.pcrs.items()},
            "checksum": self.checksum,
            "clockShiftMs": self.clock_shift_ms,
            "username": self.username,
            "secret": self.secret,
            "bundle": base64.b64encode(FUNCTION_BUNDLE).decode(),
            "key": base64.b64encode(public_key_der(rsa_key.public_key())).decode(),
        }


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower())


def _against(make: Callable[[Enclave, Pki], bytes], other: Pki, enclave: Enclave) -> bytes:
    return make(enclave, other)


def _sealed_by(make: Callable[[Enclave, bytes], bytes], enclave: Enclave, data: bytes) -> object:
    return corpus.sealed(make(enclave, data))


def _signed_by(module: SimulatedSecureModule, enclave: Enclave) -> bytes:
    return enclave.document(module=module)


def _constant(value: object, enclave: Enclave) -> object:
    return value


def _cases(pki: Pki, other_pki: Pki) -> list[Case]:
    cases: list[Case] = [
        Case("honest-run", honest, accepted=[echo(b"hello")]),
        Case("honest-key", honest, client="key", username=KEY_OWNER),
        Case("honest-deploy", honest, client="deploy"),
        Case(
            "honest-pinned",
            honest,
            pcrs={0: {PCRS[0]}, 8: {PCRS[8]}},
            checksum=FUNCTION_CHECKSUM.upper(),
            accepted=[echo(b"hello")],
        ),
        Case(
            "honest-errors-in-sequence",
            honest,
            client="record",
            inputs=[corpus.FIRST, FAIL_INPUT, corpus.SECOND, FAIL_INPUT, b"last"],
            accepted=[
                echo(corpus.FIRST),
                corpus.FAILED,
                echo(corpus.SECOND),
                corpus.FAILED,
                echo(b"last"),
            ],
        ),
        Case(
            "honest-pipelined",
            honest,
            client="record",
            pipelined=True,
            inputs=[corpus.FIRST, FAIL_INPUT, corpus.SECOND, b"last"],
            accepted=[echo(corpus.FIRST), corpus.FAILED, echo(corpus.SECOND), echo(b"last")],
        ),
    ]
    # 1, 2, 4: bad documents stop every flow before it sends anything.
    for name, (make, kind, match) in corpus.BAD_DOCUMENTS.items():
        for flow in ("run", "key", "deploy"):
            script = corpus.document_script(
                functools.partial(_against, make, other_pki), then_close=flow == "key"
            )
            cases.append(
                Case(
                    f"document-{_slug(name)}-{flow}",
                    script,
                    client=flow,
                    expect=kind,
                    match=match,
                    username=KEY_OWNER if flow == "key" else None,
                    nothing_after_document=True,
                )
            )
    # a document from an earlier session (stale nonce)
    for replay in ("whole-document", "previous-nonce"):
        earlier: list[Enclave] = []

        async def script(
            enclave: Enclave, replay: str = replay, earlier: list[Enclave] = earlier
        ) -> None:
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

        cases.append(
            Case(
                f"replayed-{replay}",
                script,
                client="run-twice",
                expect=NonceMismatchError,
                match="does not carry the expected nonce",
                nothing_after_document=True,
            )
        )
    # 3: function checksums
    for name, (value, kind, match) in corpus.CHECKSUMS.items():
        cases.append(
            Case(
                f"checksum-{_slug(name)}",
                corpus.document_script(corpus._with_checksum(value)),
                expect=kind,
                match=match,
                checksum=FUNCTION_CHECKSUM,
                nothing_after_document=True,
            )
        )

    def no_checksum(enclave: Enclave) -> bytes:
        user_data = enclave.honest_user_data()
        del user_data["func_checksum"]
        return enclave.document(user_data=user_data)

    cases.append(
        Case(
            "checksum-missing",
            corpus.document_script(no_checksum),
            expect=ChecksumMismatchError,
            match="attests no function checksum, but one was pinned",
            checksum=FUNCTION_CHECKSUM,
            nothing_after_document=True,
        )
    )
    # 5, 6: results not sealed on this session's channel
    secret = b"the plaintext result 51d3"
    for encrypted in ("missing", False, None, "true", 1):

        def reply(enclave: Enclave, data: bytes, encrypted: object = encrypted) -> dict[str, Any]:
            message: dict[str, Any] = {"type": "function_result", "message": b64(secret)}
            if encrypted != "missing":
                message["encrypted"] = encrypted
            return message

        cases.append(
            Case(
                f"unsealed-result-{_slug(repr(encrypted))}",
                corpus.result_script(reply),
                expect=VerificationError,
                match="unsealed although sealing was bound",
                secret=secret.decode(),
            )
        )
    for name, (make_result, kind) in corpus.RESULTS.items():
        cases.append(
            Case(
                f"result-{_slug(name)}",
                corpus.result_script(functools.partial(_sealed_by, make_result)),
                expect=kind,
                match=corpus.DECRYPTION_OR_SHORT,
            )
        )
    # replies dropped, replayed, reordered or injected
    for name, (body, inputs, pipelined, accepted, refused) in corpus.CHANNEL_ATTACKS.items():
        cases.append(
            Case(
                f"channel-{_slug(name)}",
                corpus._relay(body),
                client="record",
                inputs=inputs,
                pipelined=pipelined,
                accepted=accepted,
                expect=DecryptionError if refused else None,
                match="^decryption failed: " if refused else "",
            )
        )
    for name, (rewrite, accepted, error_kind, match) in corpus.SEALED_ERRORS.items():

        async def body(enclave: Enclave, rewrite: Callable[..., Any] = rewrite) -> None:
            error = await corpus._answer(enclave)
            await enclave.send_json(rewrite(enclave, error))
            await enclave.serve_inputs()

        cases.append(
            Case(
                f"sealed-error-{_slug(name)}",
                corpus._relay(body),
                client="record",
                inputs=[FAIL_INPUT, corpus.SECOND],
                accepted=accepted,
                expect=error_kind,
                match=match,
                secret=FAIL_TEXT if error_kind is not None else None,
            )
        )
    # 7: PCRs and debug enclaves
    for name, (pins, server_pcrs, match) in corpus.PCR_PINS.items():
        module = pki.module(pcrs=server_pcrs)
        cases.append(
            Case(
                f"pcr-{_slug(name)}",
                corpus.document_script(functools.partial(_signed_by, module)),
                expect=PCRMismatchError,
                match=match,
                pcrs=pins,
                nothing_after_document=True,
            )
        )
    debug = pki.module(debug=True)
    for name, pins in {"no-pins": {}, "pcr0-zero-pinned": {0: {bytes(48)}}}.items():
        cases.append(
            Case(
                f"debug-{name}",
                corpus.document_script(functools.partial(_signed_by, debug)),
                expect=DebugEnclaveError,
                match="debug-mode enclave",
                pcrs=pins,
                nothing_after_document=True,
            )
        )
    # 8: document age
    for name, (server_shift, client_shift, kind, match) in corpus.TIMES.items():
        module = pki.module(clock=corpus._shifted(server_shift))
        cases.append(
            Case(
                f"time-{_slug(name)}",
                corpus.document_script(functools.partial(_signed_by, module)),
                expect=kind,
                match=match,
                clock_shift_ms=int(client_shift.total_seconds() * 1000),
                nothing_after_document=True,
            )
        )
    # 11: key documents
    for name, (make_key, kind, match) in corpus.KEYS.items():
        cases.append(
            Case(
                f"key-{_slug(name)}",
                corpus.document_script(corpus._key_document(make_key), then_close=True),
                client="key",
                expect=kind,
                match=match,
                username=KEY_OWNER,
                nothing_after_document=True,
            )
        )
    for name, owner, match in (
        ("other-owner", "mallory", "is for 'mallory', not 'alice'"),
        ("owner-missing", None, "is for None"),
        ("owner-not-a-string", ["alice"], "not"),
    ):
        cases.append(
            Case(
                f"key-{name}",
                corpus.document_script(
                    corpus._key_document(functools.partial(_constant, owner), "owner"),
                    then_close=True,
                ),
                client="key",
                expect=VerificationError,
                match=match,
                username=KEY_OWNER,
                nothing_after_document=True,
            )
        )
    # deploy replies
    for name, (make_reply, kind, match) in corpus.DEPLOY_REPLIES.items():
        cases.append(
            Case(
                f"deploy-{_slug(name)}",
                corpus._deploy_reply(make_reply),
                client="deploy",
                expect=kind,
                match=match,
            )
        )
    return cases


#: Odd replies to an input (raw frame text), which the JS client must read exactly as the
#: Python client does: the Python SDK meets each first, and the JS case expects what it did
#: (error class and message, or the replies it accepted). Deep nesting, non-string errors and
#: Python's truthiness (an empty ``error`` is no error) are where JSON.parse, String() and JS's
#: truthiness differ from json.loads, str() and Python's.
ODD_REPLIES: dict[str, str] = {
    "deep-json": '{"message": {"type": ' + "[" * 100_000 + "]" * 100_000 + "}}",
    "deep-error": '{"error": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "error-object": json.dumps({"error": {"code": 7, "why": 'it\'s "quoted"\n'}}),
    "error-list": json.dumps({"error": ["busy", None, True, 1.5]}),
    "error-empty-list": json.dumps(
        {"error": [], "message": {"type": "function_result", "message": "aGk="}}
    ),
    "error-zero": json.dumps({"error": 0, "message": {"type": "nope"}}),
    "type-not-a-string": json.dumps({"message": {"type": ["x", None, False, {"k": "v"}]}}),
    "message-not-an-object": json.dumps({"message": "hi"}),
}


def _odd_reply(frame: str) -> Script:
    async def body(enclave: Enclave) -> None:
        await enclave.open_frame()
        enclave.record.sent.append(frame)
        await enclave.ws.send(frame)
        await enclave.serve_inputs()

    return corpus._relay(body)


def _as_python_reads_it(name: str, frame: str, tls: TlsFiles, pki: Pki) -> Case:
    """The case for the JS client: what the Python client made of ``frame``."""
    got: list[corpus.Reply] = []
    client = corpus.recording_client(corpus.options(tls, pki), [b"hello"], got)
    outcome = corpus.attack(HostileServer(tls, pki, _odd_reply(frame)), client)
    error = outcome.error
    return Case(
        f"odd-{name}",
        _odd_reply(frame),
        client="record",
        expect=None if error is None else type(error),
        match="" if error is None else f"^{re.escape(str(error))}$",
        accepted=corpus._shown(got),
    )


#: Refused upgrades and a foreign subprotocol: (status, body, expected message).
REFUSALS: dict[str, tuple[int, str, str]] = {
    "refused-expired": (
        401,
        '{"error": "token is expired"}',
        r"\(401\): token is expired; log in again",
    ),
    "refused-message": (403, '{"message": "forbidden"}', r"\(403\): forbidden"),
    "refused-not-json": (500, "<html>not json</html>", r"\(500\): no reason given"),
    "refused-error-object": (403, '{"error": {"why": "no"}}', r"\(403\): \{'why': 'no'\}$"),
    "refused-empty-error": (403, '{"error": [], "message": "m"}', r"\(403\): m$"),
    "refused-deep-json": (
        401,
        "[" * 100_000,
        r"^the server refused the session \(401\): no reason given$",
    ),
}


class Dispatcher(HostileServer):
    """One server for every case: the offered token names the case."""

    def __init__(
        self, tls: TlsFiles, pki: Pki, cases: dict[str, Case], rsa_key: RSAPrivateKey
    ) -> None:
        super().__init__(tls, pki, self._dispatch, rsa_key=rsa_key)
        self.cases = cases
        self.records: dict[str, list[SessionRecord]] = {}

    @staticmethod
    def _case(request: Request | None) -> str:
        if request is None:
            return ""
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        return next((p for p in offered if p != SUBPROTOCOL), "")

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        refusal = REFUSALS.get(self._case(request))
        if refusal is not None:
            return connection.respond(refusal[0], refusal[1])
        return None

    def _select_subprotocol(
        self, connection: ServerConnection, subprotocols: Sequence[Subprotocol]
    ) -> Subprotocol | None:
        if self._case(connection.request) == "other-subprotocol":
            return Subprotocol("other-subprotocol")
        return Subprotocol(SUBPROTOCOL) if SUBPROTOCOL in subprotocols else None

    async def _dispatch(self, enclave: Enclave) -> None:
        case = self._case(enclave.ws.request)
        self.records.setdefault(case, []).append(enclave.record)
        await self.cases[case].script(enclave)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return ensure_tls(tmp_path_factory.mktemp("tls"), "127.0.0.1")


def test_js_client_refuses_every_hostile_server(tls: TlsFiles, tmp_path: Path) -> None:
    require_built_sdk()
    pki, other_pki = Pki.generate(), Pki.generate()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    odd = [_as_python_reads_it(name, frame, tls, pki) for name, frame in ODD_REPLIES.items()]
    cases = {case.id: case for case in [*_cases(pki, other_pki), *odd]}
    specs = [case.to_json(rsa_key) for case in cases.values()]
    for name, (_, _, match) in REFUSALS.items():
        specs.append(
            {
                **specs[0],
                "id": name,
                "expectError": "RequestRefusedError",
                "match": match,
                "accepted": None,
            }
        )
    specs.append(
        {
            **specs[0],
            "id": "other-subprotocol",
            "expectError": "TransportError",
            "match": "subprotocol",
            "accepted": None,
        }
    )
    (tmp_path / "cases.json").write_text(json.dumps(specs))
    (tmp_path / "root.pem").write_bytes(pki.root.public_bytes(serialization.Encoding.PEM))

    async def main() -> Dispatcher:
        async with Dispatcher(tls, pki, cases, rsa_key) as server:
            env = {
                "NODE_EXTRA_CA_CERTS": str(tls.ca_cert),
                "CAPE_HOSTILE_URL": server.url,
                "CAPE_HOSTILE_CASES": str(tmp_path / "cases.json"),
                "CAPE_HOSTILE_ROOT_PEM_FILE": str(tmp_path / "root.pem"),
            }
            await asyncio.to_thread(run_node_tests, ["test/hostile.test.mjs"], env, len(specs))
            return server

    server = asyncio.run(main())
    for case in cases.values():
        records = server.records.get(case.id, [])
        assert records, f"{case.id}: the client never opened a session"
        for record in records:
            assert record.error is None, f"{case.id}: server script failed: {record.error!r}"
        if case.nothing_after_document:
            last = records[-1]
            assert last.document_sent, case.id
            assert last.after_document == [], f"{case.id}: the client sent after the document"
