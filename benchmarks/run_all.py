"""Run every benchmark and write a report: Markdown tables and PNG plots.

    .venv/bin/python benchmarks/run_all.py            # full run (~15 min on 2 cores)
    .venv/bin/python benchmarks/run_all.py --quick    # smoke run (CI): seconds per script

Each script runs in its own process with ``--json``; the report (``report.md``, ``*.png``,
each script's JSON and log) goes to ``benchmarks/results/<UTC time>/`` unless ``--out`` says
otherwise. Every figure stands beside the reference measured in the same run and their ratio;
the machine is described at the top. A script that fails is reported and makes the exit status
non-zero; the others still run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from _hot_path import hot_path_lines
from _results import Curve, Figure, Results, Series

HERE = Path(__file__).resolve().parent
SCRIPTS = (
    "crypto",
    "attestation",
    "sandbox",
    "hops",
    "call",
    "channel",
    "enclave",
    "imagenet",
    "server",
    "cluster",
    "image",
    "js",
    "java",
    "noisy_neighbour",
)


def machine() -> list[tuple[str, str]]:
    """What ran the benchmarks, for the report's header."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    import cryptography
    from cryptography.hazmat.backends.openssl.backend import backend

    return [
        ("CPU", f"{cpu}, {os.cpu_count()} logical cores"),
        ("Memory", memory),
        ("OS", f"{platform.system()} {platform.release()} ({platform.machine()})"),
        ("Python", platform.python_version()),
        ("cryptography", f"{cryptography.__version__} ({backend.openssl_version_text()})"),
        ("Load at start", " ".join(f"{x:.2f}" for x in os.getloadavg())),
    ]


