"""Compaction of what Redis keeps per command (issue 9, part 2; projections.compact).

The decider decides every command against a compact final order or closed position exactly as
against its full snapshot (a property over scripted histories and command sequences); on real
Redis (plain and Cluster) and PostgreSQL, compaction touches only final, archived aggregates and
outcomes older than the retention, a duplicate of a compacted command gets its first reply byte
for byte, also while PostgreSQL is away (it waits; other commands flow), and verify and replay
still agree with the log.
"""

from __future__ import annotations

import asyncio
import copy
import json
from decimal import Decimal
from typing import Any

import msgspec
import psycopg
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.command_handler import OutcomeReader
from ledger.app.replay import replay
from ledger.domain import wire
from ledger.domain.decider import Decision, Rejection
from ledger.domain.state import OrderState, PositionState
from ledger.domain.values import now_ms
from ledger.store.archived import ArchivedIndex, digest
from ledger.store.eventstore import EventStore, outcome_marker
from ledger.store.keys import ShardKeys
from ledger.store.log import read_aggregates
from projections.compact import compact_shard
from projections.projector import PROJECTOR
from projections.projector import checkpoint as archived_up_to
from projections.trim import retention_pass
from projections.verify import verify
from tests.compact_forms import compact_order, compact_position
from tests.domain_helpers import LINEAR, Driver
from tests.log_helpers import SYMBOL, Rig, archived_digest

YEAR_MS = 366 * 24 * 3600 * 1000
KEYS = ShardKeys(0)
USER = "compact-user"

# --------------------------------------------------------------------------- the decider


def _history(driver: Driver) -> dict[str, Any]:
    """Final orders of every kind (filled, partly filled then cancelled, rejected, expired, an
    open_position entry cancelled before any fill, a hedge order) and closed and liquidated
    positions. Returns the ids the commands aim at."""
    entry, long_id = driver.open_position("long", "1", leverage=3, metadata={"tag": "entry"}, stop_loss="90")
    driver.fill(entry, "1", "100", fee="0.1")
    close = driver.close(long_id, reason="take-profit")
    driver.fill(close, "1", "110", fee="0.1")  # the long closes
    partial = driver.place("buy", "2", order_type="limit", price="100", metadata={"big": "x" * 50})
    driver.ok("order_accepted", order_id=partial, exchange_order_id="venue-1")
    driver.fill(partial, "0.5", "100")  # opens a new long of 0.5
    driver.ok("cancel_order", order_id=partial)
    driver.ok("order_cancelled", order_id=partial)
    rejected = driver.place("sell", "1", order_type="limit", price="120")
    driver.ok("order_rejected", order_id=rejected, reason="insufficient margin")
    expired = driver.place("sell", "0.2", order_type="limit", price="130", client_order_id="c-9")
    driver.ok("order_accepted", order_id=expired, exchange_order_id="venue-2")
    driver.ok("order_expired", order_id=expired)
    short_entry, short_id = driver.open_position("short", "1")
    driver.ok("cancel_order", order_id=short_entry)
    driver.ok("order_cancelled", order_id=short_entry)  # its reserved position never opened
    hedge = driver.place("sell", "0.3", position_side="short", order_type="market")
    driver.fill(hedge, "0.3", "105", fee="0.02", fee_currency="OKB")  # a hedge short opens
    (liquidated,) = [p.id for p in driver.store.positions.values() if p is not None and p.side == "short"]
    driver.ok("liquidate_position", position_id=liquidated, price="150")
    current = driver.open_slot("long")
    assert current is not None
    return {
        "orders": [entry, close, partial, rejected, expired, short_entry, hedge],
        "positions": [long_id, liquidated, short_id],
        "fills": ["trade-1", "trade-2", "trade-3", "trade-4"],
        "open": current.id,
    }


def _compacted(driver: Driver, now: int = 1) -> Driver:
    """A twin whose every final order and closed position is read back from its compact form."""
    twin = copy.deepcopy(driver)
    for oid, order in twin.store.orders.items():
        if order is not None and order.status.is_final:
            twin.store.orders[oid] = msgspec.json.decode(compact_order(order, now), type=OrderState)
    for pid, position in twin.store.positions.items():
        if position is not None and not position.is_open:
            twin.store.positions[pid] = msgspec.json.decode(compact_position(position, now), type=PositionState)
    return twin


