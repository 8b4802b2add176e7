"""The table (rich) and ``benchmarks/results/*.json``: every figure beside its baseline and its
targets, the machine and the durability settings in force. With several runs a value is the
median, the range of the runs beside it (Markdown) or beneath it (the terminal's table)."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.figures import Figure
from benchmarks.run import Results, Run
from benchmarks.scenarios import describe


def digits(value: float | None, unit: str = "") -> str:
    if value is None or math.isnan(value):
        return "-"
    if unit == "ms" or abs(value) < 100:
        return f"{value:.2f}"
    return f"{value:,.0f}"


def number(value: float | None, unit: str = "") -> str:
    return f"{digits(value, unit)} {unit}".strip()


def spread(runs: Sequence[float], unit: str) -> str:
    """The range of a figure's runs, "(1,436-1,596, 3 runs)"; empty for one run (or none)."""
    told = [v for v in runs if not math.isnan(v)]
    if len(runs) < 2 or not told:
        return ""
    return f"({digits(min(told), unit)}-{digits(max(told), unit)}, {len(runs)} runs)"


def value_text(value: float, runs: Sequence[float], unit: str, *, beneath: bool = False) -> str:
    """The value (with several runs, their median) and the range of the runs beside it, or
    beneath it (dimmed, for the terminal's table)."""
    text, more = number(value, unit), spread(runs, unit)
    if not more:
        return text
    return f"{text}\n[dim]{more}[/dim]" if beneath else f"{text} {more}"


def verdict(figure: Figure) -> str:
    found = []
    for v in figure.verdicts():
        if v["met"] is None:
            found.append(f"{v['target']}: ?")
        elif v["met"]:
            found.append(f"[green]{v['target']}: met[/green]")
        else:
            found.append(f"[red]{v['target']}: missed, needs x{v['shortfall']:.2f}[/red]")
    return "\n".join(found)


def table(run: Run, title: str) -> Table:
    out = Table(title=title, show_lines=True)
    for column in ("scenario", "figure", "value", "baseline (same run)", "ratio", "target (issue 10)"):
        out.add_column(column, overflow="fold")
    for name, results in run.results.items():
        if results.error is not None:
            out.add_row(name, f"[red]failed: {results.error}[/red]", "", "", "", "")
        for figure in results.figures:
            baseline = ""
            if figure.baseline_what is not None:
                baseline = f"{figure.baseline_what}: {number(figure.baseline, figure.unit)}"
            what = figure.what + (f"\n[dim]{figure.note}[/dim]" if figure.note else "")
            ratio = "" if figure.ratio is None else f"{figure.ratio:.3f}"
            value = value_text(figure.value, figure.runs, figure.unit, beneath=True)
            out.add_row(name, what, value, baseline, ratio, verdict(figure))
    return out


def document(run: Run, *, quick: bool, argv: list[str], started: dt.datetime) -> dict[str, Any]:
    durability = str(run.durability)
    return {
        "date": started.isoformat(timespec="seconds"),
        "command": "python -m benchmarks " + " ".join(argv),
        "quick": quick,
        "sizes": run.sizes.__dict__,
        "machine": run.machine,
        "durability": run.durability_settings,
        "runs": run.runs,
        "targets_note": "issue 10 item 2: medians of 3 runs on a 2-core machine; "
        + (f"this file: medians of {run.runs} runs" if run.runs > 1 else "this file is one run"),
        "scenarios": {name: _scenario(name, r, durability) for name, r in run.results.items()},
    }


def _scenario(name: str, results: Results, durability: str) -> dict[str, Any]:
    return {
        "description": describe(name),
        "seconds": round(results.seconds, 1),
        "params": results.params,
        "params_runs": results.params_runs,
        "notes": results.notes,
        "error": results.error,
        "serve_peak_rss_bytes": results.serve_peak_rss_bytes,
        "figures": [f.as_dict(durability) for f in results.figures],
    }


def write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def markdown(data: dict[str, Any]) -> str:
    """A results file as the README's table (``python -m benchmarks --markdown FILE``)."""
    lines = [
        "| scenario | figure | value | baseline (same run) | ratio | target (issue 10) |",
        "|---|---|---|---|---|---|",
    ]
    for name, scenario in data["scenarios"].items():
        if scenario["error"]:
            lines.append(f"| {name} | failed: {scenario['error']} | | | | |")
        for f in scenario["figures"]:
            baseline = "" if f["baseline_what"] is None else f"{f['baseline_what']}: {number(f['baseline'], f['unit'])}"
            verdicts = "; ".join(
                f"{v['target']}: "
                + ("?" if v["met"] is None else "met" if v["met"] else f"**missed, x{v['shortfall']}**")
                for v in f["targets"]
            )
            ratio = "" if f["ratio"] is None else f"{f['ratio']:.3f}"
            value = value_text(f["value"], f.get("runs", []), f["unit"])  # files before --runs have no runs
            cells = [name, f["what"], value, baseline, ratio, verdicts]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def show(run: Run, title: str) -> None:
    console = Console(width=200)
    console.print(table(run, title))
    for name, results in run.results.items():
        for note in results.notes:
            console.print(f"[dim]{name}: {note}[/dim]")
