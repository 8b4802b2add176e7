"""Issue 7, defects 6 and 10: one poison entry never costs more than itself.

* Defect 6: a malformed entry is dead-lettered (and answered) exactly once, however often its
  batch is delivered again (a batch retried entry by entry, a consumer that dies before XACK, a
  claim), and an entry that makes the handler raise anything at all is isolated from its batch.
* Defect 10: tries are counted in Redis, before the entry is handled, so an entry that kills its
  process is dead-lettered after ``max_deliveries`` restarts and the stream moves on; a server
  outage never counts.

Everything runs against a real Redis (plain, and Redis Cluster where the keys' slots matter);
the crash test runs real subprocesses that ``os._exit`` in the middle of an entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis import exceptions as redis_errors

from consumers.command_handler import GROUP, CommandHandler
from consumers.deadletter import MAX_FIELDS, Reply, write_dead_letter
from consumers.entries import Entry
from consumers.runner import UNFINISHED, ConsumerSettings, StreamConsumer
from ledger.store.archived import ArchivedIndex
from ledger.store.eventstore import EventStore
from tests.pipeline_helpers import (
    ROOT,
    commands_key,
    dead_key,
    events_key,
    place_order_json,
    read_events,
    reply_key,
    wait_until,
)

FAST = ConsumerSettings(max_deliveries=2, claim_idle_ms=150, block_ms=50)


@pytest.fixture(params=["plain", "cluster"])
def client(request: pytest.FixtureRequest) -> Any:
    """A flushed plain Redis, or a flushed Redis Cluster (every key of a step on one slot)."""
    return request.getfixturevalue("redis" if request.param == "plain" else "redis_cluster")


async def _pending(redis: Any, stream: str, group: str) -> int:
    return int((await redis.xpending(stream, group))["pending"])


async def _dead_letters(redis: Any, dead: str) -> list[dict[str, str]]:
    return [fields for _id, fields in await redis.xrange(dead)]


async def _dies_holding(consumer: StreamConsumer, holding: Callable[[], Awaitable[bool]]) -> None:
    """Run ``consumer`` until ``holding`` says it is stuck, then kill it (no XACK, no cleanup)."""
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        await wait_until(holding, timeout=10, what=f"{consumer.name} to hold its entries")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --------------------------------------------------------------------------- defect 6


class DecodeBug(CommandHandler):
    """A handler with a bug that raises on one kind of entry, as any unexpected exception
    from one entry would (RecursionError on deep JSON did): not a WireError."""

    async def _decode(self, entry: Entry) -> Any:
        if entry.fields.get("type") == "explode":
            raise RuntimeError("decoder bug")
        return await super()._decode(entry)


async def test_poison_batch_redelivered_dead_letters_and_answers_each_entry_once(redis: Any) -> None:
    store = EventStore(redis, 0)
    handler = DecodeBug(store, 1)
    deep = '{"command_id": "deep", "user_id": "u-deep", "metadata": ' + "[" * 1000 + "]" * 1000 + "}"
    published = [
        ("v1", {"type": "place_order", "data": place_order_json("alice", "v1")}),
        ("m1", {"type": "place_order", "data": "{not json"}),
        ("v2", {"type": "place_order", "data": place_order_json("bob", "v2")}),
        ("m2", {"type": "fly", "data": json.dumps({"command_id": "m2", "user_id": "alice"})}),
        ("deep", {"type": "place_order", "data": deep}),
        ("explode", {"type": "explode", "data": "{}"}),
        ("m3", {"type": "cancel_order", "data": json.dumps({"command_id": "m3", "user_id": "bob"})}),
        ("v3", {"type": "place_order", "data": place_order_json("alice", "v3")}),
    ]
    stream, dead = commands_key(0), dead_key(0)

    def consumer(name: str, handle: Any) -> StreamConsumer:
        return StreamConsumer(
            redis, stream=stream, group=GROUP, handler=handle, dead_stream=dead, name=name, settings=FAST
        )

    async def handle_then_die(entries: list[Entry]) -> None:
        try:
            await handler.handle(entries)
        finally:
            await asyncio.Event().wait()  # the process dies before acknowledging anything

    first = consumer("first", handle_then_die)
    await first.ensure_group()
    ids = {name: await redis.xadd(stream, fields) for name, fields in published}

    async def holds(name: str, count: int) -> bool:
        held = {c["name"]: c["pending"] for c in await redis.xinfo_consumers(stream, GROUP)}
        return held.get(name) == count

    async def first_dead() -> bool:  # m1, m2 and deep dead-lettered, then the bug
        return await holds("first", len(published)) and await redis.xlen(dead) == 3

    async def second_dead() -> bool:  # v1 handled alone
        return await holds("second", len(published)) and await redis.exists(reply_key(0, "alice", "v1")) == 1

    # Delivered as one batch: handled up to the bug, then the consumer dies.
    await _dies_holding(first, first_dead)
    # Claimed by a consumer that handles the first entry again, alone, and dies too.
    await asyncio.sleep(FAST.claim_idle_ms / 1000)
    await _dies_holding(consumer("second", handle_then_die), second_dead)
    # Claimed by a healthy consumer, which finishes the job.
    await asyncio.sleep(FAST.claim_idle_ms / 1000)
    heir = consumer("heir", handler.handle)
    await heir.burst()

    letters = await _dead_letters(redis, dead)
    assert [(d["dead_entry_id"], d["dead_code"]) for d in letters] == [
        (ids["m1"], "INVALID_JSON"),
        (ids["m2"], "UNKNOWN_TYPE"),
        (ids["deep"], "INVALID_JSON"),
        (ids["m3"], "MISSING_FIELD"),
        (ids["explode"], "DELIVERY_LIMIT"),
    ]
    assert letters[4]["dead_reason"] == "failed deliveries: 2; last error: RuntimeError('decoder bug')"
    assert letters[2]["dead_reason"] == "place_order: data is nested too deeply to be a command"
    assert {d["dead_group"] for d in letters} == {GROUP}
    assert await redis.hlen(f"{dead}:index") == 5
    # One reply per command: accepted for the valid ones, rejected for the readable malformed ones.
    for user, command in [("alice", "v1"), ("bob", "v2"), ("alice", "v3"), ("alice", "m2"), ("bob", "m3")]:
        replies = [json.loads(r) for r in await redis.lrange(reply_key(0, user, command), 0, -1)]
        assert [r["status"] for r in replies] == ["rejected" if command.startswith("m") else "accepted"], command
    events = await read_events(redis, 0)
    assert sorted(e.data["command_id"] for e in events) == ["v1", "v2", "v3"]
    assert await _pending(redis, stream, GROUP) == 0
    assert await redis.exists(f"{stream}:tries:{GROUP}") == 0


async def test_dead_letter_and_its_reply_are_written_once(client: Any) -> None:
    redis = client
    stream, dead, reply, outcomes = "t:{d}:in", "t:{d}:dead", "t:{d}:reply", "t:{d}:outcomes"
    entry_id = await redis.xadd(stream, {"type": "x", "data": "{"})
    args: dict[str, Any] = {"stream": stream, "entry_id": entry_id, "group": "g", "code": "INVALID_JSON"}

    first = await write_dead_letter(
        redis,
        dead,
        {"type": "x", "data": "{"},
        reason="first",
        reply=Reply(reply, b'{"n": 1}', 60, outcomes, "alice:c-1", ArchivedIndex("t:{d}:archived")),
        **args,
    )
    assert await redis.blpop([reply], timeout=1) == (reply, '{"n": 1}')  # the client took it
    again = await write_dead_letter(
        redis,
        dead,
        {"type": "x", "data": "{"},
        reason="again",
        reply=Reply(reply, b'{"n": 2}', 60, outcomes, "alice:c-1", ArchivedIndex("t:{d}:archived")),
        **args,
    )

    assert (first, again) == (True, False)
    ((letter_id, letter),) = await redis.xrange(dead)
    assert (letter["dead_reason"], letter["type"], letter["data"]) == ("first", "x", "{")
    assert await redis.hgetall(f"{dead}:index") == {f"{stream}/g/{entry_id}": letter_id}
    assert await redis.exists(reply) == 0


async def test_a_malformed_entry_never_overwrites_the_recorded_outcome_of_its_command_id(client: Any) -> None:
    """A valid command answered first, then a malformed entry with the same command_id: the reply
    stays the first outcome (CONTRACT §3), whatever batches the two were in."""
    redis = client
    stream, dead, reply, outcomes = "t:{d}:in", "t:{d}:dead", "t:{d}:reply", "t:{d}:outcomes"
    await redis.hset(outcomes, "alice:c-1", '{"status": "accepted"}')
    entry_id = await redis.xadd(stream, {"type": "x", "data": "{"})
    args: dict[str, Any] = {"stream": stream, "entry_id": entry_id, "group": "g", "code": "INVALID_JSON"}

    await write_dead_letter(
        redis,
        dead,
        {"type": "x"},
        reason="bad",
        reply=Reply(reply, b'{"status": "rejected"}', 60, outcomes, "alice:c-1", ArchivedIndex("t:{d}:archived")),
        **args,
    )

    assert await redis.lrange(reply, 0, -1) == ['{"status": "accepted"}']
    assert await redis.xlen(dead) == 1


async def test_entry_with_too_many_fields_is_dead_lettered_with_the_first_ones(redis: Any) -> None:
    fields = {f"f{n:05}": "v" for n in range(MAX_FIELDS + 4000)}
    entry_id = await redis.xadd("t:{w}:in", fields)

    written = await write_dead_letter(
        redis, "t:{w}:dead", fields, stream="t:{w}:in", entry_id=entry_id, group="g", code="C", reason="r"
    )

    ((_id, letter),) = await redis.xrange("t:{w}:dead")
    assert written is True
    assert letter["dead_fields_dropped"] == "4000"
    assert sorted(k for k in letter if k.startswith("f")) == [f"f{n:05}" for n in range(MAX_FIELDS)]


# --------------------------------------------------------------------------- defect 10

_CRASHING_CONSUMER = textwrap.dedent(
    """
    import asyncio, os, sys
    import redis.asyncio as aioredis
    from consumers.runner import ConsumerSettings, StreamConsumer

    async def main(url, name):
        redis = aioredis.Redis.from_url(url, decode_responses=True)

        async def handle(entries):
            for entry in entries:
                if entry.fields["kind"] == "poison":
                    os._exit(3)  # the process dies in the middle of this entry
                await redis.rpush("t:{k}:handled", entry.fields["n"])

        consumer = StreamConsumer(
            redis, stream="t:{k}:in", group="g", handler=handle, dead_stream="t:{k}:dead", name=name,
            settings=ConsumerSettings(max_deliveries=2, claim_idle_ms=150, block_ms=50),
        )
        await consumer.burst()
        await redis.aclose()

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


