"""benchmarks/run_all.py turns results into a report: ratio tables, goals, PNG plots."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from _results import Curve, Figure, Results, Series  # noqa: E402

pytest.importorskip("matplotlib")  # the `bench` extra; scripts/test.sh installs it

import run_all  # noqa: E402


def _results() -> Results:
    r = Results("server", quick=False)
    r.figure("invoke", "warm invoke 1 KiB p50", 0.9, "ms", reference="plain echo p50",
             reference_value=0.1, higher_is_better=False, goal="<= 2x plain echo",
             goal_met=False)  # fmt: skip
    r.figure("load", "errors at 64 clients", 0, "errors", goal="0 errors", goal_met=True)
    r.series.append(Series("invoke", "cape serve 1 KiB", "ms", [0.8, 0.9, 1.0, 3.0]))
    r.series.append(Series("invoke", "plain echo 1 KiB", "ms", [0.1, 0.1, 0.2]))
    r.curves.append(Curve("load", "runs/s", "concurrent clients", "runs/s",
                          [(1, 10.0), (4, 30.0), (16, 35.0), (64, 36.0)]))  # fmt: skip
    r.notes.append("measured on a busy machine")
    return r


def test_results_round_trip_through_json(tmp_path: Path) -> None:
    original = _results()
    original.write(tmp_path / "r.json")
    again = Results.read(tmp_path / "r.json")
    assert again == original
    assert again.figures[0].ratio == pytest.approx(9.0)
    assert Figure("g", "n", 1.0, "x").ratio is None


def test_report_has_ratios_goals_and_plots(tmp_path: Path) -> None:
    text = run_all.write_report(
        tmp_path, {"server": _results()}, {"server": 12.0}, {"enclave": "exit status 1"}, False
    )
    assert (tmp_path / "report.md").read_text() == text
    assert "| CPU |" in text and "| Python |" in text
    assert "| warm invoke 1 KiB p50 | 0.9 ms | plain echo p50: 0.1 ms | 9.00x |" in text
    assert "<= 2x plain echo: **NOT met**" in text and "0 errors: met" in text
    assert "`enclave_bench.py`: exit status 1" in text
    assert "measured on a busy machine" in text
    plots = sorted(p.name for p in tmp_path.glob("*.png"))
    assert plots == ["server-invoke-latency.png", "server-load-runs-s.png"]
    for plot in plots:
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({plot})" in text
    summary = run_all.summary({"server": _results()}, {"enclave": "exit status 1"})
    assert "NOT met" in summary and "enclave_bench.py FAILED" in summary
