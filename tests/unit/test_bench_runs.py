"""``python -m benchmarks --runs N``: the figures of N runs combined into one (medians), the
scenario's results of N runs, and the value column of the report. Pure functions, exact values."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from benchmarks.__main__ import parser
from benchmarks.figures import E2E_RATE, E2E_VS_RAW, SERVE_RSS, Figure, combine, median
from benchmarks.report import markdown, value_text
from benchmarks.run import Results, by_run, combine_runs


def e2e(value: float, baseline: float | None, note: str = "") -> Figure:
    return Figure(
        "e2e.live",
        "pairs, pipelined",
        value,
        "commands/s",
        True,
        baseline=baseline,
        baseline_what="redis-py pipelined XADD",
        targets=[E2E_RATE, E2E_VS_RAW],
        note=note,
    )


def test_median_of_an_odd_count_is_the_middle_value() -> None:
    assert median([1596.0, 1436.0, 1561.0]) == 1561.0


def test_median_of_an_even_count_is_the_mean_of_the_two_middle_values() -> None:
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert median([1436.0, 1596.0]) == 1516.0


def test_median_leaves_out_runs_that_could_not_tell() -> None:
    assert median([math.nan, 1.0, 3.0]) == 2.0
    assert math.isnan(median([math.nan, math.nan]))
    assert math.isnan(median([]))


def test_combine_takes_the_medians_and_computes_ratio_and_shortfall_from_them() -> None:
    runs = [
        e2e(1436.0, 29_000.0, "replies alone: 1,500 commands/s"),
        e2e(1596.0, 30_000.0, "replies alone: 1,650 commands/s"),
        e2e(1561.0, 28_000.0),
    ]

    figure = combine(runs)

    assert (figure.value, figure.runs) == (1561.0, [1436.0, 1596.0, 1561.0])
    assert (figure.baseline, figure.baseline_runs) == (29_000.0, [29_000.0, 30_000.0, 28_000.0])
    assert figure.note == "run 1: replies alone: 1,500 commands/s; run 2: replies alone: 1,650 commands/s"
    data = figure.as_dict("always")
    assert data["value"] == 1561.0
    assert data["runs"] == [1436.0, 1596.0, 1561.0]
    assert data["baseline_runs"] == [29_000.0, 30_000.0, 28_000.0]
    assert data["ratio"] == 0.0538  # 1,561 / 29,000
    assert data["targets"] == [
        {"target": ">= 20,000 commands/s", "met": False, "shortfall": 12.81},  # 20,000 / 1,561
        {"target": ">= 0.30 x raw pipelined XADD", "met": False, "shortfall": 5.57},  # 0.30 / (1,561 / 29,000)
    ]
    assert (figure.key, figure.what, figure.unit, figure.targets) == (
        "e2e.live",
        "pairs, pipelined",
        "commands/s",
        [E2E_RATE, E2E_VS_RAW],
    )


def test_combine_of_one_run_keeps_its_figure_and_records_the_run() -> None:
    figure = combine([e2e(1375.0, 29_297.0, "replies alone: 1,400 commands/s")])

    assert (figure.value, figure.runs, figure.baseline, figure.baseline_runs) == (
        1375.0,
        [1375.0],
        29_297.0,
        [29_297.0],
    )
    assert figure.note == "replies alone: 1,400 commands/s"


def test_combine_skips_a_run_without_the_figure_and_labels_notes_with_their_run() -> None:
    figure = combine([e2e(1000.0, None, "first"), None, e2e(3000.0, 30_000.0, "third")])

    assert (figure.value, figure.runs) == (2000.0, [1000.0, 3000.0])
    assert (figure.baseline, figure.baseline_runs) == (30_000.0, [None, 30_000.0])
    assert figure.note == "run 1: first; run 3: third"


def test_combine_without_a_baseline_records_no_baseline_runs() -> None:
    rss = [Figure("memory.serve_peak_rss", "peak RSS", mb, "MB", False, targets=[SERVE_RSS]) for mb in (180.0, 200.0)]

    assert (combine(rss).baseline, combine(rss).baseline_runs) == (None, [])
    assert combine(rss, pick=max).value == 200.0


def test_combine_refuses_no_figure() -> None:
    with pytest.raises(ValueError, match="at least one run"):
        combine([None, None])


def test_combine_runs_of_a_scenario() -> None:
    first = Results(
        figures=[e2e(1436.0, 29_000.0), Figure("e2e.echo_floor", "echo", 7000.0, "commands/s", True)],
        notes=["cpu: 283 us"],
        params={"pairs": 10_000, "cpu_us_per_command": 392.0},
        seconds=10.5,
        serve_peak_rss_bytes=180_000_000,
    )
    second = Results(
        figures=[e2e(1596.0, 30_000.0)],
        notes=["cpu: 270 us", "slow start"],
        params={"pairs": 10_000, "cpu_us_per_command": 380.0},
        seconds=11.0,
        serve_peak_rss_bytes=200_000_000,
        error="serve exited 1: read /tmp/serve.log",
    )

    results = combine_runs([first, second])

    assert [(f.key, f.value, f.runs) for f in results.figures] == [
        ("e2e.live", 1516.0, [1436.0, 1596.0]),
        ("e2e.echo_floor", 7000.0, [7000.0]),
    ]
    assert results.notes == ["run 1: cpu: 283 us", "run 2: cpu: 270 us", "run 2: slow start"]
    assert results.error == "run 2: serve exited 1: read /tmp/serve.log"
    assert results.params == {"pairs": 10_000, "cpu_us_per_command": 392.0}
    assert results.params_runs == [
        {"pairs": 10_000, "cpu_us_per_command": 392.0},
        {"pairs": 10_000, "cpu_us_per_command": 380.0},
    ]
    assert (results.seconds, results.serve_peak_rss_bytes) == (21.5, 200_000_000)


def test_combine_runs_of_one_run_leaves_notes_and_error_as_they_are() -> None:
    results = combine_runs([Results(notes=["redis-benchmark not found"], params={"pairs": 300}, error="failed")])

    assert (results.notes, results.error, results.params_runs) == (
        ["redis-benchmark not found"],
        "failed",
        [{"pairs": 300}],
    )


def test_by_run_groups_each_runs_results() -> None:
    a1, a2, b1 = Results(seconds=1.0), Results(seconds=2.0), Results(seconds=3.0)

    assert by_run({"a": [a1, a2], "b": [b1]}) == [{"a": a1, "b": b1}, {"a": a2}]
    assert by_run({}) == []


def test_value_text_shows_the_median_and_the_range_of_the_runs() -> None:
    assert value_text(1561.0, [1436.0, 1596.0, 1561.0], "commands/s") == "1,561 commands/s (1,436-1,596, 3 runs)"
    assert value_text(2.5, [2.14, 3.52], "ms", beneath=True) == "2.50 ms\n[dim](2.14-3.52, 2 runs)[/dim]"
    assert value_text(1375.0, [1375.0], "commands/s") == "1,375 commands/s"
    assert value_text(1375.0, [], "commands/s") == "1,375 commands/s"


def test_markdown_of_a_file_with_runs_and_of_one_before_them() -> None:
    figure = combine([e2e(1436.0, 29_000.0), e2e(1596.0, 30_000.0), e2e(1561.0, 28_000.0)]).as_dict("always")
    old = {k: v for k, v in figure.items() if k not in ("runs", "baseline_runs")}
    scenario = {"error": None, "figures": [figure]}

    table = markdown({"scenarios": {"e2e": scenario, "old": {"error": None, "figures": [old]}}})

    verdicts = ">= 20,000 commands/s: **missed, x12.81**; >= 0.30 x raw pipelined XADD: **missed, x5.57**"
    assert table.splitlines()[2:] == [
        "| e2e | pairs, pipelined | 1,561 commands/s (1,436-1,596, 3 runs) | redis-py pipelined XADD: 29,000 "
        f"commands/s | 0.054 | {verdicts} |",
        "| old | pairs, pipelined | 1,561 commands/s | redis-py pipelined XADD: 29,000 commands/s | 0.054 | "
        f"{verdicts} |",
    ]


def test_runs_option() -> None:
    assert parser().parse_args([]).runs == 1
    assert parser().parse_args(["--runs", "3"]).runs == 3
    for wrong in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            parser().parse_args(["--runs", wrong])


def test_the_suite_imports_without_the_bench_extra() -> None:
    """`make test` installs `.[dev]` only: the benchmarks' parser, figures and report must import
    without the optional `bench` dependencies (the peer's eventsourcing is imported where used)."""
    code = "import sys; sys.modules['eventsourcing'] = None; import benchmarks.__main__"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
