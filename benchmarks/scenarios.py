"""The scenarios of issue 10, each beside its baseline measured in the same run.

Each takes the run and fills its ``Results``. Every one but growth, replay and retention starts
its own Redis, PostgreSQL and ``ledger serve``; those three share one stack whose log was filled
once (``ensure_filled``), because filling 1,000,000 events is most of their time; with
``--runs N`` the others start fresh servers for each run, those three repeat only their
measurements on the one filled log.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from benchmarks import figures as targets
from benchmarks import keyspace
from benchmarks.client import (
    LIFECYCLE,
    PAPER_EXCHANGE,
    PAPER_SYMBOL,
    PRICE,
    QUANTITY,
    SYMBOL,
    Client,
    Lifecycles,
    place,
    place_paper,
    quantile,
    users,
)
from benchmarks.figures import Figure
from benchmarks.run import WARMUP_PAIRS, Accounted, Filled, Profiler, Results, Run, serving
from benchmarks.stack import BenchError, Stack, cpu_seconds
from ledger.store.keys import marks, order_key

Scenario = Callable[[Run, Results], Awaitable[None]]
QUANTILES = ((50.0, "p50"), (99.0, "p99"), (99.9, "p99.9"))
XRANGE_PAGE = 10_000
RETENTION_WAIT_S = 300.0  # for the first passes to trim the filled log (the measurement goes on after)
SETTLE_WAIT_S = 300.0  # for PostgreSQL's vacuum and analyze of what the fill or a catch-up left
# The user tables autovacuum would vacuum or analyze now, by the server's own thresholds
# (PostgreSQL's autovacuum.c: threshold + scale factor x reltuples; never analyzed counts as 0).
_AUTOVACUUM_DUE = """
select s.relname from pg_stat_user_tables s join pg_class c on c.oid = s.relid
where s.n_dead_tup > current_setting('autovacuum_vacuum_threshold')::float8
        + current_setting('autovacuum_vacuum_scale_factor')::float8 * greatest(c.reltuples, 0)
   or s.n_ins_since_vacuum > current_setting('autovacuum_vacuum_insert_threshold')::float8
        + current_setting('autovacuum_vacuum_insert_scale_factor')::float8 * greatest(c.reltuples, 0)
   or s.n_mod_since_analyze > current_setting('autovacuum_analyze_threshold')::float8
        + current_setting('autovacuum_analyze_scale_factor')::float8 * greatest(c.reltuples, 0)
