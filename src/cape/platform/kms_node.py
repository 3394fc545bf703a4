"""A cluster node's platform when the key service is a network service (``key_service_url``).

At start, over the pinned TLS channel of :class:`~cape.kms.client.KeyServiceClient`, the node

1. checks the key service's certificate pin and its node token (one clear error each);
2. learns the key service's answer identity (what its enclaves measure into PCR16) and the
   cluster's attestation root (what clients pin);
3. makes a P-384 key of its own and has the cluster authority certify it as this node's
   intermediate CA (:mod:`cape.enclave.secure_module.cluster`): its enclaves' instance
   credentials are issued under it, so documents from every node chain to the one root;
4. has the release signer sign its runtime's PCR0 (the simulated image signature, PCR8, that
   new keys' policy names).

Then the enclaves' ``kms`` frames are relayed to the service unchanged and its signed answers
relayed back (:meth:`~cape.kms.client.KeyServiceClient.relay`). No key-service secret is on
the node: not the master key, not the root key, not the release signer's key.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cape.crypto.eif_signature import verify_signature_section
from cape.enclave.measure import measure_runtime
from cape.enclave.secure_module.cluster import NodeAuthority, node_request
from cape.errors import CapeError, FormatError
from cape.kms.client import KeyServiceClient, read_node_token
from cape.platform.local import SimulatedPlatform

__all__ = ["NodePlatform", "node_label"]

log = logging.getLogger("cape.serve")


def node_label(node_name: str) -> str:
    """``node_name`` as a short lower-case DNS label (the intermediate's name)."""
    label = re.sub(r"[^a-z0-9-]+", "-", node_name.lower()).strip("-")[:32].strip("-")
    return label or "node"


class NodePlatform(SimulatedPlatform):
    """Simulated enclaves whose key service and attestation root are ``cape kms serve``'s."""

    authority: NodeAuthority

    def __init__(
        self, client: KeyServiceClient, node: str, identity: bytes, root: x509.Certificate
    ) -> None:
        self.client = client
        self.node = node
        self.identity_public = identity
        self.root = root
        self.authority = self._new_authority()
        pcr0 = measure_runtime().pcr0
        signature = client.runtime_signature(pcr0)
        try:
            verify_signature_section(signature, pcr0)
        except CapeError as exc:
            raise FormatError(
                f"the key service at {client.url} sent a runtime signature that does not "
                f"verify: {exc.diagnostics()}"
            ) from None
        self.image_signature = signature

    @classmethod
    def connect(cls, url: str, pin: str, token_file: Path, node_name: str) -> NodePlatform:
        """Steps 1-4 of the module docstring (blocking; bounded by the client's timeouts).

        Raises:
            FormatError: an unreadable or short token file, or malformed answers.
            KeyServiceUnavailableError: the service cannot be reached.
            VerificationError: its certificate does not match ``pin``.
            RequestRefusedError: it refuses the node token.
        """
        token = read_node_token(token_file)
        client = KeyServiceClient.connect(url, pin, token)
        try:
            identity, root_pem = client.node_info()
            try:
                root = x509.load_pem_x509_certificate(root_pem)
            except ValueError:
                raise FormatError(f"the key service at {url} sent a malformed root") from None
            return cls(client, node_label(node_name), identity, root)
        except BaseException:
            client.close()
            raise

    @property
    def root_pem(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.PEM)

    def _new_authority(self) -> NodeAuthority:
        key, request = node_request(self.node)
        certificate_pem = self.client.intermediate(request.public_bytes(serialization.Encoding.PEM))
        try:
            certificate = x509.load_pem_x509_certificate(certificate_pem)
            return NodeAuthority(key, certificate, self.root)
        except ValueError as exc:
            raise FormatError(
                f"the key service at {self.client.url} sent an unusable intermediate: {exc}"
            ) from None

    def _provision(self) -> Mapping[str, Any]:
        if self.authority.needs_renewal(dt.datetime.now(dt.UTC)):
            try:
                self.authority = self._new_authority()
            except CapeError as exc:  # keep the current one while it lasts
                log.warning("could not renew the attestation intermediate: %s", exc.diagnostics())
        return super()._provision()

    def _kms(self, message: dict[str, Any]) -> dict[str, Any]:
        return self.client.relay(message)

    def check_ready(self) -> None:
        self.client.check_ready()

    def close(self) -> None:
        self.client.close()
