from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_config(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """CLI tests never read the developer's own ~/.config/cape or CAPE_* settings."""
    directory = tmp_path_factory.mktemp("cape-config")
    monkeypatch.setenv("CAPE_CONFIG_DIR", str(directory))
    for name in ("CAPE_ENCLAVE_HOST", "CAPE_URL", "CAPE_CA_FILE", "CAPE_TOKEN",
                 "CAPE_ATTESTATION_ROOT", "CAPE_LOCAL_CONFIG_DIR"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    return directory