order by 1
"""
_AUTOVACUUM_RUNNING = "select query from pg_stat_activity where backend_type = 'autovacuum worker' order by 1"
PROJECTOR_TABLES = ("positions", "orders", "fills", "ledger_events")


# --------------------------------------------------------------------------- raw


async def raw(run: Run, res: Results) -> None:
    """The client's ceiling (redis-py pipelined XADD) and the server's (redis-benchmark)."""
    pairs = run.sizes.pairs
    with run.stack("raw") as stack:
        client = run.client(stack)
        await client.xadd_rate(WARMUP_XADD)
        rate = await client.xadd_rate(pairs)
        server = _redis_benchmark(stack, run.sizes.redis_benchmark_requests, res)
        await client.redis.aclose()
    res.params.update(commands=2 * pairs, redis_benchmark_requests=run.sizes.redis_benchmark_requests)
    res.figures.append(
        Figure(
            "raw.xadd_pipelined",
            f"redis-py pipelined XADD of {2 * pairs:,} place/fill payloads (client ceiling)",
            rate,
            "commands/s",
            True,
            baseline=server,
            baseline_what="redis-benchmark XADD (server ceiling)",
        )
    )
    if server is not None:
        res.figures.append(
            Figure("raw.redis_benchmark", "redis-benchmark XADD, 50 clients, pipeline 16", server, "commands/s", True)
        )


WARMUP_XADD = 200


def _redis_benchmark(stack: Stack, requests: int, res: Results) -> float | None:
    binary = shutil.which("redis-benchmark")
    if binary is None:
        res.notes.append("redis-benchmark not found (Debian package redis-tools): the server ceiling is skipped")
        return None
    payload = place("bench-u0", "rb-0")
    argv = [binary, "-h", "127.0.0.1", "-p", str(stack.redis.port), "-n", str(requests), "-c", "50",
            "-P", "16", "--csv", "XADD", "bench:redis-benchmark", "*", "type", payload["type"],
            "data", payload["data"]]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith('"XADD')]
    if done.returncode != 0 or not lines:
        res.notes.append(f"redis-benchmark failed (status {done.returncode}): {done.stderr.strip()[:200]}")
        return None
    # "test","rps",... where the test names the command with its arguments, quotes included.
    return float(lines[-1].rsplit(",", 7)[1].strip('"'))


# --------------------------------------------------------------------------- end to end


def _e2e_figures(key: str, what: str, run_: Lifecycles, raw_rate: float) -> list[Figure]:
    live = Figure(
        f"{key}.live",
        f"{what}: every reply, every fill in the live keys",
        run_.rate(run_.live_s),
        "commands/s",
        True,
        baseline=raw_rate,
        baseline_what="redis-py pipelined XADD, same payloads",
        targets=[targets.E2E_RATE, targets.E2E_VS_RAW],
        note=f"replies alone: {run_.rate(run_.replies_s):,.0f} commands/s",
    )
    history = Figure(
        f"{key}.history",
        f"{what}: ... and the PostgreSQL archive caught up",
        run_.rate(run_.history_s),
        "commands/s",
        True,
        baseline=raw_rate,
        baseline_what="redis-py pipelined XADD, same payloads",
        targets=[targets.E2E_RATE, targets.E2E_VS_RAW],
    )
    return [live, history]


async def e2e(run: Run, res: Results) -> None:
    """N place_order + record_fill pairs from a pipelined client until every reply is there and
    the live projection shows every fill, and until the PostgreSQL archive caught up; beside it,
    the same pairs answered by the echo consumer on servers of its own (the floor of the command
    and reply protocol), and in both runs the CPU spent per command by Redis, the consumer
    (``serve`` or the echo), PostgreSQL and the client."""
    pairs = run.sizes.pairs
    with run.stack("e2e") as stack:
        client = run.client(stack)
        await serving(stack, client)
        raw_rate = await client.xadd_rate(pairs)
        with Profiler(run, stack, "e2e"):
            async with CpuAccount(client.redis, _trees(stack, stack.serve_pid())) as ledger_cpu:
                measured = await client.lifecycles(pairs, run="e2e")
        res.serve_peak_rss_bytes = stack.serve_rss()
        await client.redis.aclose()
    with run.stack("e2e-echo") as stack:
        client = run.client(stack)
        echo = _echo(stack)
        try:
            await client.lifecycles(WARMUP_PAIRS, run="echo-warm", live=False, history=False)
            async with CpuAccount(client.redis, _trees(stack, echo.pid)) as echo_cpu:
                floor = await client.lifecycles(pairs, run="echo", live=False, history=False)
        finally:
            await _without_echo(client, echo)
            await client.redis.aclose()
    res.params.update(pairs=pairs, commands=measured.commands, window=250, workers=4, users=64)
    res.figures += _e2e_figures("e2e", f"{pairs:,} place_order + record_fill pairs, pipelined", measured, raw_rate)
    per_command = {"ledger": ledger_cpu.per_command(measured.commands), "echo": echo_cpu.per_command(floor.commands)}
    res.params["cpu_us_per_command"] = per_command
    res.figures.append(
        Figure(
            "e2e.echo_floor",
            "the same pairs answered by the echo consumer (no ledger): every reply",
            floor.rate(floor.replies_s),
            "commands/s",
            True,
            baseline=raw_rate,
            baseline_what="redis-py pipelined XADD, same payloads (e2e's stack)",
            note=(
                "CPU per command, Redis / consumer / PostgreSQL / client: echo {echo[redis]:.0f} / "
                "{echo[consumer]:.0f} / {echo[postgres]:.0f} / {echo[client]:.0f} us, ledger "
                "{ledger[redis]:.0f} / {ledger[consumer]:.0f} / {ledger[postgres]:.0f} / {ledger[client]:.0f} us"
            ).format(**per_command),
        )
    )


def _trees(stack: Stack, consumer_pid: int) -> dict[str, int]:
    """The process trees whose CPU an account reports: the consumer (``serve`` or the echo) and
    PostgreSQL's postmaster with its backends."""
    postgres = stack.postgres.pid
    if postgres is None:
        raise BenchError(f"{stack.name}: PostgreSQL is not running")
    return {"consumer": consumer_pid, "postgres": postgres}


class CpuAccount:
    """The CPU (user + system) spent while a block ran by Redis (``INFO cpu``: its main thread
    and its background fsync threads), by named process trees (``ledger serve`` or the echo
    consumer, and PostgreSQL) and by this process (the client); ``per_command`` in us."""

    def __init__(self, redis: Any, trees: dict[str, int]) -> None:
        self.redis = redis
        self.trees = trees
        self.spent: dict[str, float] = {}

    async def _now(self) -> dict[str, float]:
        info = await self.redis.info("cpu")
        now = {"redis": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]), "client": time.process_time()}
        return now | {name: cpu_seconds(pid) for name, pid in self.trees.items()}

    async def __aenter__(self) -> CpuAccount:
        self.spent = {name: -seconds for name, seconds in (await self._now()).items()}
        return self

    async def __aexit__(self, *exc: object) -> None:
        for name, seconds in (await self._now()).items():
            self.spent[name] += seconds

    def per_command(self, commands: int) -> dict[str, float]:
        return {name: seconds / commands * 1e6 for name, seconds in self.spent.items()}


