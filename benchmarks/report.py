"""The table (rich) and ``benchmarks/results/*.json``: every figure beside its baseline and its
targets, the machine and the durability settings in force."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.figures import Figure
from benchmarks.run import Results, Run
from benchmarks.scenarios import describe


def number(value: float | None, unit: str = "") -> str:
    if value is None or math.isnan(value):
        return "-"
    if unit == "ms":
        text = f"{value:.2f}"
    elif abs(value) >= 100:
        text = f"{value:,.0f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


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
            out.add_row(name, what, number(figure.value, figure.unit), baseline, ratio, verdict(figure))
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
        "targets_note": "issue 10 item 2: medians of 3 runs on a 2-core machine; this file is one run",
        "scenarios": {name: _scenario(name, r, durability) for name, r in run.results.items()},
    }


def _scenario(name: str, results: Results, durability: str) -> dict[str, Any]:
    return {
        "description": describe(name),
        "seconds": round(results.seconds, 1),
        "params": results.params,
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
            cells = [name, f["what"], number(f["value"], f["unit"]), baseline, ratio, verdicts]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def show(run: Run, title: str) -> None:
    console = Console(width=200)
    console.print(table(run, title))
    for name, results in run.results.items():
        for note in results.notes:
            console.print(f"[dim]{name}: {note}[/dim]")
