"""The hot-path goal table of issue 16, assembled from the scripts' results for the report.

Each row names the figure a script recorded (beside its same-run reference) and the goal for
its ratio; ``run_all.py`` prints the rows at the top of the report, then sessions/s at every
concurrency with errors and p50/p99 latency. A row whose figure is missing (a skipped or
failed script, or a smoke run without the large sizes) says so instead of guessing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from _results import Figure, Results

__all__ = ["ROWS", "GoalRow", "hot_path_lines"]

GIB_SIZES = ("1 GiB", "64 MiB", "1 MiB")
"""Sizes tried for the encryption rows, the goal's own first (a smoke run stops at 1 MiB)."""


@dataclass(frozen=True)
class GoalRow:
    label: str
    script: str
    figure: str
    """The figure's name; ``{size}`` is filled from GIB_SIZES for the encryption rows."""
    goal: float
    at_least: bool
    """True: the ratio must be >= goal (throughput); False: <= goal (latency)."""
    judged_only_at: str | None = None
    """For the encryption rows: the size the goal is judged at."""

    @property
    def goal_text(self) -> str:
        return f"{'≥' if self.at_least else '≤'} {self.goal:g}x"


ROWS = (
    GoalRow(
        "completed runs/s, 16 clients (connect, verify, one 1 KiB sealed invoke, close)",
        "server",
        "completed runs/s, 16 concurrent clients",
        0.25,
        at_least=True,
    ),
    GoalRow("warm invoke p50, 1 KiB", "server", "cape warm invoke p50, 1 KiB", 2, at_least=False),
    GoalRow("warm invoke p50, 1 MiB", "server", "cape warm invoke p50, 1 MiB", 2, at_least=False),
    GoalRow(
        "key-service data-key release p50 (the enclave's document reused)",
        "enclave",
        "data-key release latency, p50 (the enclave's document reused: policy checks + "
        "RSA-4096 unwrap + CMS)",
        1.5,
        at_least=False,
    ),
    GoalRow(
        "session set-up to verified document p50",
        "enclave",
        "echo run session, warm pool: open → verified document, p50 (against the sum)",
        1.3,
        at_least=False,
    ),
    GoalRow(
        "binary envelope encrypt into a reused buffer",
        "crypto",
        "binary envelope into a reused buffer encrypt {size}",
        0.8,
        at_least=True,
        judged_only_at="1 GiB",
    ),
    GoalRow(
        "stream encrypt (in-memory input, discarding sink)",
        "crypto",
        "stream form encrypt {size}",
        0.9,
        at_least=True,
        judged_only_at="1 GiB",
    ),
    GoalRow(
        "text (`cape:` base64) encrypt into a reused buffer",
        "crypto",
        "text envelope into a reused buffer encrypt {size}",
        0.8,
        at_least=True,
        judged_only_at="1 GiB",
    ),
)

UNJUDGED_ROWS = (
    (
        "floor of a warm invoke: three bare process hops against one, 1 KiB",
        "hops",
        "3-hop relay round trip, 1 KiB, p50 (client → 2 relays → echo)",
    ),
    (
        "floor of a warm invoke: three bare process hops against one, 1 MiB",
        "hops",
        "3-hop relay round trip, 1 MiB, p50 (client → 2 relays → echo)",
    ),
    (
        "enclave runtime CPU per warm call, 1 KiB: on the event loop against via a thread",
        "call",
        "runtime CPU per warm call on the event loop, 1 KiB",
    ),
    (
        "key-service release with a fresh document (first of each 30 s)",
        "enclave",
        "data-key release latency, p50 (a fresh document: its signature + RSA-4096 unwrap + CMS)",
    ),
)
"""Printed after the goal rows, beside their references, and not judged."""

FRESH_ROWS = (
    ("binary envelope encrypt, fresh output", "binary envelope encrypt {size}"),
    ("text envelope encrypt, fresh `str`", "text envelope encrypt {size}"),
    (
        "stream encrypt from a file-like source",
        "stream form from a file-like source encrypt {size}",
    ),
)
"""Printed beside the goal rows, against the fresh-output reference, and not judged."""

CLIENTS = (1, 4, 16, 64)


def _find(results: Results | None, name: str, group: str | None = None) -> Figure | None:
    if results is None:
        return None
    for figure in results.figures:
        if figure.name == name and (group is None or figure.group == group):
            return figure
    return None


