"""Machine-readable benchmark results, for ``benchmarks/run_all.py``'s report.

Each benchmark script keeps printing its human table and, given ``--json PATH``, also writes
one :class:`Results` there:

- ``figures``: one number each, beside the reference measured in the same run (``ratio`` =
  value / reference_value) and, when the issue sets one, the goal and whether it was met;
- ``series``: raw samples (latencies) to plot as distributions;
- ``curves``: (x, y) points to plot, e.g. runs/s against concurrent clients.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Curve", "Figure", "Results", "Series", "timed"]


async def timed(action: Callable[[], Awaitable[object]], repeats: int) -> list[float]:
    """Seconds each of ``repeats`` sequential awaits of ``action()`` took."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        await action()
        samples.append(time.perf_counter() - start)
    return samples


@dataclass
class Figure:
    group: str
    """Section of the report, e.g. "encryption", "attestation", "invoke"."""
    name: str
    value: float
    unit: str
    reference: str | None = None
    reference_value: float | None = None
    higher_is_better: bool = True
    goal: str | None = None
    """The issue's goal in words, e.g. ">= 0.8x raw AES-GCM"."""
    goal_met: bool | None = None
    note: str | None = None

    @property
    def ratio(self) -> float | None:
        if self.reference_value in (None, 0):
            return None
        assert self.reference_value is not None
        return self.value / self.reference_value


@dataclass
class Series:
    group: str
    name: str
    unit: str
    samples: list[float]

    @property
    def p50(self) -> float:
        return statistics.median(self.samples)

    @property
    def p99(self) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


@dataclass
class Curve:
    group: str
    name: str
    x_label: str
    y_label: str
    points: list[tuple[float, float]]


@dataclass
class Results:
    benchmark: str
    quick: bool
    figures: list[Figure] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)
    curves: list[Curve] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def figure(self, group: str, name: str, value: float, unit: str, **kwargs: Any) -> Figure:
        item = Figure(group, name, value, unit, **kwargs)
        self.figures.append(item)
        return item

    def write(self, path: Path | None) -> None:
        """Write the JSON file (no-op when ``path`` is None)."""
        if path is None:
            return
        data = asdict(self)
        for raw, item in zip(data["figures"], self.figures, strict=True):
            raw["ratio"] = item.ratio
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def read(cls, path: Path) -> Results:
        data = json.loads(path.read_text())
        for raw in data["figures"]:
            raw.pop("ratio", None)
        return cls(
            benchmark=data["benchmark"],
            quick=data["quick"],
            figures=[Figure(**f) for f in data["figures"]],
            series=[Series(**s) for s in data["series"]],
            curves=[
                Curve(
                    s["group"],
                    s["name"],
                    s["x_label"],
                    s["y_label"],
                    [(float(x), float(y)) for x, y in s["points"]],
                )
                for s in data["curves"]
            ],
            notes=list(data.get("notes", [])),
        )
