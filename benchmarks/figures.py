"""A figure of a benchmark, its baseline from the same run, and the targets of issue 10.

A target is checked against the value (``min`` / ``max``), against the ratio to the baseline
(``min_ratio`` / ``max_ratio``), or as a slowdown from the baseline (``max_slowdown``: the
baseline's rate over this one, minus one). ``shortfall`` is the factor the figure must improve
by to meet it (1.0 when met).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
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