def _outcome(result: Decision | Rejection) -> tuple[Any, ...]:
    if isinstance(result, Rejection):
        return ("rejected", result.code, result.message, result.order_id, result.position_id)
    return ("accepted", [wire.encode(e) for e in result.events], result.order_id, result.position_id)


_ORDER_COMMANDS = ("cancel_order", "order_accepted", "order_rejected", "order_cancelled", "order_expired")
_command = st.one_of(
    st.tuples(st.sampled_from(_ORDER_COMMANDS), st.integers(0, 6)),
    st.tuples(
        st.just("record_fill"),
        st.integers(0, 6),
        st.sampled_from(["new", "trade-1", "trade-2", "trade-3", "trade-4"]),
        st.sampled_from(["0.1", "0.5", "1", "3"]),
        st.sampled_from(["95", "100", "123.45"]),
        st.sampled_from([None, "0.01"]),
        st.sampled_from([None, "USDT", "BNB"]),
    ),
    st.tuples(st.sampled_from(["close_position", "liquidate_position"]), st.integers(0, 2)),
    st.tuples(st.sampled_from(["open_position", "reduce_only"]), st.sampled_from(["long", "short"])),
)


def _send(driver: Driver, ids: dict[str, Any], step: tuple[Any, ...], n: int) -> Decision | Rejection:
    kind = step[0]
    if kind in _ORDER_COMMANDS:
        extra = {"exchange_order_id": "venue-late"} if kind == "order_accepted" else {}
        extra |= {"reason": "late"} if kind == "order_rejected" else {}
        return driver.send(kind, order_id=ids["orders"][step[1]], **extra)
    if kind == "record_fill":
        _kind, order, fill_id, quantity, price, fee, currency = step
        return driver.send(
            "record_fill",
            order_id=ids["orders"][order],
            fill_id=f"late-{n}" if fill_id == "new" else fill_id,
            quantity=quantity,
            price=price,
            fee=fee,
            fee_currency=currency,
        )
    if kind in ("close_position", "liquidate_position"):
        extra = {"price": "101"} if kind == "liquidate_position" else {}
        return driver.send(kind, position_id=ids["positions"][step[1]], **extra)
    side = step[1]
    if kind == "open_position":
        return driver.send("open_position", exchange="okx", symbol=LINEAR, side=side, size="0.4", leverage=2)
    order_side = "sell" if side == "long" else "buy"
    return driver.send(
        "place_order",
        exchange="okx",
        symbol=LINEAR,
        side=order_side,
        order_type="market",
        quantity="0.1",
        reduce_only=True,
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(_command, min_size=1, max_size=5))
def test_the_decider_decides_alike_against_compact_and_full_snapshots(steps: list[tuple[Any, ...]]) -> None:
    full = Driver()
    ids = _history(full)
    compact = _compacted(full)
    for n, step in enumerate(steps):
        assert _outcome(_send(compact, ids, step, n)) == _outcome(_send(full, ids, step, n)), step


def test_each_command_kind_against_compact_aggregates_gets_the_same_reply_and_events() -> None:
    """Every command kind at least once, by name (the property above samples them)."""
    full = Driver()
    ids = _history(full)
    compact = _compacted(full)
    steps: list[tuple[Any, ...]] = [(kind, order) for kind in _ORDER_COMMANDS for order in range(7)]
    steps += [("record_fill", order, "new", "0.5", "100", "0.01", None) for order in range(7)]
    steps += [("record_fill", 2, "trade-3", "0.5", "100", None, None)]  # a duplicate fill
    steps += [(kind, p) for kind in ("close_position", "liquidate_position") for p in range(3)]
    steps += [(kind, side) for kind in ("open_position", "reduce_only") for side in ("long", "short")]
    kinds: dict[str, int] = {}
    for n, step in enumerate(steps):
        result = _send(full, ids, step, n)
        assert _outcome(_send(compact, ids, step, n)) == _outcome(result), step
        kinds[f"{step[0]}:{_outcome(result)[0]}"] = kinds.get(f"{step[0]}:{_outcome(result)[0]}", 0) + 1
    # Late fills were recorded (not only refused), duplicates refused, transitions refused.
    assert kinds["record_fill:accepted"] == 7 and kinds["record_fill:rejected"] == 1
    assert kinds["cancel_order:rejected"] == 7 and kinds["close_position:rejected"] == 3


