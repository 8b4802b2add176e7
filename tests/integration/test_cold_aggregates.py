"""Final orders and closed positions moved to PostgreSQL by compaction: a command that names one
waits, set aside, while its state is read back from the archive, then is decided as against the
state it had; an unknown id is still rejected at once; while PostgreSQL is away only such
commands wait; a reader by id (reconciliation) reads it back too."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec
import psycopg

from consumers.command_handler import OutcomeReader
from ledger.domain.state import OrderState
from ledger.store.eventstore import EventStore
from ledger.store.log import aggregate_reader, read_aggregates
from projections.compact import compact_shard
from projections.projector import PROJECTOR
from tests.integration.test_compaction import KEYS, USER, _publish, _raw_reply, _session
from tests.log_helpers import Rig


async def _moved_out(redis: Any, database_url: str) -> tuple[Rig, dict[str, str], dict[str, str]]:
    """The compaction session, every event archived, then one pass (retention 0): the final
    orders and the closed position leave Redis. Returns the rig, the ids and the order
    snapshots before the pass."""
    rig = await Rig.start(redis)
    ids = await _session(rig, database_url)
    await redis.delete(KEYS.lease(PROJECTOR))  # the session's projector is gone
    async with rig.projector(database_url):
        await rig.archive()
    before = await redis.hgetall(KEYS.orders)
    await asyncio.sleep(0.01)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await compact_shard(redis, conn, 0)
    return rig, ids, before


async def test_a_late_fill_on_an_archived_order_is_decided_once_its_state_is_read_back(
    redis: Any, database_url: str
) -> None:
    rig, ids, before = await _moved_out(redis, database_url)
    full = before[ids["late"]]
    assert await redis.hexists(KEYS.orders, ids["late"]) == 0
    # A reader by id (reconciliation) reads it back; without the archive reader it is not there.
    reader_store = EventStore(redis, 0, archive=aggregate_reader(lambda: database_url))
    assert await reader_store.order(ids["late"]) == msgspec.json.decode(full or "", type=OrderState)
    assert await EventStore(redis, 0).order(ids["late"]) is None
    assert await reader_store.position(ids["late"]) is None

    await _publish(redis, "record_fill", "late-1", order_id=ids["late"], fill_id="lf-1", quantity="0.1", price="79")
    await _publish(redis, "cancel_order", "nope", order_id="00000000-0000-4000-8000-00000000dead")
    await rig.handlers[0].burst()
    assert await _raw_reply(redis, "late-1") is None
    assert json.loads(await _raw_reply(redis, "nope") or "{}")["error"]["code"] == "UNKNOWN_ORDER"
    assert await redis.xlen(KEYS.deferred) == 1

    reader = OutcomeReader(EventStore(redis, 0), lambda: database_url)
    seconds, micros = await redis.time()
    assert await reader.burst() == 1
    assert await redis.hget(KEYS.orders, ids["late"]) == full
    # Due for compaction from when it came back, not from its old time.
    assert (await redis.zscore(KEYS.final_orders, ids["late"]) or 0) >= seconds * 1000 + micros // 1000
    await rig.handlers[0].burst()
    reply = json.loads(await _raw_reply(redis, "late-1") or "{}")
    assert reply["status"] == "accepted", reply
    assert [e["type"] for e in reply["events"]][0] == "OrderFilled"
    assert await redis.xlen(KEYS.deferred) == 0
    await reader._disconnect()


async def test_while_postgresql_is_away_a_command_on_an_archived_order_waits_and_others_flow(
    redis: Any, database_url: str, postgres_server: Any
) -> None:
    rig, ids, _before = await _moved_out(redis, database_url)
    assert await redis.hexists(KEYS.orders, ids["buy"]) == 0
    stop = asyncio.Event()
    reader = OutcomeReader(EventStore(redis, 0), lambda: database_url, poll_s=0.05, backoff_s=(0.1, 0.4))
    task = asyncio.create_task(reader.run(stop))
    await asyncio.to_thread(postgres_server.stop)
    try:
        await _publish(redis, "record_fill", "late-2", order_id=ids["buy"], fill_id="lf-2", quantity="0.2", price="98")
        await rig.handlers[0].burst()
        assert await rig.place(USER, "sell", "0.5", "120")  # answered without PostgreSQL
        await asyncio.sleep(1.0)  # several tries of the reader, all failing
        assert await _raw_reply(redis, "late-2") is None
        assert await redis.xlen(KEYS.deferred) == 1
    finally:
        await asyncio.to_thread(postgres_server.start)
    for _ in range(100):
        await rig.handlers[0].burst()
        if await _raw_reply(redis, "late-2") is not None:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    reply = json.loads(await _raw_reply(redis, "late-2") or "{}")
    assert reply["status"] == "accepted", reply
    assert await redis.xlen(KEYS.deferred) == 0


async def test_reading_back_skips_unknown_event_types_and_leaves_out_an_undecodable_history(
    redis: Any, database_url: str
) -> None:
    """An archived event of a type this reader does not know is skipped (CONTRACT §5); an
    aggregate one of whose events cannot be decoded is left out (its state cannot be told), so
    a command naming it stays set aside with an error line instead of being decided wrongly."""
    _rig, ids, before = await _moved_out(redis, database_url)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            """INSERT INTO ledger_events (event_id, shard, entry_id, entry_ms, entry_seq, type, aggregate_id,
                                          version, command_id, user_id, data, ts)
               SELECT gen_random_uuid(), shard, entry_id || 'x', entry_ms, entry_seq + 1000, 'FutureEvent',
                      aggregate_id, version + 100, command_id, user_id, data, ts
                 FROM ledger_events WHERE aggregate_id = %(id)s AND version = 1""",
            {"id": ids["buy"]},
        )
        await conn.execute(
            "UPDATE ledger_events SET data_raw = '{', data = '{}' WHERE aggregate_id = %(id)s AND version = 2",
            {"id": ids["sell"]},
        )
        states = await read_aggregates(conn, [ids["buy"], ids["sell"]])
    assert states == {ids["buy"]: msgspec.json.decode(before[ids["buy"]], type=OrderState)}