def _run_crashing_consumer(url: str, name: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _CRASHING_CONSUMER, url, name], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode in (0, 3), done.stderr
    return done.returncode


async def test_entry_that_kills_its_process_is_dead_lettered_after_max_restarts(redis: Any, redis_url: str) -> None:
    stream, dead = "t:{k}:in", "t:{k}:dead"
    await redis.xgroup_create(stream, "g", id="0", mkstream=True)
    await redis.xadd(stream, {"kind": "ok", "n": "1"})
    poison = await redis.xadd(stream, {"kind": "poison", "n": "p"})
    await redis.xadd(stream, {"kind": "ok", "n": "2"})

    exits = []
    for run in range(8):
        exits.append(await asyncio.to_thread(_run_crashing_consumer, redis_url, f"run-{run}"))
        if exits[-1] == 0:
            break
        await asyncio.sleep(0.2)  # the dead process's entries become claimable

    # Run 1 dies in the batch; runs 2 and 3 die on the poison alone (tries 1 and 2); run 4
    # finds 2 tries, dead-letters it and handles the rest.
    assert exits == [3, 3, 3, 0]
    letters = await _dead_letters(redis, dead)
    assert [(d["kind"], d["n"], d["dead_entry_id"], d["dead_code"], d["dead_group"]) for d in letters] == [
        ("poison", "p", poison, "DELIVERY_LIMIT", "g")
    ]
    assert letters[0]["dead_reason"] == f"failed deliveries: 2; last error: {UNFINISHED}"
    # Entry 1 was handled in the batch that died and once more alone; entry 2 once.
    assert await redis.lrange("t:{k}:handled", 0, -1) == ["1", "1", "2"]
    assert await _pending(redis, stream, "g") == 0
    assert await redis.exists(f"{stream}:tries:g") == 0

    await redis.xadd(stream, {"kind": "ok", "n": "3"})
    assert await asyncio.to_thread(_run_crashing_consumer, redis_url, "run-after") == 0
    assert await redis.lrange("t:{k}:handled", 0, -1) == ["1", "1", "2", "3"]
    assert len(await _dead_letters(redis, dead)) == 1