def _sized(results: Results | None, pattern: str, group: str | None) -> tuple[Figure, str] | None:
    for size in GIB_SIZES:
        figure = _find(results, pattern.format(size=size), group)
        if figure is not None:
            return figure, size
    return None


def _num(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    text = f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{text} {unit}".strip()


def _goal_cell(row: GoalRow, ratio: float | None, size: str | None) -> str:
    if ratio is None:
        return f"{row.goal_text}: n/a"
    if row.judged_only_at and size != row.judged_only_at:
        return f"{row.goal_text}: not judged at {size} (judged at {row.judged_only_at})"
    met = ratio >= row.goal if row.at_least else ratio <= row.goal
    return f"{row.goal_text}: {'met' if met else '**NOT met**'}"


def hot_path_lines(results: Mapping[str, Results]) -> list[str]:
    """The issue-16 goal table, the fresh-output figures, and sessions/s by concurrency."""
    lines = [
        "## Hot path (issue 16)",
        "",
        "| figure | value | reference (same run) | ratio | goal |",
        "|---|---:|---|---:|---|",
    ]
    for row in ROWS:
        found: tuple[Figure, str | None] | None
        if row.judged_only_at:
            found = _sized(results.get(row.script), row.figure, "encryption (issue 16 goals)")
        else:
            figure = _find(results.get(row.script), row.figure)
            found = (figure, None) if figure is not None else None
        if found is None:
            lines.append(
                f"| {row.label} | not measured in this run (`{row.script}_bench.py`) | | | "
                f"{row.goal_text} |"
            )
            continue
        figure, size = found
        label = f"{row.label}, {size}" if size else row.label
        ratio = figure.ratio
        lines.append(
            f"| {label} | {_num(figure.value, figure.unit)} | {figure.reference}: "
            f"{_num(figure.reference_value, figure.unit)} | "
            f"{'-' if ratio is None else f'{ratio:.2f}x'} | {_goal_cell(row, ratio, size)} |"
        )
    for label, script, name in UNJUDGED_ROWS:
        figure = _find(results.get(script), name)
        if figure is not None:
            lines.append(
                f"| {label} | {_num(figure.value, figure.unit)} | {figure.reference}: "
                f"{_num(figure.reference_value, figure.unit)} | "
                f"{'-' if figure.ratio is None else f'{figure.ratio:.2f}x'} | not judged |"
            )
    for label, pattern in FRESH_ROWS:
        hit = _sized(results.get("crypto"), pattern, "encryption")
        if hit is None:
            continue
        figure, size = hit
        lines.append(
            f"| {label}, {size} | {_num(figure.value, figure.unit)} | {figure.reference}: "
            f"{_num(figure.reference_value, figure.unit)} | "
            f"{'-' if figure.ratio is None else f'{figure.ratio:.2f}x'} | not judged |"
        )
    lines.append("")
    lines += _sessions_lines(results.get("server"))
    return lines


def _sessions_lines(server: Results | None) -> list[str]:
    lines = [
        "Sessions/s (a run = connect, verify, one 1 KiB sealed invoke, close):",
        "",
        "| clients | runs/s | plain websocket runs/s | ratio | errors | p50 | p99 |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    measured = False
    for clients in CLIENTS:
        plural = "s" * (clients > 1)
        rate = _find(server, f"completed runs/s, {clients} concurrent client{plural}")
        errors = _find(server, f"errors, {clients} concurrent client{plural}")
        series = None
        if server is not None:
            series = next(
                (
                    s
                    for s in server.series
                    if s.name == f"cape run, {clients} client{plural}" and s.samples
                ),
                None,
            )
        if rate is None:
            continue
        measured = True
        lines.append(
            f"| {clients} | {rate.value:.1f} | {_num(rate.reference_value, '')} | "
            f"{'-' if rate.ratio is None else f'{rate.ratio:.3f}x'} | "
            f"{'-' if errors is None else int(errors.value)} | "
            f"{'-' if series is None else _num(series.p50, 'ms')} | "
            f"{'-' if series is None else _num(series.p99, 'ms')} |"
        )
    if not measured:
        lines.append("| - | not measured in this run (`server_bench.py`) | | | | | |")
    lines.append("")
    return lines