def test_compact_forms_keep_only_what_the_decider_reads() -> None:
    driver = Driver()
    ids = _history(driver)
    partial = driver.order(ids["orders"][2])  # a plain limit order: its metadata is not read
    assert json.loads(compact_order(partial, 7)) == {
        "id": partial.id,
        "user_id": "alice",
        "exchange": "okx",
        "symbol": LINEAR,
        "side": "buy",
        "order_type": "limit",
        "quantity": "2",
        "status": "cancelled",
        "exchange_order_id": "venue-1",
        "filled_qty": "0.5",
        "fill_basis": "50.0",
        "fill_ids": ["trade-3"],
        "version": 5,
        "compacted": 7,
    }
    closed = driver.position(ids["positions"][0])
    assert json.loads(compact_position(closed, 7)) == {
        "id": closed.id,
        "user_id": "alice",
        "exchange": "okx",
        "symbol": LINEAR,
        "side": "long",
        "status": "closed",
        "version": 2,
        "compacted": 7,
    }
    entry = driver.order(ids["orders"][0])  # an open_position entry order keeps its metadata
    assert json.loads(compact_order(entry, 7))["metadata"] == {"tag": "entry"}


# --------------------------------------------------------------------------- on the servers


async def _publish(redis: Any, type_: str, command_id: str, **data: Any) -> None:
    payload = {"command_id": command_id, "user_id": USER, **data}
    await redis.xadd(KEYS.commands, {"type": type_, "data": json.dumps(payload)})


async def _raw_reply(redis: Any, command_id: str) -> str | None:
    value = await redis.lindex(KEYS.reply(USER, command_id), 0)
    return None if value is None else str(value)


async def _session(rig: Rig, database_url: str) -> dict[str, str]:
    """A filled buy and a filled sell (the position closes), a rejected command, all archived;
    then, with the projector stopped, an open order and an order cancelled (final, unarchived)."""
    buy = await rig.place(USER, "buy", "1", "100")
    await rig.send(USER, "order_accepted", order_id=buy, exchange_order_id="x-1")
    await rig.fill(USER, buy, "1", "100")
    sell = await rig.place(USER, "sell", "1", "110")
    await rig.fill(USER, sell, "1", "110")
    await _publish(rig.redis, "cancel_order", "refused", order_id=buy)  # filled: INVALID_TRANSITION
    await rig.handlers[0].burst()
    await rig.project()
    async with rig.projector(database_url):
        await rig.archive()
    young = await rig.place(USER, "buy", "1", "90")  # stays open
    late = await rig.place(USER, "buy", "1", "80")
    await rig.send(USER, "cancel_order", order_id=late)
    await rig.send(USER, "order_cancelled", order_id=late)  # final, its events not archived
    await rig.project()
    positions = await rig.redis.hkeys(KEYS.positions)
    return {"buy": buy, "sell": sell, "young": young, "late": late, "position": positions[0]}


async def _hashes(redis: Any) -> dict[str, dict[str, str]]:
    return {key: await redis.hgetall(key) for key in (KEYS.outcomes, KEYS.orders, KEYS.positions)}