async def test_failures_are_counted_across_consumers_with_the_last_error(client: Any) -> None:
    redis = client
    stream, dead = "t:{f}:in", "t:{f}:dead"
    attempts: list[str] = []

    async def fail_on_poison(entries: list[Entry]) -> None:
        for entry in entries:
            if entry.fields["kind"] == "poison":
                attempts.append(entry.id)
                raise ValueError(f"attempt {len(attempts)}")

    def consumer(name: str) -> StreamConsumer:
        return StreamConsumer(
            redis, stream=stream, group="g", handler=fail_on_poison, dead_stream=dead, name=name, settings=FAST
        )

    await consumer("a").ensure_group()
    poison = await redis.xadd(stream, {"kind": "poison"})
    await consumer("a").step(block=False)  # the batch fails, then the entry alone (try 1)
    assert await redis.hgetall(f"{stream}:tries:g") == {poison: "1", f"{poison}:error": "ValueError('attempt 2')"}
    await asyncio.sleep(FAST.claim_idle_ms / 1000 + 0.05)
    await consumer("b").step(block=False)  # another process claims it: try 2
    await asyncio.sleep(FAST.claim_idle_ms / 1000 + 0.05)
    await consumer("c").step(block=False)  # and a third finds 2 tries: dead letter

    assert len(attempts) == 3
    ((_id, letter),) = await redis.xrange(dead)
    assert (letter["dead_code"], letter["dead_reason"]) == (
        "DELIVERY_LIMIT",
        "failed deliveries: 2; last error: ValueError('attempt 3')",
    )
    assert await _pending(redis, stream, "g") == 0
    assert await redis.exists(f"{stream}:tries:g") == 0


