"""Issue 10: the handler's append step makes the live projection's writes itself while the
projection is caught up (``projections.live.InlineProjection``, ``lua/append.lua``), so a reply
comes with its live keys written; the projection then finds them applied.

On the real Redis of the test session, with the real command handler and live projection in
bursts (``tests.log_helpers.Rig``). The oracle is the live projection itself applying the whole
log afresh (``projected_afresh``: every live key, fence and the checkpoint), whose exact keys and
fields the contract tests pin; the append step must leave exactly that, and must write nothing
while the projection is not the one applying (no lease, a tool holding it, a checkpoint behind
the log, none yet) or a GRID order is in the batch."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from ledger.store.eventstore import Append
from ledger.store.keys import ShardKeys
from ledger.store.redis_conn import connect
from projections import live
from projections.live import InlineProjection, LiveProjection
from tests.live_helpers import blocked_in, hash_of, projected_afresh, snapshot, wait_for
from tests.log_helpers import SETTINGS, Rig

USER = "alice"
KEYS = ShardKeys(0)
TOOL = "ledger-repair:host:1"  # how ``consumers.pause`` names a tool holding a lease


async def _head(redis: Any) -> str:
    ((entry_id, _fields),) = await redis.xrevrange(KEYS.events, count=1)
    return str(entry_id)


class Counted(InlineProjection):
    """Counts the chunks it plans writes for."""

    def __init__(self, shard: int) -> None:
        super().__init__(shard)
        self.planned = 0

    def __call__(self, appends: Sequence[Append], offset: int) -> tuple[list[str], list[Any]] | None:
        self.planned += 1
        return super().__call__(appends, offset)


async def _caught_up(redis: Any) -> tuple[Rig, Counted]:
    """A rig whose handler makes the live writes, two orders placed and projected by the
    projection (which holds its lease now)."""
    planner = Counted(0)
    rig = await Rig.start(redis, live=lambda _shard: planner)
    await rig.place(USER, "buy", "0.2", "100")
    await rig.place(USER, "buy", "0.3", "99")
    await rig.project()
    assert (await redis.get(KEYS.lease(live.GROUP))).startswith(f"{live.GROUP}:")
    assert await redis.get(KEYS.checkpoint) == await _head(redis)
    return rig, planner


async def test_a_reply_comes_with_its_live_keys_written_as_the_projection_writes_them(redis: Any) -> None:
    rig, _planner = await _caught_up(redis)

    order = await rig.place(USER, "buy", "0.1", "101")  # the projection does not run
    placed = await _head(redis)
    assert await redis.get(KEYS.checkpoint) == placed
    ((told, fields),) = await redis.xrevrange(KEYS.progress, count=1)
    assert (told, fields) == (placed, {"applied": placed})
    fields = await hash_of(redis, f"orders:{order}")
    assert (fields["status"], fields["quantity"], fields["price"], fields["version"]) == ("pending", "0.1", "101", "1")
    assert order in await redis.smembers("orders:open:okx:BTC-USDT-SWAP")

    await rig.fill(USER, order, "0.1", "101")  # OrderFilled, PositionOpened
    assert await redis.get(KEYS.checkpoint) == await _head(redis)
    position = await hash_of(redis, f"positions:{USER}:okx:BTC-USDT-SWAP:long")
    assert (position["size"], position["entry_price"], position["fees"]) == ("0.1", "101", "0.01")
    assert order not in await redis.smembers("orders:open:okx:BTC-USDT-SWAP")
    week_ms = 7 * 24 * 3600 * 1000  # final: expires after the retention (LEDGER_FINAL_ORDER_TTL_S)
    assert week_ms - 60_000 < await redis.pttl(f"orders:{order}") <= week_ms

    written = await snapshot(redis)
    await rig.project()  # finds every entry applied: writes nothing
    assert await snapshot(redis) == written
    assert await projected_afresh(redis) == written  # fences and checkpoint included


async def _no_lease(redis: Any) -> None:
    await redis.delete(KEYS.lease(live.GROUP))


async def _tool_holds_the_lease(redis: Any) -> None:
    await redis.set(KEYS.lease(live.GROUP), TOOL, px=60_000)


async def _checkpoint_behind(redis: Any) -> None:
    ((first, _fields),) = await redis.xrange(KEYS.events, count=1)
    await redis.set(KEYS.checkpoint, first)  # what a tool's rewind leaves: the log is ahead


async def _no_checkpoint(redis: Any) -> None:
    await redis.delete(KEYS.checkpoint)  # the projection applied nothing: a log older than it


@pytest.mark.parametrize("situation", [_no_lease, _tool_holds_the_lease, _checkpoint_behind, _no_checkpoint])
async def test_nothing_is_written_unless_the_projection_holds_its_lease_and_applied_the_whole_log(
    redis: Any, situation: Callable[[Any], Awaitable[None]]
) -> None:
    """The handler plans the writes of every small chunk; the script makes none unless the
    projection is caught up."""
    rig, planner = await _caught_up(redis)
    await situation(redis)
    checkpoint = await redis.get(KEYS.checkpoint)
    planned = planner.planned

    order = await rig.place(USER, "sell", "0.1", "99")

    assert planner.planned == planned + 1
    assert await redis.exists(f"orders:{order}") == 0
    assert await redis.get(KEYS.checkpoint) == checkpoint
    if situation is _tool_holds_the_lease:
        return  # the projection stands by until the tool gives it back
    await rig.project()  # the projection applies what the append step left
    assert (await hash_of(redis, f"orders:{order}"))["status"] == "pending"
    assert await snapshot(redis) == await projected_afresh(redis)


async def _one_batch(rig: Rig, *extras: dict[str, Any]) -> list[str]:
    """Orders placed by commands the handler takes in one batch; their ids."""
    for n, extra in enumerate(extras):
        data = {
            "command_id": f"batch-{n}",
            "user_id": USER,
            "exchange": "okx",
            "symbol": "BTC-USDT-SWAP",
            "side": "buy",
            "order_type": "limit",
            "quantity": "0.1",
            "price": "98",
            **extra,
        }
        await rig.redis.xadd(KEYS.commands, {"type": "place_order", "data": json.dumps(data)})
    await rig.handlers[0].burst()
    replies = [await rig.redis.lindex(KEYS.reply(USER, f"batch-{n}"), 0) for n in range(len(extras))]
    return [json.loads(reply)["order_id"] for reply in replies]


async def _caught_up_again(rig: Rig) -> None:
    """Once the projection applied what the append step left, the next reply comes with its
    live keys written, and they are what the projection writes."""
    await rig.project()
    after = await rig.place(USER, "buy", "0.1", "97")
    assert (await hash_of(rig.redis, f"orders:{after}"))["price"] == "97"
    assert await rig.redis.get(KEYS.checkpoint) == await _head(rig.redis)
    assert await snapshot(rig.redis) == await projected_afresh(rig.redis)


async def test_a_grid_order_and_what_follows_it_in_the_batch_are_left_to_the_projection(redis: Any) -> None:
    rig, _planner = await _caught_up(redis)
    checkpoint = await redis.get(KEYS.checkpoint)
    level = f"okx:user:{USER}:symbol:BTC-USDT-SWAP:active_grid:3"

    grid, plain = await _one_batch(rig, {"grid_level": 3}, {})

    assert await redis.exists(f"orders:{grid}", f"orders:{plain}", level) == 0
    assert await redis.get(KEYS.checkpoint) == checkpoint
    await _caught_up_again(rig)
    assert (await hash_of(redis, level))["id"] == grid


async def test_the_projection_is_not_woken_for_what_the_append_step_applied(redis: Any) -> None:
    """The append step moves the projection's group past the entries it applied: the
    projection's consumer, blocked in XREADGROUP, stays blocked; the next entry left to it (a
    GRID order's) wakes it."""
    rig, _planner = await _caught_up(redis)
    consumer = rig.live[0]
    consumer.settings = dataclasses.replace(consumer.settings, block_ms=10_000)
    waiting = asyncio.create_task(consumer.step())
    await blocked_in(redis, "xreadgroup")

    await rig.place(USER, "buy", "0.1", "101")
    await rig.place(USER, "buy", "0.1", "102")
    applied = await _head(redis)
    await asyncio.sleep(0.2)
    assert not waiting.done()
    assert await redis.get(KEYS.checkpoint) == applied
    (group,) = [g for g in await redis.xinfo_groups(KEYS.events) if g["name"] == live.GROUP]
    assert (group["last-delivered-id"], group["pending"]) == (applied, 0)

    (grid,) = await _one_batch(rig, {"grid_level": 3})
    assert await asyncio.wait_for(waiting, 10) == 1
    assert (await hash_of(redis, f"orders:{grid}"))["id"] == grid
    assert await redis.get(KEYS.checkpoint) == await _head(redis)


