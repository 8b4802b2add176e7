"""``ledger dead list|show|retry|drop|ops`` (issue 9, part 9) with the real handler, projector,
Redis, PostgreSQL and ``ledger`` script.

A dead command is published again (as it was or fixed) and answered; a dead event is re-run by
the consumer group that dead-lettered it, from its original entry (never edited); a drop removes
the dead letter; every retry and drop is recorded in the operations stream ``ledger:ops``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg

from consumers.command_handler import GROUP as HANDLER_GROUP
from consumers.entries import Entry
from consumers.runner import StreamConsumer, Undeliverable
from ledger.store.keys import OPERATIONS, ShardKeys, dead_index, retries
from ledger.store.operations import actor, iso_time
from ledger.store.redis_conn import ensure_shard_count
from projections.projector import PROJECTOR
from tests.audit_helpers import FAST, KEYS, SYMBOL, USER, Ledger, entries, ledger_cli, projector

PLACE = {"exchange": "okx", "symbol": SYMBOL, "side": "buy", "order_type": "limit", "quantity": "1", "price": "100"}
BAD_QUANTITY = (
    'place_order: Expected a decimal string such as "0.1" (≤20 integer and ≤18 fraction digits) - at `$.quantity`'
)

KNOWN = (
    "adjust_position, adopt_order, cancel_order, close_position, liquidate_position, open_position, "
    "order_accepted, order_cancelled, order_expired, order_rejected, place_order, record_drift, record_fill, "
    "resolve_drift"
)


async def dead_letters(redis: Any) -> list[tuple[str, dict[str, str]]]:
    return await entries(redis, KEYS.dead)


async def cli(tmp_path: Path, redis_url: str, *args: str) -> Any:
    return await ledger_cli(tmp_path, "dead", *args, LEDGER_REDIS_URL=redis_url)


def summary(dead_id: str, letter: dict[str, str], kind: str) -> dict[str, Any]:
    """What ``dead list --json`` says of a dead letter, from its stored fields."""
    return {
        "shard": 0,
        "id": dead_id,
        "ts": int(letter["dead_ts"]),
        "time": iso_time(int(letter["dead_ts"])),
        "kind": kind,
        "type": letter["type"],
        "code": letter["dead_code"],
        "reason": letter["dead_reason"],
        "stream": letter["dead_stream"],
        "group": letter["dead_group"],
        "entry_id": letter["dead_entry_id"],
    }


@asynccontextmanager
async def handler_running(ledger: Ledger) -> AsyncIterator[None]:
    """The command handler in the background, as ``ledger serve`` runs it."""
    stop = asyncio.Event()

    async def run() -> None:
        while not stop.is_set():
            await ledger.consumer.burst()
            await asyncio.sleep(0.02)

    task = asyncio.create_task(run())
    try:
        yield
    finally:
        stop.set()
        await task


async def test_list_and_show_are_exact(redis: Any, redis_url: str, tmp_path: Path) -> None:
    ledger = await Ledger.start(redis)
    bad = await ledger.send("place_order", "c-bad", **{**PLACE, "quantity": "1e5"})
    assert bad["error"] == {"code": "INVALID_FIELD", "message": BAD_QUANTITY}
    teleport_entry = await ledger.publish("teleport", "c-teleport", to="moon")
    await ledger.consumer.burst()
    (bad_id, bad_letter), (teleport_id, teleport_letter) = await dead_letters(redis)
    bad_entry = bad_letter["dead_entry_id"]

    listed = (await cli(tmp_path, redis_url, "list", "--json")).json()
    assert listed == [summary(bad_id, bad_letter, "command"), summary(teleport_id, teleport_letter, "command")]
    assert [(r["code"], r["reason"], r["stream"], r["group"]) for r in listed] == [
        ("INVALID_FIELD", BAD_QUANTITY, KEYS.commands, HANDLER_GROUP),
        ("UNKNOWN_TYPE", f"unknown command type 'teleport'; known: {KNOWN}", KEYS.commands, HANDLER_GROUP),
    ]
    assert listed[1]["entry_id"] == teleport_entry

    run = await cli(tmp_path, redis_url, "list", "--limit", "1")
    lines = run.stdout.splitlines()
    assert lines[0].split() == [
        "shard", "id", "time", "kind", "type", "code", "reason", "stream", "group", "entry_id",
    ]  # fmt: skip
    assert lines[1].split()[:6] == ["0", bad_id, iso_time(int(bad_letter["dead_ts"])), "command", "place_order",
                                    "INVALID_FIELD"]  # fmt: skip
    assert lines[1].split()[-3:] == [KEYS.commands, HANDLER_GROUP, bad_entry]
    assert f"  {BAD_QUANTITY[:59]}…  " in lines[1]  # a reason longer than 60 characters is cut on a terminal
    assert lines[2:] == ["(1 of 2 shown: raise --limit)"]

    shown = (await cli(tmp_path, redis_url, "show", bad_id)).json()
    data = json.dumps({"command_id": "c-bad", "user_id": USER, **PLACE, "quantity": "1e5"})
    assert shown == {**summary(bad_id, bad_letter, "command"), "fields": {"type": "place_order", "data": data}}

    assert (await cli(tmp_path, redis_url, "list", "--shard", "0", "--json")).json() == listed
    run = await cli(tmp_path, redis_url, "list", "--shard", "1")
    assert (run.status, run.stderr) == (2, "ledger: --shard: must be from 0 to 0: this ledger has 1 shards (got 1)\n")
    run = await cli(tmp_path, redis_url, "show", "1-0")
    assert (run.status, run.stdout) == (1, "")
    assert run.stderr == "ledger: no dead letter 1-0 in shard 0: list them with `ledger dead list`\n"


async def test_a_malformed_command_retried_with_fixed_data_is_executed_and_answered(
    redis: Any, redis_url: str, tmp_path: Path
) -> None:
    ledger = await Ledger.start(redis)
    await ledger.send("place_order", "c-bad", **{**PLACE, "quantity": "1e5"})
    ((first_id, first),) = await dead_letters(redis)

    async with handler_running(ledger):
        # As it was: malformed again, rejected again, dead-lettered again (a new entry).
        again = await cli(tmp_path, redis_url, "retry", first_id, "--note", "try as it was")
        assert again.status == 1, again.stderr
        as_it_was = json.loads(again.stdout)
        assert as_it_was["reply"]["status"] == "rejected"
        assert as_it_was["reply"]["error"] == {"code": "INVALID_FIELD", "message": BAD_QUANTITY}
        ((second_id, second),) = await dead_letters(redis)
        published = as_it_was["operation"]["detail"]["published"]
        assert second["dead_entry_id"] == published["entry_id"] != first["dead_entry_id"]
        assert published["fields"] == {"type": "place_order", "data": first["data"]}

        fixed = json.dumps({"command_id": "c-bad", "user_id": USER, **PLACE, "quantity": "100000"})
        run = await cli(tmp_path, redis_url, "retry", second_id, "--data", fixed, "--note", "quantity fixed")
    assert run.status == 0, run.stderr
    out = json.loads(run.stdout)
    reply = out["reply"]
    assert (reply["command_id"], reply["status"], [e["type"] for e in reply["events"]]) == (
        "c-bad",
        "accepted",
        ["OrderPlaced"],
    )
    ((event_entry, event),) = await entries(redis, KEYS.events)
    assert reply["events"][0]["id"] == event_entry
    placed = json.loads(event["data"])
    assert (placed["command_id"], placed["quantity"], placed["stream"]) == ("c-bad", "100000", reply["order_id"])

    operation = out["operation"]
    new_entry = operation["detail"]["published"]["entry_id"]
    assert {k: v for k, v in operation.items() if k not in ("id", "ts", "time", "detail")} == {
        "actor": actor(),
        "action": "retry",
        "target": f"{KEYS.dead}/{second_id}",
        "reason": "quantity fixed",
    }
    assert operation["detail"] == {
        "dead_letter": {
            **summary(second_id, second, "command"),
            "fields": {"type": "place_order", "data": first["data"]},
        },
        "published": {
            "stream": KEYS.commands,
            "entry_id": new_entry,
            "fields": {"type": "place_order", "data": fixed},
            "reply_key": KEYS.reply(USER, "c-bad"),
        },
    }
    assert await dead_letters(redis) == []
    assert await redis.hgetall(dead_index(KEYS.dead)) == {}
    ops = (await cli(tmp_path, redis_url, "ops", "--json")).json()
    assert [(o["action"], o["target"], o["reason"]) for o in ops] == [
        ("retry", f"{KEYS.dead}/{first_id}", "try as it was"),
        ("retry", f"{KEYS.dead}/{second_id}", "quantity fixed"),
    ]
    assert ops[1] == operation


async def test_a_dead_event_is_rerun_by_its_consumer_once_postgresql_takes_it(
    redis: Any, redis_url: str, database_url: str, pg: psycopg.AsyncConnection[Any], tmp_path: Path
) -> None:
    """The projector dead-letters an OrderAccepted that PostgreSQL refuses. A retry while it is still
    refused dead-letters it again (fresh tries); once PostgreSQL takes it, a retry archives it."""
    await pg.execute(
        "CREATE FUNCTION refuse_accepted() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.type = 'OrderAccepted' THEN RAISE EXCEPTION 'refused by the test'; END IF; RETURN NEW; END $$"
    )
    await pg.execute(
        "CREATE TRIGGER refuse_accepted BEFORE INSERT ON ledger_events FOR EACH ROW EXECUTE FUNCTION refuse_accepted()"
    )
    ledger = await Ledger.start(redis)
    order_id = (await ledger.accepted("place_order", "c-place", **PLACE))["order_id"]
    await ledger.accepted("order_accepted", "c-accept", order_id=order_id, exchange_order_id="x-1")
    ((_placed, _), (accepted_entry, _)) = await entries(redis, KEYS.events)
    rerun_set = retries(KEYS.events, PROJECTOR)

    async def archived() -> list[int]:
        cur = await pg.execute("SELECT version FROM ledger_events WHERE aggregate_id = %s ORDER BY version", [order_id])
        return [v for (v,) in await cur.fetchall()]

    async with projector(redis, database_url) as consumer:
        for _ in range(3):  # two failed deliveries, then the dead letter
            await consumer.burst()
        ((dead_id, letter),) = await dead_letters(redis)
        assert (letter["dead_code"], letter["dead_stream"], letter["dead_group"], letter["dead_entry_id"]) == (
            "DELIVERY_LIMIT",
            KEYS.events,
            PROJECTOR,
            accepted_entry,
        )
        assert "refused by the test" in letter["dead_reason"]
        assert await archived() == [1]

        run = await cli(tmp_path, redis_url, "retry", dead_id, "--note", "still refused?")
        assert run.status == 0, run.stderr
        rerun = {"stream": KEYS.events, "group": PROJECTOR, "entry_id": accepted_entry, "retry_set": rerun_set}
        assert run.json()["operation"]["detail"]["rerun"] == rerun
        assert await dead_letters(redis) == []
        assert await redis.smembers(rerun_set) == {accepted_entry}
        for _ in range(3):  # counted afresh: dead-lettered again after as many deliveries
            await consumer.burst()
        ((again_id, again),) = await dead_letters(redis)
        assert (again["dead_code"], again["dead_entry_id"]) == ("DELIVERY_LIMIT", accepted_entry)
        assert again_id != dead_id
        assert await redis.smembers(rerun_set) == set()

        await pg.execute("DROP TRIGGER refuse_accepted ON ledger_events")
        run = await cli(tmp_path, redis_url, "retry", again_id, "--note", "trigger removed")
        assert run.status == 0, run.stderr
        await consumer.burst()

    assert await archived() == [1, 2]
    assert await dead_letters(redis) == []
    assert await redis.smembers(rerun_set) == set()
    assert await redis.hgetall(f"{KEYS.events}:tries:{PROJECTOR}") == {}
    # The event itself was never edited: the archive holds it as the log does.
    cur = await pg.execute(
        "SELECT entry_id, data FROM ledger_events WHERE aggregate_id = %s AND version = 2", [order_id]
    )
    ((entry_id, data),) = await cur.fetchall()
    ((_, fields),) = [e for e in await entries(redis, KEYS.events) if e[0] == accepted_entry]
    assert (entry_id, data) == (accepted_entry, json.loads(fields["data"]))

    run = await cli(tmp_path, redis_url, "retry", again_id)
    assert (run.status, run.stderr) == (
        1,
        f"ledger: no dead letter {again_id} in shard 0: list them with `ledger dead list`\n",
    )


async def test_drop_removes_the_dead_letter_and_records_the_operation(
    redis: Any, redis_url: str, tmp_path: Path
) -> None:
    ledger = await Ledger.start(redis)
    await ledger.publish("teleport", "c-teleport", to="moon")
    await ledger.consumer.burst()
    ((dead_id, letter),) = await dead_letters(redis)
    index_field = f"{KEYS.commands}/{HANDLER_GROUP}/{letter['dead_entry_id']}"
    assert await redis.hgetall(dead_index(KEYS.dead)) == {index_field: dead_id}
    shown = (await cli(tmp_path, redis_url, "show", dead_id)).json()

    run = await cli(tmp_path, redis_url, "drop", dead_id)
    assert run.status == 2 and "the following arguments are required: --note" in run.stderr

    dropped = (await cli(tmp_path, redis_url, "drop", dead_id, "--note", "a test publisher's garbage")).json()
    assert {k: v for k, v in dropped.items() if k not in ("id", "ts", "time")} == {
        "actor": actor(),
        "action": "drop",
        "target": f"{KEYS.dead}/{dead_id}",
        "reason": "a test publisher's garbage",
        "detail": {"dead_letter": shown},
    }
    assert await dead_letters(redis) == []
    assert await redis.hgetall(dead_index(KEYS.dead)) == {}

    ((op_id, op),) = await entries(redis, OPERATIONS)
    assert op_id == dropped["id"]
    assert (op["ts"], op["actor"], op["action"], op["reason"]) == (
        str(dropped["ts"]),
        actor(),
        "drop",
        "a test publisher's garbage",
    )
    assert (await cli(tmp_path, redis_url, "ops", "--json")).json() == [dropped]
    lines = (await cli(tmp_path, redis_url, "ops")).stdout.splitlines()
    assert lines[0].split() == ["id", "time", "actor", "action", "target", "reason"]
    assert lines[1].split() == [op_id, iso_time(dropped["ts"]), actor(), "drop", f"{KEYS.dead}/{dead_id}", "a", "test",
                                "publisher's", "garbage"]  # fmt: skip
    assert (await cli(tmp_path, redis_url, "list")).stdout == "no dead letters\n"


async def test_a_dead_event_is_rerun_by_its_group_on_a_redis_cluster(
    redis_cluster: Any, redis_cluster_url: str, tmp_path: Path
) -> None:
    """Any consumer group re-runs a retried entry from the stream, on a cluster too (every key of
    the retry step on the shard's slot); the operations stream lives on its own slot."""
    await ensure_shard_count(redis_cluster, 2)
    keys = ShardKeys(1)
    refusing = True
    handled: list[str] = []

    async def handle(batch: list[Entry]) -> None:
        for entry in batch:
            if refusing and entry.fields["data"] == "poison":
                raise Undeliverable("TEST", "refused until fixed")
            handled.append(entry.fields["data"])

    consumer = StreamConsumer(
        redis_cluster, stream=keys.events, group="g-test", handler=handle, dead_stream=keys.dead, settings=FAST
    )
    await consumer.ensure_group()
    poison = await redis_cluster.xadd(keys.events, {"type": "Test", "data": "poison"})
    await redis_cluster.xadd(keys.events, {"type": "Test", "data": "fine"})
    await consumer.burst()
    assert handled == ["fine"]
    ((dead_id, letter),) = [(str(i), f) for i, f in await redis_cluster.xrange(keys.dead)]
    assert (letter["dead_code"], letter["dead_entry_id"]) == ("TEST", poison)

    run = await ledger_cli(tmp_path, "dead", "retry", dead_id, "--shard", "1", LEDGER_REDIS_URL=redis_cluster_url)
    assert run.status == 0, run.stderr
    assert await redis_cluster.smembers(retries(keys.events, "g-test")) == {poison}
    refusing = False
    await consumer.burst()

    assert handled == ["fine", "poison"]
    assert await redis_cluster.xlen(keys.dead) == 0
    assert await redis_cluster.smembers(retries(keys.events, "g-test")) == set()
    assert [
        o["action"]
        for o in (await ledger_cli(tmp_path, "dead", "ops", "--json", LEDGER_REDIS_URL=redis_cluster_url)).json()
    ] == ["retry"]
