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


def test_report_opens_with_the_hot_path_goal_table(tmp_path: Path) -> None:
    server = Results("server", quick=False)
    for clients, rate, plain in ((1, 20.0, 400.0), (16, 30.0, 100.0)):
        plural = "s" * (clients > 1)
        server.figure("throughput", f"completed runs/s, {clients} concurrent client{plural}",
                      rate, "runs/s", reference="plain websocket runs/s",
                      reference_value=plain)  # fmt: skip
        server.figure("throughput", f"errors, {clients} concurrent client{plural}", 0, "errors")
        server.series.append(
            Series(
                "run latency",
                f"cape run, {clients} client{plural}",
                "ms",
                [10.0] * 98 + [50.0, 90.0],
            )
        )
    server.figure("warm invoke", "cape warm invoke p50, 1 KiB", 0.5, "ms",
                  reference="plain websocket echo p50", reference_value=0.2)  # fmt: skip
    crypto = Results("crypto", quick=True)
    crypto.figure("encryption (issue 16 goals)", "stream form encrypt 1 MiB", 900.0, "MB/s",
                  reference="the cipher alone", reference_value=1000.0)  # fmt: skip
    crypto.figure("encryption (issue 16 goals)", "stream form encrypt 1 GiB", 800.0, "MB/s",
                  reference="the cipher alone", reference_value=1000.0)  # fmt: skip
    crypto.figure("encryption (issue 16 goals)",
                  "binary envelope into a reused buffer encrypt 1 MiB", 900.0, "MB/s",
                  reference="the cipher alone", reference_value=1000.0)  # fmt: skip
    crypto.figure("encryption", "binary envelope encrypt 1 MiB", 300.0, "MB/s",
                  reference="fresh raw", reference_value=600.0)  # fmt: skip
    text = run_all.write_report(
        tmp_path, {"server": server, "crypto": crypto}, {"server": 1.0, "crypto": 1.0}, {}, False
    )
    table = text[text.index("## Hot path (issue 16)") :]
    assert "| completed runs/s, 16 clients" in table and "| 0.30x | ≥ 0.25x: met |" in table
    assert "| warm invoke p50, 1 KiB | 0.5 ms |" in table and "2.50x | ≤ 2x: **NOT met** |" in table
    assert "| warm invoke p50, 1 MiB | not measured in this run (`server_bench.py`)" in table
    assert "| key-service data-key release p50 (the enclave's document reused) | not" in table
    # The goal's own size wins; a smoke run's largest size is shown but not judged.
    assert "stream encrypt (in-memory input, discarding sink), 1 GiB" in table
    assert "0.80x | ≥ 0.9x: **NOT met** |" in table
    assert "binary envelope encrypt into a reused buffer, 1 MiB" in table
    assert "not judged at 1 MiB (judged at 1 GiB)" in table
    assert "| binary envelope encrypt, fresh output, 1 MiB | 300 MB/s | fresh raw" in table
    assert "| 16 | 30.0 | 100 | 0.300x | 0 | 10 ms | 50 ms |" in table
    assert "| 1 | 20.0 | 400 | 0.050x | 0 | 10 ms | 50 ms |" in table