async def test_the_projection_sweeps_when_no_entry_comes(redis: Any) -> None:
    """Expired final orders leave ``orders:user:…`` although every entry was applied by the
    append step (the projection's read finds nothing, then it sweeps): here a 1 s retention."""
    planner = InlineProjection(0, final_order_ttl_s=1, fence_keep_s=1)
    rig = await Rig.start(redis, live=lambda _shard: planner)
    rig.live[0] = LiveProjection(redis, 0, final_order_ttl_s=1, fence_keep_s=1).consumer(SETTINGS)
    await rig.place(USER, "buy", "0.2", "100")
    await rig.project()  # caught up: the projection holds its lease
    order = await rig.place(USER, "buy", "0.1", "101")
    await rig.send(USER, "cancel_order", order_id=order)
    await rig.send(USER, "order_cancelled", order_id=order)  # final, by the append step
    assert await redis.get(KEYS.checkpoint) == await _head(redis)
    assert order in await redis.smembers(f"orders:user:{USER}:okx")

    await wait_for(lambda: _gone(redis, f"orders:{order}"), "the final order's hash to expire", timeout=5)
    await asyncio.sleep(0.05)
    assert await rig.live[0].step() == 0  # nothing to read: it sweeps
    assert order not in await redis.smembers(f"orders:user:{USER}:okx")
    assert await redis.zcard(KEYS.expiring) == 0


