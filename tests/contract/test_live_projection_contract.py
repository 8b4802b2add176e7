"""The live projection's contract (``projections.live.LiveProjection``), run on a plain Redis and
on a Redis Cluster.

``LiveProjectionContract`` holds what the projection promises whatever Redis it writes to: a
scripted sequence of events gives exactly the keys and fields of CONTRACT §6 (GRID keys
included); applying the log again, whole or from any entry, changes nothing; the checkpoint only
moves forward; a write whose lease names another applier is refused, and so is a stale
applier's older write. It is not collected by itself; each backend subclasses it and says only
how to get a client. The events come from the real command handler with a clock the test sets
(``tests.log_helpers.Rig``: external execution, the test reports accepts and fills), so every
timestamp is known.
"""

from __future__ import annotations

from typing import Any

import pytest

from consumers.entries import Entry
from consumers.runner import LeaseLost
from ledger.store.keys import ShardKeys
from projections.live import FINAL_ORDER_TTL_S, GROUP, LiveProjection
from tests.live_helpers import (
    ORDER_EXTRA,
    ORDER_FIELDS,
    POSITION_EXTRA,
    POSITION_FIELDS,
    all_keys,
    dump_key,
    hash_of,
    members,
)
from tests.log_helpers import SYMBOL, T0, Rig

USER = "alice"
KEYS = ShardKeys(0)
POSITION_KEY = f"positions:{USER}:okx:{SYMBOL}:long"
GRID = f"okx:user:{USER}:symbol:{SYMBOL}"
GRID_HASHES = f"orders:okx:user:{USER}:symbol:{SYMBOL}"


def at(command: int) -> str:
    """The handler's clock (epoch ms, as hashes hold it) at the ``command``-th command."""
    return str(T0 + 1000 * command)


class Session:
    """Seven commands of one user: a grid buy placed, accepted, partly filled (opening a long),
    a sell partly filling against it (reducing the long), the buy cancelled."""

    def __init__(self, buy: str, sell: str, position: str) -> None:
        self.buy, self.sell, self.position = buy, sell, position

    @classmethod
    async def play(cls, rig: Rig) -> Session:
        buy = await rig.place(USER, "buy", "1", "100", grid_level=2)  # 1
        await rig.send(USER, "order_accepted", order_id=buy, exchange_order_id="x-1")  # 2
        await rig.fill(USER, buy, "0.4", "100")  # 3: opens the long
        sell = await rig.place(USER, "sell", "0.4", "110")  # 4
        await rig.fill(USER, sell, "0.1", "110")  # 5: reduces it
        await rig.send(USER, "cancel_order", order_id=buy)  # 6
        await rig.send(USER, "order_cancelled", order_id=buy)  # 7
        position = await rig.redis.hget(KEYS.slots, f"{USER}|okx|{SYMBOL}|long")
        return cls(buy, sell, position)


