"""The enclave's own AWS KMS client: TLS terminated in the enclave, SigV4, over a socket seam.

Inside a Nitro Enclave there is no network, only vsock. The parent runs AWS's ``vsock-proxy``
for exactly one destination, ``kms.<region>.amazonaws.com:443``; the enclave connects to it
over vsock and **speaks TLS to KMS itself**, checking KMS's certificate against the CA bundle
inside the image (so the trust anchors are measured in PCR0/PCR2). The parent relays TLS
records it cannot read or alter. Requests are signed (SigV4) with temporary credentials the
parent fetches from its instance role and passes in: they authenticate to AWS but cannot
decrypt anything, because key answers come as ``CiphertextForRecipient`` to the enclave's
attested RSA key.

Nothing here is hand-rolled: requests are serialized and answers parsed by botocore's own
serializer and parser for the KMS service model that botocore ships, and signed by
botocore's :class:`~botocore.auth.SigV4Auth`. Only the HTTP hop is Cape's, so that it can run
over any socket: :class:`KmsClient` takes a ``connect`` callable returning a connected
stream socket (vsock to the proxy in production, TCP to a local test server in tests) and an
optional :class:`ssl.SSLContext` (``None`` only for tests against a plain-HTTP server).

:class:`KmsClient` also behaves like the boto3 KMS client where
:class:`~cape.kms.aws.AwsKeyService` uses one (``client.decrypt(KeyId=…, …)`` raising
:class:`botocore.exceptions.ClientError`), so that service can run on it.

**Needs a real AWS account (not exercised on the development machine):** the TLS session
with the real ``kms.<region>.amazonaws.com`` through ``vsock-proxy``, KMS's acceptance of our
signatures with instance-role session tokens, and real ``Recipient`` answers. Tests use moto's
KMS server over HTTP on loopback (API shapes, SigV4 verification, errors, retries) and
synthetic ``CiphertextForRecipient`` answers (``tests/vectors/kms_recipient.json``, with their
provenance); a TLS test uses a local CA. ``cape doctor`` checks the real path on first boot.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from cape.errors import CapeError, FormatError

__all__ = [
    "AwsCredentials",
    "KmsClient",
    "KmsRequestError",
    "kms_host",
    "tls_context",
    "vsock_connector",
]

Connect = Callable[[], socket.socket]
"""Opens a connected stream socket towards KMS (through vsock-proxy on Nitro)."""

RETRYABLE_CODES: Final = frozenset(
    {
        "ThrottlingException",
        "KMSInternalException",
        "DependencyTimeoutException",
        "ServiceUnavailableException",
        "InternalFailure",
        "RequestTimeoutException",
    }
)
DEFAULT_ATTEMPTS: Final = 4
TIMEOUT_S: Final = 30.0
MAX_RESPONSE_BYTES: Final = 1 << 20


def kms_host(region: str) -> str:
    """``kms.<region>.amazonaws.com`` (the host name checked in KMS's certificate)."""
    if not region or not all(c.isalnum() or c == "-" for c in region):
        raise FormatError(f"invalid AWS region {region!r}")
    return f"kms.{region}.amazonaws.com"


@dataclass(frozen=True)
class AwsCredentials:
    """Temporary credentials of the parent's instance role (as IMDS hands them out)."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_json(cls, value: object) -> AwsCredentials:
        """Parse IMDS's ``security-credentials/<role>`` JSON (``AccessKeyId``, ``SecretAccessKey``,
        ``Token``)."""
        if not isinstance(value, Mapping):
            raise FormatError("AWS credentials must be a JSON object")
        key, secret = value.get("AccessKeyId"), value.get("SecretAccessKey")
        token = value.get("Token")
        if not isinstance(key, str) or not isinstance(secret, str) or not key or not secret:
            raise FormatError("AWS credentials lack AccessKeyId or SecretAccessKey")
        if token is not None and not isinstance(token, str):
            raise FormatError("AWS credentials' Token must be a string")
        return cls(key, secret, token)


class KmsRequestError(CapeError):
    """KMS could not be reached, or answered something that is not KMS's protocol."""


class _Connection(http.client.HTTPConnection):
    """One HTTP(S) connection over a socket from ``connect`` (TLS wrapped here, if any)."""

    def __init__(self, host: str, connect: Connect, tls: ssl.SSLContext | None) -> None:
        super().__init__(host, timeout=TIMEOUT_S)
        self._open = connect
        self._tls = tls

    def connect(self) -> None:
        sock = self._open()
        sock.settimeout(TIMEOUT_S)
        if self._tls is not None:
            sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        self.sock = sock