async def _gone(redis: Any, key: str) -> bool:
    return not await redis.exists(key)


async def test_a_chunk_of_more_events_than_the_handler_makes_writes_for_is_left_to_the_projection(
    redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live, "INLINE_EVENTS", 1)
    rig, planner = await _caught_up(redis)
    checkpoint, planned = await redis.get(KEYS.checkpoint), planner.planned

    orders = await _one_batch(rig, {}, {})  # two OrderPlaced

    assert await redis.exists(*(f"orders:{order}" for order in orders)) == 0
    assert await redis.get(KEYS.checkpoint) == checkpoint
    assert planner.planned == planned + 1  # asked, and declined
    await _caught_up_again(rig)  # one event


# --------------------------------------------------------------------------- any interleaving

ACTIONS = st.lists(
    st.one_of(
        st.tuples(
            st.just("place"),
            st.sampled_from(["buy", "sell"]),
            st.sampled_from(["0.1", "0.25", "1"]),
            st.sampled_from(["95", "100", "104.5"]),
            st.sampled_from([None, None, None, 1, 2]),
        ),
        st.tuples(st.just("fill"), st.integers(0, 50), st.sampled_from(["part", "rest"])),
        st.tuples(st.just("cancel"), st.integers(0, 50)),
        st.sampled_from([("project",), ("pause",), ("no lease",)]),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=ACTIONS)
def test_any_interleaving_leaves_the_keys_a_projection_of_the_whole_log_leaves(
    redis_url: str, actions: list[tuple[Any, ...]]
) -> None:
    """Orders placed (some on GRID levels), filled in parts, cancelled; the projection run, paused
    by a tool, resumed, its lease lapsed, at any point between them: once the projection has run
    at the end, the live keys are exactly those of the whole log applied afresh."""

    async def session() -> None:
        redis = await connect(redis_url)
        try:
            await redis.flushall()
            rig = await Rig.start(redis, live=InlineProjection)
            open_orders = [(await rig.place(USER, "buy", "1", "100"), "1")]  # (order id, quantity left)
            for action in actions:
                if action[0] == "place":
                    _, side, quantity, price, level = action
                    extra = {} if level is None else {"grid_level": level}
                    open_orders.append((await rig.place(USER, side, quantity, price, **extra), quantity))
                elif action[0] in ("fill", "cancel") and open_orders:
                    at = action[1] % len(open_orders)
                    order, left = open_orders[at]
                    if action[0] == "cancel":
                        await rig.send(USER, "cancel_order", order_id=order)
                        del open_orders[at]
                    elif action[2] == "part" and left == "1":
                        await rig.fill(USER, order, "0.5", "100")
                        open_orders[at] = (order, "0.5")
                    else:
                        await rig.fill(USER, order, left, "100")
                        del open_orders[at]
                elif action[0] == "project":
                    await rig.project()
                elif action[0] == "pause":
                    await _tool_holds_the_lease(redis)
                elif action[0] == "no lease":  # the tool gave it back, or the projection's lapsed
                    await _no_lease(redis)
            await _no_lease(redis)
            await rig.project()
            assert await snapshot(redis) == await projected_afresh(redis)
        finally:
            await redis.aclose()

    asyncio.run(session())
