"""Build-time tooling for the enclave image (EIF): nothing here runs inside an enclave.

- :mod:`cape.image.tree` — a root filesystem (directory or OCI/``docker save`` archive) as
  deterministic cpio members.
- :mod:`cape.image.build` — :func:`~cape.image.build.build_image`, the reproducible, optionally
  signed EIF builder behind ``cape enclave build``.
- :mod:`cape.image.kms` — signing with an AWS KMS key (``--sign-kms-key``).

The file format itself is :mod:`cape.formats.eif`; reading an image back with every check is
:func:`cape.verify.eif.describe_eif`.
"""
