"""Issue 10: what one step of the live projection costs the server, and the paths that keep it
cheap: one script call per step on a plain Redis (no WATCH/MULTI), the checkpoint kept in
memory and checked by that call, the grid level of an order seen placed kept in memory, the
sweep of ``expiring`` only when something is due, the script loaded again when the server lost
it. Counted with the server's own ``INFO commandstats`` on the real Redis of the test session;
the events come from the real command handler (``tests.log_helpers.Rig``)."""

from __future__ import annotations

from typing import Any

import pytest

from consumers.entries import Entry
from ledger.store.keys import ShardKeys
from projections import live, verify
from projections.live import LiveProjection
from tests.live_helpers import projected_afresh, snapshot
from tests.log_helpers import Rig
from tests.round_trips import RoundTrips

USER = "alice"
KEYS = ShardKeys(0)


async def _calls(redis: Any, *commands: str) -> dict[str, int]:
    """Calls of ``commands`` since the last ``CONFIG RESETSTAT``, as the server counts them
    (commands a script runs count too: ask only for those a script does not run)."""
    stats = await redis.info("commandstats")
    return {c: int(stats[f"cmdstat_{c}"]["calls"]) for c in commands if f"cmdstat_{c}" in stats}


async def _last(redis: Any) -> Entry:
    ((entry_id, _fields),) = await redis.xrevrange(KEYS.events, count=1)
    return Entry(entry_id, {})


async def test_a_plain_redis_step_is_one_script_call(redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live, "SWEEP_EVERY_MS", 3_600_000)  # no periodic read in this test
    rig = await Rig.start(redis)
    order = await rig.place(USER, "buy", "0.1", "100")
    projection = LiveProjection(redis, 0, holder="me")
    projection.redis = trips = RoundTrips(redis)
    await redis.set(KEYS.lease(live.GROUP), "me")

    await redis.config_resetstat()
    await projection.handle([await _last(redis)])
    # The checkpoint and lease read once, the log, the script loaded and called once; then the
    # sweep's one pipeline (what is due, what is next).
    assert trips.trips == [
        "mget",
        "xrange",
        "script_load",
        "EVALSHA",
        "pipeline(zrangebyscore, zrangebyscore)",
    ]
    top_level = ("evalsha", "eval", "multi", "exec", "watch", "mget", "xrange", "zrangebyscore")
    assert await _calls(redis, *top_level) == {"evalsha": 1, "mget": 1, "xrange": 1, "zrangebyscore": 2}

    await rig.fill(USER, order, "0.1", "100")  # OrderFilled, PositionOpened
    trips.trips.clear()
    await redis.config_resetstat()
    await projection.handle([await _last(redis)])
    # The checkpoint read again (the handler's append step moves it too: ``InlineProjection``),
    # the order's grid level (none) is known, nothing is due: the log and one script call.
    assert trips.trips == ["mget", "xrange", "EVALSHA"]
    assert await _calls(redis, *top_level) == {"evalsha": 1, "mget": 1, "xrange": 1}

    assert (await redis.get(KEYS.checkpoint)) == (await _last(redis)).id
    applied = await snapshot(redis)
    assert await projected_afresh(redis) == applied


async def _delivered_after(redis: Any, entry_id: str) -> list[Entry]:
    """The log's entries after ``entry_id`` with their fields, as the group delivers them."""
    return [Entry(i, fields) for i, fields in await redis.xrange(KEYS.events, min=f"({entry_id}")]


async def test_a_delivered_batch_that_follows_the_checkpoint_is_applied_as_delivered(
    redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live, "SWEEP_EVERY_MS", 3_600_000)
    rig = await Rig.start(redis)
    order = await rig.place(USER, "buy", "0.2", "100")
    projection = LiveProjection(redis, 0)
    placed = await _last(redis)
    await projection.handle(await _delivered_after(redis, "0-0"))  # the first step reads the log
    await rig.fill(USER, order, "0.1", "100")  # OrderPartiallyFilled, PositionOpened: chain 2, 3
    projection.redis = trips = RoundTrips(redis)

    # Chain numbers 2 and 3 follow the checkpoint's 1, which is still the one it wrote: applied
    # as delivered (in log order, whatever the order delivered), no XRANGE.
    await projection.handle(list(reversed(await _delivered_after(redis, placed.id))))

    assert trips.trips == ["mget", "EVALSHA"]
    assert (await redis.get(KEYS.checkpoint)) == (await _last(redis)).id
    applied = await snapshot(redis)
    assert await projected_afresh(redis) == applied


async def test_a_delivered_batch_with_a_gap_is_read_from_the_log(redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live, "SWEEP_EVERY_MS", 3_600_000)
    rig = await Rig.start(redis)
    order = await rig.place(USER, "buy", "0.2", "100")
    projection = LiveProjection(redis, 0)
    await projection.handle(await _delivered_after(redis, "0-0"))
    placed = await _last(redis)
    await rig.fill(USER, order, "0.1", "100")
    await rig.fill(USER, order, "0.1", "101")  # chain 2 to 5
    projection.redis = trips = RoundTrips(redis)
    after = await _delivered_after(redis, placed.id)

    # 2, 4 and 5 delivered (3 went to another reader): the log is read, 3 applied in its place.
    await projection.handle([after[0], *after[2:]])

    assert trips.trips == ["mget", "xrange", "EVALSHA"]
    position = await redis.hgetall(f"positions:{USER}:okx:BTC-USDT-SWAP:long")
    assert (position["size"], position["entry_price"], position["version"]) == ("0.2", "100.5", "2")
    applied = await snapshot(redis)
    assert await projected_afresh(redis) == applied


