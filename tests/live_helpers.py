"""Shared helpers of the live-projection and API tests (tests/integration/test_live_projection.py,
tests/integration/test_api.py).

The ledger runs in-process: ``serve(settings, roles, stop)`` as a task of the test's event loop
(``running_ledger``). The checking side reads Redis with plain commands (HGETALL, SMEMBERS, TTL,
XRANGE) and computes every expected value by hand from the scripted inputs; timestamps and
versions are taken from the event log itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from redis.asyncio.cluster import RedisCluster

from consumers.entries import Entry
from ledger import Exchange, OrderManager, OrderStatus, PositionManager, PositionSide
from ledger.app.service import serve
from ledger.config import Settings, parse_execution
from projections.live import LiveProjection

WEEK_S = 7 * 24 * 3600
PLAIN_DECIMAL = re.compile(r"^-?[0-9]+(\.[0-9]+)?$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

BTC = "BTC-USDT-SWAP"
ETH = "ETH-USDT-SWAP"
SOL = "SOL-USDT-SWAP"

# CONTRACT §6, verbatim.
POSITION_FIELDS = {
    "id", "user_id", "exchange", "symbol", "side", "size", "entry_price", "leverage", "realized_pnl", "fees",
    "status", "stop_loss", "take_profit", "created_at", "updated_at", "version",
}  # fmt: skip
ORDER_FIELDS = {
    "id", "user_id", "exchange", "symbol", "side", "order_type", "quantity", "price", "filled_qty",
    "avg_fill_price", "status", "exchange_order_id", "client_order_id", "position_side", "reduce_only",
    "grid_level", "created_at", "updated_at", "version",
}  # fmt: skip
# What this implementation adds ("and any more you need"); pinned so that a field appearing or
# vanishing is noticed.
POSITION_EXTRA = {"pnl", "gross_pnl", "other_fees", "exit_price", "excess_qty", "metadata", "contract_value"}
ORDER_EXTRA = {"trigger_price", "fill_basis", "position_id", "leverage", "reject_reason", "metadata"}

# Every key the live projection writes (CONTRACT §6 plus its own id -> key lookup and checkpoints).
LIVE_PATTERNS = ("positions:*", "orders:*", "*:active_grid:*", "ledger:live:*", "ledger:{*}:projection")


# --------------------------------------------------------------------------- running the ledger


async def wait_for(
    predicate: Callable[[], Awaitable[Any]], what: str, timeout: float = 10.0, step: float = 0.02
) -> Any:
    """Poll ``predicate`` until it returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(step)


async def blocked(redis: Any, command: str) -> dict[str, Any] | None:
    """A client of the server blocked in ``command`` now (per CLIENT LIST), if any."""
    for found in await redis.client_list():
        if found["cmd"] == command and "b" in found["flags"]:
            return found  # type: ignore[no-any-return]
    return None


async def blocked_in(redis: Any, command: str) -> dict[str, Any]:
    """The client of the server blocked in ``command``, once there is one."""
    found: dict[str, Any] = await wait_for(lambda: blocked(redis, command), f"a client blocked in {command}")
    return found


@dataclass
class Running:
    settings: Settings
    task: asyncio.Task[None]
    stop: asyncio.Event

    def check(self) -> None:
        if self.task.done() and not self.task.cancelled() and self.task.exception() is not None:
            raise AssertionError(f"serve failed: {self.task.exception()!r}")

    async def shutdown(self, grace: float = 0.0) -> None:
        """Set ``stop``; cancel what did not finish within ``grace`` seconds (consumers may sit in a
        1 s blocking read: call ``quiesce`` first so nothing is in flight)."""
        self.stop.set()
        if grace:
            await asyncio.wait({self.task}, timeout=grace)
        if not self.task.done():
            self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@contextlib.asynccontextmanager
