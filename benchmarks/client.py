"""A strategy's side of CONTRACT §2-§6, pipelined: commands XADDed to the command stream,
replies taken from their lists with BLPOP, the live keys and the PostgreSQL archive read to see
when the ledger is done. Nothing here imports the ledger's consumers: only its key builders."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis.asyncio as aioredis

from ledger.store.keys import ShardKeys, order_key, shard_of

SHARDS = 1  # the ledger's default: every benchmark runs one shard
EXCHANGE = "okx"  # executed externally: the benchmark reports the fills
PAPER_EXCHANGE = "binance"  # executed by the paper venue inside serve
SYMBOL = "BTC-USDT-SWAP"
PAPER_SYMBOL = "BTC/USDT:USDT"
PRICE = "100"
QUANTITY = "0.001"
REPLY_TIMEOUT_S = 120.0
REPLY_SLICE_S = 1  # BLPOP a second at a time, checking between slices that serve still runs
SOCKET_TIMEOUT_S = 30.0
POLL_S = 0.005

Fields = dict[str, str]
# A step of an order's lifecycle: (user, command id, order id or None) -> command entry fields.
Step = Callable[[str, str, str | None], Fields]


def connect(url: str) -> Any:
    """A ``redis.asyncio`` client (strings in and out; its own timeouts)."""
    return aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=SOCKET_TIMEOUT_S, max_connections=256)


def command(type_: str, data: dict[str, Any]) -> Fields:
    """One command entry: ``type`` and ``data`` (JSON), as any client would write it."""
    return {"type": type_, "data": json.dumps(data, separators=(",", ":"))}


def place(user: str, command_id: str, _order_id: str | None = None) -> Fields:
    return command(
        "place_order",
        {
            "command_id": command_id,
            "user_id": user,
            "exchange": EXCHANGE,
            "symbol": SYMBOL,
            "side": "buy",
            "order_type": "limit",
            "quantity": QUANTITY,
            "price": PRICE,
        },
    )


def place_paper(user: str, command_id: str, _order_id: str | None = None) -> Fields:
    """A market order the paper venue accepts and fills at once (at the mark)."""
    return command(
        "place_order",
        {
            "command_id": command_id,
            "user_id": user,
            "exchange": PAPER_EXCHANGE,
            "symbol": PAPER_SYMBOL,
            "side": "buy",
            "order_type": "market",
            "quantity": QUANTITY,
        },
    )


def accept(user: str, command_id: str, order_id: str | None) -> Fields:
    return command(
        "order_accepted",
        {"command_id": command_id, "user_id": user, "order_id": order_id, "exchange_order_id": f"x-{command_id}"},
    )


def fill(user: str, command_id: str, order_id: str | None) -> Fields:
    return command(
        "record_fill",
        {
            "command_id": command_id,
            "user_id": user,
            "order_id": order_id,
            "fill_id": f"f-{command_id}",
            "quantity": QUANTITY,
            "price": PRICE,
            "fee": "0.00005",
            "fee_currency": "USDT",
        },
    )


PAIR: tuple[Step, ...] = (place, fill)
LIFECYCLE: tuple[Step, ...] = (place, accept, fill)


def users(count: int, prefix: str = "bench") -> list[str]:
    return [f"{prefix}-u{n}" for n in range(count)]


def entry_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


def quantile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``samples`` by the nearest-rank rule."""
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    rank = min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))
    return ordered[rank]


@dataclass
class Lifecycles:
    """What one pipelined run of order lifecycles took."""

    commands: int
    replies_s: float  # every command answered
    live_s: float  # ... and the live projection shows every order filled
    history_s: float | None  # ... and the PostgreSQL archive holds the last event
    order_ids: list[str] = field(repr=False)
    last_event_id: str = ""

    def rate(self, seconds: float | None) -> float:
        return float("nan") if not seconds else self.commands / seconds