async def _moved_under_it(redis: Any) -> list[str]:
    """Applier A applies the first batch; two more are appended; A is handed both and reads the
    checkpoint (its own), then B applies the second: A's step, planned from the checkpoint it
    read, finds it moved, writes nothing, reads it again and applies the rest. Returns A's
    round trips in its second batch."""
    rig = await Rig.start(redis)
    order = await rig.place(USER, "buy", "0.2", "100")
    a, b = LiveProjection(redis, 0), LiveProjection(redis, 0)
    await a.handle([await _last(redis)])
    await rig.fill(USER, order, "0.1", "100")
    second = await _last(redis)
    await rig.fill(USER, order, "0.1", "101")
    a.redis = trips = RoundTrips(redis, then={"mget": lambda: b.handle([second])})
    await a.handle([await _last(redis)])
    assert (await redis.get(KEYS.checkpoint)) == (await _last(redis)).id
    position = await redis.hgetall(f"positions:{USER}:okx:BTC-USDT-SWAP:long")
    assert (position["size"], position["entry_price"], position["version"]) == ("0.2", "100.5", "2")
    applied = await snapshot(redis)
    assert await projected_afresh(redis) == applied
    return trips.trips


async def test_a_checkpoint_moved_by_another_applier_is_read_again(redis: Any) -> None:
    # Planned from its own checkpoint and refused; the checkpoint read; the rest planned again
    # (the order's level read: it became final in the first plan, which forgot it) and applied.
    assert await _moved_under_it(redis) == [
        "mget",
        "xrange",
        "EVALSHA",
        "mget",
        "xrange",
        "pipeline(hget)",
        "EVALSHA",
    ]


async def test_a_checkpoint_moved_by_another_applier_is_read_again_on_cluster(redis_cluster: Any) -> None:
    await _moved_under_it(redis_cluster)


async def _script_lost(redis: Any) -> None:
    rig = await Rig.start(redis)
    order = await rig.place(USER, "buy", "0.1", "100")
    projection = LiveProjection(redis, 0)
    await projection.handle([await _last(redis)])
    await redis.script_flush()  # what a restart of the server does to its script cache
    await rig.fill(USER, order, "0.1", "100")
    await projection.handle([await _last(redis)])
    assert (await redis.get(KEYS.checkpoint)) == (await _last(redis)).id
    position = await redis.hgetall(f"positions:{USER}:okx:BTC-USDT-SWAP:long")
    assert (position["size"], position["status"]) == ("0.1", "open")
    applied = await snapshot(redis)
    assert await projected_afresh(redis) == applied


async def test_the_script_is_loaded_again_when_the_server_lost_it(redis: Any) -> None:
    await _script_lost(redis)


async def test_the_script_is_loaded_again_when_the_server_lost_it_on_cluster(redis_cluster: Any) -> None:
    await _script_lost(redis_cluster)


async def test_a_cluster_step_is_one_call_per_slot_then_the_checkpoint(redis_cluster: Any) -> None:
    redis = redis_cluster
    rig = await Rig.start(redis)
    order = await rig.place(USER, "buy", "0.1", "100")
    projection = LiveProjection(redis, 0)
    projection.redis = trips = RoundTrips(redis)
    await projection.handle([await _last(redis)])
    written = [f"orders:{order}", f"orders:user:{USER}:okx", "orders:open:okx:BTC-USDT-SWAP"]
    slots = {redis.keyslot(key) for key in written}  # each key's fence is on the key's slot
    # The checkpoint and lease, the log, the script loaded; one call per slot in one pipeline;
    # then the checkpoint moved by a call of its own; the next step finds nothing left; the sweep.
    assert trips.trips == [
        "mget",
        "xrange",
        "script_load",
        f"pipeline({', '.join(['execute_command'] * len(slots))})",
        "EVALSHA",
        "mget",
        "pipeline(zrangebyscore, zrangebyscore)",
    ]
    assert (await redis.get(KEYS.checkpoint)) == (await _last(redis)).id
    applied = await snapshot(redis)
    assert set(applied) == {*written, *(f"ledger:live:fence:{{{key}}}" for key in written[1:]), KEYS.checkpoint}
    assert await projected_afresh(redis) == applied


async def test_a_set_written_whole_may_hold_more_members_than_one_lua_call_takes(redis: Any) -> None:
    # ``verify --repair`` writes a set key of the wrong type whole ('sput'): a grid user's
    # ``orders:user:...`` can hold tens of thousands of ids, past what Lua's unpack takes at once.
    key = "orders:user:alice:okx"
    members = [f"order-{n:05d}" for n in range(9_001)]
    await redis.set(key, "not a set")

    await redis.eval(verify._REPAIR, 2, key, "ledger:live:fence:{orders:user:alice:okx}", "sput", "", "-", "", *members)

    assert await redis.type(key) == "set"
    assert sorted(await redis.smembers(key)) == members