async def test_compaction_touches_only_final_archived_aggregates_older_than_the_retention(
    redis: Any, database_url: str
) -> None:
    rig = await Rig.start(redis)
    ids = await _session(rig, database_url)
    before = await _hashes(redis)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        # Everything is younger than a year (the session's clock is 2026-01-01, its entries now).
        young = await compact_shard(redis, conn, 0, retention_ms=YEAR_MS)
        assert [(c.eligible, c.compacted) for c in young] == [(0, 0), (0, 0), (0, 0)]
        dry = await compact_shard(redis, conn, 0, dry_run=True)
        assert await _hashes(redis) == before
        await asyncio.sleep(0.01)  # the rejection's recorded time is now in the past
        done = await compact_shard(redis, conn, 0)
        after = await _hashes(redis)
        cur = await conn.execute("SELECT user_id, command_id, reply FROM ledger_outcomes ORDER BY command_id")
        archived = await cur.fetchall()

    # Outcomes: c-1..c-5 (their events archived) and the rejection; not c-6..c-9 (not archived).
    compacted = {"c-1", "c-2", "c-3", "c-4", "c-5", "refused"}
    assert [(c.hash, c.entries, c.already, c.eligible, c.compacted) for c in done] == [
        (KEYS.outcomes, 10, 0, 6, 6),
        (KEYS.orders, 4, 0, 2, 2),
        (KEYS.positions, 1, 0, 1, 1),
    ]
    assert [(c.eligible, c.compacted) for c in dry] == [(6, 0), (2, 0), (1, 0)]
    assert archived == [(USER, c, before[KEYS.outcomes][f"{USER}:{c}"]) for c in sorted(compacted)]
    for field, reply in before[KEYS.outcomes].items():
        command = field.split(":", 1)[1]
        if command in compacted:  # left the hash for the index: its fingerprint -> its reply's digest
            assert field not in after[KEYS.outcomes]
            assert await archived_digest(redis, KEYS, field) == digest(reply.encode()).hex()
        else:
            assert after[KEYS.outcomes][field] == reply
            assert await archived_digest(redis, KEYS, field) is None
    assert await redis.zcard(KEYS.eventless) == 0
    for oid in ("young", "late"):
        assert after[KEYS.orders][ids[oid]] == before[KEYS.orders][ids[oid]]
    # The final, archived ones left for the archived aggregates' index; PostgreSQL gives them back.
    gone = [ids["buy"], ids["sell"], ids["position"]]
    assert set(after[KEYS.orders]) == {ids["young"], ids["late"]}
    assert after[KEYS.positions] == {}
    assert await EventStore(redis, 0).archived_aggregates([*gone, ids["young"], ids["late"]]) == set(gone)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        states = await read_aggregates(conn, gone)
    assert states == {
        **{ids[o]: msgspec.json.decode(before[KEYS.orders][ids[o]], type=OrderState) for o in ("buy", "sell")},
        ids["position"]: msgspec.json.decode(before[KEYS.positions][ids["position"]], type=PositionState),
    }
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        again = await compact_shard(redis, conn, 0)
    assert [(c.already, c.eligible, c.compacted) for c in again] == [(6, 0, 0), (2, 0, 0), (1, 0, 0)]


