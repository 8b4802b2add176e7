"""Issue 3, faults: handlers killed mid-batch, SIGTERM, Redis restarting under the runner.

Commands are published with raw XADD and checked through the contract's keys only (replies,
the event log, the outcomes hash ``ledger:{s}:outcomes`` that deduplicates commands).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

from consumers.command_handler import GROUP, CommandHandler
from consumers.entries import Entry
from consumers.runner import ConsumerSettings, StreamConsumer
from ledger.store.eventstore import EventStore
from ledger.store.redis_conn import connect
from tests.pipeline_helpers import (
    ServeProcess,
    assert_gapless,
    assert_no_duplicates,
    blpop_reply,
    commands_key,
    dead_key,
    events_per_command,
    fill_json,
    outcomes_key,
    peek_reply,
    place_order_json,
    read_events,
    reply_key,
    serve_processes_fixture,  # noqa: F401 - the fixture serve_processes
    serving,
    start_serve,
    wait_until,
)


async def _publish_all(redis: Any, fields: list[dict[str, str]], chunk: int = 500) -> list[str]:
    """Raw XADDs, pipelined (no transaction) to publish thousands quickly."""
    ids: list[str] = []
    for start in range(0, len(fields), chunk):
        pipe = redis.pipeline(transaction=False)
        for entry in fields[start : start + chunk]:
            pipe.xadd(commands_key(0), entry)
        ids += await pipe.execute()
    return ids


async def _group(redis: Any) -> dict[str, Any]:
    (group,) = [g for g in await redis.xinfo_groups(commands_key(0)) if g["name"] == GROUP]
    return group  # type: ignore[no-any-return]


async def _consumer_pending(redis: Any) -> dict[str, int]:
    return {c["name"]: int(c["pending"]) for c in await redis.xinfo_consumers(commands_key(0), GROUP)}


def _wait_exit(serve: ServeProcess, timeout: float) -> int:
    return serve.process.wait(timeout=timeout)


# --------------------------------------------------------------------------- kill -9


async def test_kill_9_in_the_middle_of_a_batch_loses_and_duplicates_nothing(
    redis: Any, redis_url: str, tmp_path: Path, serve_processes: list[ServeProcess]
) -> None:
    users = [f"k9-{n}" for n in range(20)]
    first = start_serve(redis_url, tmp_path, "first")
    serve_processes.append(first)
    # Below, the kill must land while a batch is in hand; between two batches (one round trip)
    # it leaves nothing pending, so then it is tried again on a fresh serve, a few times.
    attempts = 5

    # Orders to fill: 5 per user, through the first handler.
    setup = [(u, f"{u}:o{k}") for u in users for k in range(5)]
    await _publish_all(
        redis, [{"type": "place_order", "data": place_order_json(u, c, quantity="10")} for u, c in setup]
    )
    orders: dict[str, list[str]] = {u: [] for u in users}
    for user, cid in setup:
        orders[user].append((await peek_reply(redis, reply_key(0, user, cid), timeout=30))["order_id"])

    # 3000 commands: fills on those orders (each user's fills grow one long position), and
    # new orders, interleaved across users.
    commands: list[tuple[str, str, str]] = []
    fields: list[dict[str, str]] = []
    for i in range(3000):
        user = users[i % len(users)]
        if i % 3 == 0:
            cid = f"{user}:p{i}"
            fields.append({"type": "place_order", "data": place_order_json(user, cid)})
            commands.append((user, cid, "place"))
        else:
            cid = f"{user}:f{i}"
            order_id = orders[user][(i // len(users)) % 5]
            fields.append({"type": "record_fill", "data": fill_json(user, cid, order_id, f"T{i}", quantity="0.001")})
            commands.append((user, cid, "fill"))
    await _publish_all(redis, fields)
    total = len(setup) + len(commands)

    async def some_done() -> bool:
        # A batch's outcomes appear at once (one script call), just before its acknowledgement:
        # wait for a batch in hand too, or the kill may land between batches.
        started = await redis.hlen(outcomes_key(0)) >= len(setup) + 300
        return started and sum((await _consumer_pending(redis)).values()) > 0

    for attempt in range(1, attempts + 1):
        await wait_until(some_done, timeout=30, interval=0.002, what="the handler to get going")
        first.process.send_signal(signal.SIGKILL)
        assert first.process.wait(timeout=10) == -signal.SIGKILL
        done_at_kill = await redis.hlen(outcomes_key(0))
        assert done_at_kill < total, "the handler finished before it was killed: nothing was tested"
        orphaned = sum((await _consumer_pending(redis)).values())
        if orphaned > 0:
            break
        assert attempt < attempts, f"killed between batches {attempts} times: nothing was left pending"
        first = start_serve(redis_url, tmp_path, f"first-{attempt}")
        serve_processes.append(first)

    second = start_serve(redis_url, tmp_path, "second", LEDGER_CLAIM_IDLE_MS="1000")
    serve_processes.append(second)

    async def all_done() -> bool:
        return await redis.hlen(outcomes_key(0)) >= total

    await wait_until(all_done, timeout=60, interval=0.05, what="the second handler to finish")
    await wait_until(lambda: _no_pending(redis), timeout=10, what="the last acknowledgement")
    group = await _group(redis)
    assert second.stop() == 0, second.output()[-2000:]

    # Every command: exactly one outcome, and its reply says the same.
    outcomes = await redis.hgetall(outcomes_key(0))
    assert len(outcomes) == total
    for user, cid, kind in commands:
        outcome = json.loads(outcomes[f"{user}:{cid}"])
        assert (outcome["command_id"], outcome["status"]) == (cid, "accepted"), outcome
        assert len(outcome["events"]) == (1 if kind == "place" else 2)
        key = reply_key(0, user, cid)
        assert await redis.llen(key) == 1
        assert json.loads(await redis.lindex(key, 0)) == outcome

    log = await read_events(redis, 0)
    assert_no_duplicates(log)
    versions = assert_gapless(log)
    expected = Counter({(u, c): 1 for u, c in setup})
    expected.update({(u, c): (1 if kind == "place" else 2) for u, c, kind in commands})
    assert events_per_command(log) == expected
    assert len(log) == sum(expected.values())
    by_entry = {e.entry_id: e for e in log}
    for outcome in outcomes.values():
        for ref in json.loads(outcome)["events"]:
            assert by_entry[ref["id"]].type == ref["type"]
    # Fills: 2000, 100 per order... and every user's long position holds all its fills.
    fills_per_user = Counter(u for u, _c, kind in commands if kind == "fill")
    positions = {e.data["user_id"]: e.data["stream"] for e in log if e.type == "PositionOpened"}
    assert len(positions) == len(users)
    for user, position_id in positions.items():
        assert versions[position_id] == fills_per_user[user]
        last = [e for e in log if e.data["stream"] == position_id][-1]
        assert Decimal(last.data["size"]) == Decimal("0.001") * fills_per_user[user]
    for user in users:
        for order_id in orders[user]:
            last = [e for e in log if e.data["stream"] == order_id][-1]
            assert Decimal(last.data["filled_qty"]) == Decimal("0.001") * (versions[order_id] - 1)
    assert await redis.xlen(dead_key(0)) == 0
    assert group["entries-read"] == total


async def _no_pending(redis: Any) -> bool:
    return int((await _group(redis))["pending"]) == 0


# --------------------------------------------------------------------------- crash mid-pipeline


async def test_batch_after_a_crash_between_appends_is_decided_on_recorded_state(redis: Any, redis_url: str) -> None:
    """A handler died after appending the first command of a batch and before acknowledging
    it. The next handler gets the batch again: the first command is a duplicate (its recorded
    outcome stands), and the second must be decided on the recorded state, not on the state
    this handler would have produced for the first (a position with another id)."""
    user = "crash-1"
    client = await connect(redis_url)
    try:
        survivor = StreamConsumer(
            client,
            stream=commands_key(0),
            group=GROUP,
            handler=CommandHandler(EventStore(client, 0), 1).handle,
            dead_stream=dead_key(0),
            name="survivor",
            settings=ConsumerSettings(claim_idle_ms=100),
        )
        for k in (1, 2):
            await redis.xadd(commands_key(0), {"type": "place_order", "data": place_order_json(user, f"o{k}")})
        assert await survivor.burst() == 2
        o1, o2 = [(await peek_reply(redis, reply_key(0, user, f"o{k}")))["order_id"] for k in (1, 2)]
        x = {"type": "record_fill", "data": fill_json(user, "x", o1, "T-x", quantity="1")}  # opens a long
        y = {"type": "record_fill", "data": fill_json(user, "y", o2, "T-y", quantity="2")}  # increases it
        x_id = await redis.xadd(commands_key(0), x)
        await redis.xadd(commands_key(0), y)

        # The crashed handler read both, appended x, and died.
        read = await redis.xreadgroup(GROUP, "crashed", {commands_key(0): ">"}, count=10)
        assert [i for i, _f in read[0][1]] == [x_id, read[0][1][1][0]]
        await CommandHandler(EventStore(client, 0), 1).handle([Entry(x_id, x)])
        x_reply = json.loads(await redis.lindex(reply_key(0, user, "x"), 0))
        assert x_reply["status"] == "accepted"

        await asyncio.sleep(0.15)
        assert await survivor.burst() == 2  # takes both over: x again, then y
    finally:
        await client.aclose()

    assert json.loads(await redis.lindex(reply_key(0, user, "x"), 0)) == x_reply
    y_reply = json.loads(await redis.lindex(reply_key(0, user, "y"), 0))
    assert y_reply["status"] == "accepted"
    assert y_reply["position_id"] == x_reply["position_id"]
    log = await read_events(redis, 0)
    assert_no_duplicates(log)
    versions = assert_gapless(log)
    assert versions[x_reply["position_id"]] == 2
    assert events_per_command(log) == Counter({(user, "o1"): 1, (user, "o2"): 1, (user, "x"): 2, (user, "y"): 2})
    last = [e for e in log if e.data["stream"] == x_reply["position_id"]][-1]
    assert (last.type, last.data["size"]) == ("PositionIncreased", "3")
    assert int((await _group(redis))["pending"]) == 0


async def test_entry_handled_twice_at_once_never_builds_on_the_losing_decision(redis: Any, redis_url: str) -> None:
    """A stalled handler's entries are claimed by another one while the stalled one still
    appends. The claimer decided x (a fill opening a position) before the stalled handler
    recorded x: its own x is refused as a duplicate, so y, decided after it in the same batch,
    must not be appended on top of a position that was never recorded."""
    user = "stall-1"
    client = await connect(redis_url)
    stalled_handler = CommandHandler(EventStore(client, 0), 1)
    entries: dict[str, Entry] = {}

    class LateStore(EventStore):
        """The claimer's store: the stalled handler appends x just before the claimer does."""

        async def append_many(self, appends: Any) -> list[Any]:
            if any(a.command_id == "x" for a in appends):
                await stalled_handler.handle([entries["x"]])
            return await super().append_many(appends)

    try:
        claimer = StreamConsumer(
            client,
            stream=commands_key(0),
            group=GROUP,
            handler=CommandHandler(LateStore(client, 0), 1).handle,
            dead_stream=dead_key(0),
            name="claimer",
            settings=ConsumerSettings(claim_idle_ms=100),
        )
        for k in (1, 2):
            await redis.xadd(commands_key(0), {"type": "place_order", "data": place_order_json(user, f"o{k}")})
        assert await claimer.burst() == 2
        o1, o2 = [(await peek_reply(redis, reply_key(0, user, f"o{k}")))["order_id"] for k in (1, 2)]
        x = {"type": "record_fill", "data": fill_json(user, "x", o1, "T-x", quantity="1")}  # opens a long
        y = {"type": "record_fill", "data": fill_json(user, "y", o2, "T-y", quantity="2")}  # increases it
        entries["x"] = Entry(await redis.xadd(commands_key(0), x), x)
        await redis.xadd(commands_key(0), y)
        await redis.xreadgroup(GROUP, "stalled", {commands_key(0): ">"}, count=10)
        await asyncio.sleep(0.15)
        assert await claimer.burst() == 2
    finally:
        await client.aclose()

    x_reply = json.loads(await redis.lindex(reply_key(0, user, "x"), 0))
    y_reply = json.loads(await redis.lindex(reply_key(0, user, "y"), 0))
    assert x_reply["status"] == y_reply["status"] == "accepted"
    log = await read_events(redis, 0)
    assert_no_duplicates(log)
    versions = assert_gapless(log)
    assert y_reply["position_id"] == x_reply["position_id"]
    assert versions[x_reply["position_id"]] == 2
    assert {e.data["stream"] for e in log if e.type.startswith("Position")} == {x_reply["position_id"]}
    last = [e for e in log if e.data["stream"] == x_reply["position_id"]][-1]
    assert (last.type, last.data["size"]) == ("PositionIncreased", "3")


