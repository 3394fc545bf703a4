"""Deploys: blob then row, rollback on failure, orphan sweep, and crash safety under SIGKILL
(DESIGN.md invariant 7: a crash loses no acknowledged deploy and exposes no partial one)."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cape.errors import FormatError, LimitExceededError
from cape.host.errors import NotFoundError
from cape.host.ids import new_id
from cape.host.store.blobs import DirectoryBlobStore
from cape.host.store.deploys import commit_deploy, delete_deploy, sweep_orphans
from cape.host.store.metadata import Function, SqlMetadataStore, User

CHECKSUM = hashlib.sha256(b"plaintext bundle").hexdigest()


@pytest.fixture(params=["sqlite", "postgresql"])
def metadata(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlMetadataStore]:
    """The metadata store on SQLite and on a real PostgreSQL server (tests/services.py)."""
    url = f"sqlite:///{tmp_path / 'meta.db'}"
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres").new_database()
    with SqlMetadataStore(url) as store:
        yield store


@pytest.fixture
def blobs(tmp_path: Path) -> DirectoryBlobStore:
    return DirectoryBlobStore(tmp_path / "blobs")


@pytest.fixture
def owner(metadata: SqlMetadataStore) -> User:
    return metadata.create_user("alice", "hash")


def _temp_files(blobs: DirectoryBlobStore) -> list[Path]:
    return list((blobs.root / ".tmp").iterdir())


def test_commit_deploy_stores_blob_and_row(
    metadata: SqlMetadataStore, blobs: DirectoryBlobStore, owner: User
) -> None:
    data = os.urandom(200_000)
    fn = commit_deploy(
        metadata,
        blobs,
        owner=owner,
        name="app",
        checksum=CHECKSUM,
        public=True,
        ciphertext_chunks=[data[:70_000], data[70_000:]],
    )
    assert fn.size == len(data)
    assert fn.checksum == CHECKSUM
    assert fn.public is True
    assert fn.owner_name == "alice"
    assert blobs.get(fn.blob_key) == data
    assert metadata.get_function(fn.id) == fn
    assert metadata.resolve_function("alice", "app") == fn
    assert fn.blob_key != fn.id


def test_bad_metadata_is_refused_before_anything_is_written(
    metadata: SqlMetadataStore, blobs: DirectoryBlobStore, owner: User
) -> None:
    for name, checksum in (("../app", CHECKSUM), ("app", "not hex")):
        with pytest.raises(FormatError):
            commit_deploy(
                metadata,
                blobs,
                owner=owner,
                name=name,
                checksum=checksum,
                public=False,
                ciphertext_chunks=[b"x"],
            )
    assert list(blobs.keys()) == []
    assert _temp_files(blobs) == []


def test_a_failed_row_insert_deletes_the_blob(
    metadata: SqlMetadataStore, blobs: DirectoryBlobStore
) -> None:
    ghost = User(
        id=new_id(), username="ghost", password_hash="", created_at=dt.datetime.now(dt.UTC)
    )
    with pytest.raises(NotFoundError):
        commit_deploy(
            metadata,
            blobs,
            owner=ghost,
            name="app",
            checksum=CHECKSUM,
            public=False,
            ciphertext_chunks=[b"ciphertext"],
        )
    assert list(blobs.keys()) == []
    assert metadata.all_blob_keys() == set()


def test_a_database_error_deletes_the_blob(
    metadata: SqlMetadataStore,
    blobs: DirectoryBlobStore,
    owner: User,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail(**_: object) -> Function:
        raise OSError("disk full")

    monkeypatch.setattr(metadata, "add_function", fail)
    with pytest.raises(OSError, match="disk full"):
        commit_deploy(
            metadata,
            blobs,
            owner=owner,
            name="app",
            checksum=CHECKSUM,
            public=False,
            ciphertext_chunks=[b"ciphertext"],
        )
    assert list(blobs.keys()) == []


def test_size_limit_stores_nothing(
    metadata: SqlMetadataStore, blobs: DirectoryBlobStore, owner: User
) -> None:
    with pytest.raises(LimitExceededError):
        commit_deploy(
            metadata,
            blobs,
            owner=owner,
            name="app",
            checksum=CHECKSUM,
            public=False,
            ciphertext_chunks=[b"x" * 1000],
            max_bytes=999,
        )
    assert list(blobs.keys()) == []
    assert _temp_files(blobs) == []
    assert metadata.list_functions(owner.id) == []


def test_delete_deploy_removes_row_then_blob(
    metadata: SqlMetadataStore, blobs: DirectoryBlobStore, owner: User
) -> None:
    fn = commit_deploy(
        metadata,
        blobs,
        owner=owner,
        name="app",
        checksum=CHECKSUM,
        public=False,
        ciphertext_chunks=[b"x"],
    )
    assert delete_deploy(metadata, blobs, fn.id) == fn
    assert metadata.get_function(fn.id) is None
    assert not blobs.exists(fn.blob_key)
    assert delete_deploy(metadata, blobs, fn.id) is None


def test_sweep_removes_orphans_and_temp_files_only(
    metadata: SqlMetadataStore, blobs: DirectoryBlobStore, owner: User
) -> None:
    kept = commit_deploy(
        metadata,
        blobs,
        owner=owner,
        name="app",
        checksum=CHECKSUM,
        public=False,
        ciphertext_chunks=[b"kept"],
    )
    orphans = [new_id() for _ in range(3)]
    for key in orphans:
        blobs.put(key, b"never acknowledged")
    (blobs.root / ".tmp" / "half").write_bytes(b"half")
    assert sweep_orphans(metadata, blobs) == 4
    assert list(blobs.keys()) == [kept.blob_key]
    assert blobs.get(kept.blob_key) == b"kept"
    assert _temp_files(blobs) == []
    assert sweep_orphans(metadata, blobs) == 0


def test_sweep_with_an_age_spares_young_orphans(
    metadata: SqlMetadataStore, blobs: DirectoryBlobStore
) -> None:
    old, young = new_id(), new_id()
    blobs.put(old, b"old")
    blobs.put(young, b"in flight")
    hour_ago = time.time() - 3600
    os.utime(blobs.root / old[:2] / old, (hour_ago, hour_ago))
    assert sweep_orphans(metadata, blobs, min_age_s=600) == 1
    assert list(blobs.keys()) == [young]


# --------------------------------------------------------------------------- crash safety

CHILD = r"""
import hashlib, os, sys
from pathlib import Path
from cape.host.store.blobs import DirectoryBlobStore
from cape.host.store.deploys import commit_deploy
from cape.host.store.metadata import SqlMetadataStore