async def running_ledger(
    redis_url: str,
    home: Path,
    *,
    roles: tuple[str, ...] = ("handler", "projection", "paper"),
    shards: int = 1,
    database_url: str | None = None,
    execution: str = "paper",
    **overrides: Any,
) -> AsyncIterator[Running]:
    """``serve`` with ``roles`` as a task of this loop; stopped (``stop`` set, then cancelled) on exit."""
    settings = Settings(
        redis_url=redis_url,
        database_url=database_url,
        shards=shards,
        execution=parse_execution(execution),
        home=home,
        **overrides,
    )
    stop = asyncio.Event()
    running = Running(settings, asyncio.create_task(serve(settings, list(roles), stop)), stop)
    try:
        probe = await _client_like(redis_url)
        try:
            await wait_for(lambda: _started(probe, running), "serve to record ledger:meta")
        finally:
            await probe.aclose()
        yield running
        running.check()
    finally:
        await running.shutdown()


async def _client_like(url: str) -> Any:
    from ledger.store.redis_conn import connect

    return await connect(url)


async def _started(probe: Any, running: Running) -> bool:
    running.check()
    return bool(await probe.hget("ledger:meta", "shards"))


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


async def quiesce(redis: Any, shards: int, groups: tuple[str, ...] = ("ledger-paper",), timeout: float = 15.0) -> None:
    """Wait until every shard's commands are handled, its events projected (checkpoint at the last
    entry) and read by ``groups``, and that stays so for a moment."""

    async def observe() -> tuple[Any, ...] | None:
        seen: list[Any] = []
        for shard in range(shards):
            commands, events = f"ledger:{{{shard}}}:commands", f"ledger:{{{shard}}}:events"
            for stream, names in ((commands, ("ledger-handler",)), (events, groups)):
                last = await redis.xrevrange(stream, count=1)
                if not last:
                    continue
                last_id = _text(last[0][0])
                infos = {_text(i["name"]): i for i in await redis.xinfo_groups(stream)}
                for name in names:
                    info = infos.get(name)
                    if info is None or _text(info["last-delivered-id"]) != last_id or int(info["pending"]):
                        return None
                if stream == events:
                    checkpoint = _text(await redis.get(f"ledger:{{{shard}}}:projection"))
                    if checkpoint != last_id:
                        return None
                seen.append(last_id)
        return tuple(seen)

    async def stable() -> bool:
        first = await observe()
        if first is None:
            return False
        await asyncio.sleep(0.15)
        return await observe() == first

    await wait_for(stable, "the ledger to go quiet", timeout=timeout)


# --------------------------------------------------------------------------- reading Redis


async def all_keys(redis: Any, pattern: str) -> list[str]:
    if isinstance(redis, RedisCluster):
        found = await redis.keys(pattern, target_nodes=RedisCluster.PRIMARIES)
    else:
        found = await redis.keys(pattern)
    return sorted({_text(k) for k in found})


async def live_keys(redis: Any) -> list[str]:
    keys: set[str] = set()
    for pattern in LIVE_PATTERNS:
        keys.update(await all_keys(redis, pattern))
    return sorted(keys)


async def dump_key(redis: Any, key: str) -> tuple[str, Any, bool]:
    """(type, contents, has a time-to-live) of one key."""
    kind = _text(await redis.type(key))
    if kind == "hash":
        content: Any = {_text(k): _text(v) for k, v in (await redis.hgetall(key)).items()}
    elif kind == "set":
        content = sorted(_text(m) for m in await redis.smembers(key))
    elif kind == "string":
        content = _text(await redis.get(key))
    elif kind == "list":
        content = [_text(v) for v in await redis.lrange(key, 0, -1)]
    elif kind == "zset":
        content = [(_text(m), s) for m, s in await redis.zrange(key, 0, -1, withscores=True)]
    elif kind == "stream":
        content = [(_text(i), {_text(k): _text(v) for k, v in f.items()}) for i, f in await redis.xrange(key)]
    else:
        raise AssertionError(f"unexpected type {kind} of {key}")
    ttl = await redis.ttl(key)
    return kind, content, ttl >= 0


async def snapshot(redis: Any) -> dict[str, tuple[str, Any, bool]]:
    """Every live key with its type, contents and whether it expires."""
    return {key: await dump_key(redis, key) for key in await live_keys(redis)}


