"""Admission: per-user and server-wide counts of sessions, deploys and bundle bytes."""

from __future__ import annotations

import pytest

from cape.errors import LimitExceededError
from cape.host.admission import Admission, Limits, QuotaExceededError, ServerBusyError


def test_a_user_gets_its_sessions_and_no_more_others_are_unaffected() -> None:
    admission = Admission(Limits(sessions_per_user=2, sessions=10))
    with admission.session("mallory"), admission.session("mallory"):
        with (
            pytest.raises(QuotaExceededError, match="limit 2") as refused,
            admission.session("mallory"),
        ):
            pass
        assert refused.value.retry_after_s > 0
        with admission.session("alice"):
            assert admission.sessions("alice") == 1
    assert admission.sessions("mallory") == 0
    with admission.session("mallory"):  # freed when the blocks ended
        pass


def test_the_server_limit_is_a_503_kind_of_refusal() -> None:
    admission = Admission(Limits(sessions_per_user=5, sessions=2))
    with (
        admission.session("a"),
        admission.session("b"),
        pytest.raises(ServerBusyError),
        admission.session("c"),
    ):
        pass


def test_deploy_slots_and_bundle_bytes_are_held_until_the_session_ends() -> None:
    admission = Admission(Limits(deploys_per_user=1, bundle_bytes_per_user=100, bundle_bytes=150))
    with admission.session("a", deploy=True) as first:
        first.resize(80)
        with (
            pytest.raises(QuotaExceededError, match="deploys"),
            admission.session("a", deploy=True),
        ):
            pass
        with admission.session("b", deploy=True) as other:
            assert other.available() == 70  # what the server has left
            with pytest.raises(ServerBusyError):
                other.resize(71)
            with pytest.raises(LimitExceededError, match="limit of 100"):
                other.resize(101)  # never admissible: not a retry
            other.resize(70)
        first.resize(10)
        assert first.available() == 100
    with admission.session("a", deploy=True) as again:
        assert again.available() == 100


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_limits_must_be_positive_integers(bad: object) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        Limits(sessions=bad)  # type: ignore[arg-type]
