"""The root of cape's error tree.

Every failure that a user, a peer or a hostile input can cause is a :class:`CapeError`.
Bugs in cape itself raise ``TypeError``, ``ValueError`` or ``RuntimeError`` instead.

``diagnostics()`` returns text that is safe to show anywhere: it never contains keys, tokens
or plaintext.
"""

from __future__ import annotations

__all__ = [
    "SANDBOX_REASONS",
    "BusyError",
    "CapeError",
    "CertificateExpiredError",
    "ChainError",
    "ChecksumMismatchError",
    "DebugEnclaveError",
    "DecryptionError",
    "DocumentExpiredError",
    "DocumentTimestampError",
    "FormatError",
    "FunctionError",
    "KeyAnswerError",
    "KeyFormatError",
    "KeyNotFoundError",
    "KeyReleaseDeniedError",
    "KeyServiceUnavailableError",
    "LimitExceededError",
    "MalformedEnvelopeError",
    "NSMError",
    "NonceMismatchError",
    "PCRMismatchError",
    "RequestRefusedError",
    "SandboxError",
    "SecureModuleError",
    "SignatureError",
    "TransportError",
    "VerificationError",
]


class CapeError(Exception):
    """Base class of every error cape reports to its users."""

    def diagnostics(self) -> str:
        """A one-line, human-readable description that is safe to log and print."""
        text = str(self) or self.__class__.__name__
        return " ".join(text.split())


class FormatError(CapeError):
    """Malformed bytes: a frame, envelope, key, document or bundle that does not parse."""


class KeyFormatError(FormatError):
    """A key file or key bytes that are not a usable key of the expected kind."""


class LimitExceededError(CapeError):
    """An input is larger than a configured limit."""

    def __init__(self, name: str, limit: int, actual: int | None = None) -> None:
        self.name = name
        self.limit = limit
        self.actual = actual
        detail = f" (got {actual})" if actual is not None else ""
        super().__init__(f"{name} exceeds the limit of {limit}{detail}")


class DecryptionError(CapeError):
    """A ciphertext could not be opened.

    This is the one exception the decrypting side raises for any bad ciphertext: wrong prefix,
    bad base64, truncation, a wrong key or a tampered byte. Cryptographic failures all share one
    message, so the error is not an oracle.
    """


class MalformedEnvelopeError(DecryptionError, FormatError):
    """A ciphertext that is structurally wrong (prefix, base64, length) before any crypto runs."""


class VerificationError(CapeError):
    """An attestation document, signature or checksum failed a check."""


class SignatureError(VerificationError):
    """The COSE signature does not verify with the document's certificate."""


class ChainError(VerificationError):
    """The certificate chain does not lead to the pinned root at the check time."""


class CertificateExpiredError(ChainError):
    """The leaf certificate is not valid at the check time."""


class DocumentExpiredError(VerificationError):
    """The document's timestamp is older than the allowed maximum age."""


class DocumentTimestampError(VerificationError):
    """The document's timestamp lies after the check time (beyond the allowed clock skew)."""


class DebugEnclaveError(VerificationError):
    """The document comes from an enclave in debug mode (PCR0 is all zeros)."""


class NonceMismatchError(VerificationError):
    """The document does not carry the nonce the verifier sent."""


class ChecksumMismatchError(VerificationError):
    """A function checksum differs from the one the caller pinned."""


class PCRMismatchError(VerificationError):
    """A PCR is absent or holds a value outside the caller's allow-list."""

    def __init__(self, index: int, expected: list[bytes], actual: bytes | None) -> None:
        self.index = index
        self.expected = expected
        self.actual = actual
        got = actual.hex() if actual is not None else "absent"
        allowed = ", ".join(e.hex() for e in expected) or "nothing"
        super().__init__(f"PCR{index} is {got}; allowed: {allowed}")


class SecureModuleError(CapeError):
    """The secure module (simulated or Nitro NSM) could not serve a request."""


class NSMError(SecureModuleError):
    """The NSM answered with one of its error codes (``InvalidArgument``, ``InputTooLarge``...)."""

    def __init__(self, code: str) -> None:
        self.code = code
        super().__init__(f"secure module error: {code}")


class KeyReleaseDeniedError(CapeError):
    """The key service refused to release key material; names the failed check, never keys."""


class KeyAnswerError(VerificationError):
    """A key-service answer relayed by the host is not signed by the key service the enclave
    was measured with (substituted, forged, or replayed from another request)."""


class KeyNotFoundError(CapeError):
    """The key service holds no key for that owner (and was not asked to create one)."""


class SandboxError(CapeError):
    """User code was stopped by the sandbox, or the sandbox could not be set up.

    ``reason`` says which limit or failure: one of :data:`SANDBOX_REASONS`.
    """

    def __init__(self, reason: str, message: str) -> None:
        if reason not in SANDBOX_REASONS:
            raise ValueError(f"unknown sandbox reason {reason!r}")
        self.reason = reason
        super().__init__(message)


#: Why a sandboxed call ended abnormally.
SANDBOX_REASONS = frozenset(
    {
        "cpu",  # CPU-seconds limit (RLIMIT_CPU)
        "timeout",  # wall-clock limit per call
        "memory",  # address-space limit
        "processes",  # process-count limit
        "output",  # result larger than the output limit
        "crashed",  # the worker died (signal, os._exit, segfault)
        "unavailable",  # OS isolation is not available here: user code is refused
        "load",  # the bundle's app.py could not be imported or lacks cape_handler
    }
)


class BusyError(CapeError):
    """A bounded queue is full (the enclave's calls, key service or attestation): retry later.

    The host answers it as "try again later" (HTTP 503, websocket close 1013); the SDK raises
    it for those answers, with the server's ``Retry-After`` (seconds) as ``retry_after_s``
    when it gave one.
    """

    def __init__(self, message: str = "", *, retry_after_s: float | None = None) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class KeyServiceUnavailableError(BusyError):
    """The key service cannot be reached (down, unreachable or not answering in time); calls
    that need a key fail with it after a bounded wait. Like any busy error, "try again later"
    (HTTP 503, websocket close 1013)."""


class FunctionError(CapeError):
    """User code raised an exception; the session stays open."""


class TransportError(CapeError):
    """A connection, TLS or framing failure between two parties (``close_code`` if known)."""

    def __init__(self, message: str, *, close_code: int | None = None) -> None:
        self.close_code = close_code
        super().__init__(message)


class RequestRefusedError(CapeError):
    """The server answered a request or a session upgrade with an error ``status``."""

    def __init__(self, message: str, *, status: int) -> None:
        self.status = status
        super().__init__(message)