# --------------------------------------------------------------------------- latency


@dataclass
class Paced:
    reply_ms: list[float] = field(default_factory=list)
    live_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.reply_ms) / self.seconds if self.seconds else float("nan")


class LiveWatcher:
    """One task looks for every awaited live key with one pipeline of EXISTS per round (about
    every half millisecond), so fifty waiting clients cost one round trip, not fifty busy loops
    competing with ``serve`` for the two cores. Resolution: a round, about 1 ms."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.waiting: dict[str, asyncio.Future[float]] = {}

    async def seen(self, key: str) -> float:
        """The ``perf_counter`` time at which ``key`` was first seen to exist."""
        future = self.waiting[key] = asyncio.get_running_loop().create_future()
        return await future

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            keys = list(self.waiting)
            if keys:
                pipe = self.redis.pipeline(transaction=False)
                for key in keys:
                    pipe.exists(key)
                found = await pipe.execute()
                now = time.perf_counter()
                for key, exists in zip(keys, found, strict=True):
                    if exists:
                        self.waiting.pop(key).set_result(now)
            await asyncio.sleep(WATCH_PAUSE_S)


WATCH_PAUSE_S = 0.0005


async def paced(client: Client, *, rate: int, seconds: float, clients: int, live: bool, run: str) -> Paced:
    """Open-loop schedule, closed-loop clients: command i is due at start + i / rate; each of
    ``clients`` takes the next command, waits until it is due, publishes it, waits for its reply
    (and, ``live``, for its order hash in the live keys). Latency counts from when the command
    was DUE, so a client held up by a slow reply does not hide the wait of the commands queued
    behind it (no coordinated omission)."""
    total = int(rate * seconds)
    people = users(clients, prefix="lat")
    result = Paced()
    state = {"next": 0}
    watcher, stop = LiveWatcher(client.redis), asyncio.Event()
    started = time.perf_counter() + 0.05

    async def closed_loop() -> None:
        while state["next"] < total:
            i = state["next"]
            state["next"] = i + 1
            due = started + i / rate
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            user, cid = people[i % len(people)], f"{run}-{i}"
            await client.redis.xadd(client.keys.commands, place(user, cid))
            reply = await client.reply(client.reply_key(user, cid))
            result.reply_ms.append((time.perf_counter() - due) * 1000)
            if live:
                result.live_ms.append((await watcher.seen(order_key(reply["order_id"])) - due) * 1000)

    watching = asyncio.create_task(watcher.run(stop))
    await asyncio.gather(*(closed_loop() for _ in range(clients)))
    result.seconds = time.perf_counter() - started
    stop.set()
    await watching
    return result


def _echo(stack: Stack) -> subprocess.Popen[bytes]:
    """The echo consumer (``benchmarks.echo``) as a process of its own, as ``serve`` is."""
    with open(stack.workdir / "echo.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "benchmarks.echo", stack.redis.url],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def _without_echo(client: Client, echo: subprocess.Popen[bytes]) -> None:
    echo.terminate()
    echo.wait(timeout=30)
    await client.redis.delete(client.keys.commands)


async def latency(run: Run, res: Results) -> None:
    """Paced load: command -> reply and command -> live key visible, beside the echo floor. The
    replies are timed without the live-key watcher, as the echo's are (its polling round trips
    share the two cores and the server with what it measures), the live keys in a second paced
    run of their own."""
    sizes = run.sizes
    with run.stack("latency") as stack:
        client = run.client(stack)
        echo = _echo(stack)
        try:
            await paced(client, rate=sizes.rate, seconds=0.2, clients=sizes.clients, live=False, run="echo-warm")
            floor = await paced(
                client, rate=sizes.rate, seconds=sizes.latency_s, clients=sizes.clients, live=False, run="echo"
            )
        finally:
            await _without_echo(client, echo)
        await serving(stack, client)
        await paced(client, rate=sizes.rate, seconds=0.2, clients=sizes.clients, live=True, run="warm")
        ledger = await paced(
            client, rate=sizes.rate, seconds=sizes.latency_s, clients=sizes.clients, live=False, run="ledger"
        )
        watched = await paced(
            client, rate=sizes.rate, seconds=sizes.latency_s, clients=sizes.clients, live=True, run="watched"
        )
        res.serve_peak_rss_bytes = stack.serve_rss()
        await client.redis.aclose()
    res.params.update(rate=sizes.rate, seconds=sizes.latency_s, clients=sizes.clients, command="place_order")
    res.notes.append(
        f"achieved: echo {floor.rate:,.0f} commands/s, ledger {ledger.rate:,.0f} commands/s "
        f"({watched.rate:,.0f} with the live keys watched)"
    )
    for q, name in QUANTILES:
        echo_q = quantile(floor.reply_ms, q / 100)
        res.figures.append(
            Figure(
                f"latency.reply_{name}",
                f"command -> reply {name} at {sizes.rate:,}/s",
                quantile(ledger.reply_ms, q / 100),
                "ms",
                False,
                baseline=echo_q,
                baseline_what=f"echo consumer {name}",
                targets={"p50": [targets.REPLY_P50], "p99": [targets.REPLY_P99]}.get(name, []),
            )
        )
    for q, name in QUANTILES:
        res.figures.append(
            Figure(
                f"latency.live_{name}",
                f"command -> live key visible {name}",
                quantile(watched.live_ms, q / 100),
                "ms",
                False,
                baseline=quantile(floor.reply_ms, q / 100),
                baseline_what=f"echo consumer {name} (reply)",
            )
        )


# --------------------------------------------------------------------------- API


async def api(run: Run, res: Results) -> None:
    """``OrderManager.create_order`` and ``PositionManager.open_position`` one at a time
    (reply + read-your-writes; the paper venue fills the position's entry order), beside one
    command's round trip through the echo consumer, one at a time."""
    from ledger import OrderManager, PositionManager

    sizes = run.sizes
    with run.stack("api") as stack:
        client = run.client(stack)
        echo = _echo(stack)
        try:
            await _round_trips(client, 20, "echo-warm")
            floor = await _round_trips(client, sizes.api_orders, "echo")
        finally:
            await _without_echo(client, echo)
        await serving(stack, client)
        await client.redis.hset(marks(PAPER_EXCHANGE), PAPER_SYMBOL, PRICE)
        orders, positions = OrderManager(client.redis), PositionManager(client.redis)

        async def create() -> None:
            await orders.create_order("bench-api", "okx", SYMBOL, "buy", "limit", Decimal(QUANTITY), Decimal(PRICE))

        async def open_() -> None:
            await positions.open_position("bench-api", PAPER_EXCHANGE, PAPER_SYMBOL, "long", Decimal(QUANTITY), 1)

        await _timed(create, 20)
        created = await _timed(create, sizes.api_orders)
        await _timed(open_, 5)
        opened = await _timed(open_, sizes.api_positions)
        res.serve_peak_rss_bytes = stack.serve_rss()
        await client.redis.aclose()
    res.params.update(create_order=sizes.api_orders, open_position=sizes.api_positions)
    for label, samples, target in (("create_order", created, targets.API_P50), ("open_position", opened, None)):
        for q, name in QUANTILES[:2]:
            res.figures.append(
                Figure(
                    f"api.{label}_{name}",
                    f"{label} one at a time, {name}",
                    quantile(samples, q / 100),
                    "ms",
                    False,
                    baseline=quantile(floor, q / 100),
                    baseline_what=f"echo round trip {name}",
                    targets=[target] if target is not None and name == "p50" else [],
                )
            )


async def _round_trips(client: Client, count: int, run: str) -> list[float]:
    samples = []
    for i in range(count):
        user, cid = "bench-api", f"{run}-{i}"
        started = time.perf_counter()
        await client.redis.xadd(client.keys.commands, place(user, cid))
        await client.reply(client.reply_key(user, cid))
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def _timed(call: Callable[[], Awaitable[None]], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


# --------------------------------------------------------------------------- growth, replay, retention


async def ensure_filled(run: Run) -> Filled:
    """The shared stack of growth, replay and retention: its log filled to ``log_events`` events
    through ``serve`` itself (pipelined pairs: every event valid, chained, projected and
    archived, as in production), once."""
    if run.filled is not None:
        return run.filled
    stack = run.open("log")
    client = run.client(stack)
    await serving(stack, client)
    target = run.sizes.log_events
    commands, started, chunk = 0, time.perf_counter(), 0
    while (length := int(await client.redis.xlen(client.keys.events))) < target:
        per_command = length / max(1, commands + 2 * WARMUP_PAIRS)
        pairs = max(500, min(50_000, math.ceil((target - length) / per_command / 2)))
        done = await client.lifecycles(pairs, run=f"fill{chunk}", window=500, history=False)
        commands, chunk = commands + done.commands, chunk + 1
        stack.check_serve()
    last = await client.last_event()
    if last is not None:
        await client.wait_archived(last)
    run.filled = Filled(stack, length, commands / (time.perf_counter() - started))
    await client.redis.aclose()
    return run.filled


async def _empty_log(run: Run, name: str) -> Accounted:
    """The baseline of growth and retention: the same end-to-end run on a fresh stack (an empty
    log), measured just before the run it is the baseline of, so both see the machine alike: on
    a shared machine the same run's rate drifts by a fifth over minutes, more than the 10 % the
    targets allow (a baseline measured before the fill, minutes earlier, told the drift)."""
    with run.stack(name) as stack:
        client = run.client(stack)
        await serving(stack, client)
        done = await _accounted(client, stack, run.sizes.pairs, name)
        await client.redis.aclose()
    return done


async def growth(run: Run, res: Results) -> None:
    """End to end on an empty log, then with ``log_events`` events in the Redis log."""
    filled = await ensure_filled(run)
    client = run.client(filled.stack)
    empty = await _empty_log(run, "growth-empty")
    full = await _accounted(client, filled.stack, run.sizes.pairs, f"full{run.repeat}")
    res.serve_peak_rss_bytes = filled.stack.serve_rss()
    await client.redis.aclose()
    _growth_figures(res, "growth", f"with {filled.events:,} events in the Redis log", full, empty)
    res.params.update(pairs=run.sizes.pairs, log_events=filled.events)
    if run.repeat == 0:
        res.notes.append(
            f"log filled once through serve with pipelined place_order + record_fill pairs at "
            f"{filled.fill_rate:,.0f} commands/s (replies, live keys and archive caught up)"
        )


async def _accounted(client: Client, stack: Stack, pairs: int, name: str) -> Accounted:
    """An end-to-end run of ``pairs`` on ``stack`` once PostgreSQL has settled (every run of
    growth and retention and their empty-log baselines alike: a run does not pay for the
    autovacuum the one before it, or the fill, or retention's catch-up left due)."""
    settled = await _postgres_settled(stack)
    async with CpuAccount(client.redis, _trees(stack, stack.serve_pid())) as cpu:
        done = await client.lifecycles(pairs, run=name)
    return Accounted(done, cpu.per_command(done.commands), settled)


def _growth_figures(res: Results, key: str, what: str, measured_run: Accounted, empty_run: Accounted) -> None:
    """Growth's and retention's figures, a measured run beside its empty-log run, with what
    each cost per command (``params.cpu_us_per_command``) and how PostgreSQL settled before each."""
    measured, empty = measured_run.done, empty_run.done
    res.params["cpu_us_per_command"] = {"measured": measured_run.cpu, "empty log": empty_run.cpu}
    res.notes.append(f"before the empty-log run: {empty_run.settled}; before this run: {measured_run.settled}")
    for kind, seconds, empty_seconds in (
        ("live", measured.live_s, empty.live_s),
        ("history", measured.history_s, empty.history_s),
    ):
        res.figures.append(
            Figure(
                f"{key}.{kind}",
                f"end to end ({kind}) {what}",
                measured.rate(seconds),
                "commands/s",
                True,
                baseline=empty.rate(empty_seconds),
                baseline_what=f"same, empty log ({kind})",
                targets=[targets.GROWTH],
            )
        )


async def replay(run: Run, res: Results) -> None:
    """``ledger replay`` and ``ledger verify`` over the filled log, beside reading it raw."""
    filled = await ensure_filled(run)
    stack = filled.stack
    client = run.client(stack)
    events, read_s = await _read_log(client)
    await client.redis.aclose()
    replay_s, replayed = stack.ledger("replay", "--json")
    verify_s, verified = stack.ledger("verify")
    res.serve_peak_rss_bytes = stack.serve_rss()
    res.params.update(events=events)
    for name, done in (("replay", replayed), ("verify", verified)):
        if done.returncode != 0:
            res.notes.append(f"ledger {name} exited {done.returncode}: {done.stderr.decode(errors='replace')[-300:]}")
    baseline = events / read_s
    res.figures.append(
        Figure(
            "replay.replay",
            f"ledger replay of {events:,} events",
            events / replay_s,
            "events/s",
            True,
            baseline=baseline,
            baseline_what="XRANGE + JSON decode of the same log",
            targets=[targets.REPLAY_RATE],
        )
    )
    res.figures.append(
        Figure(
            "replay.verify",
            f"ledger verify of {events:,} events (live keys and PostgreSQL compared)",
            events / verify_s,
            "events/s",
            True,
            baseline=baseline,
            baseline_what="XRANGE + JSON decode of the same log",
        )
    )


async def _read_log(client: Client) -> tuple[int, float]:
    """Every event of shard 0 read with XRANGE and its data decoded: (events, seconds)."""
    import json

    count, after = 0, "-"
    started = time.perf_counter()
    while True:
        page = await client.redis.xrange(client.keys.events, min=after, max="+", count=XRANGE_PAGE)
        for _entry_id, fields in page:
            json.loads(fields["data"])
        count += len(page)
        if len(page) < XRANGE_PAGE:
            return count, time.perf_counter() - started
        after = f"({page[-1][0]}"


async def retention(run: Run, res: Results) -> None:
    """``serve`` restarted on the filled log with retention on (``LEDGER_RETENTION_MS``, role
    ``retention``): time to trim and compact what is archived, then end to end while it keeps
    trimming and compacting. Each run starts once retention has caught up with what is there (the
    filled log; the run before): what it measures is retention keeping up with the load, not
    the one-off catch-up of a log that grew without it (noted apart)."""
    filled = await ensure_filled(run)
    stack = filled.stack
    client = run.client(stack)
    if filled.retained_from is None:
        filled.retained_from = int(await client.redis.xlen(client.keys.events))
        stack.stop_serve()
        started = time.perf_counter()
        await serving(stack, client, LEDGER_RETENTION_MS="1000", LEDGER_TRIM_INTERVAL_S="1")
        caught_up = await _retention_caught_up(client, stack)
        res.notes.append(
            f"retention caught up with the filled log in {time.perf_counter() - started:.1f} s "
            f"(serve restart included): {caught_up}"
        )
    else:
        await _retention_caught_up(client, stack)
    empty = await _empty_log(run, "retention-empty")
    measured = await _accounted(client, stack, run.sizes.pairs, f"retained{run.repeat}")
    res.serve_peak_rss_bytes = stack.serve_rss()
    after = int(await client.redis.xlen(client.keys.events))
    await client.redis.aclose()
    if run.repeat == run.runs - 1:  # the filled log is trimmed now: a later scenario fills a new one
        run.close(stack)
        run.filled = None
    res.params.update(retention_ms=1000, trim_interval_s=1, events_before=filled.retained_from, events_after=after)
    what = "with retention on, after the filled log was trimmed"
    _growth_figures(res, "retention", what, measured, empty)


async def _retention_caught_up(client: Client, stack: Stack) -> str:
    """Until retention has trimmed the events and compacted the outcomes and order snapshots
    Redis holds now to a tenth (what is younger than the retention stays); what it did, as a note."""
    before = await _retained(client)
    deadline = time.perf_counter() + RETENTION_WAIT_S
    while True:
        now = await _retained(client)
        if all(now[name] <= before[name] // 10 for name in now) or time.perf_counter() > deadline:
            return ", ".join(f"{name} {before[name]:,} -> {now[name]:,}" for name in now)
        stack.check_serve()
        await asyncio.sleep(0.2)


async def _postgres_settled(stack: Stack) -> str:
    """Until no autovacuum worker runs and no table is due for one: the tables autovacuum has due
    (what the fill's or retention's catch-up's bulk inserts and deletes, or the run before, left
    it) are vacuumed and analyzed now, as autovacuum would (it waits up to a minute,
    ``autovacuum_naptime``, then works throttled), so that work is done before the measurement,
    not during it; what the measured load itself makes due is measured. What was done, as a note."""
    started = time.perf_counter()
    seen: set[str] = set()
    quiet = 0
    async with await psycopg.AsyncConnection.connect(stack.postgres.url, autocommit=True) as conn:
        while quiet < 2 and time.perf_counter() - started < SETTLE_WAIT_S:
            running = [row[0] for row in await (await conn.execute(_AUTOVACUUM_RUNNING)).fetchall()]
            due = [row[0] for row in await (await conn.execute(_AUTOVACUUM_DUE)).fetchall()]
            seen.update(running)
            seen.update(f"vacuumed {name}" for name in due)
            for name in due:
                await conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(name)))
            quiet = 0 if running or due else quiet + 1
            stack.check_serve()
            await asyncio.sleep(0.5)
    waited = time.perf_counter() - started
    state = "settled" if quiet >= 2 else "still busy at the deadline"
    return f"PostgreSQL {state} after {waited:.1f} s ({', '.join(sorted(seen)) or 'nothing due'})"


async def _retained(client: Client) -> dict[str, int]:
    keys, redis = client.keys, client.redis
    return {
        "events": int(await redis.xlen(keys.events)),
        "outcomes": int(await redis.hlen(keys.outcomes)),
        "order snapshots": int(await redis.hlen(keys.orders)),
    }


# --------------------------------------------------------------------------- PostgreSQL projector


async def projector(run: Run, res: Results) -> None:
    """PostgreSQL stopped, pairs published (replies and live keys go on), PostgreSQL started:
    time until the archive holds the last event, and rows written per second meanwhile."""
    pairs = run.sizes.projector_pairs
    with run.stack("projector") as stack:
        client = run.client(stack)
        await serving(stack, client)
        before = await _row_counts(stack.postgres.url)
        stack.postgres.stop()
        published = await client.lifecycles(pairs, run="outage", history=False)
        started = time.perf_counter()
        stack.postgres.start()
        reconnect_s = await _first_progress(stack.postgres.url, before["ledger_events"], started)
        await client.wait_archived(published.last_event_id)
        caught_up_s = time.perf_counter() - started
        after = await _row_counts(stack.postgres.url)
        rows = sum(after.values()) - sum(before.values())
        baseline = await asyncio.to_thread(_insert_rate, stack.postgres.url, rows)
        res.serve_peak_rss_bytes = stack.serve_rss()
        await client.redis.aclose()
    events = after["ledger_events"] - before["ledger_events"]
    res.params.update(pairs=pairs, rows=rows, events=events, rows_by_table={t: after[t] - before[t] for t in after})
    res.notes.append(
        f"catch-up of {events:,} events ({rows:,} rows) took {caught_up_s:.2f} s after PostgreSQL started; "
        f"the first row came after {reconnect_s:.2f} s (the projector's reconnect backoff, at most 5 s)"
    )
    res.figures.append(
        Figure(
            "projector.rows",
            "PostgreSQL projector catching up: rows written (positions, orders, fills, archive)",
            rows / max(1e-9, caught_up_s - reconnect_s),
            "rows/s",
            True,
            baseline=baseline,
            baseline_what="psycopg executemany of as many archive-like rows, 256 a transaction",
            targets=[targets.PROJECTOR_RATE],
        )
    )
    res.figures.append(
        Figure(
            "projector.catch_up",
            f"catch-up after an outage of {2 * pairs:,} commands ({events:,} events)",
            caught_up_s,
            "s",
            False,
            note=f"includes {reconnect_s:.2f} s until the projector reconnected",
        )
    )


async def _row_counts(url: str) -> dict[str, int]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        counts = {}
        for table in PROJECTOR_TABLES:
            cur = await conn.execute(f"SELECT count(*) FROM {table}")
            row = await cur.fetchone()
            counts[table] = 0 if row is None else int(row[0])
        return counts


async def _first_progress(url: str, archived: int, started: float) -> float:
    """Seconds from ``started`` until the archive holds more than ``archived`` events."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while True:
            cur = await conn.execute("SELECT count(*) FROM ledger_events")
            row = await cur.fetchone()
            if row is not None and int(row[0]) > archived:
                return time.perf_counter() - started
            await asyncio.sleep(0.01)


def _insert_rate(url: str, rows: int) -> float:
    """What PostgreSQL takes, same durability: ``rows`` rows of about an event's size (uuid,
    JSONB), 256 a transaction (the ledger's batch size) with executemany; rows/s."""
    data = '{"event_id": "%s", "stream": "%s", "version": 1, "user_id": "bench-u0", "symbol": "BTC-USDT-SWAP"}'
    batch = 256
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_rows")
        conn.execute("CREATE TABLE bench_rows (id UUID PRIMARY KEY, n BIGINT NOT NULL, data JSONB NOT NULL)")
        values = [(uuid.uuid4(), n) for n in range(max(rows, batch))]
        started = time.perf_counter()
        for first in range(0, len(values), batch):
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO bench_rows (id, n, data) VALUES (%s, %s, %s::jsonb)",
                    [(i, n, data % (i, i)) for i, n in values[first : first + batch]],
                )
        elapsed = time.perf_counter() - started
        conn.execute("DROP TABLE bench_rows")
    return len(values) / elapsed