async def _archived_through(database_url: str) -> str | None:
    """The last log entry the projector archived (its tracking record)."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        return await archived_up_to(conn, 0)


async def _finals(redis: Any) -> tuple[dict[str, float], dict[str, float]]:
    orders = dict(await redis.zrange(KEYS.final_orders, 0, -1, withscores=True))
    positions = dict(await redis.zrange(KEYS.final_positions, 0, -1, withscores=True))
    return orders, positions


def _updated_at(raw: str) -> float:
    return float(json.loads(raw)["updated_at"])


async def test_compaction_looks_only_at_what_became_final_and_finds_older_finals_once(
    redis: Any, database_url: str
) -> None:
    """The append step records each final order and closed position with its updated_at;
    compaction reads those older than the retention, drops what it compacts, and leaves one whose
    events are not archived yet. A late fill on a compacted order records it again. A ledger
    whose sets were never written (an earlier version) has its finals found by one scan."""
    rig = await Rig.start(redis)
    ids = await _session(rig, database_url)
    hashes = await _hashes(redis)
    orders, positions = await _finals(redis)
    assert orders == {ids[o]: _updated_at(hashes[KEYS.orders][ids[o]]) for o in ("buy", "sell", "late")}
    assert positions == {ids["position"]: _updated_at(hashes[KEYS.positions][ids["position"]])}

    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        before = (await redis.info("commandstats")).get("cmdstat_hscan", {}).get("calls", 0)
        done = await compact_shard(redis, conn, 0)
        scans = (await redis.info("commandstats"))["cmdstat_hscan"]["calls"] - before
    assert [(c.compacted) for c in done] == [6, 2, 1]
    assert scans == 3  # the outcomes hash, and each snapshot hash once (its finals found once)
    assert await _finals(redis) == ({ids["late"]: orders[ids["late"]]}, {})  # "late" is not archived yet
    assert await redis.hgetall(KEYS.compacted) == {
        "orders": "2",
        "positions": "1",
        "finals:orders": "1",
        "finals:positions": "1",
        "outcomes:through": await _archived_through(database_url),
    }

    # A late fill on the archived order: set aside, its state read back, then decided.
    await _publish(redis, "record_fill", "late-b", order_id=ids["buy"], fill_id="late-b", quantity="0.5", price="99")
    await rig.handlers[0].burst()
    reader = OutcomeReader(EventStore(redis, 0), lambda: database_url)
    assert await reader._cold_round() == (1, 0)
    await reader._disconnect()
    await rig.handlers[0].burst()
    assert json.loads(await _raw_reply(redis, "late-b") or "{}")["status"] == "accepted"
    raw = await redis.hget(KEYS.orders, ids["buy"])
    assert (await _finals(redis))[0] == {ids["late"]: orders[ids["late"]], ids["buy"]: _updated_at(raw)}
    await redis.delete(KEYS.lease(PROJECTOR))  # the session's projector is gone (its lease would expire)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        async with rig.projector(database_url):
            await rig.archive()
        await asyncio.sleep(0.01)
        # Archived but not yet projected: the live projection still needs the late fill's order.
        assert [c.compacted for c in await compact_shard(redis, conn, 0)][1:] == [1, 0]
        await rig.project()
        before = (await redis.info("commandstats"))["cmdstat_hscan"]["calls"]
        again = await compact_shard(redis, conn, 0)
        scans = (await redis.info("commandstats"))["cmdstat_hscan"]["calls"] - before
        assert scans == 0  # outcomes are found from the archive's events after the watermark
        assert [(c.hash, c.already, c.compacted) for c in again][1:] == [(KEYS.orders, 3, 1), (KEYS.positions, 1, 0)]
        assert await _finals(redis) == ({}, {})

        # An earlier version's ledger: no sets, no counts; a final order still in full and one
        # in the compact form compaction wrote then. One scan finds them and both leave.
        await redis.delete(KEYS.compacted)
        sell = msgspec.json.decode(hashes[KEYS.orders][ids["sell"]], type=OrderState)
        await redis.hset(KEYS.orders, ids["sell"], hashes[KEYS.orders][ids["sell"]])
        await redis.hset(KEYS.orders, ids["late"], compact_order(sell, 1))
        old = await compact_shard(redis, conn, 0)
    assert [(c.hash, c.already, c.eligible, c.compacted) for c in old][1:] == [
        (KEYS.orders, 0, 1, 2),  # sell found final and archived; late, compact, due at once
        (KEYS.positions, 0, 0, 0),
    ]
    assert await redis.hget(KEYS.compacted, "orders") == "2"
    assert set(await redis.hkeys(KEYS.orders)) == {ids["young"]}


class _ChangesBeforeMoving:
    """The real client, but one snapshot changes just before the script that moves its hash's
    items runs: a late fill appended between compaction's read and its move."""

    def __init__(self, redis: Any, key: str, field: str, value: str) -> None:
        self._redis, self._key, self._field, self._value = redis, key, field, value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._redis, name)

    async def eval(self, script: str, numkeys: int, *args: Any) -> Any:
        if args[0] == self._key and self._value:
            await self._redis.hset(self._key, self._field, self._value)
            self._value = ""
        return await self._redis.eval(script, numkeys, *args)


async def test_a_snapshot_that_changed_after_it_was_read_stays_for_the_next_pass(redis: Any, database_url: str) -> None:
    """Compaction moves a final order only if its snapshot still holds what was read: one that a
    late fill changed in between stays in its hash and among the finals; the others move."""
    rig = await Rig.start(redis)
    ids = await _session(rig, database_url)
    read = json.loads(await redis.hget(KEYS.orders, ids["buy"]))
    changed = json.dumps(read | {"updated_at": read["updated_at"] + 1})
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        done = await compact_shard(_ChangesBeforeMoving(redis, KEYS.orders, ids["buy"], changed), conn, 0)

    assert [(c.hash, c.eligible, c.compacted) for c in done][1:] == [(KEYS.orders, 2, 1), (KEYS.positions, 1, 1)]
    assert await redis.hget(KEYS.orders, ids["buy"]) == changed
    assert ids["sell"] not in await redis.hkeys(KEYS.orders)
    assert set((await _finals(redis))[0]) == {ids["buy"], ids["late"]}
    assert await ArchivedIndex(KEYS.cold).read(redis) == 2  # the sell order and the position


