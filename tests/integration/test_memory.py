"""Issue 10, memory per order lifecycle: what the ledger keeps in Redis per order, exactly.

The snapshots of the append step hold only the fields that differ from the state's defaults (a
left-out field decodes to its default), and the live projection schedules what it forgets of a
final order or a closed position as one short member of ``expiring`` (``projections.live.Expiry``),
while members written as JSON before are still carried out; a final order's hash stays for
``LEDGER_FINAL_ORDER_TTL_S``. Real Redis and Redis Cluster, events from the real command handler.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from consumers.entries import Entry
from ledger.config import ConfigError, Settings
from ledger.domain.enums import OrderStatus, PositionStatus
from ledger.domain.state import OrderState, PositionState
from ledger.domain.values import now_ms
from ledger.store.eventstore import ORDER_SNAPSHOT, EventStore
from ledger.store.keys import fence
from ledger.store.redis_conn import text
from projections.live import FENCE_KEEP_S, Expiry, LiveProjection, projection_role
from tests.faults.test_fencing import KEYS, SYMBOL, USER, Ledger
from tests.live_helpers import members, wait_for

EXPIRING = KEYS.expiring


@pytest.mark.parametrize("kind", ["plain", "cluster"])
async def test_a_snapshot_holds_what_differs_from_the_defaults_and_reads_back_whole(
    kind: str, redis: Any, redis_cluster: Any
) -> None:
    client = redis if kind == "plain" else redis_cluster
    ledger = Ledger(client)
    placed = await ledger.send(
        "place_order", exchange="okx", symbol=SYMBOL, side="buy", order_type="limit", quantity="0.10", price="40000"
    )
    order_id = placed["order_id"]
    raw = text(await client.hget(KEYS.orders, order_id)) or ""
    stored = json.loads(raw)
    ts = stored["created_at"]
    # pending, no options, nothing filled: every other field is at its default and left out
    assert stored == {
        "id": order_id,
        "user_id": USER,
        "exchange": "okx",
        "symbol": SYMBOL,
        "side": "buy",
        "order_type": "limit",
        "quantity": "0.10",
        "price": "40000",
        "created_at": ts,
        "updated_at": ts,
        "version": 1,
    }
    order = await EventStore(client, 0).order(order_id)
    assert order == OrderState(
        id=order_id,
        user_id=USER,
        exchange="okx",  # type: ignore[arg-type]
        symbol=SYMBOL,
        side="buy",  # type: ignore[arg-type]
        order_type="limit",  # type: ignore[arg-type]
        quantity=Decimal("0.10"),
        price=Decimal("40000"),
        created_at=ts,
        updated_at=ts,
        version=1,
    )
    assert order is not None and order.status is OrderStatus.PENDING and order.metadata == {}
    assert ORDER_SNAPSHOT.encode(order) == raw.encode()
    assert len(raw) < len(msgspec.json.encode(order)) / 2  # 580 bytes with every default written

    opened = await ledger.open_long("0.5", "40000", "0.1", "t-1")
    position = json.loads(text(await client.hget(KEYS.positions, opened["position_id"])) or "")
    assert "status" not in position and "stop_loss" not in position and "other_fees" not in position
    decoded = await EventStore(client, 0).position(opened["position_id"])
    assert decoded is not None and decoded.status is PositionStatus.OPEN and decoded.size == Decimal("0.5")
    assert decoded == msgspec.json.decode(msgspec.json.encode(decoded), type=PositionState)


@pytest.mark.parametrize("kind", ["plain", "cluster"])
async def test_expiring_members_are_short_and_carried_out_old_json_ones_too(
    kind: str, redis: Any, redis_cluster: Any
) -> None:
    client = redis if kind == "plain" else redis_cluster
    ledger = Ledger(client)
    opened = await ledger.open_long("0.5", "40000", "0.1", "t-1")
    position_id = opened["position_id"]
    closed = await ledger.send("close_position", position_id=position_id)
    await ledger.send("record_fill", order_id=closed["order_id"], fill_id="t-2", quantity="0.5", price="41000")
    projection = LiveProjection(client, 0, final_order_ttl_s=1, fence_keep_s=1)
    await projection.handle([Entry(await ledger.last_entry(), {})])

    scheduled = {text(m) for m in await client.zrange(EXPIRING, 0, -1)}
    assert scheduled == {
        f"o {opened['order_id']} {USER} okx {SYMBOL}",
        f"o {closed['order_id']} {USER} okx {SYMBOL}",
        f"p {position_id} {USER} okx",
    }
    assert Expiry.decode(f"p {position_id} {USER} okx").forget == [
        (f"positions:index:{USER}:okx", position_id),
        ("positions:active", position_id),
        ("ledger:live:position-keys", position_id),
    ]
    # A member scheduled as JSON before (here: due at once) is done as it is written.
    old_key = "orders:user:old-user:okx"
    legacy = {"gone": None, "remove": [[old_key, "x"]], "forget": [[old_key, "x"]]}
    await client.sadd(old_key, "x", "y")
    await client.hset(fence(old_key), mapping={"x": "1-0", "y": "1-0"})
    await client.zadd(EXPIRING, {json.dumps(legacy): 1})
    position_fences = [fence(key) for key, _member in Expiry.decode(f"p {position_id} {USER} okx").forget]
    for key in position_fences:
        assert position_id in {text(f) for f in await client.hkeys(key)}

    async def swept() -> bool:
        await projection.sweep()
        return await client.zcard(EXPIRING) == 0

    await wait_for(swept, "every scheduled member to be carried out", timeout=5)
    assert await members(client, old_key) == {"y"}
    assert {text(f) for f in await client.hkeys(fence(old_key))} == {"y"}
    for key in position_fences:
        assert position_id not in {text(f) for f in await client.hkeys(key)}
    assert await members(client, f"orders:user:{USER}:okx") == set()
    for order_id in (opened["order_id"], closed["order_id"]):
        assert await client.exists(f"orders:{order_id}") == 0


def test_an_expiring_member_that_is_no_expiry_is_refused_with_what_to_do() -> None:
    with pytest.raises(Exception, match=r"'q 1 2' in the expiring set is no scheduled expiry: remove it by hand"):
        Expiry.decode("q 1 2")
    with pytest.raises(Exception, match="user_id"):
        Expiry.decode("p 6f1c2f0e-8a55-4c57-9d0e-0a2b7d1c9e11 bad:user okx")


async def test_serve_keeps_final_order_hashes_for_ledger_final_order_ttl_s(redis: Any) -> None:
    settings = Settings.from_env({"LEDGER_FINAL_ORDER_TTL_S": "60"})
    assert settings.final_order_ttl_s == 60 and Settings().final_order_ttl_s == 7 * 24 * 3600
    ledger = Ledger(redis)
    limit = {"exchange": "okx", "symbol": SYMBOL, "side": "buy", "order_type": "limit", "quantity": "1"}
    cancelled = (await ledger.send("place_order", price="40000", **limit))["order_id"]
    await ledger.send("cancel_order", order_id=cancelled)
    await ledger.send("order_cancelled", order_id=cancelled)
    (consumer,) = await projection_role(redis, settings)
    await consumer.burst()
    assert 59_000 < await redis.pttl(f"orders:{cancelled}") <= 60_000
    # Its id and the fence fields (tombstones) of its set members go later: never before an hour.
    ((member, due),) = await redis.zrange(EXPIRING, 0, -1, withscores=True)
    assert member == f"o {cancelled} {USER} okx {SYMBOL}"
    assert FENCE_KEEP_S == 3600 and 3_599_000 < due - now_ms() <= 3_600_000


def test_ledger_final_order_ttl_s_is_a_whole_number_of_seconds() -> None:
    with pytest.raises(ConfigError, match=r"\ALEDGER_FINAL_ORDER_TTL_S: must be a whole number ≥ 1 \(got '0'\)\Z"):
        Settings.from_env({"LEDGER_FINAL_ORDER_TTL_S": "0"})


def test_a_snapshot_leaves_out_only_what_reads_back_exactly() -> None:
    """A value equal to its default but spelled otherwise (0.00 against 0) is kept, so every
    state reads back with the very decimals it had."""
    order = OrderState(
        id="6f1c2f0e-8a55-4c57-9d0e-0a2b7d1c9e11",
        user_id=USER,
        exchange="okx",  # type: ignore[arg-type]
        symbol=SYMBOL,
        side="sell",  # type: ignore[arg-type]
        order_type="market",  # type: ignore[arg-type]
        quantity=Decimal("2"),
        filled_qty=Decimal("0.00"),
        fill_basis=Decimal("0"),
        reduce_only=True,
        metadata={"k": None},
        fill_ids=[],
        version=0,
    )
    raw = ORDER_SNAPSHOT.encode(order)
    assert json.loads(raw) == {
        "id": order.id,
        "user_id": USER,
        "exchange": "okx",
        "symbol": SYMBOL,
        "side": "sell",
        "order_type": "market",
        "quantity": "2",
        "reduce_only": True,
        "metadata": {"k": None},
        "filled_qty": "0.00",
    }
    decoded = msgspec.json.decode(raw, type=OrderState)
    assert decoded == order and str(decoded.filled_qty) == "0.00" and str(decoded.fill_basis) == "0"
