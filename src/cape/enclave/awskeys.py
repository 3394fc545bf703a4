"""Nitro mode's key path: the enclave runs the AWS key service itself, over its own KMS client.

With ``cape serve --enclave nitro --kms aws`` the host relays no key-service calls: the
runtime calls AWS KMS directly (:mod:`cape.enclave.awskms`, TLS terminated in the enclave,
through the parent's ``vsock-proxy``) with :class:`~cape.kms.aws.AwsKeyService`'s logic (one
RSA-4096 key per owner behind ``alias/cape/<owner>``, the key policy checked before a key is
used, data keys released only as ``CiphertextForRecipient`` to this process's attested key).

The host sends the configuration in the ``configure`` frame: region, account, the two role
ARNs, the key policy (PCR pins), the vsock-proxy port and temporary credentials from the
instance role (renewed later with ``credentials`` frames). Everything but the port and the
credentials is measured into PCR16 (:func:`~cape.crypto.keyanswers.aws_kms_measurement`), so a
host that points the enclave at another account or a laxer policy changes every document's
PCR16. The credentials only authenticate: what KMS releases is sealed to the enclave.

**Needs real AWS and Nitro hardware (not exercised here):** the vsock connection to
``vsock-proxy``, TLS to the real KMS endpoint, and KMS's ``Recipient`` check. The runtime's
``--kms-connect tcp:HOST:PORT|unix:PATH`` and ``--kms-insecure-http`` flags exist so tests
can aim it at moto's KMS server; they are part of the image's command line (measured), never
something the host can set at run time.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from cape.crypto.cms import open_for_recipient
from cape.crypto.envelope import DEK_SIZE
from cape.crypto.keyanswers import aws_kms_measurement
from cape.enclave.awskms import (
    AwsCredentials,
    Connect,
    KmsClient,
    tls_context,
    vsock_connector,
)
from cape.enclave.keyclient import EnclaveKeyClient, Send
from cape.enclave.lanes import Lanes
from cape.enclave.secure_module.base import SecureModule
from cape.errors import CapeError, FormatError
from cape.kms.aws import AwsKeyService
from cape.kms.base import KeyPolicy, Recipient

__all__ = ["AwsEnclaveKeyClient", "AwsKmsConfig", "key_client", "kms_connector"]

_FIELDS = ("region", "account_id", "admin_role_arn", "enclave_role_arn", "policy")


@dataclass(frozen=True)
class AwsKmsConfig:
    """The ``aws_kms`` map of a ``configure`` frame (see the module docstring)."""

    region: str
    account_id: str
    admin_role_arn: str
    enclave_role_arn: str
    policy: KeyPolicy
    proxy_port: int = 8000

    @classmethod
    def from_frame(cls, value: object) -> AwsKmsConfig:
        if not isinstance(value, dict):
            raise FormatError("'aws_kms' must be a map")
        texts = {name: value.get(name) for name in _FIELDS}
        if not all(isinstance(text, str) and text for text in texts.values()):
            raise FormatError(f"'aws_kms' needs the strings {', '.join(_FIELDS)}")
        port = value.get("proxy_port", 8000)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 1 << 32:
            raise FormatError("'aws_kms' proxy_port must be a vsock port number")
        return cls(
            region=str(texts["region"]),
            account_id=str(texts["account_id"]),
            admin_role_arn=str(texts["admin_role_arn"]),
            enclave_role_arn=str(texts["enclave_role_arn"]),
            policy=KeyPolicy.from_json(str(texts["policy"])),
            proxy_port=port,
        )

    def to_frame(self) -> dict[str, Any]:
        return {
            "region": self.region,
            "account_id": self.account_id,
            "admin_role_arn": self.admin_role_arn,
            "enclave_role_arn": self.enclave_role_arn,
            "policy": self.policy.to_json(),
            "proxy_port": self.proxy_port,
        }

    def canonical(self) -> bytes:
        """What is measured: every field but the proxy port, as canonical JSON."""
        measured = {k: v for k, v in self.to_frame().items() if k != "proxy_port"}
        return json.dumps(measured, sort_keys=True, separators=(",", ":")).encode()


def kms_connector(spec: str) -> Connect:
    """``tcp:HOST:PORT`` or ``unix:PATH`` as a :data:`Connect` (tests: moto's KMS server on
    loopback, or a Unix-socket relay to it standing in for vsock-proxy)."""
    kind, _, rest = spec.partition(":")
    if kind == "unix" and rest:

        def unix() -> socket.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(rest)
            except OSError:
                sock.close()
                raise
            return sock

        return unix
    host, _, port = rest.rpartition(":")
    if kind != "tcp" or not host or not port.isdigit():
        raise FormatError(f"--kms-connect {spec!r}: use tcp:HOST:PORT or unix:PATH")
    return lambda: socket.create_connection((host, int(port)), timeout=30)


class AwsEnclaveKeyClient(EnclaveKeyClient):
    """:class:`EnclaveKeyClient`'s interface over AWS KMS called from inside the enclave."""

    def __init__(
        self,
        module: SecureModule,
        send: Send,
        config: AwsKmsConfig,
        credentials: AwsCredentials,
        *,
        connect: Connect | None = None,
        tls: ssl.SSLContext | None = None,
        insecure_http: bool = False,
        lanes: Lanes | None = None,
    ) -> None:
        """``tls`` defaults to the image's CA bundle (the system store inside the EIF);
        ``insecure_http`` (tests only, a measured command-line flag) sends plain HTTP."""
        self._setup(module, send, aws_kms_measurement(config.canonical()), lanes)
        self._credentials = credentials
        client = KmsClient(
            config.region,
            lambda: self._credentials,
            connect or vsock_connector(config.proxy_port),
            tls=None if insecure_http else (tls or tls_context(None)),
        )
        self._service = AwsKeyService(
            account_id=config.account_id,
            admin_role_arn=config.admin_role_arn,
            enclave_role_arn=config.enclave_role_arn,
            default_policy=config.policy,
            client=client,
        )

    def update_credentials(self, credentials: AwsCredentials) -> None:
        """New temporary credentials from the parent (they expire after a few hours)."""
        self._credentials = credentials

    def _public_key(self, owner: str) -> bytes:
        self._service.get_or_create_key(owner)
        return self._service.get_public_key(owner)

    async def public_key(self, owner: str) -> bytes:
        return await asyncio.to_thread(self._public_key, owner)

    async def unwrap(self, owner: str, wrapped_key: bytes) -> bytes:
        document, _ = await asyncio.to_thread(self._recipient_document, True)
        try:
            cms = await asyncio.to_thread(
                self._service.decrypt,
                owner,
                wrapped_key,
                recipient=Recipient(attestation_document=document),
            )
        except ValueError as exc:
            raise CapeError(f"AWS KMS Decrypt: {exc}") from None
        return await asyncio.to_thread(
            open_for_recipient, cms, self._recipient_key, expected_length=DEK_SIZE
        )


def key_client(
    module: SecureModule,
    send: Send,
    *,
    identity: bytes | None,
    configure: dict[str, Any] | None,
    kms_connect: str | None = None,
    kms_insecure_http: bool = False,
    lanes: Lanes | None = None,
) -> EnclaveKeyClient:
    """The runtime's key client: the built-in key service through the host (``identity`` from
    the command line or the ``configure`` frame), or AWS KMS directly (``aws_kms``)."""
    if identity is None and configure is not None and "aws_kms" in configure:
        credentials = AwsCredentials.from_json(configure.get("credentials"))
        return AwsEnclaveKeyClient(
            module,
            send,
            AwsKmsConfig.from_frame(configure["aws_kms"]),
            credentials,
            connect=kms_connector(kms_connect) if kms_connect else None,
            insecure_http=kms_insecure_http,
            lanes=lanes,
        )
    if identity is None and configure is not None:
        identity = configure.get("kms_identity")
    if not isinstance(identity, bytes):
        raise FormatError("the 'configure' frame lacks bytes 'kms_identity' or a map 'aws_kms'")
    return EnclaveKeyClient(module, send, lanes, identity=identity)
