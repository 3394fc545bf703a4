"""Client-side envelope encryption recipes for files, streams and byte strings.

Clients only ever encrypt: the private half of a Cape key lives in the key service, and only an
attested enclave gets data keys unwrapped. Small inputs use Cape's single-shot ``cape:`` form
(text by default, byte-compatible with Cape's CLI and pycape); inputs over
:data:`STREAM_THRESHOLD_BYTES`, or any input when asked, use the streaming form, whose memory
use is bounded whatever the input size.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from cape.crypto import envelope, stream
from cape.crypto.keys import load_rsa_public_key_file
from cape.errors import CapeError

__all__ = [
    "DEFAULT_INPUT_LIMIT_BYTES",
    "STREAM_THRESHOLD_BYTES",
    "EncryptResult",
    "OutputError",
    "atomic_output",
    "encrypt_stream_to",
    "largest_text_input",
    "load_encryption_key",
    "text_form_size",
]

#: Inputs larger than this use the streaming form (issue: "Inputs over 64 MiB").
STREAM_THRESHOLD_BYTES = 64 * 1024 * 1024
#: The input limit assumed when the server cannot be asked (``cape serve``'s default).
DEFAULT_INPUT_LIMIT_BYTES = 64 * 1024 * 1024


def text_form_size(input_size: int, public_key: RSAPublicKey) -> int:
    """Bytes of the text form (``cape:`` + base64 + newline) of an ``input_size``-byte input."""
    raw = public_key.key_size // 8 + envelope.NONCE_SIZE + input_size + envelope.TAG_SIZE
    return len(envelope.PREFIX) + 4 * -(-raw // 3) + 1


def largest_text_input(limit: int | None, public_key: RSAPublicKey) -> int:
    """The largest input whose text form fits ``limit`` bytes (the server's input limit) and
    stays in memory (:data:`STREAM_THRESHOLD_BYTES`); larger ones take the streaming form."""
    if limit is None:
        return STREAM_THRESHOLD_BYTES
    fixed = text_form_size(0, public_key)
    if limit < fixed:
        return -1
    # text_form_size grows by 4 bytes per 3 input bytes: step back from the estimate.
    guess = min(STREAM_THRESHOLD_BYTES, (limit - fixed) * 3 // 4 + 3)
    while guess >= 0 and text_form_size(guess, public_key) > limit:
        guess -= 1
    return guess


class OutputError(CapeError):
    """The output destination cannot be written."""


@dataclass(frozen=True)
class EncryptResult:
    """What was written: the form used and the ciphertext size in bytes."""

    streaming: bool
    bytes_written: int


def load_encryption_key(path: Path) -> RSAPublicKey:
    """Load the RSA public key (DER or PEM) that ciphertexts will be encrypted for."""
    return load_rsa_public_key_file(path)


class _Prefixed(io.RawIOBase):
    """A reader that yields ``head`` and then the rest of ``tail`` (peeked stdin)."""

    def __init__(self, head: bytes, tail: BinaryIO) -> None:
        self._head = memoryview(head)
        self._tail = tail

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._tail.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def encrypt_stream_to(
    source: BinaryIO,
    destination: BinaryIO,
    public_key: RSAPublicKey,
    *,
    force_stream: bool = False,
    text: bool = True,
    size_hint: int | None = None,
    text_limit: int | None = None,
) -> EncryptResult:
    """Encrypt everything ``source`` yields into ``destination``.

    The form is chosen by the size of what would be written: the single-shot text form while
    it fits ``text_limit`` bytes (pass the server's input limit, so that ``cape run`` can send
    the file; the text form is a third larger than the input) and
    :data:`STREAM_THRESHOLD_BYTES`, else the streaming form. Reads at most that many bytes + 1
    before deciding, so memory stays bounded for inputs of any size. The single-shot form is
    written as text (``cape:`` + base64 and a newline) when ``text`` is true, else as binary
    (``cape:`` + raw envelope).
    """
    threshold = largest_text_input(text_limit, public_key) if text else STREAM_THRESHOLD_BYTES
    if force_stream or (size_hint is not None and size_hint > threshold):
        written = stream.encrypt_stream(source, destination, public_key)
        return EncryptResult(streaming=True, bytes_written=written)
    head = source.read(max(threshold, 0) + 1)
    if len(head) > threshold:
        reader = io.BufferedReader(_Prefixed(head, source), buffer_size=1024 * 1024)
        written = stream.encrypt_stream(reader, destination, public_key)
        return EncryptResult(streaming=True, bytes_written=written)
    if text:
        out = envelope.encrypt_text_bytes(head, public_key) + b"\n"
    else:
        out = envelope.encrypt(head, public_key)
    destination.write(out)
    return EncryptResult(streaming=False, bytes_written=len(out))


@contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """Write to a temporary file beside ``path``, fsync, and rename over it on success.

    A crash or an error leaves either the previous file or the complete new one, never a
    partial ciphertext.
    """
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise OutputError(f"cannot write to {directory}: {exc.strerror}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