async def test_deliveries_cut_short_by_a_server_outage_are_not_counted(client: Any) -> None:
    redis = client
    stream, dead = "t:{o}:in", "t:{o}:dead"
    outage = {"left": 6}
    handled: list[str] = []

    async def handle(entries: list[Entry]) -> None:
        if outage["left"]:
            outage["left"] -= 1
            raise redis_errors.ConnectionError("server down")
        handled.extend(e.fields["n"] for e in entries)

    consumer = StreamConsumer(redis, stream=stream, group="g", handler=handle, dead_stream=dead, settings=FAST)
    await consumer.ensure_group()
    first = await redis.xadd(stream, {"n": "1"})
    second = await redis.xadd(stream, {"n": "2"})
    for _ in range(6):  # 3 times the delivery limit
        with pytest.raises(redis_errors.ConnectionError):
            await consumer.step(block=False)
        assert await redis.hgetall(f"{stream}:tries:g") == {first: "-1", second: "-1"}  # given back
    await consumer.burst()

    assert handled == ["1", "2"]
    assert await redis.exists(dead) == 0
    assert await _pending(redis, stream, "g") == 0


async def test_outage_during_a_counted_try_gives_the_count_back(redis: Any) -> None:
    stream, dead = "t:{g}:in", "t:{g}:dead"
    calls: list[str] = []

    async def handle(entries: list[Entry]) -> None:
        calls.append(",".join(e.fields["n"] for e in entries))
        if len(calls) == 1:
            raise ValueError("bad batch")  # now every entry is tried alone, and counted
        if len(calls) <= 4:
            raise redis_errors.ConnectionError("server down")

    consumer = StreamConsumer(redis, stream=stream, group="g", handler=handle, dead_stream=dead, settings=FAST)
    await consumer.ensure_group()
    entry = await redis.xadd(stream, {"n": "1"})
    for _ in range(3):
        with pytest.raises(redis_errors.ConnectionError):
            await consumer.step(block=False)
        assert await redis.hgetall(f"{stream}:tries:g") == {entry: "0"}
    await consumer.burst()

    assert calls == ["1"] * 5
    assert await redis.exists(dead) == 0
    assert await redis.exists(f"{stream}:tries:g") == 0


async def test_events_of_a_shard_keep_their_tries_on_its_slot(redis_cluster: Any) -> None:
    """Counting, acknowledging and dead-lettering are single steps on one slot of a cluster."""
    redis = redis_cluster
    stream, dead = events_key(3), dead_key(3)

    async def refuse(entries: list[Entry]) -> None:
        raise ValueError("no")

    consumer = StreamConsumer(
        redis,
        stream=stream,
        group="ledger-x",
        handler=refuse,
        dead_stream=dead,
        settings=ConsumerSettings(max_deliveries=1, claim_idle_ms=150, block_ms=50),
    )
    await consumer.ensure_group()
    entry = await redis.xadd(stream, {"type": "t", "data": "{}"})
    await consumer.burst()

    ((_id, letter),) = await redis.xrange(dead)
    assert (letter["dead_entry_id"], letter["dead_reason"]) == (
        entry,
        "failed deliveries: 1; last error: ValueError('no')",
    )
    assert await redis.exists("ledger:{3}:events:tries:ledger-x") == 0
    assert await redis.hlen("ledger:{3}:dead:index") == 1
