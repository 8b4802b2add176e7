"""The command handler decides a user it appended for from memory (``consumers.user_books``),
with no read of the user's token or snapshots; a memory made stale by another handler shows as a
conflict, decided again on fresh state, never as a wrong decision.

Two real ``CommandHandler``s on one shard of the test session's Redis, each given the entries of
a batch directly (as its consumer would)."""

from __future__ import annotations

import itertools
import json
from typing import Any

from consumers.command_handler import CommandHandler
from consumers.entries import Entry
from ledger.store.eventstore import EventStore
from ledger.store.keys import ShardKeys
from tests.round_trips import RoundTrips

KEYS = ShardKeys(0)
ORDER = {"exchange": "okx", "symbol": "BTC-USDT-SWAP", "side": "buy", "order_type": "limit", "price": "100"}
_ids = itertools.count(1)


def _handler(redis: Any) -> CommandHandler:
    return CommandHandler(EventStore(redis, 0), 1)


Command = tuple[str, str, dict[str, Any]]  # user, type, data


async def _batch(redis: Any, handler: CommandHandler, *commands: Command) -> list[dict[str, Any]]:
    """Publish the commands, have ``handler`` handle them as one batch, return their replies."""
    entries, replies = [], []
    for user, type_, data in commands:
        command_id = f"c-{next(_ids)}"
        fields = {"type": type_, "data": json.dumps({"command_id": command_id, "user_id": user, **data})}
        entries.append(Entry(await redis.xadd(KEYS.commands, fields), fields))
        replies.append(KEYS.reply(user, command_id))
    await handler.handle(entries)
    return [json.loads(await redis.lindex(key, 0)) for key in replies]


async def _order(redis: Any, order_id: str) -> dict[str, Any]:
    return json.loads(await redis.hget(KEYS.orders, order_id))  # type: ignore[no-any-return]


async def test_a_user_the_handler_appended_for_is_decided_without_reading_its_state(redis: Any) -> None:
    handler = _handler(redis)
    (placed,) = await _batch(redis, handler, ("alice", "place_order", {**ORDER, "quantity": "1"}))
    order_id = placed["order_id"]
    handler.store.redis = trips = RoundTrips(redis)

    fill = {"order_id": order_id, "fill_id": "f-1", "quantity": "0.4", "price": "100"}
    (filled,) = await _batch(redis, handler, ("alice", "record_fill", fill))

    assert trips.trips == ["EVALSHA"]  # the append, and no load
    assert filled["status"] == "accepted"
    order = await _order(redis, order_id)
    assert (order["status"], order["filled_qty"], order["version"]) == ("partially_filled", "0.4", 2)


async def test_a_memory_another_handler_made_stale_is_a_conflict_decided_again_on_fresh_state(redis: Any) -> None:
    first, second = _handler(redis), _handler(redis)
    (placed,) = await _batch(redis, first, ("alice", "place_order", {**ORDER, "quantity": "1"}))
    order_id = placed["order_id"]
    fill = {"order_id": order_id, "fill_id": "f-1", "quantity": "1", "price": "100"}
    (filled,) = await _batch(redis, second, ("alice", "record_fill", fill))
    assert filled["status"] == "accepted"

    # ``first`` remembers the order open; the order is filled.
    (cancelled,) = await _batch(redis, first, ("alice", "cancel_order", {"order_id": order_id}))

    assert (cancelled["status"], cancelled["error"]["code"]) == ("rejected", "INVALID_TRANSITION")
    order = await _order(redis, order_id)
    assert (order["status"], order["filled_qty"], order["version"]) == ("filled", "1", 2)
    assert await redis.xlen(KEYS.events) == 3  # placed, filled, the position opened: no cancel
    # a user whose command conflicted is forgotten: its next command reads its state first
    first.store.redis = trips = RoundTrips(redis)
    (placed,) = await _batch(redis, first, ("alice", "place_order", {**ORDER, "quantity": "1"}))
    assert placed["status"] == "accepted"
    # its token and slots, the position its slot names, then one append: no conflict
    assert trips.trips == ["pipeline(hmget, hmget)", "pipeline(hmget)", "EVALSHA"]


async def test_another_users_order_is_never_remembered_for_the_user_who_named_it(redis: Any) -> None:
    """Bob names alice's order (refused); alice's order then fills through another handler; a
    batch of bob's and alice's commands must decide alice's on her order as it is."""
    first, second = _handler(redis), _handler(redis)
    (placed,) = await _batch(redis, second, ("alice", "place_order", {**ORDER, "quantity": "1"}))
    order_id = placed["order_id"]
    (named,) = await _batch(redis, first, ("bob", "cancel_order", {"order_id": order_id}))
    assert (named["status"], named["error"]["code"]) == ("rejected", "UNKNOWN_ORDER")
    fill = {"order_id": order_id, "fill_id": "f-1", "quantity": "1", "price": "100"}
    assert (await _batch(redis, second, ("alice", "record_fill", fill)))[0]["status"] == "accepted"

    bob, alice = await _batch(
        redis,
        first,
        ("bob", "place_order", {**ORDER, "quantity": "2"}),
        ("alice", "cancel_order", {"order_id": order_id}),
    )

    assert bob["status"] == "accepted"
    assert (alice["status"], alice["error"]["code"]) == ("rejected", "INVALID_TRANSITION")
    assert (await _order(redis, order_id))["status"] == "filled"