url, root, user_id, seed = sys.argv[1:5]
metadata = SqlMetadataStore(url)
blobs = DirectoryBlobStore(Path(root))
owner = metadata.get_user_by_id(user_id)
assert owner is not None
print("ready", flush=True)
i = int(seed) * 100_000
while True:
    data = os.urandom(1 + (i * 7919) % 400_000)
    fn = commit_deploy(
        metadata, blobs, owner=owner, name=f"fn{i % 5}",
        checksum=hashlib.sha256(str(i).encode()).hexdigest(), public=bool(i % 2),
        ciphertext_chunks=(data[j:j + 65536] for j in range(0, len(data), 65536)),
    )
    sys.stdout.write(f"{fn.id} {hashlib.sha256(data).hexdigest()} {len(data)}\n")
    sys.stdout.flush()
    i += 1
"""

KILLS = 30
LIVENESS_S = 120.0
"""Only for a child that stops making progress; a loaded machine is merely slow."""


def _all_functions(metadata: SqlMetadataStore, owner: User) -> dict[str, Function]:
    found: dict[str, Function] = {}
    offset = 0
    while page := metadata.list_functions(owner.id, limit=1000, offset=offset):
        found.update((f.id, f) for f in page)
        offset += len(page)
    return found


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_no_acknowledged_deploy(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'meta.db'}"
    with SqlMetadataStore(url) as metadata:
        _crash_loop(tmp_path, url, metadata)


def _crash_loop(tmp_path: Path, url: str, metadata: SqlMetadataStore) -> None:
    blobs = DirectoryBlobStore(tmp_path / "blobs")
    owner = metadata.create_user("crash", "hash")
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    acknowledged: dict[str, tuple[str, int]] = {}
    unacknowledged_rows = removed_total = 0

    for kill in range(KILLS):
        with (tmp_path / "child.err").open("wb") as err:
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD, url, str(blobs.root), owner.id, str(kill)],
                stdout=subprocess.PIPE,
                stderr=err,
            )
            assert child.stdout is not None
            # Event-driven, not timed: the kill waits for the child to be under way (started,
            # and one deploy acknowledged), then lands at a random moment of the deploys that
            # follow. A watchdog only bounds a child that stops making progress.
            watchdog = threading.Timer(LIVENESS_S, child.kill)
            watchdog.start()
            try:
                ready = child.stdout.readline()
                first = child.stdout.readline() if ready == b"ready\n" else b""
            finally:
                watchdog.cancel()
            if not first.endswith(b"\n"):
                child.kill()
                child.stdout.close()
                child.wait()
                pytest.fail(f"child made no deploy: {(tmp_path / 'child.err').read_text()}")
            time.sleep(rng.uniform(0.0, 0.050))
            child.send_signal(signal.SIGKILL)
            output = first + child.stdout.read()
            child.stdout.close()
            child.wait()
        assert child.returncode == -signal.SIGKILL, (tmp_path / "child.err").read_text()

        # Only whole lines were acknowledged: the child printed them after commit returned.
        for line in output.split(b"\n")[:-1]:
            fid, digest, length = line.decode().split()
            acknowledged[fid] = (digest, int(length))

        removed_total += sweep_orphans(metadata, blobs)

        functions = _all_functions(metadata, owner)
        context = f"seed={seed} kill={kill}"
        for fid, (digest, size) in acknowledged.items():
            assert fid in functions, f"acknowledged deploy {fid} lost ({context})"
            stored = blobs.get(functions[fid].blob_key)
            assert len(stored) == size == functions[fid].size, context
            assert hashlib.sha256(stored).hexdigest() == digest, context
        for fn in functions.values():  # no row without its whole blob
            assert blobs.size(fn.blob_key) == fn.size, f"partial deploy {fn.id} ({context})"
        assert set(blobs.keys()) == metadata.all_blob_keys(), context
        assert list((blobs.root / ".tmp").iterdir()) == [], context
        unacknowledged_rows = len(set(functions) - set(acknowledged))

    assert len(acknowledged) >= KILLS  # each kill waited for a deploy of its own round
    print(  # shown with -s: how often a kill fell between the steps
        f"seed={seed}: {len(acknowledged)} acknowledged, {unacknowledged_rows} committed "
        f"but unacknowledged, {removed_total} orphans/temp files swept"
    )