# --------------------------------------------------------------------------- memory


async def memory(run: Run, res: Results) -> None:
    """Redis bytes per order lifecycle (external: place, accept, fill; paper: one market order
    the venue accepts and fills) while live, and after ``ledger trim`` (what retention runs)
    once every order is final and archived, with where the bytes are (``MEMORY USAGE`` per key
    class) and what of them stays for good; ``serve``'s peak RSS."""
    count = run.sizes.memory_lifecycles
    with run.stack("memory") as stack:
        client = run.client(stack)
        await serving(stack, client)
        await client.redis.hset(marks(PAPER_EXCHANGE), PAPER_SYMBOL, PRICE)
        measured: dict[str, tuple[float, float, float]] = {}
        classes: dict[str, dict[str, dict[str, float]]] = {}
        for label, steps in (("external", LIFECYCLE), ("paper", (place_paper,))):
            start, start_classes = await client.used_memory(), await keyspace.by_class(client.redis)
            await client.lifecycles(count, steps=steps, run=f"mem-{label}")
            live, live_classes = await client.used_memory(), await keyspace.by_class(client.redis)
            _, trimmed = stack.ledger("trim", "--reason", "benchmark")
            if trimmed.returncode != 0:
                res.notes.append(f"ledger trim exited {trimmed.returncode}: {trimmed.stderr.decode()[-300:]}")
            archived, archived_classes = await client.used_memory(), await keyspace.by_class(client.redis)
            classes[label] = {
                "live": keyspace.per_lifecycle(start_classes, live_classes, count),
                "archived": keyspace.per_lifecycle(start_classes, archived_classes, count),
            }
            kept = sum(v for name, v in classes[label]["archived"].items() if name in keyspace.KEPT)
            measured[label] = ((live - start) / count, (archived - start) / count, kept)
        res.serve_peak_rss_bytes = stack.serve_rss()
        await client.redis.aclose()
    res.params.update(
        lifecycles=count,
        measure="INFO memory used_memory, before and after; per key class MEMORY USAGE SAMPLES 0",
        bytes_per_lifecycle_by_key_class=classes,
        key_class_stays=keyspace.STAYS,
    )
    res.notes.append(
        "after = after `ledger trim` (what the retention role runs), with every order final and archived; "
        "final order hashes stay in the live keys for 7 days (CONTRACT §6) and reply lists for "
        "LEDGER_REPLY_TTL_S, and are counted; kept = the key classes that stay for good (the archived indexes)"
    )
    for label, (per_live, per_archived, kept) in measured.items():
        what = "place, accept, fill" if label == "external" else "paper market order: place, accepted + filled"
        res.figures.append(
            Figure(f"memory.{label}_live", f"Redis per lifecycle while live ({what})", per_live, "bytes", False,
                   targets=[targets.MEMORY_LIVE])
        )  # fmt: skip
        res.figures.append(
            Figure(f"memory.{label}_archived", f"Redis per lifecycle, final, archived, trimmed ({label})",
                   per_archived, "bytes", False, targets=[targets.MEMORY_ARCHIVED])
        )  # fmt: skip
        res.figures.append(
            Figure(f"memory.{label}_kept", f"of which kept for good: the archived indexes ({label}, MEMORY USAGE)",
                   kept, "bytes", False, targets=[targets.MEMORY_ARCHIVED])
        )  # fmt: skip


