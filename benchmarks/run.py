"""What a run of the suite shares: its sizes, its servers, its results."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.client import Client, Lifecycles, connect
from benchmarks.figures import Figure, combine, run_label
from benchmarks.stack import BenchError, Stack, durability_in_force, machine, open_stack, postgres_template
from ledger.config import Durability


@dataclass(frozen=True)
class Sizes:
    pairs: int  # place_order + record_fill pairs of an end-to-end run
    latency_s: float  # each paced load (the echo; the ledger; the ledger with its live keys watched)
    rate: int  # commands/s of the paced load
    clients: int  # closed-loop clients of the paced load
    api_orders: int  # create_order calls, one at a time
    api_positions: int  # open_position calls, one at a time
    log_events: int  # events in the Redis log for growth, replay and verify
    projector_pairs: int  # pairs published while PostgreSQL is down
    memory_lifecycles: int  # lifecycles (place, accept, fill) measured for memory
    peer_pairs: int  # place + fill through the eventsourcing library
    redis_benchmark_requests: int


FULL = Sizes(
    pairs=10_000,
    latency_s=30.0,
    rate=1_000,
    clients=50,
    api_orders=1_000,
    api_positions=200,
    log_events=1_000_000,
    projector_pairs=10_000,
    memory_lifecycles=5_000,
    peer_pairs=3_000,
    redis_benchmark_requests=200_000,
)
QUICK = Sizes(
    pairs=300,
    latency_s=1.0,
    rate=1_000,
    clients=50,
    api_orders=50,
    api_positions=10,
    log_events=3_000,
    projector_pairs=300,
    memory_lifecycles=200,
    peer_pairs=150,
    redis_benchmark_requests=50_000,
)
WARMUP_PAIRS = 50


@dataclass(frozen=True, slots=True)
class Accounted:
    """An end-to-end run, the CPU it cost per command (us) by process, and how PostgreSQL was
    brought to rest before it (a note)."""

    done: Lifecycles
    cpu: dict[str, float]
    settled: str


@dataclass
class Filled:
    """A stack whose Redis log holds ``Sizes.log_events`` events, filled once for every run of
    growth, replay and retention."""

    stack: Stack
    events: int
    fill_rate: float  # commands/s while filling, until the archive caught up
    retained_from: int | None = None  # events in the log when retention was turned on (once)


@dataclass
class Results:
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    serve_peak_rss_bytes: int = 0
    error: str | None = None
    params_runs: list[dict[str, Any]] = field(default_factory=list)  # each run's params (``combine_runs``)


def combine_runs(runs: list[Results]) -> Results:
    """A scenario's results from its runs, in run order: each figure combined (median of its
    runs, see ``figures.combine``) in the order the figures first appear; the notes and the
    errors of every run, prefixed "run k: " when there are several; the params of the first run
    (the sizes and settings, the same in every run) and every run's in ``params_runs`` (the
    measurements some scenarios keep in their params differ by run); the peak RSS the highest;
    the seconds their sum."""
    count = len(runs)
    keys = list(dict.fromkeys(f.key for r in runs for f in r.figures))
    by_key = [{f.key: f for f in r.figures} for r in runs]
    errors = [run_label(k, r.error, count) for k, r in enumerate(runs, start=1) if r.error is not None]
    return Results(
        figures=[combine([figures.get(key) for figures in by_key]) for key in keys],
        notes=[run_label(k, note, count) for k, r in enumerate(runs, start=1) for note in r.notes],
        params=runs[0].params if runs else {},
        seconds=sum(r.seconds for r in runs),
        serve_peak_rss_bytes=max((r.serve_peak_rss_bytes for r in runs), default=0),
        error="; ".join(errors) or None,
        params_runs=[r.params for r in runs],
    )


def by_run(per_run: dict[str, list[Results]]) -> list[dict[str, Results]]:
    """Run k's results of every scenario that got to a k-th run, for k = 1, 2, ..."""
    count = max((len(runs) for runs in per_run.values()), default=0)
    return [{name: runs[k] for name, runs in per_run.items() if len(runs) > k} for k in range(count)]


@dataclass
class Run:
    root: Path
    sizes: Sizes
    durability: Durability
    profile_dir: Path | None = None
    machine: dict[str, Any] = field(default_factory=dict)
    durability_settings: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Results] = field(default_factory=dict)
    filled: Filled | None = None
    stacks: list[Stack] = field(default_factory=list)
    pg_template: Path | None = None
    runs: int = 1  # each scenario runs this many times (``--runs``)
    repeat: int = 0  # the run under way, 0 to runs - 1

    @contextlib.contextmanager
    def stack(self, name: str) -> Iterator[Stack]:
        """A fresh Redis and PostgreSQL for one benchmark, closed afterwards (a fresh pair for
        each run of the scenario)."""
        stack = self.open(name)
        try:
            yield stack
        finally:
            self.close(stack)

    def open(self, name: str) -> Stack:
        if self.pg_template is None:
            self.pg_template = postgres_template(self.root)
        if self.runs > 1:
            name = f"{name}.run{self.repeat + 1}"  # its own directory, kept with --keep
        stack = open_stack(self.root, name, self.durability, self.pg_template)
        self.stacks.append(stack)
        if not self.machine:
            self.machine = machine(stack)
            self.durability_settings = durability_in_force(stack, self.durability)
        return stack

    def close(self, stack: Stack) -> None:
        stack.close()
        self.stacks.remove(stack)

    def close_all(self) -> None:
        for stack in list(self.stacks):
            self.close(stack)

    def client(self, stack: Stack) -> Client:
        return Client(connect(stack.redis.url), stack.postgres.url, stack.check_serve)


async def serving(stack: Stack, client: Client, **extra: str) -> None:
    """Start ``ledger serve`` and warm it up: a few pairs answered, projected and archived."""
    stack.start_serve(**extra)
    try:
        await client.lifecycles(WARMUP_PAIRS, run="warmup", user_count=8, window=50, workers=2)
    except (TimeoutError, RuntimeError) as exc:
        stack.check_serve()
        raise BenchError(f"{stack.name}: serve did not answer the warm-up ({exc}): read {stack.serve_log}") from exc


class Profiler:
    """``py-spy record`` of ``serve`` while a block runs (raw collapsed stacks), when asked."""

    def __init__(self, run: Run, stack: Stack, name: str) -> None:
        self.out = None if run.profile_dir is None else run.profile_dir / f"profile-{name}.txt"
        self.stack = stack
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Profiler:
        if self.out is not None and self.stack.serve is not None:
            spy = Path(sys.executable).parent / "py-spy"
            self.process = subprocess.Popen(
                [str(spy), "record", "--pid", str(self.stack.serve.pid), "--format", "raw", "--rate", "200",
                 "--output", str(self.out.with_suffix(".collapsed")), "--nonblocking", "--subprocesses"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.process is None or self.out is None:
            return
        self.process.send_signal(2)  # SIGINT: py-spy writes what it recorded and exits
        self.process.wait(timeout=60)
        collapsed = self.out.with_suffix(".collapsed")
        if collapsed.exists():
            from benchmarks.profile import summarize

            self.out.write_text(summarize(collapsed.read_text()))
