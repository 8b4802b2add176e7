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


# --------------------------------------------------------------------------- one batch ahead
# The runner hands the next batch over before it awaits the answers of the one before
# (``consumers.runner``: one batch ahead): ``begin`` decides a batch and sends its appends, and
# the next ``begin`` decides from the users as the first was decided, before it was answered.


async def _entries(redis: Any, *commands: Command) -> tuple[list[Entry], list[str]]:
    entries, replies = [], []
    for user, type_, data in commands:
        command_id = f"c-{next(_ids)}"
        fields = {"type": type_, "data": json.dumps({"command_id": command_id, "user_id": user, **data})}
        entries.append(Entry(await redis.xadd(KEYS.commands, fields), fields))
        replies.append(KEYS.reply(user, command_id))
    return entries, replies


async def _replies(redis: Any, keys: list[str]) -> list[dict[str, Any]]:
    return [json.loads(await redis.lindex(key, 0)) for key in keys]


async def test_a_batch_decided_ahead_starts_from_the_one_being_appended(redis: Any) -> None:
    handler = _handler(redis)
    (placed,) = await _batch(redis, handler, ("alice", "place_order", {**ORDER, "quantity": "1"}))
    order_id = placed["order_id"]
    handler.store.redis = trips = RoundTrips(redis)
    fill_1 = {"order_id": order_id, "fill_id": "f-1", "quantity": "0.25", "price": "100"}
    fill_2 = {"order_id": order_id, "fill_id": "f-2", "quantity": "0.5", "price": "102"}
    first, first_replies = await _entries(
        redis, ("alice", "record_fill", fill_1), ("bob", "place_order", {**ORDER, "quantity": "2"})
    )
    second, second_replies = await _entries(redis, ("alice", "record_fill", fill_2))

    rest_1 = await handler.begin(first)
    rest_2 = await handler.begin(second)  # before the first batch's appends answered
    assert rest_1 is not None and rest_2 is not None
    await rest_1
    await rest_2

    # bob's state and alice's token read once (bob is new), then one append per batch
    # bob's state and token read (alice is known), one append per batch: no load for the second
    assert trips.trips == ["pipeline(hmget, hmget)", "EVALSHA", "EVALSHA"]
    assert [r["status"] for r in await _replies(redis, first_replies + second_replies)] == ["accepted"] * 3
    order = await _order(redis, order_id)
    assert (order["status"], order["filled_qty"], order["avg_fill_price"], order["version"]) == (
        "partially_filled",
        "0.75",
        "101.3333333333333333333333333",
        3,
    )


async def test_a_conflict_in_a_batch_fails_the_batch_decided_ahead_on_it_and_both_are_decided_again(
    redis: Any,
) -> None:
    """The first batch's memory of alice is stale (another handler filled her order): its cancel
    conflicts, and so does the second batch's order decided ahead on the cancel's token. Both
    are decided again on fresh state, in order: the cancel refused (the order is filled), the
    new order placed; bob's order, in the first batch, goes through at once."""
    first_handler, other = _handler(redis), _handler(redis)
    (placed,) = await _batch(redis, first_handler, ("alice", "place_order", {**ORDER, "quantity": "1"}))
    order_id = placed["order_id"]
    fill = {"order_id": order_id, "fill_id": "f-1", "quantity": "1", "price": "100"}
    (filled,) = await _batch(redis, other, ("alice", "record_fill", fill))
    assert filled["status"] == "accepted"
    first_handler.store.redis = trips = RoundTrips(redis)

    cancel, cancel_replies = await _entries(
        redis, ("alice", "cancel_order", {"order_id": order_id}), ("bob", "place_order", {**ORDER, "quantity": "2"})
    )
    again, again_replies = await _entries(redis, ("alice", "place_order", {**ORDER, "quantity": "3"}))
    rest_1 = await first_handler.begin(cancel)
    rest_2 = await first_handler.begin(again)
    assert rest_1 is not None and rest_2 is not None
    await rest_1
    await rest_2

    # each batch one append; then alice's cancel and her order decided again, each on state
    # loaded afresh (her token and the order, then the order's position), in that order
    load_cancel = ["pipeline(hmget, hmget)", "pipeline(hmget)", "pipeline(hmget)"]
    load_place = ["pipeline(hmget, hmget)", "pipeline(hmget)"]
    assert trips.trips == [
        "pipeline(hmget, hmget)",
        "EVALSHA",
        "EVALSHA",
        *load_cancel,
        "EVALSHA",
        *load_place,
        "EVALSHA",
    ]
    cancelled, bob, second = await _replies(redis, cancel_replies + again_replies)
    assert (cancelled["status"], cancelled["error"]["code"]) == ("rejected", "INVALID_TRANSITION")
    assert (bob["status"], second["status"]) == ("accepted", "accepted")
    order = await _order(redis, order_id)
    assert (order["status"], order["filled_qty"], order["version"]) == ("filled", "1", 2)
    assert (await _order(redis, second["order_id"]))["quantity"] == "3"
    types = [fields["type"] for _id, fields in await redis.xrange(KEYS.events)]
    assert types == ["OrderPlaced", "OrderFilled", "PositionOpened", "OrderPlaced", "OrderPlaced"]
