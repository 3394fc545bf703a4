"""The real AWS Nitro attestation documents in ``../shared/nitro-samples`` (never copied here).

Provenance and validity windows: ``shared/nitro-samples/README.md``. Tests check each document
at a time inside its window, never at wall-clock time, and skip when the folder is absent.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES_DIR = Path(
    os.environ.get("CAPE_NITRO_SAMPLES", REPO_ROOT.parent / "shared" / "nitro-samples")
)
ROOT_PEM = SAMPLES_DIR / "AWS_NitroEnclaves_Root-G1.pem"


def utc(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class Sample:
    name: str
    filename: str
    module_id: str
    timestamp_ms: int
    leaf_not_before: dt.datetime
    leaf_not_after: dt.datetime
    check_time: dt.datetime
    debug: bool

    @property
    def path(self) -> Path:
        return SAMPLES_DIR / self.filename


SAMPLES = (
    Sample(
        "blocky-prod",
        "blocky-nitrite_prod_us-east-1_2024-09-07.cose.b64",
        "i-0a22e5c5f24d22174-enc0191cceb4289903f",
        1725719859545,
        utc("2024-09-07T14:37:36"),
        utc("2024-09-07T17:37:39"),
        utc("2024-09-07T15:00:00"),
        debug=False,
    ),
    Sample(
        "blocky-debug",
        "blocky-nitrite_debug_us-east-1_2024-09-07.cose.b64",
        "i-0a22e5c5f24d22174-enc0191ccebaf8feaba",
        1725719886508,
        utc("2024-09-07T14:38:03"),
        utc("2024-09-07T17:38:06"),
        utc("2024-09-07T15:00:00"),
        debug=True,
    ),
    Sample(
        "anjuna-prod-rsa",
        "anjuna_prod_rsa-pubkey_us-east-2_2021-03-24.cose.bin",
        "i-0a6d65e7122308898-enc017846bcd2f820da",
        1616602241734,
        utc("2021-03-24T16:06:22"),
        utc("2021-03-24T19:06:22"),
        utc("2021-03-24T16:30:00"),
        debug=False,
    ),
)
SAMPLE_IDS = [s.name for s in SAMPLES]

requires_samples = pytest.mark.skipif(
    not ROOT_PEM.is_file(), reason=f"real Nitro samples not found at {SAMPLES_DIR}"
)


def read_sample(sample: Sample) -> bytes:
    """The raw COSE bytes of a sample (base64 files decoded)."""
    from cape.formats.attestation import decode_document_bytes

    return decode_document_bytes(sample.path.read_bytes())
