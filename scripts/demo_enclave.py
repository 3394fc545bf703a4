"""Demo helper: the parts of the main job that play the enclave's side.

- ``keygen DIR``: a fresh RSA-4096 Cape key. In the product it is created inside the key
  service and its private half never leaves it; the demo keeps it so step ``decrypt`` can show
  what the enclave-side library does with it.
- ``decrypt DIR FILE``: open a ``cape:`` or ``cape-stream-v1:`` ciphertext (enclave side).
- ``attest DIR``: a live document from the simulated secure module (measured PCRs, a fresh
  P-384 chain shaped like AWS's), written with its root and the nonce it binds.
"""

from __future__ import annotations

import hashlib
import secrets
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from cape.crypto import stream
from cape.crypto.keys import generate_cape_key, load_rsa_private_key, public_key_der


def keygen(directory: Path) -> None:
    key = generate_cape_key()
    (directory / "capekey.pub.der").write_bytes(public_key_der(key))
    private = directory / "enclave-only.key.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    print(f"  wrote {directory / 'capekey.pub.der'} (RSA-4096 public key, DER)")


def decrypt(directory: Path, ciphertext: Path) -> None:
    key = load_rsa_private_key((directory / "enclave-only.key.pem").read_bytes())
    plaintext = stream.decrypt_any(ciphertext.read_bytes(), key)
    digest = hashlib.sha256(plaintext).hexdigest()[:16]
    print(f"  {ciphertext.name}: {len(plaintext)} bytes, sha256 {digest}…")


def attest(directory: Path) -> None:
    import datetime as dt

    from cape.enclave.secure_module.simulated import SimulatedAuthority, SimulatedSecureModule

    authority = SimulatedAuthority.generate()
    module = SimulatedSecureModule(authority.issue_instance(dt.datetime.now(dt.UTC)))
    nonce = secrets.token_bytes(16)
    document = module.attestation(
        nonce=nonce, public_key=secrets.token_bytes(32), user_data=b'{"demo": true}'
    )
    (directory / "simulated-root.pem").write_bytes(authority.root_pem)
    (directory / "simulated-attestation.cbor").write_bytes(document)
    (directory / "nonce.hex").write_text(nonce.hex())
    print(f"  module {module.module_id}: {len(document)}-byte document, nonce {nonce.hex()}")


if __name__ == "__main__":
    command, folder, *rest = sys.argv[1:]
    target = Path(folder)
    if command == "keygen":
        keygen(target)
    elif command == "decrypt":
        decrypt(target, Path(rest[0]))
    elif command == "attest":
        attest(target)
    else:
        raise SystemExit(f"unknown command {command}")