# --------------------------------------------------------------------------- SIGTERM


async def test_sigterm_finishes_the_batch_in_hand_and_exits_0(
    redis: Any, redis_url: str, tmp_path: Path, serve_processes: list[ServeProcess]
) -> None:
    users = [f"term-{n}" for n in range(10)]
    commands = [(users[i % 10], f"c{i}") for i in range(3000)]
    serve = start_serve(redis_url, tmp_path, "term")
    serve_processes.append(serve)
    await _publish_all(redis, [{"type": "place_order", "data": place_order_json(u, c)} for u, c in commands])

    async def some_done() -> bool:
        return await redis.hlen(outcomes_key(0)) >= 300

    await wait_until(some_done, timeout=30, interval=0.002, what="the handler to get going")
    serve.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(_wait_exit, serve, 15) == 0, serve.output()[-2000:]

    group = await _group(redis)
    done = await redis.hlen(outcomes_key(0))
    assert group["pending"] == 0  # what it had read, it finished and acknowledged
    assert group["entries-read"] == done  # and it read nothing it did not finish
    assert done < len(commands), "it finished everything before SIGTERM: nothing was tested"
    assert group["lag"] == len(commands) - done
    log = await read_events(redis, 0)
    assert len(log) == done
    assert "consumer stopped" in serve.output()

    # A new serve does the rest, exactly once.
    again = start_serve(redis_url, tmp_path, "again")
    serve_processes.append(again)

    async def all_done() -> bool:
        return await redis.hlen(outcomes_key(0)) >= len(commands)

    await wait_until(all_done, timeout=30, what="the rest")
    assert again.stop() == 0
    log = await read_events(redis, 0)
    assert events_per_command(log) == Counter({(u, c): 1 for u, c in commands})
    assert_gapless(log)


