"""A figure of a benchmark, its baseline from the same run, and the targets of issue 10.

A target is checked against the value (``min`` / ``max``), against the ratio to the baseline
(``min_ratio`` / ``max_ratio``), or as a slowdown from the baseline (``max_slowdown``: the
baseline's rate over this one, minus one). ``shortfall`` is the factor the figure must improve
by to meet it (1.0 when met).

With ``--runs N`` each scenario runs N times and ``combine`` makes one figure of the N: its value
and its baseline are the medians of the runs' (``runs`` and ``baseline_runs`` keep each run's, in
run order), so ratio and shortfall are computed from the medians.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

Kind = Literal["min", "max", "min_ratio", "max_ratio", "max_slowdown"]


@dataclass(frozen=True)
class Target:
    kind: Kind
    limit: float
    text: str

    def shortfall(self, value: float, baseline: float | None) -> float | None:
        """How many times better the figure must get (1.0: met); None when it cannot be told."""
        if math.isnan(value) or value <= 0:
            return None
        if self.kind == "min":
            return max(1.0, self.limit / value)
        if self.kind == "max":
            return max(1.0, value / self.limit)
        if baseline is None or math.isnan(baseline) or baseline <= 0:
            return None
        ratio = value / baseline
        if self.kind == "min_ratio":
            return max(1.0, self.limit / ratio)
        if self.kind == "max_ratio":
            return max(1.0, ratio / self.limit)
        slowdown = baseline / value - 1.0
        return max(1.0, (1.0 + slowdown) / (1.0 + self.limit))


@dataclass
class Figure:
    """One measured figure; ``higher`` says whether more is better (rates) or worse (latency)."""

    key: str
    what: str
    value: float
    unit: str
    higher: bool
    baseline: float | None = None
    baseline_what: str | None = None
    targets: list[Target] = field(default_factory=list)
    note: str = ""
    runs: list[float] = field(default_factory=list)  # each run's value, in run order (``combine``)
    baseline_runs: list[float | None] = field(default_factory=list)  # each run's baseline; [] without one

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or not self.baseline or math.isnan(self.baseline) or math.isnan(self.value):
            return None
        return self.value / self.baseline

    def verdicts(self) -> list[dict[str, Any]]:
        found = []
        for target in self.targets:
            shortfall = self.shortfall_of(target)
            found.append(
                {
                    "target": target.text,
                    "met": None if shortfall is None else shortfall <= 1.0,
                    "shortfall": None if shortfall is None else round(shortfall, 2),
                }
            )
        return found

    def shortfall_of(self, target: Target) -> float | None:
        return target.shortfall(self.value, self.baseline)

    def as_dict(self, durability: str) -> dict[str, Any]:
        data = asdict(self)
        data["targets"] = self.verdicts()
        data["ratio"] = None if self.ratio is None else round(self.ratio, 4)
        data["durability"] = durability
        return data


def median(values: Sequence[float]) -> float:
    """The median of the values that are numbers (a run that could not tell gives NaN, left out;
    NaN when none is): for an even count, the mean of the two middle ones, which favours neither
    the better nor the worse run."""
    numbers = [v for v in values if not math.isnan(v)]
    return float(statistics.median(numbers)) if numbers else math.nan


def run_label(run: int, text: str, runs: int) -> str:
    """``text`` of run ``run`` (1-based) of ``runs``: prefixed "run k: " when there are several."""
    return f"run {run}: {text}" if runs > 1 else text


def combine(runs: Sequence[Figure | None], pick: Callable[[Sequence[float]], float] = median) -> Figure:
    """One figure from the same figure of each run (in run order; None where a run did not get
    to it): its value ``pick`` of the runs' values (the median; ``max`` for a peak), its baseline
    the median of the runs' baselines; key, description, unit and targets those of the first run
    that has it; the runs' notes kept, each prefixed with its run when there are several."""
    present = [(k, f) for k, f in enumerate(runs, start=1) if f is not None]
    if not present:
        raise ValueError("combine needs the figure of at least one run: pass the runs' figures, None for a missing one")
    values = [f.value for _, f in present]
    baselines = [f.baseline for _, f in present]
    known = [b for b in baselines if b is not None]
    notes = [run_label(k, f.note, len(runs)) for k, f in present if f.note]
    return replace(
        present[0][1],
        value=pick(values),
        runs=values,
        baseline=median(known) if known else None,
        baseline_runs=baselines if known else [],
        note="; ".join(notes),
    )


# The targets of issue 10 item 2 (a 2-core machine, medians of 3 runs, durable defaults).
E2E_RATE = Target("min", 20_000, ">= 20,000 commands/s")
E2E_VS_RAW = Target("min_ratio", 0.30, ">= 0.30 x raw pipelined XADD")
REPLY_P99 = Target("max_ratio", 3.0, "p99 <= 3 x echo p99")
REPLY_P50 = Target("max", 2.0, "p50 <= 2 ms")
API_P50 = Target("max", 2.0, "p50 <= 2 ms")
GROWTH = Target("max_slowdown", 0.10, "<= 10 % slower than an empty log")
REPLAY_RATE = Target("min", 150_000, ">= 150,000 events/s")
PROJECTOR_RATE = Target("min", 10_000, ">= 10,000 rows/s")
MEMORY_LIVE = Target("max", 3_000, "<= 3 KB per lifecycle while live")
MEMORY_ARCHIVED = Target("max", 300, "<= 300 bytes once final and archived (retention on)")
SERVE_RSS = Target("max", 250, "<= 250 MB")
