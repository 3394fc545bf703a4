"""The secure module seam: what the enclave runtime asks of a Nitro Secure Module.

:class:`SecureModule` has one abstract method, :meth:`~SecureModule.process`, which takes
and returns the exact CBOR messages the ``/dev/nsm`` device exchanges
(:mod:`cape.formats.nsm`). The typed methods (:meth:`~SecureModule.attestation`,
:meth:`~SecureModule.describe_pcr`, ...) are written once here on top of it, so the Nitro
module and the simulated one share the whole codec path and differ only in who answers.

Failures:

- an ``Error`` response raises :class:`~cape.errors.NSMError` carrying the NSM's code;
- a response that does not parse, or a valid response of the wrong variant, raises
  :class:`~cape.errors.SecureModuleError`.
"""

from __future__ import annotations

import abc
from typing import ClassVar, TypeVar

from cape._internal.closeable import Closeable
from cape.errors import FormatError, NSMError, SecureModuleError
from cape.formats.nsm import (
    AttestationRequest,
    AttestationResponse,
    DescribeNSMRequest,
    DescribeNSMResponse,
    DescribePCRRequest,
    DescribePCRResponse,
    ErrorResponse,
    ExtendPCRRequest,
    ExtendPCRResponse,
    GetRandomRequest,
    GetRandomResponse,
    LockPCRRequest,
    LockPCRResponse,
    LockPCRsRequest,
    LockPCRsResponse,
    Request,
    Response,
    encode_request,
    parse_response,
)

__all__ = ["SecureModule"]

_R = TypeVar("_R", bound=Response)


class SecureModule(Closeable, abc.ABC):
    """A Nitro Secure Module, real or simulated.

    Subclasses implement :meth:`process`; everything else is shared. Instances are usable as
    context managers; :meth:`close` releases whatever the module holds (a device handle).
    """

    waits: ClassVar[bool] = True
    """Whether a request waits on something outside this process (the NSM device): the
    enclave runtime then makes it on a thread. A module that only computes in this process
    (the simulated one) is called on the event loop instead (issue 16: a thread hand-off per
    session costs more than it could overlap)."""

    @abc.abstractmethod
    def process(self, request: bytes) -> bytes:
        """Serve one raw NSM request (CBOR) and return the raw response (CBOR).

        Raises :class:`~cape.errors.SecureModuleError` only when the module cannot answer at
        all; refusals the NSM itself would express come back as an encoded ``Error`` response.
        """

    def close(self) -> None:
        """Release the module's resources; the default holds none."""

    # --- one request/response round trip ----------------------------------------------------

    def request(self, request: Request) -> Response:
        """Send a typed request and return the typed response.

        An ``Error`` response raises :class:`~cape.errors.NSMError`; a malformed response
        raises :class:`~cape.errors.SecureModuleError`.
        """
        raw = self.process(encode_request(request))
        try:
            response = parse_response(raw)
        except FormatError as exc:
            raise SecureModuleError(
                f"secure module sent a malformed response to {_name(request)}: {exc.diagnostics()}"
            ) from None
        if isinstance(response, ErrorResponse):
            raise NSMError(response.code)
        return response

    def _expect(self, request: Request, kind: type[_R]) -> _R:
        response = self.request(request)
        if not isinstance(response, kind):
            raise SecureModuleError(
                f"secure module answered {_name(request)} with {_name(response)}"
            )
        return response

    # --- the NSM operations -----------------------------------------------------------------

    def attestation(
        self,
        *,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes:
        """A signed attestation document (COSE_Sign1 bytes) carrying the given fields.

        Each field may hold up to 1024 bytes; a longer one raises
        ``NSMError("InputTooLarge")``.
        """
        request = AttestationRequest(user_data=user_data, nonce=nonce, public_key=public_key)
        return self._expect(request, AttestationResponse).document

    def describe_pcr(self, index: int) -> DescribePCRResponse:
        """The value of PCR ``index`` and whether it is locked."""
        return self._expect(DescribePCRRequest(index), DescribePCRResponse)

    def extend_pcr(self, index: int, data: bytes) -> bytes:
        """Extend PCR ``index`` with ``data``; returns the PCR's new value."""
        return self._expect(ExtendPCRRequest(index, data), ExtendPCRResponse).data

    def lock_pcr(self, index: int) -> None:
        """Make PCR ``index`` read-only for the rest of the enclave's life."""
        self._expect(LockPCRRequest(index), LockPCRResponse)

    def lock_pcrs(self, count: int) -> None:
        """Make PCRs ``[0, count)`` read-only."""
        self._expect(LockPCRsRequest(count), LockPCRsResponse)

    def describe_nsm(self) -> DescribeNSMResponse:
        """The module's version, id, PCR count, locked PCRs and digest."""
        return self._expect(DescribeNSMRequest(), DescribeNSMResponse)

    def get_random(self) -> bytes:
        """Entropy from the module."""
        return self._expect(GetRandomRequest(), GetRandomResponse).random


def _name(message: Request | Response) -> str:
    return type(message).__name__.removesuffix("Request").removesuffix("Response")