async def _hscans(redis: Any) -> int:
    return int((await redis.info("commandstats")).get("cmdstat_hscan", {}).get("calls", 0))


async def test_outcomes_leave_from_the_archived_events_after_the_watermark(redis: Any, database_url: str) -> None:
    """Once a shard has a watermark (set by its first pass, which scans the outcomes hash once),
    a pass finds the outcomes that may leave from the archive's events after the watermark, with
    no scan: an outcome leaves once its events are archived and older than the retention, one
    without events once recorded older than the retention; the watermark follows the archive.
    Without the watermark (removed by hand), the next pass scans once and sets it again."""
    rig = await Rig.start(redis)
    await _session(rig, database_url)  # c-1..c-5 archived, "refused" without events, c-6..c-9 not archived
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        scans = await _hscans(redis)
        started = now_ms()
        first = await compact_shard(redis, conn, 0, retention_ms=YEAR_MS)
        ended = now_ms()
        assert await _hscans(redis) - scans == 3  # the outcomes, and each snapshot hash's finals, once
        # The bound is the retention's (everything archived is younger): its millisecond's last id.
        ms, seq = (await redis.hget(KEYS.compacted, "outcomes:through")).split("-")
        assert started - YEAR_MS - 1 <= int(ms) <= ended - YEAR_MS - 1
        assert int(seq) == 2**63 - 1
        await asyncio.sleep(0.01)
        scans = await _hscans(redis)
        done = await compact_shard(redis, conn, 0)
        assert await _hscans(redis) == scans
        assert await redis.hget(KEYS.compacted, "outcomes:through") == await _archived_through(database_url)
        await redis.delete(KEYS.lease(PROJECTOR))  # the session's projector is gone (its lease would expire)
        async with rig.projector(database_url):
            await rig.archive()
        await asyncio.sleep(0.01)
        later = await compact_shard(redis, conn, 0)
        assert await redis.hget(KEYS.compacted, "outcomes:through") == await _archived_through(database_url)
        assert await redis.hlen(KEYS.outcomes) == 0
        await rig.place(USER, "buy", "1", "70")  # its events not archived
        await redis.hdel(KEYS.compacted, "outcomes:through")
        scans = await _hscans(redis)
        rescan = await compact_shard(redis, conn, 0)
        assert await _hscans(redis) - scans == 1
        assert await redis.hget(KEYS.compacted, "outcomes:through") == await _archived_through(database_url)
    assert [(c.entries, c.eligible, c.compacted) for c in (first[0], done[0], later[0])] == [
        (10, 0, 0),
        (10, 6, 6),  # c-1..c-5 and "refused"
        (4, 4, 4),  # c-6..c-9, once archived
    ]
    assert (rescan[0].entries, rescan[0].eligible, rescan[0].compacted) == (1, 0, 0)


async def test_a_compacted_outcome_is_stored_byte_for_byte_whatever_its_text(redis: Any, database_url: str) -> None:
    """The replies go to ``ledger_outcomes`` inside one JSON array: each comes back exactly as
    Redis held it, whatever its characters, escapes, spacing and key order (a JSON round trip
    that normalised the reply, as ``jsonb`` does, would change its digest and leave its duplicate
    unanswered)."""
    # Each a JSON string's text: raw non-ASCII, and escapes kept as written (a quote, a backslash,
    # a slash, control characters, a line separator, an escape of what could be raw).
    messages = ["prix é ≠ 1 😀", 'quote \\" backslash \\\\ slash \\/', "line\\nbreak\\ttab \\u0000 \\u2028", "\\u00e9"]
    replies = {
        f"{USER}:c-{n}": f'{{"status":"rejected",  "command_id":"c-{n}","error":{{"message":"{m}","code":"X"}}}}'
        for n, m in enumerate(messages)
    }
    assert all(json.loads(reply) for reply in replies.values())
    await redis.hset(KEYS.outcomes, mapping=replies)
    await redis.zadd(KEYS.eventless, dict.fromkeys(replies, 1))
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        (outcomes, _orders, _positions) = await compact_shard(redis, conn, 0)
        cur = await conn.execute("SELECT user_id || ':' || command_id, reply FROM ledger_outcomes")
        stored = dict(await cur.fetchall())
    assert (outcomes.eligible, outcomes.compacted) == (4, 4)
    assert stored == replies
    for field, reply in replies.items():
        assert await archived_digest(redis, KEYS, field) == digest(reply.encode()).hex()