class Client:
    """A pipelined strategy on one ledger (one shard)."""

    def __init__(self, redis: Any, database_url: str | None = None, alive: Callable[[], None] = lambda: None) -> None:
        self.redis = redis
        self.database_url = database_url
        self.alive = alive  # raises when the ledger under test has died
        self.keys = ShardKeys(0)

    def reply_key(self, user: str, command_id: str) -> str:
        return ShardKeys(shard_of(user, SHARDS)).reply(user, command_id)

    async def lifecycles(
        self,
        count: int,
        *,
        steps: Sequence[Step] = PAIR,
        run: str | None = None,
        user_count: int = 64,
        window: int = 250,
        workers: int = 4,
        history: bool = True,
        live: bool = True,
    ) -> Lifecycles:
        """``count`` order lifecycles (each step a command), ``workers`` pipelines at a time of
        ``window`` orders each: XADD every first step, BLPOP every reply (the order ids), XADD
        every next step, ... Timed until every reply is there, until the live projection shows
        every order filled (``live``; without it, a consumer that only answers, such as the
        echo), and (``history``) until the archive holds the last event."""
        run = run or uuid.uuid4().hex[:8]
        people = users(user_count)
        order_ids: list[str] = [""] * count
        last: list[str] = ["0-0", ""]  # the last event appended, and its order
        queue = list(range(0, count, window))
        started = time.perf_counter()

        async def worker() -> None:
            while queue:
                first = queue.pop(0)
                chunk = range(first, min(first + window, count))
                for number, step in enumerate(steps):
                    pipe = self.redis.pipeline(transaction=False)
                    wanted = []
                    for i in chunk:
                        user, cid = people[i % len(people)], f"{run}-{i}-{number}"
                        pipe.xadd(self.keys.commands, step(user, cid, order_ids[i] or None))
                        wanted.append(self.reply_key(user, cid))
                    await pipe.execute()
                    for i, reply in zip(chunk, await self.replies(wanted), strict=True):
                        if number == 0:
                            order_ids[i] = reply["order_id"]
                        for event in reply["events"]:
                            if entry_order(event["id"]) > entry_order(last[0]):
                                last[:] = [event["id"], order_ids[i]]

        await asyncio.gather(*(worker() for _ in range(workers)))
        replies_s = time.perf_counter() - started
        if not live:
            return Lifecycles(count * len(steps), replies_s, replies_s, None, order_ids, last[0])
        await self.wait_filled([last[1]])  # the projection applies the log in order: the last one first
        await self.wait_filled(order_ids)
        live_s = time.perf_counter() - started
        # Every fill is in the log once the live keys show it (the paper venue's too).
        last_event = await self.last_event() or last[0]
        history_s = None
        if history:
            await self.wait_archived(last_event)
            history_s = time.perf_counter() - started
        return Lifecycles(count * len(steps), replies_s, live_s, history_s, order_ids, last_event)

    async def reply(self, key: str) -> dict[str, Any]:
        """Take one command's accepted reply from its list (BLPOP, a slice at a time)."""
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while (answer := await self.redis.blpop([key], timeout=REPLY_SLICE_S)) is None:
            self.alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reply on {key} within {REPLY_TIMEOUT_S:.0f} s: read the serve log")
        return accepted(answer)

    async def replies(self, keys: Sequence[str]) -> list[dict[str, Any]]:
        """The replies of commands published in this order: the last one waited for first (the
        ledger answers a shard's commands in stream order), then all the others in one pipeline."""
        last = await self.reply(keys[-1])
        pipe = self.redis.pipeline(transaction=False)
        for key in keys[:-1]:
            pipe.blpop([key], timeout=REPLY_SLICE_S)
        found = await pipe.execute()
        return [
            *[accepted(a) if a is not None else await self.reply(k) for k, a in zip(keys[:-1], found, strict=True)],
            last,
        ]

    async def wait_filled(self, order_ids: Sequence[str], timeout: float = 600.0) -> None:
        """Until every order's live hash (``orders:{id}``, CONTRACT §6) says ``filled``."""
        waiting = list(order_ids)
        deadline = time.monotonic() + timeout
        while waiting:
            pipe = self.redis.pipeline(transaction=False)
            for order_id in waiting:
                pipe.hget(order_key(order_id), "status")
            statuses = await pipe.execute()
            waiting = [o for o, s in zip(waiting, statuses, strict=True) if s != "filled"]
            if waiting:
                self.alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(waiting)} orders not filled in the live keys after {timeout:.0f} s")
                await asyncio.sleep(POLL_S)

    async def wait_archived(self, entry_id: str, timeout: float = 3600.0) -> None:
        """Until the PostgreSQL archive (``ledger_events``) holds the event ``entry_id``."""
        if self.database_url is None:
            raise ValueError("no database URL: the archive cannot be watched")
        target = entry_order(entry_id)
        deadline = time.monotonic() + timeout
        async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True) as conn:
            while True:
                last = await archived_up_to(conn)
                if last is not None and last >= target:
                    return
                self.alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the archive did not reach {entry_id} within {timeout:.0f} s")
                await asyncio.sleep(POLL_S * 2)

    async def last_event(self) -> str | None:
        found = await self.redis.xrevrange(self.keys.events, count=1)
        return str(found[0][0]) if found else None

    async def xadd_rate(
        self, count: int, *, steps: Sequence[Step] = PAIR, window: int = 250, workers: int = 4
    ) -> float:
        """The client's ceiling: the same command payloads (``count`` lifecycles), pipelined
        XADD only, same windows and workers, to a scratch stream; commands per second."""
        scratch = f"{self.keys.commands}:bench-raw"
        people = users(64)
        fake = str(uuid.uuid4())
        payloads = [
            step(people[i % len(people)], f"raw-{i}-{n}", fake) for i in range(count) for n, step in enumerate(steps)
        ]
        chunks = [payloads[i : i + window * len(steps)] for i in range(0, len(payloads), window * len(steps))]
        started = time.perf_counter()

        async def worker() -> None:
            while chunks:
                chunk = chunks.pop(0)
                pipe = self.redis.pipeline(transaction=False)
                for fields in chunk:
                    pipe.xadd(scratch, fields)
                await pipe.execute()

        await asyncio.gather(*(worker() for _ in range(workers)))
        elapsed = time.perf_counter() - started
        await self.redis.delete(scratch)
        return len(payloads) / elapsed

    async def used_memory(self) -> int:
        return int((await self.redis.info("memory"))["used_memory"])


async def archived_up_to(conn: psycopg.AsyncConnection[Any]) -> tuple[int, int] | None:
    """The last entry of shard 0 in the archive, by its (shard, entry_ms, entry_seq) index; None
    before the projector applied the schema (its process starts apart from the handler's)."""
    try:
        cur = await conn.execute(
            "SELECT entry_ms, entry_seq FROM ledger_events WHERE shard = 0"
            " ORDER BY entry_ms DESC, entry_seq DESC LIMIT 1"
        )
    except psycopg.errors.UndefinedTable:
        return None
    row = await cur.fetchone()
    return None if row is None else (int(row[0]), int(row[1]))


def accepted(answer: Any) -> dict[str, Any]:
    reply: dict[str, Any] = json.loads(answer[1])
    if reply["status"] != "accepted":
        raise RuntimeError(f"command {reply['command_id']} rejected: {reply['error']}")
    return reply