class KmsClient:
    """AWS KMS's JSON API, called from inside the enclave (see the module docstring).

    ``credentials`` is called for every request, so the parent can rotate them.
    """

    def __init__(
        self,
        region: str,
        credentials: Callable[[], AwsCredentials],
        connect: Connect,
        *,
        tls: ssl.SSLContext | None,
        host: str | None = None,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff_s: float = 0.2,
    ) -> None:
        import botocore.session  # only AWS mode needs botocore
        from botocore.exceptions import ClientError
        from botocore.parsers import create_parser
        from botocore.serialize import create_serializer

        self.region = region
        self.host = host or kms_host(region)
        self._credentials = credentials
        self._connect = connect
        self._tls = tls
        self._attempts = max(1, attempts)
        self._backoff = backoff_s
        self._model = botocore.session.get_session().get_service_model("kms")
        protocol = self._model.metadata["protocol"]
        self._serializer = create_serializer(protocol, include_validation=True)
        self._parser = create_parser(protocol)
        self.client_error: type[Exception] = ClientError

    # --- the boto3-client surface AwsKeyService uses ---------------------------------------

    def __getattr__(self, name: str) -> Callable[..., dict[str, Any]]:
        operation = "".join(part.capitalize() for part in name.split("_"))
        if name.startswith("_") or operation not in self._model.operation_names:
            raise AttributeError(name)
        return lambda **params: self.call(operation, **params)

    # --- calls -----------------------------------------------------------------------------

    def call(self, operation: str, **params: Any) -> dict[str, Any]:
        """Serialize, sign, send (retrying throttling, 5xx and broken connections), parse.

        Raises:
            botocore.exceptions.ClientError: KMS answered an error (``response["Error"]``).
            botocore.exceptions.ParamValidationError: ``params`` do not fit the API model.
            KmsRequestError: KMS could not be reached after every attempt, or did not answer
                in its protocol.
        """
        model = self._model.operation_model(operation)
        request = self._serializer.serialize_to_request(params, model)
        for attempt in range(1, self._attempts + 1):
            try:
                status, headers, body = self._send(request)
            except (OSError, http.client.HTTPException) as exc:
                if attempt == self._attempts:
                    raise KmsRequestError(
                        f"AWS KMS {operation}: cannot reach {self.host} ({exc})"
                    ) from None
            else:
                parsed = self._parse(model, status, headers, body)
                if status < 300:
                    parsed.pop("ResponseMetadata", None)
                    return parsed
                code = str(parsed.get("Error", {}).get("Code", ""))
                if attempt == self._attempts or not (status >= 500 or code in RETRYABLE_CODES):
                    raise self.client_error(parsed, operation)
            time.sleep(self._backoff * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    def _send(self, request: Mapping[str, Any]) -> tuple[int, dict[str, str], bytes]:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        creds = self._credentials()
        scheme = "https" if self._tls is not None else "http"
        aws_request = AWSRequest(
            method=request["method"],
            url=f"{scheme}://{self.host}{request['url_path']}",
            data=request["body"],
            headers=dict(request["headers"]),
        )
        SigV4Auth(
            Credentials(creds.access_key_id, creds.secret_access_key, creds.session_token),
            "kms",
            self.region,
        ).add_auth(aws_request)
        prepared = aws_request.prepare()
        connection = _Connection(self.host, self._connect, self._tls)
        try:
            connection.request(
                prepared.method,
                request["url_path"],
                body=prepared.body,
                headers=dict(prepared.headers.items()),
            )
            response = connection.getresponse()
            body = response.read(MAX_RESPONSE_BYTES + 1)
            if len(body) > MAX_RESPONSE_BYTES:
                raise KmsRequestError("AWS KMS answered more than 1 MiB")
            return response.status, dict(response.getheaders()), body
        finally:
            connection.close()

    def _parse(
        self, model: Any, status: int, headers: dict[str, str], body: bytes
    ) -> dict[str, Any]:
        try:
            parsed: dict[str, Any] = self._parser.parse(
                {"status_code": status, "headers": headers, "body": body}, model.output_shape
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise KmsRequestError(
                f"AWS KMS {model.name} answered HTTP {status} that is not KMS's JSON ({exc})"
            ) from None
        return parsed


def tls_context(cafile: str | None) -> ssl.SSLContext:
    """Certificate-checking TLS for KMS, trusting only ``cafile`` (default: the system store,
    which inside an enclave is the CA bundle in the image)."""
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def vsock_connector(port: int, cid: int = 3) -> Connect:
    """Connects to the parent's ``vsock-proxy`` (CID 3 is the parent). *Needs real hardware*."""

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.connect((cid, port))
        except OSError:
            sock.close()
            raise
        return sock

    return connect
