"""`from cape import Cape` against a live `cape serve`: sync and async, every call."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

import cape
from cape.errors import (
    CapeError,
    ChecksumMismatchError,
    FunctionError,
    PCRMismatchError,
    RequestRefusedError,
    VerificationError,
)
from cape.sdk.client import AsyncCape, Cape, FunctionRef, UntrustedRootError
from cape.verify.roots import fingerprint
from tests.e2e.server import ServeProcess, User, use_wheelhouse

ECHO = "def cape_handler(x):\n    return b'echo:' + x\n"
COUNTER = (
    "calls = []\ndef cape_handler(x):\n    calls.append(x)\n    return str(len(calls)).encode()\n"
)
RAISES = "def cape_handler(x):\n    raise ValueError('no thanks')\n"


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "config"
    monkeypatch.setenv("CAPE_CONFIG_DIR", str(directory))
    for name in ("CAPE_ENCLAVE_HOST", "CAPE_URL", "CAPE_CA_FILE", "CAPE_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("CAPE_ATTESTATION_ROOT", raising=False)
    return directory


def _client(server: ServeProcess, **kwargs: object) -> Cape:
    return Cape(
        server.url,
        ca_file=server.ca_file,
        attestation_root=server.data_dir / "attestation" / "root.pem",
        **kwargs,  # type: ignore[arg-type]
    )


def _folder(tmp_path: Path, name: str, source: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "app.py").write_text(source)
    return folder


def test_sync_client_whole_product(server: ServeProcess, config_dir: Path, tmp_path: Path) -> None:
    client = _client(server)
    username = f"sdk{os.urandom(4).hex()}"
    client.signup(username, "correct horse battery")
    auth = config_dir / "auth"
    assert stat.S_IMODE(auth.stat().st_mode) == 0o600
    assert stat.S_IMODE(config_dir.stat().st_mode) == 0o700

    der = client.key()
    cached = config_dir / "capekey.pub.der"
    assert cached.read_bytes() == der and stat.S_IMODE(cached.stat().st_mode) == 0o600
    assert client.key() == der  # from the cache

    deployed = client.deploy(_folder(tmp_path, "echo", ECHO), name="echo")
    assert len(deployed.id) == 22 and deployed.name == f"{username}/echo"
    copy = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(tmp_path / "echo", copy)
    assert client.build(copy).checksum == deployed.checksum  # deterministic zip

    assert client.run(deployed.id, None, b"hi") == b"echo:hi"
    facts = client.aio.last_attestation
    assert facts is not None and facts.function_checksum == deployed.checksum
    assert facts.root_sha256 == fingerprint(server.root) and len(facts.pcrs[0]) == 96
    by_name = FunctionRef(name=deployed.name, checksum=deployed.checksum)
    assert client.run(by_name, None, b"yo") == b"echo:yo"
    ciphertext = client.encrypt(b"secret")
    assert ciphertext.startswith(b"cape:")
    assert client.run(deployed.function_ref, None, ciphertext) == b"echo:secret"

    wrong = "0" * 64
    with pytest.raises(ChecksumMismatchError):
        client.run(client.function(deployed.id, checksum=wrong), None, b"x")
    with pytest.raises(PCRMismatchError):
        client.run(deployed.id, None, b"x", pcrs={"0": ["00" * 48]})

    counter = client.deploy(_folder(tmp_path, "counter", COUNTER))
    with client:
        client.connect(counter.id)
        assert [client.invoke(b"a"), client.invoke(b"b"), client.invoke(b"c")] == [
            b"1",
            b"2",
            b"3",
        ]
    with pytest.raises(CapeError, match="not connected"):
        client.invoke(b"after close")

    raising = client.deploy(_folder(tmp_path, "raises", RAISES))
    with pytest.raises(FunctionError, match="ValueError: no thanks"):
        client.run(raising.id, None, b"x")

    listed = {f.id: f for f in client.functions()}
    assert {deployed.id, counter.id, raising.id} <= set(listed)
    assert listed[deployed.id].checksum == deployed.checksum

    scoped = client.create_token("ci", function=deployed.id, expiry=dt.timedelta(hours=1))
    assert client.run(deployed.id, scoped.token, b"t") == b"echo:t"
    with pytest.raises(RequestRefusedError, match="403"):
        client.run(counter.id, scoped.token, b"t")
    token_file = tmp_path / "scoped.token"
    token_file.write_text(scoped.token + "\n")
    assert client.run(deployed.id, token_file, b"f") == b"echo:f"
    listed_tokens = {t.id: t for t in client.tokens()}
    assert listed_tokens[scoped.id].function_id == deployed.id
    assert listed_tokens[scoped.id].expires_at is not None
    client.delete_token(scoped.id)
    with pytest.raises(RequestRefusedError, match="401"):
        client.run(deployed.id, scoped.token, b"t")

    assert client.test(tmp_path / "echo", b"local") == b"echo:local"

    client.delete_function(raising.id)
    assert raising.id not in {f.id for f in client.functions()}
    with pytest.raises(RequestRefusedError, match="404"):
        client.run(raising.id, None, b"x")


def test_function_json_in_pycapes_shape(
    server: ServeProcess, config_dir: Path, tmp_path: Path
) -> None:
    client = _client(server)
    client.signup(f"ref{os.urandom(4).hex()}", "correct horse battery")
    deployed = client.deploy(_folder(tmp_path, "echo", ECHO))
    function_json = tmp_path / "function.json"
    function_json.write_text(
        json.dumps({"function_id": deployed.id, "function_checksum": deployed.checksum})
    )
    ref = client.function(str(function_json))
    assert ref == FunctionRef(id=deployed.id, checksum=deployed.checksum)
    assert client.run(str(function_json), None, b"j") == b"echo:j"
    assert FunctionRef.from_json(ref.to_json()) == ref


def test_async_use(server: ServeProcess, config_dir: Path, tmp_path: Path) -> None:
    folder = _folder(tmp_path, "counter", COUNTER)

    async def main() -> None:
        aio = AsyncCape(
            server.url,
            ca_file=server.ca_file,
            attestation_root=server.data_dir / "attestation" / "root.pem",
        )
        await aio.signup(f"aio{os.urandom(4).hex()}", "correct horse battery")
        deployed = await aio.deploy(folder)
        async with aio:
            await aio.connect(deployed.id)
            assert await aio.invoke(b"a") == b"1"
            assert await aio.invoke(b"b") == b"2"
        # pycape's style: the sync class awaited from async code.
        sync = _client(server, token=aio.token())
        assert await sync.run(deployed.id, None, b"x") == b"1"
        # Independent clients in one loop run concurrently, each with its own session.
        clients = [
            AsyncCape(
                server.url,
                token=aio.token(),
                ca_file=server.ca_file,
                attestation_root=server.data_dir / "attestation" / "root.pem",
            )
            for _ in range(3)
        ]
        results = await asyncio.gather(*(c.run(deployed.id, None, b"x") for c in clients))
        assert results == [b"1", b"1", b"1"]

    asyncio.run(main())


def test_keys_by_name_are_attested_and_bound_to_the_name(
    server: ServeProcess, config_dir: Path
) -> None:
    alice, bob = User.signup(server, "alice"), User.signup(server, "bob")
    client = _client(server, token=alice.token)
    bob_key = client.key(username=bob.username)
    cached = config_dir / "encryption_keys" / bob.username / "capekey.pub.der"
    assert cached.read_bytes() == bob_key
    own = _client(server, token=bob.token).key(key_path=config_dir / "bob.der")
    assert own == bob_key
    ciphertext = client.encrypt(b"for bob", username=bob.username)
    assert ciphertext.startswith(b"cape:")
    with pytest.raises(CapeError, match="not a valid user name"):
        client.key(username="../etc")
    with pytest.raises(RequestRefusedError, match="404"):
        client.key(username="nobody" + os.urandom(4).hex())


def test_root_pinning(server: ServeProcess, config_dir: Path) -> None:
    unpinned = Cape(server.url, ca_file=server.ca_file)
    with pytest.raises(UntrustedRootError, match="--trust-root"):
        unpinned.key(username="anyone")
    with pytest.raises(VerificationError, match="not pinned"):
        unpinned.trust_root("ab" * 32)
    assert not (config_dir / "roots").exists()
    expected = fingerprint(server.root)
    cert = unpinned.trust_root(expected.upper())
    assert cert.public_bytes(Encoding.DER) == server.root.public_bytes(Encoding.DER)
    pinned = list((config_dir / "roots").iterdir())
    assert len(pinned) == 1 and stat.S_IMODE(pinned[0].stat().st_mode) == 0o600
    assert Cape(server.url, ca_file=server.ca_file).root() == server.root


def test_import_cape_stays_light() -> None:
    assert cape.Cape is Cape
    code = "import cape, sys; print('cape.sdk.client' in sys.modules, 'websockets' in sys.modules)"
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_serdio_function_with_vendored_requirements(
    server: ServeProcess, config_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_wheelhouse(monkeypatch, tmp_path / "cache", "msgpack")
    from cape import serdio
    from cape.cli.functions import SERDIO_APP

    folder = tmp_path / "hypot"
    folder.mkdir()
    (folder / "app.py").write_text(SERDIO_APP)
    (folder / "requirements.txt").write_text("msgpack>=1.0\n")
    shutil.copy(serdio.__file__, folder / "cape_serdio.py")

    client = _client(server)
    client.signup(f"serdio{os.urandom(4).hex()}", "correct horse battery")
    deployed = client.deploy(folder)
    assert any(name.lower().startswith("msgpack") for name in deployed.vendored)
    assert client.run(deployed.id, None, 3, 4, use_serdio=True) == 5.0
    with client:
        client.connect(deployed.function_ref)
        assert client.invoke(6.0, y=8.0, use_serdio=True) == 10.0
    raw = serdio.serialize(5, 12)
    assert serdio.deserialize(client.run(deployed.id, None, raw)) == 13.0
    assert base64.b64encode(raw)