async def projected_afresh(redis: Any) -> dict[str, tuple[str, Any, bool]]:
    """The live keys of shard 0's whole log applied at once by a fresh applier, from nothing."""
    await redis.delete(*await live_keys(redis))
    ((last, _fields),) = await redis.xrevrange("ledger:{0}:events", count=1)
    await LiveProjection(redis, 0).handle([Entry(_text(last), {})])
    return await snapshot(redis)


async def hash_of(redis: Any, key: str) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in (await redis.hgetall(key)).items()}


async def members(redis: Any, key: str) -> set[str]:
    return {_text(m) for m in await redis.smembers(key)}


async def events_of(redis: Any, shard: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(entry id, type, data) of every event of a shard, in log order."""
    return [
        (_text(i), _text(f["type"]), json.loads(_text(f["data"])))
        for i, f in await redis.xrange(f"ledger:{{{shard}}}:events")
    ]


def assert_decimals(fields: dict[str, str], expected: dict[str, Decimal]) -> None:
    """Computed money: a plain decimal string (no exponent) of exactly the expected value."""
    for name, value in expected.items():
        text = fields[name]
        assert PLAIN_DECIMAL.fullmatch(text), f"{name}={text!r} is not a plain decimal string"
        assert Decimal(text) == value, f"{name}: {text} != {value}"


# --------------------------------------------------------------------------- the scripted session


POS_USER = "user123"
GRID_USER = "grid-bot"
GRID_PRICES = {0: "140", 1: "138", 2: "136", 3: "134", 4: "132"}
FEE = Decimal("0.0005")


@dataclass
class Session:
    """Ids of what the scripted session created."""

    btc: str = ""
    eth: str = ""
    sol: str = ""
    orders: dict[str, str] = field(default_factory=dict)  # label -> order id


async def order_status(redis: Any, order_id: str) -> str | None:
    return _text(await redis.hget(f"orders:{order_id}", "status"))


async def wait_order_status(redis: Any, order_id: str, status: OrderStatus, timeout: float = 10.0) -> None:
    async def reached() -> bool:
        return await order_status(redis, order_id) == status.value

    await wait_for(reached, f"order {order_id} to be {status.value}", timeout=timeout)


async def run_session(redis: Any, shards: int) -> Session:
    """Positions on two symbols (one scaled then partly closed, one closed) for ``POS_USER``; a
    five-level buy grid for ``GRID_USER`` whose marks fill two levels, one level re-armed, one
    cancelled. Everything through the API, marks with HSET."""
    pm, om = PositionManager(redis, timeout=15), OrderManager(redis, timeout=15)
    s = Session()
    await redis.hset("marks:okx", mapping={BTC: "45000", ETH: "3000", SOL: "145"})

    btc = await pm.open_position(POS_USER, "okx", BTC, "long", Decimal("0.1"), 10, "44000", "50000", price="45000")
    s.btc = str(btc.id)
    eth = await pm.open_position(POS_USER, Exchange.OKX, ETH, PositionSide.LONG, "2", 5, price="3000")
    s.eth = str(eth.id)
    scaled = await pm.open_position(POS_USER, "okx", BTC, "long", "0.1", 10, price="46000")
    assert scaled.id == s.btc and scaled.size == Decimal("0.2")
    assert await pm.close_position(s.btc, size="0.05", price="47000") is True
    assert await pm.close_position(s.eth, price="3100") is True

    for level, price in GRID_PRICES.items():
        order = await om.create_order(GRID_USER, "okx", SOL, "buy", "limit", "1", price, grid_level=level)
        s.orders[f"grid{level}"] = str(order.id)
    await redis.hset("marks:okx", SOL, "137")  # crosses levels 0 (140) and 1 (138)
    for level in (0, 1):
        await wait_order_status(redis, s.orders[f"grid{level}"], OrderStatus.FILLED)
    rearmed = await om.create_order(GRID_USER, "okx", SOL, "buy", "limit", "1", "135", grid_level=0)
    s.orders["grid0b"] = str(rearmed.id)
    assert await om.cancel_order(s.orders["grid3"]) is True
    await wait_order_status(redis, s.orders["grid3"], OrderStatus.CANCELLED)
    await quiesce(redis, shards)

    (sol,) = await pm.get_positions(GRID_USER, "okx")
    s.sol = str(sol.id)
    # The market orders of the position commands, from the log (in placement order).
    for shard in range(shards):
        placed = [d for _i, t, d in await events_of(redis, shard) if t == "OrderPlaced" and d["user_id"] == POS_USER]
        for label, data in zip(("btc_open", "eth_open", "btc_scale", "btc_partial", "eth_close"), placed, strict=False):
            s.orders[label] = data["stream"]
    return s


async def check_session_keys(redis: Any, s: Session, shards: int) -> None:
    """Every key of CONTRACT §6 after ``run_session``, field by field."""
    events: list[tuple[str, str, dict[str, Any]]] = []
    for shard in range(shards):
        events += await events_of(redis, shard)
    by_stream: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for _id, type_name, data in events:
        by_stream.setdefault(data["stream"], []).append((type_name, data))

    def order_events(order_id: str) -> list[str]:
        return [t for t, _d in by_stream[order_id]]

    def position_times(position_id: str) -> dict[str, str]:
        history = by_stream[position_id]
        return {
            "created_at": str(history[0][1]["created_at"]),
            "updated_at": str(history[-1][1]["updated_at"]),
            "version": str(len(history)),
        }

    def order_times(order_id: str) -> dict[str, str]:
        history = by_stream[order_id]
        assert [d["version"] for _t, d in history] == list(range(1, len(history) + 1))
        return {
            "created_at": str(history[0][1]["ts"]),
            "updated_at": str(history[-1][1]["ts"]),
            "version": str(len(history)),
        }

    # ------------------------------------------------------------------ the set of live keys
    o = s.orders
    grid_prefix = f"okx:user:{GRID_USER}:symbol:{SOL}"
    grid_hashes = f"orders:okx:user:{GRID_USER}:symbol:{SOL}"
    expected_keys = {
        f"positions:{POS_USER}:okx:{BTC}:long",
        f"positions:{GRID_USER}:okx:{SOL}:long",
        f"positions:index:{POS_USER}:okx",
        f"positions:index:{GRID_USER}:okx",
        "positions:active",
        "ledger:live:position-keys",
        f"orders:user:{POS_USER}:okx",
        f"orders:user:{GRID_USER}:okx",
        f"orders:open:okx:{SOL}",
        f"{grid_prefix}:active_grid:0",
        f"{grid_prefix}:active_grid:2",
        f"{grid_prefix}:active_grid:4",
        f"{grid_hashes}:orders",
        f"{grid_hashes}:order_placed_index",
        *(f"orders:{order_id}" for order_id in o.values()),
        *(f"ledger:{{{shard_of_user(user, shards)}}}:projection" for user in (POS_USER, GRID_USER)),
    }
    # The fence of every legacy key ever written (a deleted key keeps its fence: a tombstone).
    fenced = {
        *(f"positions:{POS_USER}:okx:{symbol}:long" for symbol in (BTC, ETH)),
        f"positions:{GRID_USER}:okx:{SOL}:long",
        *(f"positions:index:{user}:okx" for user in (POS_USER, GRID_USER)),
        "positions:active",
        "ledger:live:position-keys",
        *(f"orders:user:{user}:okx" for user in (POS_USER, GRID_USER)),
        *(f"orders:open:okx:{symbol}" for symbol in (BTC, ETH, SOL)),
        *(f"{grid_prefix}:active_grid:{level}" for level in GRID_PRICES),
        f"{grid_hashes}:orders",
        f"{grid_hashes}:order_placed_index",
    }
    expected_keys |= {f"ledger:live:fence:{{{key}}}" for key in fenced}
    assert set(await live_keys(redis)) == expected_keys

    # ------------------------------------------------------------------ positions
    btc = await hash_of(redis, f"positions:{POS_USER}:okx:{BTC}:long")
    assert set(btc) == POSITION_FIELDS | POSITION_EXTRA
    # 0.1 @ 45000 + 0.1 @ 46000 -> 0.2 @ 45500; 0.05 closed @ 47000: gross (47000 - 45500) * 0.05 = 75
    btc_fees = Decimal("0.1") * 45000 * FEE + Decimal("0.1") * 46000 * FEE + Decimal("0.05") * 47000 * FEE
    assert btc_fees == Decimal("5.725")
    assert {k: v for k, v in btc.items() if k not in {"realized_pnl", "pnl", "fees", "gross_pnl", "excess_qty"}} == {
        "id": s.btc,
        "user_id": POS_USER,
        "exchange": "okx",
        "symbol": BTC,
        "side": "long",
        "size": "0.15",
        "entry_price": "45500",
        "leverage": "10",
        "exit_price": "47000",
        "status": "open",
        "stop_loss": "44000",
        "take_profit": "50000",
        "other_fees": "{}",
        "metadata": "{}",
        "contract_value": "",  # linear: none recorded
        **position_times(s.btc),
    }
    assert_decimals(
        btc,
        {
            "fees": btc_fees,
            "gross_pnl": Decimal(75),
            "realized_pnl": Decimal(75) - btc_fees,
            "pnl": Decimal("69.275"),
            "excess_qty": Decimal(0),
        },
    )
    assert btc["version"] == "3"

    sol = await hash_of(redis, f"positions:{GRID_USER}:okx:{SOL}:long")
    assert set(sol) == POSITION_FIELDS | POSITION_EXTRA
    sol_fees = Decimal(140) * FEE + Decimal(138) * FEE
    assert {k: v for k, v in sol.items() if k not in {"realized_pnl", "pnl", "fees", "gross_pnl", "excess_qty"}} == {
        "id": s.sol,
        "user_id": GRID_USER,
        "exchange": "okx",
        "symbol": SOL,
        "side": "long",
        "size": "2",
        "entry_price": "139",
        "leverage": "1",
        "exit_price": "",
        "status": "open",
        "stop_loss": "",
        "take_profit": "",
        "other_fees": "{}",
        "metadata": "{}",
        "contract_value": "",  # linear: none recorded
        **position_times(s.sol),
    }
    assert_decimals(
        sol,
        {
            "fees": sol_fees,
            "gross_pnl": Decimal(0),
            "realized_pnl": -sol_fees,
            "pnl": -sol_fees,
            "excess_qty": Decimal(0),
        },
    )
    assert sol["version"] == "2"

    assert await members(redis, f"positions:index:{POS_USER}:okx") == {s.btc}
    assert await members(redis, f"positions:index:{GRID_USER}:okx") == {s.sol}
    assert await members(redis, "positions:active") == {s.btc, s.sol}
    assert await hash_of(redis, "ledger:live:position-keys") == {
        s.btc: f"positions:{POS_USER}:okx:{BTC}:long",
        s.sol: f"positions:{GRID_USER}:okx:{SOL}:long",
    }
    assert s.eth not in await members(redis, "positions:active")

    # ------------------------------------------------------------------ orders
    def market(
        label: str, user: str, symbol: str, side: str, qty: str, price: str, position: str, *, reduce: bool, lev: str
    ) -> dict[str, str]:
        order_id = o[label]
        return {
            "id": order_id,
            "user_id": user,
            "exchange": "okx",
            "symbol": symbol,
            "side": side,
            "order_type": "market",
            "quantity": qty,
            "price": price,
            "trigger_price": "",
            "filled_qty": qty,
            "avg_fill_price": price,
            "status": "filled",
            "exchange_order_id": "paper-" + order_id.replace("-", "")[:16],
            "client_order_id": "",
            "position_side": "long",
            "position_id": position,
            "reduce_only": "true" if reduce else "false",
            "leverage": lev,
            "grid_level": "",
            "reject_reason": "",
            "metadata": "{}",
            **order_times(order_id),
        }

    def grid(label: str, level: int, price: str, status: str) -> dict[str, str]:
        order_id = o[label]
        filled = status == "filled"
        return {
            "id": order_id,
            "user_id": GRID_USER,
            "exchange": "okx",
            "symbol": SOL,
            "side": "buy",
            "order_type": "limit",
            "quantity": "1",
            "price": price,
            "trigger_price": "",
            "filled_qty": "1" if filled else "0",
            "avg_fill_price": price if filled else "",
            "status": status,
            "exchange_order_id": "paper-" + order_id.replace("-", "")[:16],
            "client_order_id": "",
            "position_side": "",
            "position_id": "",
            "reduce_only": "false",
            "leverage": "",
            "grid_level": str(level),
            "reject_reason": "",
            "metadata": "{}",
            **order_times(order_id),
        }

    expected_orders = {
        "btc_open": market("btc_open", POS_USER, BTC, "buy", "0.1", "45000", s.btc, reduce=False, lev="10"),
        "eth_open": market("eth_open", POS_USER, ETH, "buy", "2", "3000", s.eth, reduce=False, lev="5"),
        "btc_scale": market("btc_scale", POS_USER, BTC, "buy", "0.1", "46000", s.btc, reduce=False, lev="10"),
        "btc_partial": market("btc_partial", POS_USER, BTC, "sell", "0.05", "47000", s.btc, reduce=True, lev=""),
        "eth_close": market("eth_close", POS_USER, ETH, "sell", "2", "3100", s.eth, reduce=True, lev=""),
        "grid0": grid("grid0", 0, "140", "filled"),
        "grid1": grid("grid1", 1, "138", "filled"),
        "grid2": grid("grid2", 2, "136", "open"),
        "grid3": grid("grid3", 3, "134", "cancelled"),
        "grid4": grid("grid4", 4, "132", "open"),
        "grid0b": grid("grid0b", 0, "135", "open"),
    }
    assert set(expected_orders) == set(o)
    for label, expected in expected_orders.items():
        actual = await hash_of(redis, f"orders:{o[label]}")
        assert set(actual) == ORDER_FIELDS | ORDER_EXTRA, label
        fill_basis = actual.pop("fill_basis")
        expected_basis = Decimal(expected["filled_qty"]) * Decimal(expected["price"] or 0)
        assert Decimal(fill_basis) == expected_basis and PLAIN_DECIMAL.fullmatch(fill_basis), (label, fill_basis)
        assert actual == expected, label
        ttl = await redis.ttl(f"orders:{o[label]}")
        if expected["status"] in {"filled", "cancelled"}:
            assert WEEK_S - 300 < ttl <= WEEK_S, (label, ttl)
        else:
            assert ttl == -1, (label, ttl)
    assert order_events(o["grid3"]) == ["OrderPlaced", "OrderAccepted", "OrderCancelRequested", "OrderCancelled"]
    assert order_events(o["grid0"]) == ["OrderPlaced", "OrderAccepted", "OrderFilled"]

    pos_orders = {o[k] for k in ("btc_open", "eth_open", "btc_scale", "btc_partial", "eth_close")}
    assert await members(redis, f"orders:user:{POS_USER}:okx") == pos_orders
    assert await members(redis, f"orders:user:{GRID_USER}:okx") == {o[f"grid{n}"] for n in range(5)} | {o["grid0b"]}
    assert await members(redis, f"orders:open:okx:{SOL}") == {o["grid2"], o["grid4"], o["grid0b"]}
    for symbol in (BTC, ETH):
        assert not await redis.exists(f"orders:open:okx:{symbol}")

    # ------------------------------------------------------------------ GRID compatibility keys
    assert await hash_of(redis, f"{grid_prefix}:active_grid:0") == await hash_of(redis, f"orders:{o['grid0b']}")
    assert await hash_of(redis, f"{grid_prefix}:active_grid:2") == await hash_of(redis, f"orders:{o['grid2']}")
    assert await hash_of(redis, f"{grid_prefix}:active_grid:4") == await hash_of(redis, f"orders:{o['grid4']}")
    for level in (1, 3):
        assert not await redis.exists(f"{grid_prefix}:active_grid:{level}")
    assert await hash_of(redis, f"{grid_hashes}:orders") == {"0": "135", "2": "136", "4": "132"}
    assert await hash_of(redis, f"{grid_hashes}:order_placed_index") == {
        "0": "1",
        "1": "0",
        "2": "1",
        "3": "0",
        "4": "1",
    }
    for key in (f"{grid_hashes}:orders", f"{grid_hashes}:order_placed_index", f"{grid_prefix}:active_grid:0"):
        assert await redis.ttl(key) == -1


def shard_of_user(user_id: str, shards: int) -> int:
    import zlib

    return zlib.crc32(user_id.encode()) % shards
