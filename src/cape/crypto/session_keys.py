"""A sealed session's two channels from its one X25519 agreement (protocol.md, "Sealed
inputs"; ours, issue 16).

Results are sealed under a key derived from X25519(enclave session key, client response key)
(:mod:`cape.crypto.results`). When the enclave confirms ``"input_frames": "sealed"`` in the
attested ``user_data``, inputs travel under a twin key from the same agreement instead of one
HPKE seal (an ephemeral key pair and two agreements) per call:

    key     = HKDF-SHA256(shared, salt = none,
                          info = "cape-inputs-v1" ‖ session public key ‖ response public key)
    input n (0, 1, 2, … in the session; a test session's bundle is input 0)
            = ChaCha20-Poly1305(key, nonce = n as 12 bytes big-endian, aad = "input")

Only the client (its response key) and the attested enclave (its session key) can derive the
key, so unlike base-mode HPKE, where anyone holding the public key can seal, an input the host
made up, replayed, reordered or cut does not open. All primitives come from ``cryptography``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from cape.crypto.envelope import DECRYPTION_FAILED
from cape.crypto.hpke import KeyPair
from cape.crypto.results import INFO as RESULTS_INFO
from cape.crypto.results import ResultChannel, channel_key, sequence_nonce, x25519_shared
from cape.errors import DecryptionError, MalformedEnvelopeError

__all__ = ["INPUT", "INPUT_INFO", "InputChannel", "SessionKeys"]

INPUT_INFO: Final = b"cape-inputs-v1"
INPUT: Final = b"input"
_TAG = 16


class InputChannel:
    """One session's input key; ``seal``/``open`` take the input's sequence number."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)

    def seal(self, sequence: int, data: bytes) -> bytes:
        return self._aead.encrypt(sequence_nonce(sequence), bytes(data), INPUT)

    def open(self, sequence: int, data: bytes) -> bytes:
        """Open input ``sequence``: anything else (an HPKE frame, another input, a cut or
        altered one) raises as an undecryptable HPKE input does."""
        if len(data) < _TAG:
            raise MalformedEnvelopeError("a sealed input is shorter than its tag")
        try:
            return self._aead.decrypt(sequence_nonce(sequence), data, INPUT)
        except InvalidTag:
            raise DecryptionError(DECRYPTION_FAILED) from None


@dataclass(frozen=True)
class SessionKeys:
    """Both channels of a sealed session, from a single X25519 agreement."""

    results: ResultChannel
    inputs: InputChannel

    @classmethod
    def derive(
        cls,
        private_key: object,
        peer_public: bytes,
        *,
        session_public: bytes,
        response_public: bytes,
    ) -> SessionKeys:
        """Either side: its own private key, the other's public key, both public keys."""
        shared = x25519_shared(private_key, peer_public)  # type: ignore[arg-type]  # checked
        return cls(
            ResultChannel(channel_key(shared, RESULTS_INFO, session_public, response_public)),
            InputChannel(channel_key(shared, INPUT_INFO, session_public, response_public)),
        )

    @classmethod
    def for_client(cls, response_key: KeyPair, session_public: bytes) -> SessionKeys:
        """The client's side: its response key pair and the attested session key."""
        return cls.derive(
            response_key.private_key,
            session_public,
            session_public=session_public,
            response_public=response_key.public_bytes,
        )

    @classmethod
    def for_enclave(cls, session_key: KeyPair, response_public: bytes) -> SessionKeys:
        """The enclave's side: its session key pair and the client's response key."""
        return cls.derive(
            session_key.private_key,
            response_public,
            session_public=session_key.public_bytes,
            response_public=response_public,
        )