def run_script(name: str, out: Path, quick: bool) -> tuple[Results | None, float, str | None]:
    json_path = out / f"{name}.json"
    script = HERE / f"{name}_bench.py"
    if not script.exists():  # scripts named for what they measure, e.g. noisy_neighbour.py
        script = HERE / f"{name}.py"
    command = [sys.executable, str(script), "--json", str(json_path)]
    if quick:
        command.append("--quick")
    start = time.monotonic()
    with (out / f"{name}.log").open("w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    elapsed = time.monotonic() - start
    if done.returncode != 0:
        return None, elapsed, f"exit status {done.returncode} (see {name}.log)"
    try:
        return Results.read(json_path), elapsed, None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, elapsed, f"unreadable results: {exc}"


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    magnitude = abs(value)
    text = (
        f"{value:.3g}"
        if magnitude < 10
        else f"{value:.1f}"
        if magnitude < 1000
        else f"{value:,.0f}"
    )
    return f"{text} {unit}".strip()


def _goal(figure: Figure) -> str:
    if figure.goal is None:
        return ""
    mark = {True: "met", False: "**NOT met**", None: "n/a"}[figure.goal_met]
    return f"{figure.goal}: {mark}"


def figure_rows(figures: list[Figure]) -> list[str]:
    rows = [
        "| figure | value | reference (same run) | ratio | goal |",
        "|---|---:|---|---:|---|",
    ]
    for f in figures:
        reference = f"{f.reference}: {_number(f.reference_value, f.unit)}" if f.reference else ""
        ratio = f"{f.ratio:.2f}x" if f.ratio is not None else ""
        name = f.name + (f" — {f.note}" if f.note else "")
        rows.append(f"| {name} | {_number(f.value, f.unit)} | {reference} | {ratio} | {_goal(f)} |")
    return rows


def plot_series(series: list[Series], path: Path, title: str) -> None:
    """Latency distributions as empirical CDFs (log time axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for s in series:
        ordered = sorted(s.samples)
        n = len(ordered)
        ax.step(ordered, [(i + 1) / n for i in range(n)], where="post", label=f"{s.name} ({n})")
    ax.set_xscale("log")
    ax.set_xlabel(series[0].unit)
    ax.set_ylabel("fraction of samples ≤ x")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(curves: list[Curve], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for c in curves:
        xs = [x for x, _ in c.points]
        ys = [y for _, y in c.points]
        ax.plot(xs, ys, marker="o", label=c.name)
    if (
        all(x > 0 for c in curves for x, _ in c.points)
        and max(x for c in curves for x, _ in c.points)
        / min(x for c in curves for x, _ in c.points)
        > 50
    ):
        ax.set_xscale("log")
    ax.set_xlabel(curves[0].x_label)
    ax.set_ylabel(curves[0].y_label)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def write_report(
    out: Path,
    results: dict[str, Results],
    timings: dict[str, float],
    failures: dict[str, str],
    quick: bool,
    started: tuple[dt.datetime, list[tuple[str, str]]] | None = None,
) -> str:
    """``started``: when the run began and :func:`machine` as it was then (the load at start);
    without it, both are taken now."""
    began, facts = started or (dt.datetime.now(dt.UTC), machine())
    lines = [
        f"# Cape benchmark report{' (quick smoke run)' if quick else ''}",
        "",
        f"Run from {began.isoformat(timespec='seconds')} to "
        f"{dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}; "
        "every ratio is against a reference measured in the same run.",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in facts),
        "",
    ]
    lines += hot_path_lines(results)
    goals = [f for r in results.values() for f in r.figures if f.goal is not None]
    if goals:
        lines += ["## Goals", "", *figure_rows(goals), ""]
    if failures:
        lines += ["## Failed scripts", ""]
        lines += [f"- `{name}_bench.py`: {why}" for name, why in failures.items()]
        lines.append("")
    for name in SCRIPTS:
        if name not in results:
            continue
        r = results[name]
        lines += [f"## {name} (`benchmarks/{name}_bench.py`, {timings[name]:.0f} s)", ""]
        groups: dict[str, list[Figure]] = {}
        for f in r.figures:
            groups.setdefault(f.group, []).append(f)
        for group, figures in groups.items():
            lines += [f"### {group}", "", *figure_rows(figures), ""]
        series_groups: dict[str, list[Series]] = {}
        for s in r.series:
            if s.samples:
                series_groups.setdefault(s.group, []).append(s)
        for group, series in series_groups.items():
            png = f"{name}-{_slug(group)}-latency.png"
            plot_series(series, out / png, f"{name}: {group}")
            lines += [
                f"![{name} {group} latency distribution]({png})",
                "",
                "| series | samples | p50 | p99 |",
                "|---|---:|---:|---:|",
                *(
                    f"| {s.name} | {len(s.samples)} | {_number(s.p50, s.unit)} | "
                    f"{_number(s.p99, s.unit)} |"
                    for s in series
                ),
                "",
            ]
        curve_groups: dict[tuple[str, str, str], list[Curve]] = {}
        for c in r.curves:
            if c.points:
                curve_groups.setdefault((c.group, c.x_label, c.y_label), []).append(c)
        for (group, _x, y_label), curves in curve_groups.items():
            png = f"{name}-{_slug(group)}-{_slug(y_label)}.png"
            plot_curves(curves, out / png, f"{name}: {group}")
            lines += [f"![{name} {group}: {y_label}]({png})", ""]
        lines += [f"- {note}" for note in r.notes]
        if r.notes:
            lines.append("")
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def summary(results: dict[str, Results], failures: dict[str, str]) -> str:
    rows = []
    for r in results.values():
        for f in r.figures:
            if f.goal is not None:
                ratio = f"{f.ratio:.2f}x" if f.ratio is not None else "-"
                status = {True: "met", False: "NOT met", None: "n/a"}[f.goal_met]
                rows.append(
                    f"  {f.name[:58]:<58} {_number(f.value, f.unit):>14} {ratio:>8}  {status}"
                )
    rows += [f"  {name}_bench.py FAILED: {why}" for name, why in failures.items()]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smoke run: seconds per script")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/…)")
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, help="run only these scripts")
    args = parser.parse_args(argv)
    started = (dt.datetime.now(dt.UTC), machine())  # the load before any benchmark ran
    stamp = started[0].strftime("%Y%m%dT%H%M%SZ")
    out: Path = args.out or HERE / "results" / (stamp + ("-quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Results] = {}
    timings: dict[str, float] = {}
    failures: dict[str, str] = {}
    for name in args.only or SCRIPTS:
        print(f"== {name}_bench.py{' --quick' if args.quick else ''}", flush=True)
        result, elapsed, error = run_script(name, out, args.quick)
        timings[name] = elapsed
        if result is None:
            failures[name] = error or "failed"
            print(f"   FAILED after {elapsed:.0f} s: {error}", flush=True)
        else:
            results[name] = result
            print(f"   {elapsed:.0f} s, {len(result.figures)} figures", flush=True)
    write_report(out, results, timings, failures, args.quick, started)
    print("\nGoals:")
    print(summary(results, failures))
    print(f"\nReport: {out / 'report.md'} (+ {len(list(out.glob('*.png')))} plots)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
