"""``python -m benchmarks``: run the scenarios, print the table, write the results file.

    python -m benchmarks                      # everything, full sizes (make bench)
    python -m benchmarks --quick              # everything, small sizes, under a minute (make bench-quick)
    python -m benchmarks --only e2e,latency   # some scenarios
    python -m benchmarks --runs 3             # each scenario three times, medians (make bench)
    python -m benchmarks --list               # the scenarios and what each measures

A full run of every scenario writes ``benchmarks/results/latest.json`` (commit it with each
performance change: the README's table comes from it); ``--quick`` writes ``latest-quick.json``
and a run of some scenarios ``latest-partial.json`` (``--output`` chooses another file).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks.report import document, markdown, show, write
from benchmarks.run import FULL, QUICK, Results, Run, by_run, combine_runs
from benchmarks.scenarios import SCENARIOS, describe, serve_rss_figure
from benchmarks.stack import BenchError
from ledger.app.servers import ServerError
from ledger.config import DEFAULT_DURABILITY, Durability

RESULTS = Path(__file__).resolve().parent / "results"


def _names(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown scenario {unknown[0]!r}: use {', '.join(SCENARIOS)}")
    return names


def _runs(value: str) -> int:
    if not value.isdecimal() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"runs must be a whole number of at least 1, not {value!r}: use --runs 3")
    return int(value)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: the whole suite in about a minute")
    p.add_argument("--only", type=_names, help="comma-separated scenarios (default: all)")
    p.add_argument("--skip", type=_names, default=[], help="comma-separated scenarios to leave out")
    p.add_argument(
        "--runs",
        type=_runs,
        default=1,
        help="runs of each scenario, each figure the median of its runs (default 1; make bench: 3)",
    )
    p.add_argument("--events", type=int, help="events in the Redis log for growth, replay and retention")
    p.add_argument(
        "--durability",
        type=Durability,
        default=DEFAULT_DURABILITY,
        help=f"durability of the servers (default: the ledger's, {DEFAULT_DURABILITY})",
    )
    p.add_argument("--profile", action="store_true", help="py-spy profile of serve under the e2e load")
    p.add_argument("--output", type=Path, help="results file (default: benchmarks/results/latest*.json)")
    p.add_argument("--keep", action="store_true", help="keep the servers' directories (their logs) under /tmp")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--markdown", type=Path, metavar="FILE", help="print a results file as a Markdown table and exit")
    return p


async def _run(run: Run, names: list[str]) -> None:
    """Each scenario ``run.runs`` times, then its runs combined; a scenario stops repeating at
    its first failed run (a failure is a bug to read, not noise to take a median of)."""
    per_run: dict[str, list[Results]] = {}
    try:
        for name in names:
            print(f"-- {name}: {describe(name)}", flush=True)
            done = per_run[name] = []
            for repeat in range(run.runs):
                run.repeat = repeat
                results = Results()
                done.append(results)
                started = time.perf_counter()
                try:
                    await SCENARIOS[name](run, results)
                except (BenchError, ServerError, TimeoutError, RuntimeError, OSError) as exc:
                    results.error = str(exc).splitlines()[0]
                    traceback.print_exc()
                results.seconds = time.perf_counter() - started
                which = f" run {repeat + 1}/{run.runs}" if run.runs > 1 else ""
                print(f"   {name}{which} done in {results.seconds:.1f} s", flush=True)
                if results.error is not None:
                    break
            run.results[name] = combine_runs(done)
    finally:
        run.close_all()
    if "memory" in run.results and (rss := serve_rss_figure(run.results)) is not None:
        # the highest of every scenario and run; ``runs``: each run's highest over its scenarios
        rss.runs = [f.value for results in by_run(per_run) if (f := serve_rss_figure(results)) is not None]
        run.results["memory"].figures.append(rss)


def _terminated(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cli = parser()
    args = cli.parse_args(argv)
    if args.markdown is not None:
        if not args.markdown.is_file():
            cli.error(f"--markdown {args.markdown}: no such file; give a results file (benchmarks/results/latest.json)")
        print(markdown(json.loads(args.markdown.read_text())), end="")
        return 0
    if args.list:
        for name in SCENARIOS:
            print(f"{name:10} {describe(name)}")
        return 0
    names = [n for n in (args.only or list(SCENARIOS)) if n not in args.skip]
    sizes = QUICK if args.quick else FULL
    if args.events is not None:
        sizes = type(sizes)(**{**sizes.__dict__, "log_events": args.events})
    complete = args.only is None and not args.skip
    output = args.output or RESULTS / (
        "latest-quick.json" if args.quick else "latest.json" if complete else "latest-partial.json"
    )
    root = Path(tempfile.mkdtemp(prefix="ledger-bench-"))  # under /tmp: the postgres user can reach it
    run = Run(
        root=root,
        sizes=sizes,
        durability=args.durability,
        profile_dir=RESULTS if args.profile else None,
        runs=args.runs,
    )
    started = dt.datetime.now(dt.UTC)
    # SIGTERM (a timeout, a CI cancel) unwinds like Ctrl-C, so every server started is stopped.
    signal.signal(signal.SIGTERM, _terminated)
    try:
        asyncio.run(_run(run, names))
    finally:
        if args.keep:
            print(f"servers' directories kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    mode = "quick" if args.quick else "full"
    runs = f"; medians of {run.runs} runs" if run.runs > 1 else ""
    title = f"ledger benchmarks {started:%Y-%m-%d %H:%M} UTC ({mode}; durability {run.durability}{runs})"
    show(run, title)
    write(output, document(run, quick=args.quick, argv=argv, started=started))
    print(f"results: {output}")
    return 1 if any(r.error for r in run.results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