async def test_an_outcome_leaves_only_once_its_last_event_is_archived(redis: Any, database_url: str) -> None:
    """A fill's outcome has two events; with the archive's tracking record between them, the
    pass finds the outcome through its first event and leaves it (its last event is not
    archived), moving the place order's; the next pass, past the second event, moves it."""
    rig = await Rig.start(redis)
    order_id = await rig.place(USER, "buy", "1", "100")
    await rig.fill(USER, order_id, "1", "100")
    await rig.project()
    async with rig.projector(database_url):
        await rig.archive()
    fill_field = f"{USER}:c-2"
    events = [e["id"] for e in json.loads(await redis.hget(KEYS.outcomes, fill_field))["events"]]
    assert len(events) == 2
    ms, seq = (int(part) for part in events[0].split("-"))
    await redis.hset(KEYS.compacted, "outcomes:through", "0-0")
    await asyncio.sleep(0.01)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        tracked = await archived_up_to(conn, 0) or ""
        await conn.execute("UPDATE projector_checkpoints SET entry_ms = %s, entry_seq = %s", (ms, seq))
        cut = await compact_shard(redis, conn, 0)
        assert set(await redis.hkeys(KEYS.outcomes)) == {fill_field}
        assert await redis.hget(KEYS.compacted, "outcomes:through") == events[0]
        await conn.execute("UPDATE projector_checkpoints SET entry_ms = %s, entry_seq = %s", tracked.split("-"))
        after = await compact_shard(redis, conn, 0)
    assert [(c.eligible, c.compacted) for c in (cut[0], after[0])] == [(1, 1), (1, 1)]
    assert await redis.hlen(KEYS.outcomes) == 0


async def _compact_session(rig: Rig, database_url: str) -> tuple[dict[str, str], dict[str, str]]:
    ids = await _session(rig, database_url)
    first = {c: await _raw_reply(rig.redis, c) or "" for c in ("c-1", "c-3", "refused")}
    async with rig.projector(database_url):
        await rig.archive()
    await asyncio.sleep(0.01)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await compact_shard(rig.redis, conn, 0)
    for command in first:
        await rig.redis.delete(KEYS.reply(USER, command))  # long expired
    return ids, first


async def _duplicates_get_their_first_replies(rig: Rig, database_url: str) -> None:
    redis = rig.redis
    ids, first = await _compact_session(rig, database_url)
    await _publish(redis, "place_order", "c-1", exchange="okx", symbol=SYMBOL, side="buy", order_type="limit",
                   quantity="1", price="100")  # fmt: skip
    await _publish(redis, "record_fill", "c-3", order_id=ids["buy"], fill_id="f-3", quantity="1", price="100")
    await _publish(redis, "cancel_order", "refused", order_id="not-even-a-uuid")  # malformed: dead-lettered
    await _publish(redis, "record_fill", "new-dup-fill", order_id=ids["buy"], fill_id="f-3", quantity="1", price="1")
    await rig.handlers[0].burst()
    reader = OutcomeReader(EventStore(redis, 0), lambda: database_url)
    # The fills name the archived order: set aside until the reader gives its state back.
    assert await redis.xlen(KEYS.deferred) == 2
    assert await reader._cold_round() == (2, 0)
    await rig.handlers[0].burst()
    assert await redis.hgetall(KEYS.waiting) == {
        f"{USER}:{c}": outcome_marker(first[c].encode()) for c in ("c-1", "c-3", "refused")
    }
    assert [await _raw_reply(redis, c) for c in first] == [None, None, None]
    # A fill id already counted on the compact (filled) order is still a duplicate.
    duplicate_fill = json.loads(await _raw_reply(redis, "new-dup-fill") or "{}")
    assert duplicate_fill["error"]["code"] == "DUPLICATE_FILL"

    assert await reader.answer_once() == 0
    assert {c: await _raw_reply(redis, c) for c in first} == first
    assert await redis.hlen(KEYS.waiting) == 0
    await reader._disconnect()


