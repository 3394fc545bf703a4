"""``cape serve --limit NAME=VALUE``: every server limit of docs/limits.md ("Server")."""

from __future__ import annotations

from pathlib import Path

import pytest

from cape.errors import FormatError
from cape.platform.limits import ServerLimits, parse_limits
from tests.cli.test_admin import invoke


@pytest.mark.parametrize(
    ("setting", "needle"),
    [
        ("sessions_per_user", "unknown limit"),
        ("sessions_per_tenant=3", "unknown limit"),
        ("sessions_per_user=three", "must be a number"),
        ("sessions_per_user=0", "must be a positive number"),
        ("frame_timeout_s=-1", "must be a positive number"),
        ("deploys=1.5", "must be a number"),
    ],
)
def test_bad_limits_are_one_error_line_before_starting(
    tmp_path: Path, setting: str, needle: str
) -> None:
    code, _, err = invoke(
        "serve", "--data-dir", str(tmp_path / "data"), "--port", "0", "--limit", setting
    )
    assert code != 0 and needle in err, err
    assert err.count("Error:") == 1 and "Traceback" not in err
    assert not (tmp_path / "data").exists()


def test_limits_parse_over_the_defaults() -> None:
    limits = parse_limits(["sessions_per_user=3", "frame-timeout-s=2.5", "bundle_bytes=10"])
    assert limits.sessions_per_user == 3 and limits.frame_timeout_s == 2.5
    assert limits.bundle_bytes == 10 and limits.deploys == ServerLimits().deploys
    admission = limits.admission()
    assert admission.sessions_per_user == 3
    with pytest.raises(FormatError):
        ServerLimits(sessions=0)
