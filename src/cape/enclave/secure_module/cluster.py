"""One attestation root for a cluster of simulated nodes: each node's own intermediate CA.

In simulated mode the attestation root plays AWS's: one root per cluster, kept by the
cluster authority beside the network key service (``cape kms serve``), so clients pin one root
whichever node answers. A node never holds the root key. At start it makes a P-384 key of its
own, sends a certificate request (:func:`node_request`) and receives an intermediate CA
certificate (:meth:`~cape.enclave.secure_module.simulated.SimulatedAuthority.issue_intermediate`,
pathLen 1, :data:`INTERMEDIATE_LIFETIME`); a :class:`NodeAuthority` then issues its enclaves'
instance credentials under it, so a document's ``cabundle`` is::

    [cluster root, node intermediate, instance CA]   (then the per-enclave leaf)

Nitro's own chains have more levels (regional, zonal, instance); verifiers accept any length.
The intermediate is short-lived and renewed at node start (and by the node before it runs
out); instance CAs never outlive it.

**No hardware guarantee**: a node holding an intermediate can certify any document, as the
operator of a simulated single machine can. What the split gives is that no node's disk holds
the root key, and one node's intermediate can be left to expire.
"""

from __future__ import annotations

import datetime as dt
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cape._internal.timefile import as_utc
from cape.enclave.secure_module.simulated import (
    _DOMAIN,
    BACKDATE,
    DEFAULT_REGION,
    INSTANCE_LIFETIME,
    InstanceCredentials,
    _check_label,
    _instance_id,
    _issue_ca,
    _name,
    _new_key,
)
from cape.errors import SecureModuleError

__all__ = ["INTERMEDIATE_LIFETIME", "NodeAuthority", "node_request"]

INTERMEDIATE_LIFETIME: Final = dt.timedelta(days=3)
"""How long a node's intermediate is valid; a node asks for a new one at every start and when
less than :data:`RENEW_BEFORE` is left."""
RENEW_BEFORE: Final = dt.timedelta(days=1)


def node_request(node: str) -> tuple[ec.EllipticCurvePrivateKey, x509.CertificateSigningRequest]:
    """A fresh P-384 key and its certificate request for the node named ``node`` (a short
    lower-case DNS label): what the node sends to the cluster authority."""
    _check_label(node, "node name")
    key = _new_key()
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
        .sign(key, hashes.SHA384())
    )
    return key, request


class NodeAuthority:
    """A node's intermediate CA: issues instance credentials for its simulated modules."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        certificate: x509.Certificate,
        root: x509.Certificate,
    ) -> None:
        if certificate.public_key() != key.public_key():
            raise ValueError("the intermediate certificate is not for this node's key")
        if certificate.issuer != root.subject:
            raise ValueError("the intermediate certificate is not issued by the cluster root")
        try:
            certificate.verify_directly_issued_by(root)
        except (InvalidSignature, ValueError, TypeError):
            raise ValueError(
                "the intermediate certificate is not issued by the cluster root"
            ) from None
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not constraints.ca:
            raise ValueError("the intermediate certificate is not a CA")
        self._key = key
        self.certificate = certificate
        self._root = root

    @property
    def root_certificate(self) -> x509.Certificate:
        """The cluster root clients pin."""
        return self._root

    @property
    def root_pem(self) -> bytes:
        return self._root.public_bytes(serialization.Encoding.PEM)

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc

    def needs_renewal(self, now: dt.datetime) -> bool:
        return as_utc(now, "times") >= self.not_after - RENEW_BEFORE

    def issue_instance(
        self,
        now: dt.datetime,
        *,
        region: str = DEFAULT_REGION,
        instance_id: str | None = None,
    ) -> InstanceCredentials:
        """Certify a new simulated module: an instance CA under the node's intermediate,
        valid for a day from ``now`` but never beyond the intermediate."""
        start = as_utc(now, "times")
        intermediate = self.certificate
        if not intermediate.not_valid_before_utc <= start < intermediate.not_valid_after_utc:
            raise SecureModuleError(
                f"this node's attestation intermediate is not valid at {start.isoformat()}; "
                "restart the node to get a new one from the key service"
            )
        instance_id = _instance_id(region, instance_id)
        instance_key = _new_key()
        instance = _issue_ca(
            subject=_name(f"{instance_id}.{region}.{_DOMAIN}"),
            key=instance_key,
            issuer=intermediate,
            issuer_key=self._key,
            path_length=0,
            not_before=start - BACKDATE,
            not_after=min(start + INSTANCE_LIFETIME, intermediate.not_valid_after_utc),
            crl_sign=False,
        )
        der = serialization.Encoding.DER
        return InstanceCredentials(
            instance_id=instance_id,
            region=region,
            instance_key=instance_key,
            cabundle=tuple(c.public_bytes(der) for c in (self._root, intermediate, instance)),
        )
