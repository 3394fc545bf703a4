"""One attestation root per cluster: node intermediates under it, instance CAs under those."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cape.enclave.secure_module.cluster import (
    INTERMEDIATE_LIFETIME,
    NodeAuthority,
    node_request,
)
from cape.enclave.secure_module.simulated import SimulatedAuthority, SimulatedSecureModule
from cape.errors import ChainError, SecureModuleError
from cape.verify.policy import AttestationPolicy
from cape.verify.verifier import verify_attestation

NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def root() -> SimulatedAuthority:
    return SimulatedAuthority.generate(now=NOW - dt.timedelta(days=1))


def _node(root: SimulatedAuthority, name: str = "node-a", at: dt.datetime = NOW) -> NodeAuthority:
    key, request = node_request(name)
    certificate = root.issue_intermediate(request, at, lifetime=INTERMEDIATE_LIFETIME)
    return NodeAuthority(key, certificate, root.root_certificate)


def _document(node: NodeAuthority, at: dt.datetime) -> bytes:
    module = SimulatedSecureModule(node.issue_instance(at), clock=lambda: at)
    return module.attestation(nonce=b"n" * 16)


def test_documents_from_two_nodes_verify_against_the_one_root(root: SimulatedAuthority) -> None:
    for name in ("node-a", "node-b"):
        node = _node(root, name)
        document = verify_attestation(
            _document(node, NOW),
            root=root.root_certificate,
            now=NOW,
            policy=AttestationPolicy(nonce=b"n" * 16),
        )
        chain = [x509.load_der_x509_certificate(der) for der in document.cabundle]
        assert chain[0] == root.root_certificate and chain[1] == node.certificate
        assert len(chain) == 3
        assert f"{name}.node." in chain[1].subject.rfc4514_string()
        constraints = chain[1].extensions.get_extension_for_class(x509.BasicConstraints).value
        assert constraints.ca and constraints.path_length == 1


def test_a_document_does_not_verify_against_another_clusters_root(
    root: SimulatedAuthority,
) -> None:
    other = SimulatedAuthority.generate(now=NOW - dt.timedelta(days=1))
    with pytest.raises(ChainError):
        verify_attestation(_document(_node(root), NOW), root=other.root_certificate, now=NOW)


def test_instance_cas_never_outlive_the_intermediate(root: SimulatedAuthority) -> None:
    node = _node(root)
    late = node.not_after - dt.timedelta(hours=1)
    credentials = node.issue_instance(late)
    assert credentials.instance_certificate.not_valid_after_utc == node.not_after
    assert node.needs_renewal(late) and not node.needs_renewal(NOW)
    with pytest.raises(SecureModuleError, match="restart the node"):
        node.issue_instance(node.not_after + dt.timedelta(seconds=1))


def test_the_authority_refuses_bad_requests(root: SimulatedAuthority) -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-a")]))
        .sign(p256, hashes.SHA256())
    )
    with pytest.raises(ValueError, match="P-384"):
        root.issue_intermediate(request, NOW, lifetime=INTERMEDIATE_LIFETIME)
    p384 = ec.generate_private_key(ec.SECP384R1())
    named = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Not.A.Label")]))
        .sign(p384, hashes.SHA384())
    )
    with pytest.raises(ValueError, match="node name"):
        root.issue_intermediate(named, NOW, lifetime=INTERMEDIATE_LIFETIME)
    with pytest.raises(ValueError, match="node name"):
        node_request("Node_A")


def test_a_node_refuses_an_intermediate_for_another_key_or_root(root: SimulatedAuthority) -> None:
    key, request = node_request("node-a")
    certificate = root.issue_intermediate(request, NOW, lifetime=INTERMEDIATE_LIFETIME)
    other_key, _ = node_request("node-a")
    with pytest.raises(ValueError, match="not for this node's key"):
        NodeAuthority(other_key, certificate, root.root_certificate)
    other = SimulatedAuthority.generate(now=NOW - dt.timedelta(days=1))
    with pytest.raises(ValueError, match="not issued by the cluster root"):
        NodeAuthority(key, certificate, other.root_certificate)