# --------------------------------------------------------------------------- Redis restart


async def test_handler_survives_a_redis_restart(redis: Any, redis_url: str, redis_server: Any, tmp_path: Path) -> None:
    async with serving(redis_url, 1, tmp_path / "home") as task:
        await redis.xadd(commands_key(0), {"type": "place_order", "data": place_order_json("rs", "before")})
        raw_before, before = await blpop_reply(redis, reply_key(0, "rs", "before"))
        assert before["status"] == "accepted"

        started = time.monotonic()
        await asyncio.to_thread(redis_server.restart)  # the script cache is gone, the data is not
        await redis.connection_pool.disconnect()  # the test's own client: drop its dead connections
        assert not task.done()
        await redis.xadd(commands_key(0), {"type": "place_order", "data": place_order_json("rs", "after")})
        _, after = await blpop_reply(redis, reply_key(0, "rs", "after"), timeout=20)
        assert after["status"] == "accepted"
        assert time.monotonic() - started < 20
        # Deduplication survived the restart too.
        await redis.xadd(commands_key(0), {"type": "place_order", "data": place_order_json("rs", "before")})
        raw_again, _ = await blpop_reply(redis, reply_key(0, "rs", "before"))
        assert raw_again == raw_before
        assert not task.done()

    log = await read_events(redis, 0)
    assert [e.data["command_id"] for e in log] == ["before", "after"]
    assert_gapless(log)
    assert await redis.xlen(dead_key(0)) == 0