def serve_rss_figure(results: dict[str, Results]) -> Figure | None:
    """``serve``'s peak RSS: the highest of every scenario of the run."""
    peaks = {name: r.serve_peak_rss_bytes for name, r in results.items() if r.serve_peak_rss_bytes}
    if not peaks:
        return None
    name = max(peaks, key=lambda n: peaks[n])
    listed = ", ".join(f"{n} {b / 1e6:.0f}" for n, b in peaks.items())
    return Figure(
        "memory.serve_peak_rss",
        f"ledger serve peak RSS (highest: {name})",
        peaks[name] / 1e6,
        "MB",
        False,
        targets=[targets.SERVE_RSS],
        note=f"per scenario (MB): {listed}",
    )


# --------------------------------------------------------------------------- peer


async def peer(run: Run, res: Results) -> None:
    """The same place + fill pairs through the eventsourcing library (PostgreSQL recorder, 4
    threads) beside the ledger's pairs until archived, on the same PostgreSQL server."""
    # Imported here: the peer needs the optional `bench` dependencies (eventsourcing), which
    # `make test` does not install; the rest of the suite (its parser, figures, report) does not.
    from benchmarks.peer import peer_fills_per_s

    pairs = run.sizes.peer_pairs
    with run.stack("peer") as stack:
        client = run.client(stack)
        await serving(stack, client)
        ledger = await client.lifecycles(pairs, run="peer")
        res.serve_peak_rss_bytes = stack.serve_rss()
        stack.stop_serve()
        await client.redis.aclose()
        library = await asyncio.to_thread(
            peer_fills_per_s, stack.postgres.url, "127.0.0.1", stack.postgres.port, pairs, 4
        )
    res.params.update(pairs=pairs, library_threads=4)
    fills = pairs / ledger.history_s if ledger.history_s else float("nan")
    res.figures.append(
        Figure(
            "peer.fills",
            f"ledger: {pairs:,} place + fill pairs until archived in PostgreSQL",
            fills,
            "fills/s",
            True,
            baseline=library,
            baseline_what="eventsourcing (PostgreSQL recorder), same pairs",
        )
    )


SCENARIOS: dict[str, Scenario] = {
    "raw": raw,
    "e2e": e2e,
    "latency": latency,
    "api": api,
    "projector": projector,
    "memory": memory,
    "peer": peer,
    "growth": growth,
    "replay": replay,
    "retention": retention,
}


def describe(name: str) -> str:
    doc = SCENARIOS[name].__doc__ or ""
    return " ".join(doc.split())
