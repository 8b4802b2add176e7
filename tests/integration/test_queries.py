"""Issue 7, defect 11: the read paths (ledger/client/queries.py, the mark rule) never write and never
crash on a value someone else wrote into Redis.

The live keys are written by the real handler and live projection (``serve`` in-process, external
execution, fills published as a strategy would); what other programs may write (marks, legacy
hashes, foreign ids) is written with plain HSET/SADD.
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import structlog

from ledger import OrderManager, OrderStatus, PositionManager
from ledger.client import queries
from ledger.client.models import parse_mark, read_mark
from tests.integration.test_paper import Rig
from tests.live_helpers import BTC, ETH, hash_of, members, quiesce, running_ledger, wait_for, wait_order_status

USER = "user123"
ALIEN = "00000000-0000-4000-8000-000000000000"


def warnings_of(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k != "log_level"} for e in logs if e["log_level"] == "warning"]


def fill(order_id: str, fill_id: str, quantity: str, price: str) -> dict[str, str]:
    data = {"command_id": f"cmd-{fill_id}", "user_id": USER, "order_id": order_id, "fill_id": fill_id}
    return {"type": "record_fill", "data": json.dumps({**data, "quantity": quantity, "price": price})}


async def open_long(redis: Any, symbol: str, size: str, price: str) -> str:
    """Open a long through the API, the strategy reporting the entry fill; return its id."""
    orders = OrderManager(redis)
    task = asyncio.create_task(PositionManager(redis).open_position(USER, "okx", symbol, "long", size, 1, price=price))

    async def entry() -> list[str]:
        return [str(o.id) for o in await orders.get_orders(USER, "okx") if o.symbol == symbol]

    (order_id,) = await wait_for(entry, f"the entry order of {symbol}")
    await redis.xadd("ledger:{0}:commands", fill(order_id, f"f-{order_id}", size, price))
    return str((await asyncio.wait_for(task, 10)).id)


async def writes_since_save(redis: Any) -> int:
    return int((await redis.info("persistence"))["rdb_changes_since_last_save"])


# --------------------------------------------------------------------------- the mark rule


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("45000", Decimal(45000)),
        (b"45000.5", Decimal("45000.5")),
        ("0.000000000000000001", Decimal("0.000000000000000001")),
        ("99999999999999999999", Decimal("99999999999999999999")),
        (None, None),
    ],
)
def test_a_valid_or_absent_mark_is_read_without_a_warning(raw: Any, expected: Decimal | None) -> None:
    with structlog.testing.capture_logs() as logs:
        assert read_mark(raw, "okx", BTC) == expected
    assert logs == []


@pytest.mark.parametrize(
    ("raw", "value", "error"),
    [
        ("NaN", "NaN", "decimal string"),
        ("abc", "abc", "decimal string"),
        ("1e5", "1e5", "decimal string"),
        ("Infinity", "Infinity", "decimal string"),
        (" 45000", " 45000", "decimal string"),
        ("45000\n", "45000\n", "decimal string"),
        ("0", "0", "greater than zero"),
        ("-1", "-1", "greater than zero"),
        ("100000000000000000000", "100000000000000000000", "decimal string"),
        ("0.0000000000000000001", "0.0000000000000000001", "decimal string"),
        (b"\xff", "\udcff", "decimal string"),
    ],
)
def test_an_invalid_mark_is_ignored_with_a_warning_naming_exchange_symbol_and_value(
    raw: Any, value: str, error: str
) -> None:
    with structlog.testing.capture_logs() as logs:
        assert read_mark(raw, "okx", BTC) is None
    (warning,) = warnings_of(logs)
    assert {k: warning[k] for k in ("event", "exchange", "symbol", "value")} == {
        "event": "invalid mark ignored",
        "exchange": "okx",
        "symbol": BTC,
        "value": value,
    }
    assert error in warning["error"]


def test_parse_mark_is_the_wire_rule_for_callers_too() -> None:
    assert parse_mark("45000") == parse_mark(Decimal("45000")) == parse_mark(45000) == Decimal(45000)
    assert parse_mark(Decimal("1E+5")) == Decimal(100000)  # a Decimal's value, not an exponent string
    for bad in ("1e5", "NaN", "abc", "0"):
        with pytest.raises(ValueError, match=r"^mark: must be"):
            parse_mark(bad)
    with pytest.raises(ValueError, match="never a float"):
        parse_mark(45000.0)  # type: ignore[arg-type]


async def test_queries_and_the_paper_venue_read_marks_by_the_one_rule(redis: Any) -> None:
    await redis.hset("marks:okx", mapping={BTC: "NaN", ETH: "1e5", "SOL-USDT-SWAP": "145.5"})
    with structlog.testing.capture_logs() as logs:
        found = await queries.marks(redis, "okx", [BTC, ETH, "SOL-USDT-SWAP", "XRP-USDT-SWAP"])
    assert found == {"SOL-USDT-SWAP": Decimal("145.5")}
    assert [(w["symbol"], w["value"]) for w in warnings_of(logs)] == [(BTC, "NaN"), (ETH, "1e5")]

    # The paper venue: no valid mark, so a market order without a price is rejected and a
    # resting limit order is left resting (1e5 is not read as 100000).
    rig = Rig(redis)
    with structlog.testing.capture_logs() as logs:
        market = await rig.place(symbol=ETH, side="buy", order_type="market", quantity="0.1")
        resting = await rig.place(symbol=ETH, side="buy", order_type="limit", quantity="0.1", price="100001")
        await rig.mark("1e5", symbol=ETH)
    assert await rig.status(market) is OrderStatus.REJECTED
    (rejected,) = await rig.events("OrderRejected", market)
    assert rejected.reason == f"no price and no mark for {ETH}"
    assert await rig.status(resting) is OrderStatus.OPEN
    marks_warned = {
        (w["exchange"], w["symbol"], w["value"]) for w in warnings_of(logs) if w["event"] == "invalid mark ignored"
    }
    assert marks_warned == {("okx", ETH, "1e5")}


# --------------------------------------------------------------------------- reads never write


async def test_reading_orders_never_writes_an_expired_id_stays_in_the_user_set(
    redis: Any, redis_url: str, tmp_path: Path
) -> None:
    async with running_ledger(redis_url, tmp_path, roles=("handler", "projection"), execution="external"):
        orders = OrderManager(redis)
        kept = await orders.create_order(USER, "okx", BTC, "buy", "limit", "1", "40000")
        gone = await orders.create_order(USER, "okx", BTC, "buy", "limit", "2", "39000")
        await quiesce(redis, 1, groups=())
    # The final order's hash expired (or, on a cluster, is not written yet): reads skip the id
    # and leave the set as the projection wrote it.
    await redis.delete(f"orders:{gone.id}")
    before = await writes_since_save(redis)
    assert [o.id for o in await orders.get_orders(USER, "okx")] == [kept.id]
    assert [h["id"] for h in await queries.order_hashes(redis, USER)] == [kept.id]
    assert await orders.get_order(str(gone.id)) is None
    assert await members(redis, f"orders:user:{USER}:okx") == {kept.id, gone.id}
    assert await writes_since_save(redis) == before


# --------------------------------------------------------------------------- what other programs write


async def test_hashes_and_ids_written_by_another_program_are_skipped_with_a_warning(
    redis: Any, redis_url: str, tmp_path: Path
) -> None:
    async with running_ledger(redis_url, tmp_path, roles=("handler", "projection"), execution="external"):
        btc = await open_long(redis, BTC, "1", "100")
        eth = await open_long(redis, ETH, "2", "50")
        order = await OrderManager(redis).create_order(USER, "okx", BTC, "buy", "limit", "1", "90")
        await wait_order_status(redis, str(order.id), OrderStatus.PENDING)
        await quiesce(redis, 1, groups=())

    # A legacy writer's short hash, a ledger order hash broken by hand, a legacy order id.
    legacy_short = f"positions:{USER}:okx:{BTC}:short"
    await redis.hset(legacy_short, mapping={"size": "1", "side": "short", "status": "open"})
    broken, *entries = await OrderManager(redis).get_orders(USER, "okx")
    assert broken.id == order.id
    await redis.hset(f"orders:{broken.id}", "version", "x")
    await redis.sadd(f"orders:user:{USER}:okx", "legacy-7")
    positions = PositionManager(redis)
    before = await writes_since_save(redis)
    with structlog.testing.capture_logs() as logs:
        assert [p.id for p in await positions.get_positions(USER, "okx", BTC)] == [btc]
        assert [p.id for p in await positions.get_positions(USER, "okx")] == [btc, eth]
        assert await OrderManager(redis).get_orders(USER, "okx") == entries
        assert await OrderManager(redis).get_order(str(broken.id)) is None
    assert await writes_since_save(redis) == before
    warned = [(w["event"], w.get("key"), w.get("ids")) for w in warnings_of(logs)]
    assert warned == [
        ("live hash is not a ledger hash, skipped", legacy_short, None),
        ("order ids that are not ledger ids, skipped", None, ["legacy-7"]),
        ("live hash is not a ledger hash, skipped", f"orders:{broken.id}", None),
        ("live hash is not a ledger hash, skipped", f"orders:{broken.id}", None),
    ]
    assert warnings_of(logs)[0]["error"] == "KeyError: 'id'"

    # An id whose key now holds another position (the side's next one): not that position.
    await redis.hset("ledger:live:position-keys", ALIEN, f"positions:{USER}:okx:{ETH}:long")
    await redis.sadd("positions:active", ALIEN)
    assert await positions.get_position(ALIEN) is None
    assert [h["id"] for h in await queries.position_hashes(redis)] == [btc, eth]
    # Ids in either case (the ledger lower-cases them).
    found = await positions.get_position(eth.upper())
    assert found is not None and found.id == eth
    assert (await hash_of(redis, f"positions:{USER}:okx:{ETH}:long"))["id"] == eth


def test_a_poller_is_warned_once_per_bad_value_of_a_market() -> None:
    warned: dict[tuple[str, str], str] = {}
    with structlog.testing.capture_logs() as logs:
        for raw in ("NaN", "NaN", "NaN", "abc", "abc", "45000", "NaN"):
            read_mark(raw, "okx", BTC, warned)
    assert [w["value"] for w in warnings_of(logs)] == ["NaN", "abc", "NaN"]
