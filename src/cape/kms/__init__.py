"""The key service: Cape keys that release data keys only to attested enclaves.

- :mod:`cape.kms.base` — the :class:`~cape.kms.base.KeyService` seam, :class:`KeyPolicy`,
  :class:`Recipient`, and :func:`~cape.kms.base.check_recipient`, the release check.
- :mod:`cape.kms.local` — :class:`~cape.kms.local.LocalKeyService`, SQLite-backed, for
  ``cape serve``.
- :mod:`cape.kms.aws` — :class:`~cape.kms.aws.AwsKeyService`, AWS KMS with a Nitro
  ``Recipient`` (needs the ``aws`` extra).

Usage (the enclave side opens the answer with :func:`cape.crypto.cms.open_for_recipient`)::

    service = LocalKeyService.open(data_dir, trusted_root=root, default_policy=policy)
    public_der = service.get_public_key(service.get_or_create_key("alice").owner)
    cms = service.decrypt("alice", wrapped_dek, recipient=Recipient(attestation_document))
"""

from __future__ import annotations

from cape.kms.base import (
    DataKey,
    KeyMetadata,
    KeyPolicy,
    KeyService,
    KeyStoreError,
    Recipient,
    check_recipient,
)

__all__ = [
    "DataKey",
    "KeyMetadata",
    "KeyPolicy",
    "KeyService",
    "KeyStoreError",
    "Recipient",
    "check_recipient",
]