async def test_runner_survives_a_redis_restart_and_continues(redis: Any, redis_server: Any) -> None:
    """The bare runner: an outage means backoff and reconnection, then the stream continues."""
    stream, group = "t:{restart}:in", "g"
    seen: list[str] = []

    async def record(entries: list[Entry]) -> None:
        seen.extend(e.fields["n"] for e in entries)

    consumer = StreamConsumer(
        redis,
        stream=stream,
        group=group,
        handler=record,
        dead_stream="t:{restart}:dead",
        name="survivor",
        settings=ConsumerSettings(block_ms=100, backoff_max_s=0.5),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        await redis.xadd(stream, {"n": "1"})
        await wait_until(lambda: _has(seen, "1"), what="entry 1")
        await asyncio.to_thread(redis_server.stop)
        await asyncio.sleep(0.5)  # the runner meets the outage
        assert not task.done()
        await asyncio.to_thread(redis_server.start)
        await redis.connection_pool.disconnect()  # the test's own client: drop its dead connections
        await redis.xadd(stream, {"n": "2"})
        await wait_until(lambda: _has(seen, "2"), timeout=10, what="entry 2 after the restart")
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert seen == ["1", "2"]
    assert (await redis.xpending(stream, group))["pending"] == 0


async def _has(seen: list[str], n: str) -> bool:
    return n in seen