async def test_a_duplicate_of_a_compacted_command_gets_its_first_reply_byte_for_byte(
    redis: Any, database_url: str
) -> None:
    await _duplicates_get_their_first_replies(await Rig.start(redis), database_url)


async def test_on_redis_cluster_compaction_and_duplicates_stay_on_the_shard_slot(
    redis_cluster: Any, database_url: str
) -> None:
    await _duplicates_get_their_first_replies(await Rig.start(redis_cluster), database_url)


async def test_while_postgresql_is_away_new_commands_flow_and_a_duplicate_waits(
    redis: Any, database_url: str, postgres_server: Any
) -> None:
    rig = await Rig.start(redis)
    _ids, first = await _compact_session(rig, database_url)
    stop = asyncio.Event()
    reader = OutcomeReader(EventStore(redis, 0), lambda: database_url, poll_s=0.05, backoff_s=(0.1, 0.4))
    task = asyncio.create_task(reader.run(stop))
    await asyncio.to_thread(postgres_server.stop)
    try:
        await _publish(redis, "place_order", "c-1", exchange="okx", symbol=SYMBOL, side="buy",
                       order_type="limit", quantity="1", price="100")  # fmt: skip
        await rig.handlers[0].burst()
        new = await rig.place(USER, "sell", "0.5", "120")  # answered without PostgreSQL
        assert new
        await asyncio.sleep(1.0)  # several tries of the reader, all failing
        assert await _raw_reply(redis, "c-1") is None
        assert await redis.hkeys(KEYS.waiting) == [f"{USER}:c-1"]
    finally:
        await asyncio.to_thread(postgres_server.start)
    for _ in range(100):
        if await _raw_reply(redis, "c-1") is not None:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    assert await _raw_reply(redis, "c-1") == first["c-1"]
    assert await redis.hlen(KEYS.waiting) == 0


async def test_verify_and_replay_agree_with_the_log_after_compaction(redis: Any, database_url: str) -> None:
    rig = await Rig.start(redis)
    await _session(rig, database_url)
    async with rig.projector(database_url):
        await rig.archive()
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        before = await replay(redis, conn)
        assert (await verify(redis, conn, [0], 1)).differences == []
        done = await retention_pass(redis, conn, [0])
        assert sum(c.compacted for c in done.compactions) > 0 and sum(t.removed for t in done.trims) > 0
        assert (await verify(redis, conn, [0], 1)).differences == []
        assert await replay(redis, conn) == before
    # The compact snapshots still decide: a late fill on the compacted cancelled order is recorded.
    late_fill = await rig.send(USER, "record_fill", order_id=_cancelled(await _hashes(redis)), fill_id="late-1",
                               quantity="0.1", price="79")  # fmt: skip
    assert [e["type"] for e in late_fill["events"]][0] == "OrderFilled"


def _cancelled(hashes: dict[str, dict[str, str]]) -> str:
    (oid,) = [i for i, raw in hashes[KEYS.orders].items() if json.loads(raw).get("status") == "cancelled"]
    return oid


def test_amounts_in_compact_forms_keep_their_exact_text() -> None:
    """A decimal equal to its default but written differently ("0.00" vs "0") is kept as written,
    so arithmetic on it gives the same text as on the full snapshot."""
    driver = Driver()
    order_id = driver.place("buy", "1", order_type="limit", price="100")
    driver.ok("order_rejected", order_id=order_id, reason="x")
    order = msgspec.structs.replace(driver.order(order_id), filled_qty=Decimal("0.00"))
    assert json.loads(compact_order(order, 1))["filled_qty"] == "0.00"
