"""What the websocket sessions read from the client before the calls: the token offered, the
nonce frame, the next message within its deadline, room for a single-frame bundle
(re-exported by :mod:`cape.host.api.sessions`)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Final

from starlette.websockets import WebSocket

from cape.errors import FormatError
from cape.host.admission import Reservation, ServerBusyError
from cape.host.api.frames import b64_field, json_message, receive
from cape.host.api.session_deps import SessionDeps
from cape.host.errors import AuthError

SUBPROTOCOL: Final = "cape.runtime"
MAX_NONCE_BYTES: Final = 1024
RESULT_FRAMES: Final = ("text", "binary")
"""The nonce frame's ``result_frames`` (ours): how results come back; Cape's form is text."""
INPUT_FRAMES: Final = ("hpke", "sealed")
"""The nonce frame's ``input_frames`` (ours): ``sealed`` asks the enclave for inputs under the
session's input key (protocol.md "Sealed inputs"); the enclave confirms it in the document."""
SEALINGS: Final = ("aes-256-gcm",)
"""The nonce frame's ``sealing`` (ours): the sealed channels' suite the client asks for (absent:
ChaCha20-Poly1305); the enclave confirms it in the document (protocol.md "Sealing"). The host
only checks and passes the name on (the suites are ``cape.crypto.session_keys.SEALINGS``, which
a test keeps equal to this)."""
SEALING_VALUES: Final = " or ".join(f'"{name}"' for name in SEALINGS)


def _token(websocket: WebSocket) -> str:
    offered: list[str] = list(websocket.scope.get("subprotocols") or [])
    others = [p for p in offered if p != SUBPROTOCOL]
    if SUBPROTOCOL in offered and others:
        return others[0]
    header = websocket.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    raise AuthError(f"missing token: offer the subprotocols '{SUBPROTOCOL}' and your token")


@dataclass(frozen=True)
class _Start:
    """What the nonce frame asks for."""

    nonce: bytes
    response_key: bytes | None
    binary_results: bool
    """Results as binary frames (``result_frames: "binary"``, our SDK), else JSON text."""
    sealed_inputs: bool = False
    """The client asked for sealed inputs (``input_frames: "sealed"``, our SDK)."""
    sealing: str | None = None
    """The suite the client asked for its sealed channels (``sealing``, our SDK), or None."""


def _nonce_frame(frame: str | bytes) -> _Start:
    message = json_message(frame, "nonce")
    nonce = b64_field(message, "nonce", MAX_NONCE_BYTES)
    if nonce is None:
        raise FormatError("the first frame must carry 'nonce'")
    form = message.get("result_frames", "text")
    if form not in RESULT_FRAMES:
        raise FormatError('\'result_frames\' must be "text" or "binary"')
    inputs = message.get("input_frames", "hpke")
    if inputs not in INPUT_FRAMES:
        raise FormatError('\'input_frames\' must be "hpke" or "sealed"')
    response_key = b64_field(message, "response_key", 64)
    if inputs == "sealed" and response_key is None:
        raise FormatError("'input_frames': \"sealed\" needs a 'response_key'")
    sealing = message.get("sealing")
    if "sealing" in message and (not isinstance(sealing, str) or sealing not in SEALINGS):
        raise FormatError(f"'sealing' must be {SEALING_VALUES}")
    if sealing is not None and response_key is None:
        raise FormatError("'sealing' needs a 'response_key'")
    return _Start(nonce, response_key, form == "binary", inputs == "sealed", sealing)


async def _next(
    websocket: WebSocket, deps: SessionDeps, limit: int, what: str, *, idle: bool = False
) -> str | bytes:
    """The next client message (``what``): at most ``limit`` bytes, within the frame timeout
    (or, for ``idle`` waits between calls, the idle timeout)."""
    timeout_s = deps.idle_timeout_s if idle else deps.frame_timeout_s
    return await receive(
        websocket, deps.lifecycle.draining, limit=limit, timeout_s=timeout_s, idle=idle, what=what
    )


def _bundle_room(deps: SessionDeps, reservation: Reservation) -> int:
    """Reserve room for a single-frame bundle: the bundle limit, or what is left of the
    caller's and the server's bundle bytes in flight. Raises if nothing is left."""
    room = min(deps.max_bundle_bytes, reservation.available())
    if room <= 0:
        raise ServerBusyError("too many bundle bytes in flight; try again later")
    reservation.resize(room)
    return room


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