class LiveProjectionContract:
    """What ``LiveProjection`` promises on any Redis. Subclasses provide ``client``."""

    @pytest.fixture
    def client(self) -> Any:
        raise NotImplementedError

    @pytest.fixture
    async def rig(self, client: Any) -> Rig:
        return await Rig.start(client)

    async def live(self, client: Any) -> dict[str, Any]:
        """Every key the projection writes, with type, contents and whether it expires."""
        found: set[str] = set()
        for pattern in ("positions:*", "orders:*", "*:active_grid:*", "ledger:live:*", "ledger:{0}:projection*"):
            found.update(await all_keys(client, pattern))
        return {key: await dump_key(client, key) for key in sorted(found)}

    async def log(self, client: Any) -> list[str]:
        return [entry_id for entry_id, _fields in await client.xrange(KEYS.events)]

    # ----------------------------------------------------------------- the keys of §6

    async def test_a_scripted_session_writes_exactly_the_keys_and_fields_of_section_6(
        self, client: Any, rig: Rig
    ) -> None:
        s = await Session.play(rig)

        await rig.project()

        log = await self.log(client)
        # placed, accepted, filled + opened; placed, filled + reduced; cancel requested, cancelled
        assert len(log) == 9
        live = await self.live(client)
        fenced = {
            POSITION_KEY,
            f"positions:index:{USER}:okx",
            "positions:active",
            "ledger:live:position-keys",
            f"orders:user:{USER}:okx",
            f"orders:open:okx:{SYMBOL}",
            f"{GRID}:active_grid:2",
            f"{GRID_HASHES}:orders",
            f"{GRID_HASHES}:order_placed_index",
        }
        assert set(live) == {
            POSITION_KEY,
            f"positions:index:{USER}:okx",
            "positions:active",
            "ledger:live:position-keys",
            f"orders:{s.buy}",
            f"orders:{s.sell}",
            f"orders:user:{USER}:okx",
            f"orders:open:okx:{SYMBOL}",
            f"{GRID_HASHES}:order_placed_index",  # level 2 cleared: active_grid:2 and orders emptied
            KEYS.checkpoint,
            KEYS.progress,
            KEYS.expiring,
            *(f"ledger:live:fence:{{{key}}}" for key in fenced),
        }
        # Each step told its checkpoint on the progress stream; the last one is the log's end.
        kind, progress, expires = live[KEYS.progress]
        assert (kind, expires) == ("stream", False)
        assert progress[-1] == (log[-1], {"applied": log[-1]})
        assert all(fields == {"applied": entry_id} and entry_id in log for entry_id, fields in progress)

        position = await hash_of(client, POSITION_KEY)
        assert set(position) == POSITION_FIELDS | POSITION_EXTRA
        # 0.4 bought at 100 (fee 0.01), 0.1 sold at 110 (fee 0.01): gross (110 - 100) x 0.1 = 1.
        assert position == {
            "id": s.position,
            "user_id": USER,
            "exchange": "okx",
            "symbol": SYMBOL,
            "side": "long",
            "size": "0.3",
            "entry_price": "100",
            "exit_price": "110",
            "leverage": "1",
            "realized_pnl": "0.98",
            "pnl": "0.98",
            "gross_pnl": "1.0",
            "fees": "0.02",
            "other_fees": "{}",
            "excess_qty": "0",
            "status": "open",
            "stop_loss": "",
            "take_profit": "",
            "metadata": "{}",
            "contract_value": "",  # linear: none recorded
            "created_at": at(3),
            "updated_at": at(5),
            "version": "2",
        }
        assert await members(client, f"positions:index:{USER}:okx") == {s.position}
        assert await members(client, "positions:active") == {s.position}
        assert await hash_of(client, "ledger:live:position-keys") == {s.position: POSITION_KEY}

        common = {
            "user_id": USER,
            "exchange": "okx",
            "symbol": SYMBOL,
            "order_type": "limit",
            "trigger_price": "",
            "client_order_id": "",
            "position_side": "",
            "reduce_only": "false",
            "leverage": "",
            "reject_reason": "",
            "metadata": "{}",
        }
        buy = await hash_of(client, f"orders:{s.buy}")
        assert set(buy) == ORDER_FIELDS | ORDER_EXTRA
        assert buy == {
            **common,
            "id": s.buy,
            "side": "buy",
            "quantity": "1",
            "price": "100",
            "filled_qty": "0.4",
            "avg_fill_price": "100",
            "fill_basis": "40.0",
            "status": "cancelled",
            "exchange_order_id": "x-1",
            "position_id": "",
            "grid_level": "2",
            "created_at": at(1),
            "updated_at": at(7),
            "version": "5",
        }
        assert FINAL_ORDER_TTL_S - 300 < await client.ttl(f"orders:{s.buy}") <= FINAL_ORDER_TTL_S
        sell = await hash_of(client, f"orders:{s.sell}")
        assert sell == {
            **common,
            "id": s.sell,
            "side": "sell",
            "quantity": "0.4",
            "price": "110",
            "filled_qty": "0.1",
            "avg_fill_price": "110",
            "fill_basis": "11.0",
            "status": "partially_filled",
            "exchange_order_id": "",
            "position_id": "",
            "grid_level": "",
            "created_at": at(4),
            "updated_at": at(5),
            "version": "2",
        }
        assert await client.ttl(f"orders:{s.sell}") == -1
        assert await members(client, f"orders:user:{USER}:okx") == {s.buy, s.sell}
        assert await members(client, f"orders:open:okx:{SYMBOL}") == {s.sell}
        assert await hash_of(client, f"{GRID_HASHES}:order_placed_index") == {"2": "0"}
        assert await client.get(KEYS.checkpoint) == log[-1]

    async def test_a_grid_order_while_live_fills_its_level_keys(self, client: Any, rig: Rig) -> None:
        buy = await rig.place(USER, "buy", "1", "100", grid_level=2)
        await rig.send(USER, "order_accepted", order_id=buy, exchange_order_id="x-1")

        await rig.project()

        order = await hash_of(client, f"orders:{buy}")
        assert (order["status"], order["version"], order["grid_level"]) == ("open", "2", "2")
        assert await hash_of(client, f"{GRID}:active_grid:2") == order
        assert await hash_of(client, f"{GRID_HASHES}:orders") == {"2": "100"}
        assert await hash_of(client, f"{GRID_HASHES}:order_placed_index") == {"2": "1"}
        assert await members(client, f"orders:open:okx:{SYMBOL}") == {buy}

    # ----------------------------------------------------------------- idempotence

    async def test_applying_the_log_again_whole_or_from_any_entry_changes_nothing(self, client: Any, rig: Rig) -> None:
        await Session.play(rig)
        await rig.project()
        before = await self.live(client)
        log = await self.log(client)

        # Redelivered to the group: entries at or before the checkpoint are applied already.
        await client.xgroup_setid(KEYS.events, GROUP, "0")
        assert await rig.live[0].burst() == len(log)
        assert await self.live(client) == before

        # Applied again from the start and from every entry (the checkpoint moved back by hand):
        # every write is refused as old or lands the same value.
        for start in [None, *log[:-1]]:
            if start is None:
                await client.delete(KEYS.checkpoint)
            else:
                await client.set(KEYS.checkpoint, start)
            await LiveProjection(client, 0).handle([Entry(log[-1], {})])
            assert await self.live(client) == before, start

    # ----------------------------------------------------------------- the checkpoint

    async def test_the_checkpoint_moves_only_forward_up_to_the_last_entry_delivered(
        self, client: Any, rig: Rig
    ) -> None:
        s = await Session.play(rig)
        log = await self.log(client)
        projection = LiveProjection(client, 0)

        await projection.handle([Entry(log[2], {})])  # placed, accepted, filled: the long not yet
        assert await client.get(KEYS.checkpoint) == log[2]
        assert await hash_of(client, f"orders:{s.buy}") != {}
        assert await client.exists(POSITION_KEY, f"orders:{s.sell}") == 0

        await projection.handle([Entry(log[6], {}), Entry(log[1], {})])  # the last delivered decides
        assert await client.get(KEYS.checkpoint) == log[6]
        assert (await hash_of(client, f"orders:{s.sell}"))["status"] == "partially_filled"
        assert (await hash_of(client, POSITION_KEY))["size"] == "0.3"
        middle = await self.live(client)

        await projection.handle([Entry(log[0], {})])  # older than the checkpoint: nothing to do
        assert await self.live(client) == middle

        await projection.handle([Entry(log[-1], {})])
        assert await client.get(KEYS.checkpoint) == log[-1]
        assert (await hash_of(client, f"orders:{s.buy}"))["status"] == "cancelled"

    # ----------------------------------------------------------------- fencing

    async def test_a_write_under_a_lease_that_names_another_applier_is_refused(self, client: Any, rig: Rig) -> None:
        await Session.play(rig)
        log = await self.log(client)
        projection = LiveProjection(client, 0, holder="stale")
        lease = KEYS.lease(GROUP)
        await client.set(lease, "stale")
        await projection.handle([Entry(log[2], {})])
        before = await self.live(client)

        await client.set(lease, "successor")
        with pytest.raises(LeaseLost, match=r"held by 'successor', not by 'stale'"):
            await projection.handle([Entry(log[-1], {})])

        assert await self.live(client) == before
        assert await client.get(KEYS.checkpoint) == log[2]
        await client.delete(lease)
        with pytest.raises(LeaseLost):  # no lease at all: not held either
            await projection.handle([Entry(log[-1], {})])
        assert await self.live(client) == before

    async def test_a_stale_applier_never_writes_an_older_event_over_a_newer_one(self, client: Any, rig: Rig) -> None:
        """Without a lease (a tool, or a holder that has not noticed yet): the fences refuse older writes."""
        s = await Session.play(rig)
        log = await self.log(client)
        await LiveProjection(client, 0).handle([Entry(log[-1], {})])
        newer = await self.live(client)

        # A stale applier whose view of the checkpoint is from before the reduction and the cancel.
        await client.set(KEYS.checkpoint, log[1])
        await LiveProjection(client, 0).handle([Entry(log[3], {})])
        await client.set(KEYS.checkpoint, log[-1])

        assert await self.live(client) == newer
        assert (await hash_of(client, f"orders:{s.buy}"))["status"] == "cancelled"
        assert (await hash_of(client, POSITION_KEY))["size"] == "0.3"


class TestLiveProjectionOnRedis(LiveProjectionContract):
    @pytest.fixture
    def client(self, redis: Any) -> Any:
        return redis


class TestLiveProjectionOnCluster(LiveProjectionContract):
    @pytest.fixture
    def client(self, redis_cluster: Any) -> Any:
        return redis_cluster
